"""Peak tensor memory without allocating it: live storage bytes counted at the dispatcher, on fake tensors.

A 1024 px SDXL training step in bf16 would need ~7 GB of real memory and many minutes of this CPU per measurement.
Under torch's FakeTensorMode every operator runs on shapes and dtypes only, and `LiveBytes` (a TorchDispatchMode
above it) adds up the bytes of every tensor storage while it is alive: the peak is what
`torch.cuda.max_memory_allocated` reports on a GPU, without the caching allocator's reserve or fragmentation
(each storage is rounded up to the allocator's 512-byte blocks). The same counter on real tensors measures a real
run, which is how `benchmarks.memory --validate` checks the fake figures (and RSS checks the counter).

A GPU cannot run backward on fake `cuda` tensors without a CUDA device (the autograd engine asks the driver), so the
fake runs use the CPU device and `cuda_like_kernels()` makes the two choices where a CPU run would allocate
differently from a CUDA one: autocast's fp32 list (CUDA runs group_norm and layer_norm in float32, CPU in bf16) and
the WaveFT spectrum gradient's CPU-only kernel and token chunks. Attention needs nothing: scaled_dot_product_attention
takes a flash kernel on both (no tokens × tokens matrix; output and log-sum-exp saved).
"""

from __future__ import annotations

import functools
import itertools
import weakref
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

ALLOCATOR_BLOCK = 512  # bytes: the CUDA caching allocator's smallest block; every allocation is rounded up to it


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages (`current`) and their maximum (`peak`).

    Every tensor an operator returns is registered the first time its storage is seen, and forgotten when the
    storage is freed (a weakref finalizer), so views, in-place results and autograd's saved tensors count once and
    exactly as long as they live. Tensors made before the mode was entered are added with `track`.
    """

    def __init__(self, block: int = ALLOCATOR_BLOCK):
        super().__init__()
        self.block = block
        self.current = 0
        self.peak = 0
        self.peak_op = None  # the operator whose result set the peak
        self._tokens = WeakIdKeyDictionary()  # storage -> token
        self._sizes: dict[int, int] = {}  # token -> counted bytes
        self._next = itertools.count()

    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.block) * self.block if self.block > 1 else nbytes

    def track(self, *tensors) -> None:
        """Count these tensors' storages (if not yet counted), or their new size after an in-place resize."""
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
                continue
            storage = tensor.untyped_storage()
            size = self._rounded(int(storage.nbytes()))
            token = self._tokens.get(storage)
            if token is None:
                token = next(self._next)
                self._tokens[storage] = token
                self._sizes[token] = size
                self.current += size
                weakref.finalize(storage, self._free, token)
            elif self._sizes[token] != size:
                self.current += size - self._sizes[token]
                self._sizes[token] = size
        self.peak = max(self.peak, self.current)

    def _free(self, token: int) -> None:
        self.current -= self._sizes.pop(token)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        peak = self.peak
        self.track(*tree_flatten(out)[0])
        if self.peak > peak:
            self.peak_op = str(func)
        return out


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and peft's reference WaveFT index tensors (kept in a plain dict) of a module tree."""
    tensors = list(module.parameters()) + list(module.buffers())
    for submodule in module.modules():
        indices = getattr(submodule, "waveft_indices", None)
        if isinstance(indices, dict):
            tensors += [t for t in indices.values() if isinstance(t, torch.Tensor)]
    return tensors


def fake_weights(module: nn.Module, weight_dtype: torch.dtype, device: str = "cpu") -> None:
    """Replace every tensor of a meta-device module tree by an empty tensor made in the current (fake) mode.

    Frozen floating-point parameters get `weight_dtype`; trainable ones float32 (as the trainer casts them);
    buffers keep their dtype. Values do not matter: nothing a training step runs depends on them.
    """

    def empty(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(tensor.shape, dtype=dtype, device=device)

    for submodule in module.modules():
        for name, parameter in list(submodule._parameters.items()):
            if parameter is not None:
                dtype = torch.float32 if parameter.requires_grad else weight_dtype
                dtype = dtype if parameter.is_floating_point() else parameter.dtype
                submodule._parameters[name] = nn.Parameter(empty(parameter, dtype), requires_grad=parameter.requires_grad)
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None:
                submodule._buffers[name] = empty(buffer, buffer.dtype)
        indices = getattr(submodule, "waveft_indices", None)
        if isinstance(indices, dict):  # peft's reference layer: not buffers, copied to the device per call
            for key, value in list(indices.items()):
                if isinstance(value, torch.Tensor):
                    indices[key] = empty(value, value.dtype)


def _float32_under_autocast(function, device_type: str = "cpu"):
    """`function` run in float32 when autocast is on, as CUDA autocast does for the ops on its fp32 list."""

    @functools.wraps(function)
    def wrapper(input, *args, **kwargs):
        if not torch.is_autocast_enabled(device_type):
            return function(input, *args, **kwargs)
        args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
        with torch.autocast(device_type, enabled=False):
            return function(input.float(), *args, **kwargs)

    return wrapper


@contextmanager
def cuda_like_kernels(device_type: str = "cpu"):
    """On the CPU, allocate what a CUDA run allocates where the two would differ (see the module docstring)."""
    import torch.nn.functional as F

    from waveft_train.waveft import functional

    saved = (F.group_norm, F.layer_norm, functional.sampled_products, functional._token_chunk)
    F.group_norm = _float32_under_autocast(F.group_norm, device_type)
    F.layer_norm = _float32_under_autocast(F.layer_norm, device_type)
    functional.sampled_products = functools.partial(saved[2], kernel="gather")  # the kernel used off the CPU
    functional._token_chunk = lambda g, transforms: max(1, g.shape[0])  # one chunk off the CPU
    try:
        yield
    finally:
        F.group_norm, F.layer_norm, functional.sampled_products, functional._token_chunk = saved


@contextmanager
def reference_without_bounds_mask():
    """peft's reference WaveFT builds ΔW through a boolean mask that is always all-true (its locations lie inside
    the padded matrix), and a boolean mask's result has a data-dependent shape, which fake tensors cannot run. This
    swaps in the same computation (peft 0.21's `WaveFTLayer.get_delta_weight` with use_idwt) without the mask; the
    large tensors — the padded dense spectrum, the IDWT's temporaries and ΔW — are made exactly as peft makes them.
    """
    from peft.tuners.waveft.constants import WAVELET_REDUCTIONS
    from peft.tuners.waveft.layer import WaveFTLayer
    from peft.tuners.waveft.waverec2d import waverec2d

    original = WaveFTLayer.get_delta_weight

    def get_delta_weight(self, adapter):
        if not self.waveft_use_idwt[adapter]:
            return original(self, adapter)
        spectrum = self.waveft_spectrum[adapter]
        indices = self.waveft_indices[adapter].to(spectrum.device)
        family = self.waveft_wavelet_family[adapter]
        reduction_rows, reduction_cols = WAVELET_REDUCTIONS[family]
        rows, cols = self.out_features + reduction_rows, self.in_features + reduction_cols
        rows, cols = rows + rows % 2, cols + cols % 2
        dense = torch.zeros(rows, cols, device=spectrum.device, dtype=spectrum.dtype)
        padded = indices.clone()
        padded[0, :] += (rows - self.out_features) // 2
        padded[1, :] += (cols - self.in_features) // 2
        dense[padded[0, :], padded[1, :]] = spectrum
        half_rows, half_cols = rows // 2, cols // 2
        coefficients = (dense[:half_rows, :half_cols], (dense[:half_rows, half_cols:], dense[half_rows:, :half_cols],
                                                        dense[half_rows:, half_cols:]))  # fmt: skip
        delta = waverec2d(coefficients, family) * self.waveft_scaling[adapter]
        top, left = (delta.shape[0] - self.out_features) // 2, (delta.shape[1] - self.in_features) // 2
        return delta[top : top + self.out_features, left : left + self.in_features]

    WaveFTLayer.get_delta_weight = get_delta_weight
    try:
        yield
    finally:
        WaveFTLayer.get_delta_weight = original
