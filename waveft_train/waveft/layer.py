"""WaveFT tuner layers, compatible with peft's `WaveFTLayer` state-dict keys and semantics.

Differences from peft's reference, all deliberate:
- ΔW comes from `SparseIDWT` (its patch entries, or a scatter + one strided 1-D transposed conv) instead of a dense
  padded IDWT, and training runs through `functional.waveft_linear`: one matmul on W + ΔW (or, for few tokens, a
  factorized product) with a custom backward whose spectrum gradient is a sampled product, near the frozen cost.
- Every PyWavelets family in WaveFT's documented range works (the reference crashes on db11+, sym11+, coif6+).
- Coefficient locations and the transform's index tensors are non-persistent buffers: they move with the module
  and are never re-copied per call.
- The spectrum is created in the base layer's floating dtype, as peft creates adapter weights; peft's
  `autocast_adapter_dtype=True` (the default of get_peft_model, PeftModel.from_pretrained, add_adapter and
  load_adapter) then upcasts fp16/bf16 spectra to float32, and `False` leaves them in the base dtype.
- The output's dtype is the base layer's: the autocast dtype under autocast (peft's reference returns the input's,
  so with it an adapter at zero turns the blocks' residual stream float32), else the input's.
- `bias="waveft_only"` is peft's generic `<method>_only`: it trains the existing biases of the adapted layers
  (saved as `<module>.base_layer.bias`); the layer itself adds no bias.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .families import check_family
from .functional import waveft_linear
from .transform import SparseIDWT, coefficient_locations

try:  # transformers' GPT-2 style Conv1D stores weights as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()


class WaveFTLayer(BaseTunerLayer):
    adapter_layer_names = ("waveft_spectrum",)
    other_param_names = (
        "waveft_n_frequency",
        "waveft_scaling",
        "waveft_random_loc_seed",
        "waveft_wavelet_family",
        "waveft_use_idwt",
        "waveft_indices",
        "waveft_transform",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.waveft_spectrum = nn.ParameterDict({})
        self.waveft_n_frequency: dict[str, int] = {}
        self.waveft_scaling: dict[str, float] = {}
        self.waveft_random_loc_seed: dict[str, int] = {}
        self.waveft_wavelet_family: dict[str, str] = {}
        self.waveft_use_idwt: dict[str, bool] = {}
        self.waveft_indices = BufferDict({}, persistent=False)
        self.waveft_transform = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            shape = base.weight.ds_shape if hasattr(base.weight, "ds_shape") else base.weight.shape
            self.in_features, self.out_features = shape
        else:
            raise TypeError(f"WaveFT can only adapt torch.nn.Linear layers, not {type(base).__name__}.")

    def update_layer(self, adapter_name: str, n_frequency: int, config) -> None:
        check_family(config.wavelet_family)
        size = self.out_features * self.in_features
        if not 0 < n_frequency <= size:
            raise ValueError(
                f"n_frequency must be between 1 and d_out*d_in = {self.out_features}*{self.in_features} = {size} "
                f"for this layer, got {n_frequency}."
            )
        device = self.get_base_layer().weight.device
        locations = coefficient_locations(self.out_features, self.in_features, n_frequency, config.random_loc_seed)
        self.waveft_n_frequency[adapter_name] = n_frequency
        self.waveft_scaling[adapter_name] = float(config.scaling)
        self.waveft_random_loc_seed[adapter_name] = config.random_loc_seed
        self.waveft_wavelet_family[adapter_name] = config.wavelet_family
        self.waveft_use_idwt[adapter_name] = config.use_idwt
        self.waveft_indices[adapter_name] = locations.to(device)
        self.waveft_transform[adapter_name] = SparseIDWT(
            self.out_features, self.in_features, locations, config.wavelet_family, config.use_idwt
        ).to(device)
        # Drawn in float32 (the same values whatever the base dtype), then stored in the base layer's dtype as peft's
        # `_move_adapter_to_device_of_base_layer` stores adapter weights: `autocast_adapter_dtype` decides later.
        # Only the spectrum is cast: the transform's float filter buffers stay float32.
        if config.init_weights:
            spectrum = torch.zeros(n_frequency, device=device)
        else:
            spectrum = torch.randn(n_frequency, device=device) * 0.01
        self.waveft_spectrum[adapter_name] = nn.Parameter(spectrum.to(self._adapter_dtype()))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _adapter_dtype(self) -> torch.dtype:
        """The base weight's dtype when it is a float type (not e.g. a quantized integer one), else float32."""
        dtype = self.get_base_layer().weight.dtype
        return dtype if dtype.is_floating_point else torch.float32

    @torch.no_grad()
    def reset_wave_parameters(self, adapter_name: str) -> None:
        if adapter_name in self.waveft_spectrum:
            nn.init.zeros_(self.waveft_spectrum[adapter_name])

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW of one adapter as (d_out, d_in), float32 (or the spectrum's dtype), scaling applied."""
        spectrum = self.waveft_spectrum[adapter]
        return self.waveft_transform[adapter](spectrum) * self.waveft_scaling[adapter]


class WaveFTLinear(nn.Module, WaveFTLayer):
    """A Linear (or Conv1D) layer with WaveFT adapters."""

    def __init__(self, base_layer, adapter_name: str, config, n_frequency: int, **kwargs) -> None:
        super().__init__()
        WaveFTLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, n_frequency, config=config)

    def _weight_delta(self, adapter: str) -> torch.Tensor:
        delta = self.get_delta_weight(adapter)
        return delta.T if self.fan_in_fan_out else delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.waveft_spectrum:
                continue
            with torch.no_grad():
                weight = base.weight.data.float() + self._weight_delta(name).float()
                if safe_merge and not torch.isfinite(weight).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                base.weight.data = weight.to(base.weight.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.waveft_spectrum:
                continue
            with torch.no_grad():
                weight = base.weight.data.float() - self._weight_delta(name).float()
                base.weight.data = weight.to(base.weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.waveft_spectrum]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)

        base = self.get_base_layer()
        weight = base.weight.T if self.fan_in_fan_out else base.weight
        adapters = [(self.waveft_spectrum[name], self.waveft_transform[name], self.waveft_scaling[name]) for name in active]
        return waveft_linear(x, weight, base.bias, adapters)

    def __repr__(self) -> str:
        return "waveft." + super().__repr__()
