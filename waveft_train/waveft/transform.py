"""The WaveFT transform: a sparse spectrum → the dense weight update ΔW, as two 1-D synthesis steps.

peft's reference scatters the `n` coefficients into a zero-padded wavelet-domain matrix, splits it into the four
sub-bands, runs a one-level inverse DWT (`conv_transpose2d` with the four outer-product synthesis filters) and
crops the centre. That map is linear and separable: coefficient `k` at padded position (r, c) adds `s_k · a ⊗ b`,
an L×L patch of two synthesis filters (L = filter length), where

- the row filter `a` is the high-pass one iff the coefficient sits in the right half (c ≥ W/2), else low-pass;
- the column filter `b` is the high-pass one iff it sits in the bottom half (r ≥ H/2);
- the patch starts at row `2·(r mod H/2) − crop_rows` and column `2·(c mod W/2) − crop_cols`, where `crop_*` is
  the offset of the reference's centre crop; entries outside the layer are dropped.

(That the high-pass row filter goes with the right half is the reference's sub-band order, kept for compatibility.)

So ΔW = R M Cᵀ: M is a sparse (H2·2 × W2·2) matrix holding s_k at (row slot gi_k, column slot xi_k) with
gi_k = 2·(r mod H/2) + [c ≥ W/2] and xi_k = 2·(c mod W/2) + [r ≥ H/2] (slot-major, band-minor: a slot's two
bands are adjacent, which keeps the 1-D steps reshapes and small GEMMs), and R, C are one-level 1-D synthesis
operators along the rows and the columns (`Axis`). Their adjoints are what training needs: the gradient of s_k is
Σ_t (g R)[t, gi_k] · (x C)[t, xi_k] (`Axis.analyze_transposed`). `use_idwt=False` is the same structure with one
band, stride 1 and a single tap of 1: the identity. Filter banks come from PyWavelets, so every documented family
works.

`SparseIDWT` holds, per adapter, the index buffers all of this needs: ΔW's patch entries (sorted by position, to
add ΔW into W touching only those), M and Mᵀ as CSR patterns, and the block-banded analysis matrices.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cache, lru_cache

import pywt
import torch
import torch.nn.functional as F
from torch import nn

from .families import check_family

BLOCK_SLOTS = 8  # slots per block of the block-banded analysis GEMM (measured on CPU: 8 beats 4 and 16)


@cache
def synthesis_filters(family: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(rec_lo, rec_hi) of a family, from PyWavelets (immutable, so caching is safe)."""
    check_family(family)
    wavelet = pywt.Wavelet("db1" if family == "haar" else family)
    return tuple(wavelet.rec_lo), tuple(wavelet.rec_hi)


def coefficient_locations(out_features: int, in_features: int, n_frequency: int, seed: int) -> torch.Tensor:
    """The (2, n) row/column locations of the learnable coefficients, derived exactly as peft derives them.

    peft draws a full permutation of d_out·d_in per layer; layers of one shape share one seed, so the draw is
    memoized per (shape, n, seed): SDXL's 560 attention linears have only a handful of shapes. A fresh copy is
    returned each time, so callers may keep or modify it.
    """
    return _locations(out_features, in_features, n_frequency, seed).clone()


@lru_cache(maxsize=64)
def _locations(out_features: int, in_features: int, n_frequency: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator)[:n_frequency]
    return torch.stack([flat // in_features, flat % in_features], dim=0)


@dataclass(frozen=True)
class Axis:
    """One axis of the separable transform: `slots·bands` wavelet-domain entries ↔ `length` weight entries.

    Synthesis: out[i] = Σ_{p,b} z[p·bands + b] · f_b[i + crop − stride·p] for 0 ≤ i < length (a strided
    transposed convolution, then a crop); analysis is its exact adjoint. The filters `f` (bands × taps) travel separately, as
    a buffer of the owning `SparseIDWT`, so they follow the module's device.
    """

    length: int
    slots: int
    bands: int
    taps: int
    stride: int
    crop: int

    @property
    def width(self) -> int:
        """Size of the wavelet-domain side (slots × bands)."""
        return self.slots * self.bands

    @property
    def is_identity(self) -> bool:
        return self.taps == 1 and self.stride == 1 and self.bands == 1 and self.crop == 0

    def _pad_to(self, y: torch.Tensor, full: int) -> torch.Tensor:
        """y (…, length) placed at offset `crop` of a zero signal of length `full` (no copy when nothing to pad)."""
        right = full - self.length - self.crop
        return y if self.crop == 0 and right == 0 else F.pad(y, (self.crop, right))

    def synthesize(self, z: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
        """(…, width) → (…, length) along the last dimension."""
        if self.is_identity:
            return z
        lead = z.shape[:-1]
        if self.taps == self.stride:  # no overlap between slots (Haar): a reshape of a tiny matmul
            patches = z.reshape(*lead, self.slots, self.bands) @ filters.to(z.dtype)
            full = patches.reshape(*lead, self.slots * self.stride)
        else:  # a strided transposed convolution, bands as input channels
            bands_first = z.reshape(-1, self.slots, self.bands).transpose(1, 2)
            full = F.conv_transpose1d(bands_first, filters.to(z.dtype)[:, None, :], stride=self.stride)
            full = full.reshape(*lead, -1)
        return full[..., self.crop : self.crop + self.length]

    def block_matrix(self, filters: torch.Tensor, block_slots: int) -> torch.Tensor:
        """The analysis of `block_slots` consecutive slots as a dense (block_slots·bands, window) matrix."""
        window = self.stride * block_slots + self.taps - self.stride
        block = torch.zeros(block_slots * self.bands, window, dtype=filters.dtype)
        for slot in range(block_slots):
            start = self.stride * slot
            block[slot * self.bands : (slot + 1) * self.bands, start : start + self.taps] = filters
        return block

    def analyze_transposed(self, y: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """y (T, length) → (width, T), contiguous: analysis and transposition in one batched GEMM.

        Why: the spectrum gradient is a sampled product whose fast kernels want both factors with tokens
        contiguous; a block-banded GEMM reads y transposed at BLAS speed, where a plain `.t().contiguous()`
        alone costs more on CPU (BENCHMARKS.md). `block` is `block_matrix(filters, block_slots)`.
        """
        tokens = y.shape[0]
        block_slots = block.shape[0] // self.bands
        blocks = -(-self.slots // block_slots)
        window, step = block.shape[1], self.stride * block_slots
        padded = self._pad_to(y, step * blocks + self.taps - self.stride)
        windows = padded.unfold(1, window, step).permute(1, 2, 0)  # (blocks, window, T), a view
        block = block if block.dtype == y.dtype else block.to(y.dtype)
        out = torch.bmm(block.expand(blocks, -1, -1), windows)  # (blocks, block_slots·bands, T)
        return out.view(blocks * block_slots * self.bands, tokens)[: self.width]

    def synthesize_transposed(self, z_t: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """z_t (width, T) → (length, T): the adjoint of `analyze_transposed` (the result is a row slice)."""
        if self.is_identity:
            return z_t
        tokens = z_t.shape[1]
        block_slots = block.shape[0] // self.bands
        blocks = -(-self.slots // block_slots)
        window, step = block.shape[1], self.stride * block_slots
        rows = blocks * block_slots * self.bands
        if rows > self.width:
            z_t = F.pad(z_t, (0, 0, 0, rows - self.width))
        parts = torch.bmm(block.t().to(z_t.dtype).expand(blocks, -1, -1), z_t.reshape(blocks, -1, tokens))
        overlap = window - step  # taps − stride: each block's tail lands on the next block's head
        if overlap == 0:
            full = parts.reshape(blocks * step, tokens)
        else:
            full = z_t.new_zeros(blocks + 1, step, tokens)
            full[:blocks] = parts[:, :step]
            full[1:, :overlap] += parts[:, step:]
            full = full.view(-1, tokens)
        return full[self.crop : self.crop + self.length]


def _axis(length: int, filters: torch.Tensor, use_idwt: bool) -> Axis:
    if not use_idwt:
        return Axis(length=length, slots=length, bands=1, taps=1, stride=1, crop=0)
    taps = filters.shape[1]
    padded = length + taps - 2
    padded += padded % 2
    slots = padded // 2
    # Offset of the reference's centre crop in the full synthesized signal (length 2·slots + taps − 2).
    crop = (taps - 2) + (2 * slots + 2 - taps - length) // 2
    return Axis(length=length, slots=slots, bands=2, taps=taps, stride=2, crop=crop)


class SparseIDWT(nn.Module):
    """The transform of one adapter of one layer: spectrum (n,) → unscaled ΔW (d_out, d_in), and its pieces.

    Holds only non-persistent buffers: they follow the module across devices and are never saved, since they are
    re-derived from `random_loc_seed` exactly as peft does. Index buffers are int32 wherever the kernel using them
    accepts it (SDXL has 560 adapted layers).
    """

    def __init__(self, out_features: int, in_features: int, locations: torch.Tensor, family: str, use_idwt: bool):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        rows, cols = locations[0].long(), locations[1].long()
        if use_idwt:
            lo, hi = synthesis_filters(family)
            filters = torch.tensor([lo, hi], dtype=torch.float64)  # (bands=2, taps)
        else:
            filters = torch.ones(1, 1, dtype=torch.float64)
        self.rows, self.cols = _axis(out_features, filters, use_idwt), _axis(in_features, filters, use_idwt)
        self.family = family if use_idwt else None
        self.key = (self.rows, self.cols, self.family)  # equal keys ⇒ equal analyses (adapters of a layer share them)
        self.taps = filters.shape[1]
        self.n = rows.numel()

        # Wavelet-domain slots (see the module docstring).
        if use_idwt:
            r = rows + (2 * self.rows.slots - out_features) // 2
            c = cols + (2 * self.cols.slots - in_features) // 2
            row_band, col_band = (c >= self.cols.slots).long(), (r >= self.rows.slots).long()
            row_slot = 2 * (r % self.rows.slots) + row_band
            col_slot = 2 * (c % self.cols.slots) + col_band
        else:
            row_band = col_band = torch.zeros_like(rows)
            row_slot, col_slot = rows, cols
        self.register_buffer("row_slot", row_slot.int(), persistent=False)
        self.register_buffer("col_slot", col_slot.int(), persistent=False)

        # Patch form: ΔW is the sum of n L×L patches s_k · a_k ⊗ b_k. While that is sparse, ΔW is built (and added
        # to W) by scatter-adding its n·L² patch entries, never touching the rest of W.
        self.register_buffer("filters", filters.float(), persistent=False)
        row_index, row_weight = self._patch_side(row_slot, row_band, self.rows, filters)
        col_index, col_weight = self._patch_side(col_slot, col_band, self.cols, filters)
        self.use_patches = self.n * self.taps**2 <= out_features * in_features // 4
        if self.use_patches:  # entries sorted by position: scattering them into W walks memory in order
            flat = (row_index[:, :, None] * in_features + col_index[:, None, :]).reshape(-1)  # row·d_in + col
            weight = (row_weight[:, :, None] * col_weight[:, None, :]).reshape(-1)
            coefficient = torch.arange(self.n)[:, None].expand(self.n, self.taps**2).reshape(-1)
            order = torch.argsort(flat)
            # int64: `take` and `put_` (or `index_copy_`) save and restore W's values at these positions
            self.register_buffer("patch_index", flat[order], persistent=False)
            self.register_buffer("patch_coefficient", coefficient[order].int(), persistent=False)
            self.register_buffer("patch_weight", weight[order].float(), persistent=False)
        else:  # separable build: the row step's taps per coefficient
            self.register_buffer("row_index", row_index.int(), persistent=False)
            self.register_buffer("row_weight", row_weight.float(), persistent=False)

        # M (row slots × column slots) and Mᵀ as CSR patterns: the sampled product for the spectrum gradient reads
        # M's, the factorized path multiplies by both. `*_coefficient` lists the coefficient at each CSR entry.
        patterns = (("csr", row_slot, col_slot, self.rows.width), ("csr_t", col_slot, row_slot, self.cols.width))
        for name, major, minor, width in patterns:
            order = torch.argsort(major * (self.rows.width + self.cols.width) + minor)
            crow = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(major, minlength=width).cumsum(0)])
            self.register_buffer(f"{name}_crow", crow.int(), persistent=False)
            self.register_buffer(f"{name}_col", minor[order].int(), persistent=False)
            self.register_buffer(f"{name}_coefficient", order.int(), persistent=False)
            if name == "csr":  # where each coefficient sits in M's CSR values: the spectrum gradient's gather
                self.register_buffer("csr_position", torch.argsort(order).int(), persistent=False)
        # Blocks must reach past the filter overlap (taps − stride ≤ stride·block_slots): transposed synthesis.
        block_slots = max(BLOCK_SLOTS, -(-(self.taps - 1) // 2))
        self.register_buffer("row_block", self.rows.block_matrix(filters.float(), block_slots), persistent=False)
        self.register_buffer("col_block", self.cols.block_matrix(filters.float(), block_slots), persistent=False)
        self._patterns: dict[tuple, torch.Tensor] = {}  # M's sampling pattern per (dtype, device): slot_matrix

    def _apply(self, fn, recurse=True):
        self._patterns = {}  # the buffers are about to be replaced: drop patterns that reference the old ones
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__()
        state["_patterns"] = {}  # sparse tensors can be neither deep-copied nor pickled; rebuilt on first use
        return state

    @staticmethod
    def _patch_side(slot: torch.Tensor, band: torch.Tensor, axis: Axis, filters: torch.Tensor):
        start = axis.stride * torch.div(slot, axis.bands, rounding_mode="floor") - axis.crop
        index = start[:, None] + torch.arange(axis.taps)[None, :]  # (n, taps)
        inside = (index >= 0) & (index < axis.length)
        return index.clamp(0, axis.length - 1), filters[band] * inside

    def forward(self, spectrum: torch.Tensor) -> torch.Tensor:
        """Dense unscaled ΔW (d_out, d_in) in the spectrum's dtype; differentiable (merging, tests, the oracle)."""
        out = spectrum.new_zeros(self.out_features, self.in_features)
        return self.add_delta_(out, spectrum)

    def patch_entries(self, spectrum: torch.Tensor) -> torch.Tensor:
        """The n·L² patch entries of ΔW(spectrum), aligned with `patch_index` (patch mode only; a position may
        repeat, and its entries add up), in the spectrum's dtype."""
        weight = self.patch_weight
        weight = weight if weight.dtype == spectrum.dtype else weight.to(spectrum.dtype)
        return spectrum.index_select(0, self.patch_coefficient) * weight

    def add_delta_(self, out: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
        """out += ΔW(spectrum) for a contiguous (d_out, d_in) `out` (in place; the spectrum may carry a scaling)."""
        spectrum = spectrum.to(out.dtype)
        if self.use_patches:
            return out.view(-1).index_add_(0, self.patch_index, self.patch_entries(spectrum)).view_as(out)
        # Separable: the row step as a scatter into (d_out, column slots), then one synthesis along the columns.
        rows = spectrum[:, None] * self.row_weight.to(out.dtype)  # (n, taps): s_k · row filter
        flat = self.row_index.long() * self.cols.width + self.col_slot.long()[:, None]
        half = out.new_zeros(self.out_features * self.cols.width).index_add_(0, flat.reshape(-1), rows.reshape(-1))
        return out.add_(self.cols.synthesize(half.view(self.out_features, self.cols.width), self.filters))

    def slot_matrix(self, values: torch.Tensor | None, transposed: bool = False, like=None) -> torch.Tensor:
        """M (row slots × column slots), or Mᵀ, as a sparse CSR tensor holding `values` (coefficient order), or
        zeros of `like`'s dtype and device when `values` is None (a sampling pattern)."""
        name = "csr_t" if transposed else "csr"
        shape = (self.cols.width, self.rows.width) if transposed else (self.rows.width, self.cols.width)
        if values is None:  # a pattern is the same every call: made once per dtype and device
            key = (like.dtype, like.device, transposed)
            if key not in self._patterns:
                self._patterns[key] = self.slot_matrix(like.new_zeros(self.n), transposed)
            return self._patterns[key]
        values = values.index_select(0, getattr(self, f"{name}_coefficient"))
        crow, col = getattr(self, f"{name}_crow"), getattr(self, f"{name}_col")
        if torch.compiler.is_compiling():  # dynamo cannot trace warning filters
            return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=False)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": shown once per process, not useful here
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=False)

    def extra_repr(self) -> str:
        return (
            f"out={self.out_features}, in={self.in_features}, n={self.n}, bands={self.rows.bands}, taps={self.taps}, "
            f"build={'patches' if self.use_patches else 'separable'}"
        )

