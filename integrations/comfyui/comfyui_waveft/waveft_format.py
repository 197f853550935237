"""The single-file WaveFT format (`waveft-train export --format waveft`): what one adapted layer stores, and its
weight update rebuilt with torch alone.

Keys, per adapted layer, under the `lora_unet_<module>` prefix the apps' LoRA key maps already know:

    <prefix>.waveft_spectrum   (n,)   float32  the learned coefficients
    <prefix>.waveft_locations  (2, n) int16/32 their (row, column) in the d_out × d_in grid, as peft draws them
    <prefix>.waveft_filters    (2, L) float32  the family's reconstruction filters (rec_lo, rec_hi); absent when
                                               the adapter was trained without the inverse DWT (use_idwt: false)
    <prefix>.waveft_scaling    ()     float32  what the inverse transform's output is multiplied by
    <prefix>.waveft_version    ()     int32    the format version (a reader refuses a newer one)
    <prefix>.diff_b            (d_out,)        a trained bias's change, if any (the apps' own "diff" patch)

ΔW = scaling · IDWT(S), with S the zero matrix holding the spectrum at its locations, centred in the zero-padded
wavelet domain, and a one-level 2-D inverse DWT with the stored filters. It is linear and local, so it is built
here as the sum of one L×L patch per coefficient: coefficient k at padded position (r, c) adds s_k · a ⊗ b, where
the row filter a is the high-pass one iff c lies in the right half, the column filter b iff r lies in the bottom
half, and the patch starts at row 2·(r mod H/2) − crop and column 2·(c mod W/2) − crop (peft's sub-band order and
centre crop). Locations are stored rather than re-drawn from the seed: a stored index is exact on every torch
release, and it costs as many bytes as the spectrum.

Pure torch on purpose: the ComfyUI node and the AUTOMATIC1111 extension (integrations/a1111, through a link to this
file) import it, and waveft-train's tests check it against the exact `.diff` export without either app.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMAT_VERSION = 1
SUFFIXES = ("waveft_spectrum", "waveft_locations", "waveft_filters", "waveft_scaling", "waveft_version")


class UnsupportedWaveFTFile(ValueError):
    pass


@dataclass(frozen=True)
class WaveFTLayerRecord:
    spectrum: torch.Tensor  # (n,)
    locations: torch.Tensor  # (2, n)
    filters: torch.Tensor | None  # (2, L), or None for use_idwt: false
    scaling: float
    keys: tuple[str, ...]  # the file's keys this record was read from


def read_layer(tensors: dict[str, torch.Tensor], prefix: str) -> WaveFTLayerRecord | None:
    """The record stored under `prefix`, or None when the file holds no WaveFT layer there. An empty prefix reads a
    dict keyed by the suffixes alone (AUTOMATIC1111 hands each layer's tensors over that way)."""
    names = {suffix: f"{prefix}.{suffix}" if prefix else suffix for suffix in SUFFIXES}
    if names["waveft_spectrum"] not in tensors:
        return None
    missing = [name for suffix, name in names.items() if suffix != "waveft_filters" and name not in tensors]
    if missing:
        raise UnsupportedWaveFTFile(f"WaveFT layer {prefix} lacks {', '.join(missing)}: the file is damaged or was "
                                    "not written by `waveft-train export --format waveft`.")
    version = int(tensors[names["waveft_version"]].item())
    if version > FORMAT_VERSION:
        raise UnsupportedWaveFTFile(f"WaveFT layer {prefix} is format version {version}, newer than this reader's "
                                    f"{FORMAT_VERSION}: update the WaveFT node (or waveft-train) to load it.")
    filters = tensors.get(names["waveft_filters"])
    return WaveFTLayerRecord(spectrum=tensors[names["waveft_spectrum"]], locations=tensors[names["waveft_locations"]],
                             filters=filters, scaling=float(tensors[names["waveft_scaling"]].item()),
                             keys=tuple(name for name in names.values() if name in tensors))


def _axis(length: int, taps: int) -> tuple[int, int, int]:
    """(half of the padded length, offset of the locations in it, offset of the centre crop) along one axis."""
    padded = length + taps - 2
    padded += padded % 2
    half = padded // 2
    return half, (padded - length) // 2, (taps - 2) + (padded + 2 - taps - length) // 2


def delta_weight(record: WaveFTLayerRecord, shape: tuple[int, int], *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The layer's full update scaling·ΔW as a dense (d_out, d_in) tensor in `dtype` (computed in float32 or wider)."""
    out_features, in_features = int(shape[0]), int(shape[1])
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    spectrum = record.spectrum.to(device=device, dtype=work)
    rows = record.locations[0].to(device=device, dtype=torch.long)
    cols = record.locations[1].to(device=device, dtype=torch.long)
    if rows.numel() and (int(rows.max()) >= out_features or int(cols.max()) >= in_features):
        raise UnsupportedWaveFTFile(f"WaveFT locations reach beyond the layer's {out_features}x{in_features} weight: "
                                    "the file was made for another model.")
    delta = torch.zeros(out_features, in_features, dtype=work, device=device)
    if record.filters is None:  # use_idwt: false, the identity transform
        delta.index_put_((rows, cols), spectrum, accumulate=True)
        return (delta * record.scaling).to(dtype)
    filters = record.filters.to(device=device, dtype=work)
    taps = filters.shape[1]
    row_half, row_offset, row_crop = _axis(out_features, taps)
    col_half, col_offset, col_crop = _axis(in_features, taps)
    r, c = rows + row_offset, cols + col_offset  # positions in the padded wavelet domain
    row_filter = filters[(c >= col_half).long()]  # (n, L): high-pass rows iff in the right half
    col_filter = filters[(r >= row_half).long()]  # (n, L): high-pass columns iff in the bottom half
    tap = torch.arange(taps, device=device)
    row_index = (2 * (r % row_half) - row_crop)[:, None] + tap  # (n, L)
    col_index = (2 * (c % col_half) - col_crop)[:, None] + tap
    values = spectrum[:, None, None] * row_filter[:, :, None] * col_filter[:, None, :]  # (n, L, L)
    row_index, col_index = row_index[:, :, None].expand_as(values), col_index[:, None, :].expand_as(values)
    inside = (row_index >= 0) & (row_index < out_features) & (col_index >= 0) & (col_index < in_features)
    delta.index_put_((row_index[inside], col_index[inside]), values[inside], accumulate=True)
    return (delta * record.scaling).to(dtype)
