"""The WaveFT weight adapter for ComfyUI's LoRA loader (`comfy.weight_adapter`): the stock "Load LoRA" nodes try every
class in `comfy.weight_adapter.adapters` on each layer's key prefix, so adding this one to the list is all it takes.
"""

from __future__ import annotations

import torch
from comfy.weight_adapter.base import WeightAdapterBase

from .waveft_format import WaveFTLayerRecord, delta_weight, read_layer


class WaveFTAdapter(WeightAdapterBase):
    name = "waveft"

    def __init__(self, loaded_keys: set[str], weights: tuple):
        self.loaded_keys = loaded_keys
        self.weights = weights  # (spectrum, locations, filters or None, scaling): what ComfyUI may move between devices
        self._bypass_delta: torch.Tensor | None = None

    @classmethod
    def load(cls, x: str, lora: dict[str, torch.Tensor], alpha=None, dora_scale=None, loaded_keys=None):
        """The layer under prefix `x`, or None when the file has no WaveFT layer there (a newer format raises)."""
        loaded_keys = set() if loaded_keys is None else loaded_keys
        record = read_layer(lora, x)
        if record is None:
            return None
        loaded_keys.update(record.keys)
        return cls(loaded_keys, (record.spectrum, record.locations, record.filters, record.scaling))

    def _record(self) -> WaveFTLayerRecord:
        spectrum, locations, filters, scaling = self.weights
        return WaveFTLayerRecord(spectrum, locations, filters, float(scaling), ())

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        """weight + strength·ΔW, in place (ComfyUI passes a narrowed view when the layer is part of a fused weight)."""
        if weight.dim() != 2:
            raise ValueError(f"WaveFT adapts linear layers; {key} has a {tuple(weight.shape)} weight.")
        delta = delta_weight(self._record(), tuple(weight.shape), dtype=intermediate_dtype, device=weight.device)
        weight += function((strength * delta).type(weight.dtype))
        return weight

    def h(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The update's output for the bypass loaders (newer ComfyUI): x·ΔWᵀ, times the adapter's multiplier."""
        if self._bypass_delta is None or self._bypass_delta.device != x.device:
            shape = (base_out.shape[-1], x.shape[-1])
            self._bypass_delta = delta_weight(self._record(), shape, device=x.device)
        return torch.nn.functional.linear(x, self._bypass_delta.to(x.dtype)) * getattr(self, "multiplier", 1.0)
