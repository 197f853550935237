"""The WaveFT linear map for training: y = x (W + Σ scaling·ΔW)ᵀ + b, at close to the frozen layer's cost.

peft's reference builds a dense ΔW through a padded 2-D IDWT and runs a second `F.linear`, with autograd through
all of it. Here one small custom autograd function does the work (ΔW = R M Cᵀ, see transform.py; x is (T, d_in),
g = dL/dy is (T, d_out)), on one of two paths:

- merged: y = x (W + ΔW)ᵀ is one matmul, and backward's dx = g (W + ΔW) another. While ΔW is patch-sparse, W + ΔW
  costs n·L² writes: into the cast copy of W that autocast makes anyway, or into W itself, restored bit-exactly
  right after the matmul. Otherwise it is a fresh dense copy, dropped after use: no weight-size tensor is kept
  between forward and backward.
- factorized (few tokens and a dense ΔW build, e.g. long filters on cross-attention's 77 text tokens): ΔW is never
  formed; y = x Wᵀ + (R (M (x C)ᵀ))ᵀ and dx = g W + (C (Mᵀ (g R)ᵀ))ᵀ, with M a sparse CSR matrix.

The spectrum gradient is the same on both paths: ds_k = scaling · Σ_t (g R)[t, gi_k] · (x C)[t, xi_k], a sampled
dense-dense product of both factors held transposed (tokens contiguous), each made by one block-banded GEMM.

Dtypes: the matmuls with W run in the autocast dtype under autocast, else in the weight's dtype (as the frozen layer
would); everything that touches the spectrum runs in float32 (float64 in gradcheck), so its gradient accumulates
in float32. In low precision the merged path rounds W + ΔW to that precision, as the merged inference weights will.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .transform import SparseIDWT

Adapter = tuple[torch.Tensor, SparseIDWT, float]
MERGED, FACTORIZED, AUTO = "merged", "factorized", "auto"
# Above this fraction of the wavelet-domain matrix, one dense product then a gather beats the sampled product.
DENSE_SAMPLING_FRACTION = 0.05
GATHER_CHUNK_ELEMENTS = 1 << 22  # bounds the (coefficients × tokens) buffers of the "gather" sampled product
# Token chunks of the spectrum gradient on CPU: the two transposed factors of a chunk (up to ~4 MiB each) stay in
# cache between being made and being sampled (measured best: 1024 tokens at widths 640-1280).
CPU_CHUNK_ELEMENTS, MIN_CHUNK_TOKENS, MAX_CHUNK_TOKENS = 1 << 20, 256, 1024
# Relative cost of one patch entry and of one element of a dense ΔW build, in units of one element of factorized
# work; fitted on CPU with cold caches, as each layer runs inside a UNet step (python -m benchmarks.layer
# --calibrate --cold; benchmarks/LOG.md): with db1 patches merged wins from ~8-16 tokens on (a warm loop over one
# layer had put that at ~100 and chosen the slower path for SDXL's 64-token layers at 32×32 latents).
PATCH_COST, DENSE_BUILD_COST = 7.0, 10.0


def launch_light(device: torch.device) -> bool:
    """Whether to use the launch-light path: on accelerators, which a layer step's many small kernels leave waiting
    for the host to launch them (BENCHMARKS §6: every method busy 3-16 % of a step there), fewer, larger operations
    pay; on the CPU, which does the arithmetic itself, cache-sized token chunks and the sparse kernel do.

    Launch-light: the spectrum gradient in one token chunk, its sampled product as one dense product and one gather.
    benchmarks.profile forces it on the CPU (`launch_light_path`) to count its operations without a GPU.
    """
    return device.type != "cpu"


def choose_path(tokens: int, out_features: int, in_features: int, transforms: Sequence[SparseIDWT]) -> str:
    """Merged or factorized, by which extra work is smaller.

    Both paths share backward's spectrum gradient. Beyond it, merged writes W + ΔW twice (forward and backward):
    n·L² patch entries, or a dense d_out·d_in build when ΔW is not patch-sparse; factorized analyzes and
    synthesizes both sides and multiplies by M twice: ~T·(d_in + d_out + 2n).
    """
    coefficients = sum(transform.n for transform in transforms)
    if all(transform.use_patches for transform in transforms):
        merged = PATCH_COST * sum(transform.n * transform.taps**2 for transform in transforms)
    else:
        merged = DENSE_BUILD_COST * out_features * in_features
    factorized = tokens * (in_features + out_features + 2 * coefficients)
    return FACTORIZED if factorized < merged else MERGED


@dataclass(frozen=True)
class _Plan:
    """The non-tensor inputs of one call."""

    transforms: tuple[SparseIDWT, ...]
    scalings: tuple[float, ...]
    path: str
    dtype: torch.dtype  # of the matmuls with W
    patchable: bool  # every ΔW is patch-sparse


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs (gradcheck): what sums over tokens and spectra are kept in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)` without a dispatcher round trip when it is already that (this code runs per layer)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _patch_weight(weight: torch.Tensor, spectra: Sequence[torch.Tensor], plan: _Plan):
    """(W + Σ scaling·ΔW in the matmul dtype, restore list for `_restore_weight`).

    Patch-sparse ΔW is added entry by entry into the autocast copy of W, or into W itself, whose overwritten values
    are returned for `_restore_weight` to put back bit-exactly (a position listed twice saves the same value twice).
    The in-place write goes through `.data`, leaving autograd's version counters alone; callers restore in a
    `finally`, and nothing else runs while W is patched (a module serves one thread at a time, as in training).
    A separable ΔW, a non-contiguous W, or tracing by torch.compile gets a fresh merged copy instead.

    Backward patches again rather than keeping forward's values: ~40 µs per call, against 80 KiB per layer held
    from forward to backward (45 MiB for SDXL).
    """
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    if not (plan.patchable and weight.is_contiguous() and not torch.compiler.is_compiling()):
        merged = torch.empty(weight.shape, dtype=_accumulate_dtype(weight.dtype), device=weight.device)
        merged.copy_(weight)
        for spectrum, transform, scaling in zip(spectra, plan.transforms, plan.scalings):
            transform.add_delta_(merged, spectrum * scaling)
        return merged.to(plan.dtype), saved
    in_place = weight.dtype == plan.dtype
    target = weight.data if in_place else weight.detach().to(plan.dtype)
    flat, accumulate = target.view(-1), _accumulate_dtype(target.dtype)
    try:
        for spectrum, transform, scaling in zip(spectra, plan.transforms, plan.scalings):
            if in_place:
                saved.append((flat, transform.patch_index, flat.take(transform.patch_index)))
            # In W's own dtype index_add_ applies the scaling (one elementwise pass fewer); a low-precision copy gets
            # entries scaled before they are rounded to it, as the merged inference weights are.
            late = flat.dtype == accumulate
            spectrum = _cast(spectrum, accumulate)
            entries = transform.patch_entries(spectrum if late else spectrum * scaling)
            flat.index_add_(0, transform.patch_index, _cast(entries, flat.dtype), alpha=scaling if late else 1)
    except BaseException:
        _restore_weight(saved)
        raise
    return target, saved


def _restore_weight(saved: list) -> None:
    """Undo `_patch_weight`'s in-place writes (last adapter first).

    `put_` is the faster write (~2 % of a step at 154 tokens), but it has no deterministic implementation: under
    `torch.use_deterministic_algorithms(True)` it raises, which here would leave ΔW in the frozen W.
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    for flat, positions, values in reversed(saved):
        if deterministic:
            flat.index_copy_(0, positions, values)
        else:
            flat.put_(positions, values)


def sampled_products(
    rows_t: torch.Tensor, cols_t: torch.Tensor, transform: SparseIDWT, scaling: float = 1.0, kernel: str = AUTO
) -> torch.Tensor:
    """scaling · Σ_t rows_t[gi_k, t] · cols_t[xi_k, t] for every coefficient k, in coefficient order.

    rows_t (2·H2, T) and cols_t (2·W2, T) are contiguous with tokens last, as all kernels want: "dense" (one full
    product, then a gather: dense spectra, and the launch-light path), "csr" (`torch.sparse.sampled_addmm`: fastest
    on CPU), "gather" (chunked row gathers and batched dot products: any device and dtype; cuSPARSE's SDDMM lacks
    bf16). "auto" picks by density and device: on a GPU the dense product's kernels took as long as gather's or less
    (§6: 0.20 / 0.21 / 0.09 ms against 0.30 / 0.19 / 0.08 at the three SDXL shapes) in two launches instead of ~10.
    """
    kernel = auto_kernel(transform, rows_t) if kernel == AUTO else kernel
    if kernel == "dense":
        return (rows_t @ cols_t.t())[transform.row_slot.long(), transform.col_slot.long()] * scaling
    if kernel == "csr":
        pattern = transform.slot_matrix(None, like=rows_t)
        values = torch.sparse.sampled_addmm(pattern, rows_t, cols_t.t(), beta=0.0, alpha=scaling).values()
        return values.index_select(0, transform.csr_position)
    if kernel != "gather":
        raise ValueError(f"unknown sampled-product kernel {kernel!r}; use auto, dense, csr or gather")
    chunk = max(1, GATHER_CHUNK_ELEMENTS // max(1, rows_t.shape[1]))
    parts = []
    for start in range(0, transform.n, chunk):
        picked_rows = rows_t.index_select(0, transform.row_slot[start : start + chunk])
        picked_cols = cols_t.index_select(0, transform.col_slot[start : start + chunk])
        parts.append(torch.bmm(picked_rows.unsqueeze(1), picked_cols.unsqueeze(2)).view(-1))
    return torch.cat(parts) * scaling


def auto_kernel(transform: SparseIDWT, rows_t: torch.Tensor) -> str:
    """The sampled-product kernel "auto" means, for this transform and the row factor's device."""
    dense = transform.n >= DENSE_SAMPLING_FRACTION * transform.rows.width * transform.cols.width
    if dense or launch_light(rows_t.device):
        return "dense"
    return "csr" if rows_t.device.type == "cpu" and not torch.compiler.is_compiling() else "gather"  # dynamo: no sparse


def _slot_product(transform: SparseIDWT, values: torch.Tensor, z_t: torch.Tensor, transposed: bool = False):
    """M z_t, or Mᵀ z_t, for M holding `values` (coefficient order) at (row slot, column slot)."""
    if not torch.compiler.is_compiling():
        return torch.sparse.mm(transform.slot_matrix(values, transposed), z_t)
    # Traced by torch.compile, which has no sparse tensors: the same product as a gather and a scatter-add.
    source, target = transform.col_slot, transform.row_slot
    if transposed:
        source, target = target, source
    width = transform.cols.width if transposed else transform.rows.width
    picked = z_t.index_select(0, source) * values[:, None]
    return z_t.new_zeros(width, z_t.shape[1]).index_add_(0, target, picked)


class _WaveFTLinear(torch.autograd.Function):
    """y = x (W + Σ scaling·ΔW(spectrum))ᵀ + b for 2-D x; gradients for x, W, b and every spectrum."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan: _Plan, *spectra):
        ctx.plan = plan
        ctx.save_for_backward(x, weight, *spectra)
        if plan.path == MERGED:
            merged, saved = _patch_weight(weight, spectra, plan)
            try:
                return F.linear(x, merged, bias)
            finally:
                _restore_weight(saved)
        y = F.linear(x, weight.to(plan.dtype), bias)
        x_acc = x.to(_accumulate_dtype(x.dtype))
        for spectrum, transform, scaling in zip(spectra, plan.transforms, plan.scalings):
            x_slots = transform.cols.analyze_transposed(x_acc, transform.col_block)  # (x C)ᵀ
            row_slots = _slot_product(transform, spectrum.to(x_acc.dtype) * scaling, x_slots)
            y += transform.rows.synthesize_transposed(row_slots, transform.row_block).t()
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *spectra = ctx.saved_tensors
        plan: _Plan = ctx.plan
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_spectra = ctx.needs_input_grad[4:]
        grad_x = grad_weight = grad_bias = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.contiguous()
            if need_weight:
                grad_weight = (g.t() @ x).to(weight.dtype)
            if need_bias:
                grad_bias = g.sum(0)
            if need_x and plan.path == MERGED:
                merged, saved = _patch_weight(weight, spectra, plan)
                try:
                    grad_x = g @ merged
                finally:
                    _restore_weight(saved)
            elif need_x:
                grad_x = g @ weight.to(plan.dtype)
                _add_factorized_grad_x(grad_x, g, spectra, plan)
            grad_spectra = _spectrum_grads(g, x, plan, need_spectra)
        return (grad_x, grad_weight, grad_bias, None, *grad_spectra)


def _token_chunk(g: torch.Tensor, transforms: Sequence[SparseIDWT]) -> int:
    """Tokens per chunk of the spectrum gradient (one chunk on the launch-light path)."""
    if launch_light(g.device):
        return max(1, g.shape[0])
    width = max(max(t.rows.width, t.cols.width) for t in transforms)
    return min(MAX_CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, CPU_CHUNK_ELEMENTS // width))


def _spectrum_grads(g, x, plan: _Plan, needed: Sequence[bool]) -> list[torch.Tensor | None]:
    """scaling · Σ_t (g R)[t, gi] · (x C)[t, xi] for each adapter that needs it, over chunks of tokens.

    Why chunks: on CPU the two transposed factors of a chunk stay in cache between being made and being sampled,
    which is most of this step's cost at thousands of tokens.
    """
    accumulate = _accumulate_dtype(g.dtype)
    g_acc, x_acc = _cast(g, accumulate), _cast(x, accumulate)
    grads: list[torch.Tensor | None] = [None] * len(needed)
    if not any(needed):
        return grads
    chunk = _token_chunk(g, plan.transforms)
    for start in range(0, g.shape[0], chunk):
        g_chunk, x_chunk = g_acc[start : start + chunk], x_acc[start : start + chunk]
        factors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # adapters with equal transforms share them
        for index, (transform, scaling, need) in enumerate(zip(plan.transforms, plan.scalings, needed)):
            if not need:
                continue
            if transform.key not in factors:
                factors[transform.key] = (
                    transform.rows.analyze_transposed(g_chunk, transform.row_block),  # (g R)ᵀ
                    transform.cols.analyze_transposed(x_chunk, transform.col_block),  # (x C)ᵀ
                )
            part = sampled_products(*factors[transform.key], transform, scaling)
            grads[index] = part if grads[index] is None else grads[index].add_(part)
    return grads


def _add_factorized_grad_x(grad_x: torch.Tensor, g: torch.Tensor, spectra, plan: _Plan) -> None:
    """grad_x += Σ scaling · g ΔW, as (C (Mᵀ (g R)ᵀ))ᵀ per adapter (the factorized path)."""
    g_acc = g.to(_accumulate_dtype(g.dtype))
    for spectrum, transform, scaling in zip(spectra, plan.transforms, plan.scalings):
        g_slots = transform.rows.analyze_transposed(g_acc, transform.row_block)
        col_slots = _slot_product(transform, spectrum.to(g_acc.dtype) * scaling, g_slots, transposed=True)
        grad_x += transform.cols.synthesize_transposed(col_slots, transform.col_block).t()


def waveft_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: Sequence[Adapter],
    path: str = AUTO,
) -> torch.Tensor:
    """Apply a (d_out, d_in) weight plus WaveFT adapters to `x` (…, d_in), returning what the frozen base layer
    would: under autocast the matmuls run in, and the output has, the autocast dtype (as `nn.Linear`'s does, so an
    adapter at zero leaves the model's dtypes as they were); otherwise `x` is cast to the weight's dtype for the
    matmuls and the output has `x`'s dtype. `path` forces "merged" or "factorized" (tests, benchmarks); "auto" chooses by
    shape (`choose_path`).
    """
    out_features, in_features = weight.shape
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
    x2d = _cast(x.reshape(-1, in_features), dtype)
    transforms = tuple(transform for _, transform, _ in adapters)
    if path == AUTO:
        path = choose_path(x2d.shape[0], out_features, in_features, transforms)
    elif path not in (MERGED, FACTORIZED):
        raise ValueError(f"path must be one of {AUTO!r}, {MERGED!r}, {FACTORIZED!r}; got {path!r}.")
    patchable = all(transform.use_patches for transform in transforms)
    scalings = tuple(float(scaling) for _, _, scaling in adapters)
    plan = _Plan(transforms=transforms, scalings=scalings, path=path, dtype=dtype, patchable=patchable)
    spectra = [spectrum for spectrum, _, _ in adapters]
    with torch.autocast(device_type, enabled=False):
        y = _WaveFTLinear.apply(x2d, weight, _cast(bias, dtype) if bias is not None else None, plan, *spectra)
    return _cast(y.reshape(*x.shape[:-1], out_features), dtype if autocast else x.dtype)
