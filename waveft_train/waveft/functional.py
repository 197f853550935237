"""The WaveFT linear map: y = x (W + Σ scaling·ΔW(spectrum))ᵀ + b, as one matmul."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def combined_delta(adapters: Sequence[tuple[torch.Tensor, nn.Module, float]]) -> torch.Tensor:
    """Σ scaling · ΔW over the given (spectrum, transform, scaling) triples, in the spectra's dtype (float32)."""
    delta = None
    for spectrum, transform, scaling in adapters:
        term = transform(spectrum) * scaling
        delta = term if delta is None else delta + term
    return delta


def waveft_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    adapters: Sequence[tuple[torch.Tensor, nn.Module, float]],
) -> torch.Tensor:
    """Apply a frozen (d_out, d_in) weight plus WaveFT adapters to `x`; the output has `x`'s dtype.

    Under autocast, `F.linear` runs in the autocast dtype; otherwise `x` is cast to the weight's dtype, as the
    frozen base layer would require.
    """
    out_dtype = x.dtype
    merged = weight + combined_delta(adapters).to(weight.dtype)
    if not torch.is_autocast_enabled(x.device.type):
        x = x.to(merged.dtype)
        bias = bias.to(merged.dtype) if bias is not None else None
    return F.linear(x, merged, bias).to(out_dtype)
