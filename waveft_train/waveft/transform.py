"""The WaveFT transform: a sparse spectrum → the dense weight update ΔW, without a dense IDWT.

peft's reference scatters the `n` coefficients into a zero-padded wavelet-domain matrix, splits it into the four
sub-bands, runs a one-level inverse DWT (`conv_transpose2d` with the four outer-product synthesis filters) and
crops the centre. That map is linear and local: coefficient `k` at padded position (r, c) adds the L×L patch
`s_k · a ⊗ b` of two synthesis filters, where

- the row filter `a` is the high-pass one iff the coefficient sits in the right half (c ≥ W/2), else the low-pass one;
- the column filter `b` is the high-pass one iff it sits in the bottom half (r ≥ H/2);
- the patch starts at row `2·(r mod H/2) − (L−2) − crop_rows` and column `2·(c mod W/2) − (L−2) − crop_cols`,
  where `crop_*` is the centre crop the reference applies; entries outside the layer are dropped.

(That the high-pass row filter goes with the right half is the reference's sub-band order, kept for compatibility.)

`SparseIDWT` builds ΔW in two separable steps: scatter the `n·L` row-filtered values into a
(bands, d_out, W/2) buffer, then one strided `conv_transpose1d` along the columns, whose cost is
d_out·d_in·L — independent of the family table that crashes the reference (filter banks come from PyWavelets).
With `use_idwt=False` the spectrum is placed directly (L = 1, stride 1).
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

_FAMILY_RANGES = {"db": (1, 38), "sym": (2, 20), "coif": (1, 17)}
ALLOWED_FAMILIES_TEXT = "db1-db38, sym2-sym20, coif1-coif17, and haar (= db1)"


def is_supported_family(family: str) -> bool:
    if family == "haar":
        return True
    match = re.fullmatch(r"(db|sym|coif)(\d+)", str(family))
    if not match:
        return False
    low, high = _FAMILY_RANGES[match.group(1)]
    return low <= int(match.group(2)) <= high


def check_family(family: str) -> None:
    if not is_supported_family(family):
        raise ValueError(
            f"Unknown wavelet_family {family!r}. WaveFT supports the PyWavelets families {ALLOWED_FAMILIES_TEXT}."
        )


@lru_cache(maxsize=None)
def synthesis_filters(family: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(rec_lo, rec_hi) of a family, from PyWavelets (immutable, so caching is safe)."""
    import pywt

    check_family(family)
    wavelet = pywt.Wavelet("db1" if family == "haar" else family)
    return tuple(wavelet.rec_lo), tuple(wavelet.rec_hi)


def coefficient_locations(out_features: int, in_features: int, n_frequency: int, seed: int) -> torch.Tensor:
    """The (2, n) row/column locations of the learnable coefficients, derived exactly as peft derives them."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator)[:n_frequency]
    return torch.stack([flat // in_features, flat % in_features], dim=0)


class SparseIDWT(nn.Module):
    """Maps a spectrum of `n` coefficients to the (unscaled) ΔW of one layer; see the module docstring.

    Holds only non-persistent buffers: they follow the module across devices and are never saved, since they are
    re-derived from `random_loc_seed` exactly as peft does.
    """

    def __init__(self, out_features: int, in_features: int, locations: torch.Tensor, family: str, use_idwt: bool):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        rows, cols = locations[0].long(), locations[1].long()
        if use_idwt:
            lo, hi = synthesis_filters(family)
            filters = torch.tensor([lo, hi], dtype=torch.float64)  # (bands=2, L)
            length = filters.shape[1]
            padded_rows = out_features + length - 2
            padded_rows += padded_rows % 2
            padded_cols = in_features + length - 2
            padded_cols += padded_cols % 2
            half_rows, half_cols = padded_rows // 2, padded_cols // 2
            r = rows + (padded_rows - out_features) // 2
            c = cols + (padded_cols - in_features) // 2
            # Offset of the reference's centre crop after its (L-2) border trim.
            crop_rows = (length - 2) + (2 * half_rows + 2 - length - out_features) // 2
            crop_cols = (length - 2) + (2 * half_cols + 2 - length - in_features) // 2
            row_band = (c >= half_cols).long()  # high-pass row filter in the right half
            col_band = (r >= half_rows).long()  # high-pass column filter in the bottom half
            row_start = 2 * (r % half_rows) - crop_rows
            col_slot = c % half_cols
            stride, slots = 2, half_cols
        else:
            filters = torch.ones(1, 1, dtype=torch.float64)
            length, crop_cols = 1, 0
            row_band = col_band = torch.zeros_like(rows)
            row_start, col_slot = rows, cols
            stride, slots = 1, in_features

        # Step 1: each coefficient adds its row filter to column slot `col_slot` of band `col_band`.
        taps = torch.arange(length)
        target_rows = row_start[:, None] + taps[None, :]  # (n, L)
        valid = (target_rows >= 0) & (target_rows < out_features)
        coef = torch.arange(rows.numel())[:, None].expand_as(target_rows)
        flat = (col_band[:, None] * out_features + target_rows) * slots + col_slot[:, None]
        weight = filters[row_band][:, :length]  # (n, L) row-filter taps
        self.bands, self.stride, self.slots, self.crop_cols = filters.shape[0], stride, slots, crop_cols
        self.register_buffer("scatter_index", flat[valid].contiguous(), persistent=False)
        self.register_buffer("scatter_coef", coef[valid].contiguous(), persistent=False)
        self.register_buffer("scatter_weight", weight[valid].float().contiguous(), persistent=False)
        # Step 2: column synthesis filters as a conv_transpose1d kernel (in=bands, out=1, L).
        self.register_buffer("column_kernel", filters.float()[:, None, :].contiguous(), persistent=False)

    def forward(self, spectrum: torch.Tensor) -> torch.Tensor:
        values = spectrum[self.scatter_coef] * self.scatter_weight.to(spectrum.dtype)
        bands = torch.zeros(
            self.bands * self.out_features * self.slots, device=spectrum.device, dtype=spectrum.dtype
        ).index_add(0, self.scatter_index, values)
        bands = bands.view(self.bands, self.out_features, self.slots)
        if self.column_kernel.shape[-1] == 1 and self.stride == 1:
            return bands[0]
        full = F.conv_transpose1d(
            bands.transpose(0, 1), self.column_kernel.to(spectrum.dtype), stride=self.stride
        )  # (d_out, 1, 2·slots + L − 2)
        return full[:, 0, self.crop_cols : self.crop_cols + self.in_features]

    def extra_repr(self) -> str:
        return f"out={self.out_features}, in={self.in_features}, bands={self.bands}, taps={self.column_kernel.shape[-1]}"
