"""Every export of a WaveFT adapter, behind one option check and one target check.

- `diffusers` (default): the adapter merged into its base UNet, a plain diffusers UNet folder (merged.py).
- `comfyui`: one `.safetensors` file of every adapted layer's full update, `lora_unet_<name>.diff` (and the text
  encoders', `lora_te1_…`/`lora_te2_…`, when they were trained), exact; ComfyUI,
  Forge, A1111 and LyCORIS apply it as W + strength·diff (export_files.py).
- `lora`: one kohya LoRA file, each update factored by SVD; lossy, every layer's error reported (export_files.py).
- `waveft`: one `.safetensors` file of every layer's spectrum, locations, filters and scaling, exact and about the
  adapter's size; ComfyUI loads it with the node in integrations/comfyui/ (export_files.py).

`export()` checks the options (before any model loads) and the target (it never overwrites the adapter or anything
that is not an earlier export of ours, and an earlier one only with `force`), then writes atomically: nothing is left
half-written.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from waveft_train.adapter.export_files import FORMAT_KEY, write_file
from waveft_train.adapter.merged import (
    EXPORT_CONFIG_NAME,
    EXPORT_SCHEDULER_NAME,
    EXPORT_WEIGHTS_PATTERN,
    not_an_export,
    write_merged_unet,
)
from waveft_train.adapter.text_encoders import has_text_encoder_adapters
from waveft_train.common.errors import UserError
from waveft_train.common.files import writing
from waveft_train.common.lock import FolderLock
from waveft_train.models.loading import DTYPES
from waveft_train.models.unet_names import NAMINGS

logger = logging.getLogger(__name__)
FORMATS = ("diffusers", "comfyui", "lora", "waveft")
FILE_FORMATS = ("comfyui", "lora", "waveft")  # one .safetensors file; `diffusers` is a folder


@dataclass
class ExportResult:
    path: Path
    format: str
    layers: int
    errors: dict[str, float] = field(default_factory=dict)  # lora: per kohya module key
    ranks: dict[str, int] = field(default_factory=dict)

    @property
    def worst(self) -> tuple[str, float] | None:
        return max(self.errors.items(), key=lambda item: item[1]) if self.errors else None


def export(adapter_dir: Path | str, out: Path | str, *, format: str = "diffusers", base: str | None = None,
           dtype: str = "fp16", naming: str | None = None, rank: int | None = None, max_error: float | None = None,
           force: bool = False, prediction_type: str | None = None, base_config: str | None = None) -> ExportResult:
    """Write the adapter at `adapter_dir` in `format` to `out` (a folder for diffusers, a .safetensors file otherwise).

    `naming` (file formats): diffusers (default) or ldm module names. `rank` / `max_error`: the LoRA's rank. The file
    formats record `prediction_type` (by default what the adapter records) in their metadata. `base` / `base_config`:
    the base model and a single-file base's configs, when not the ones the adapter records.
    """
    check_options(format, dtype, naming, rank, max_error)
    adapter_dir, out = Path(adapter_dir).expanduser(), Path(out).expanduser().absolute()
    check_target(out, adapter_dir, format, force)
    if format in ("diffusers", "waveft") and has_text_encoder_adapters(adapter_dir):
        logger.warning("The adapter %s also holds text-encoder adapters (%s); --format %s holds the UNet only, so they "
                       "are left out. --format comfyui and lora carry them (lora_te1_/lora_te2_ keys).", adapter_dir,
                       ", ".join(has_text_encoder_adapters(adapter_dir)), format)
    if format == "diffusers":
        with writing(out, "the merged UNet"), export_lock(out):
            check_target(out, adapter_dir, format, force)  # again: another export may have finished meanwhile
            return ExportResult(out, format, write_merged_unet(adapter_dir, out, base=base, dtype=dtype,
                                                                       base_config=base_config))
    layers, errors, ranks = write_file(adapter_dir, out, format=format, base=base, dtype=dtype,
                                       naming=naming or "diffusers", rank=rank, max_error=max_error,
                                       prediction_type=prediction_type, base_config=base_config)
    return ExportResult(out, format, layers, errors, ranks)


def check_options(format: str, dtype: str, naming: str | None, rank: int | None, max_error: float | None) -> None:
    """The option errors a user can make, raised before any model loads."""
    if format not in FORMATS:
        raise UserError(f"Unknown --format '{format}'; allowed: diffusers (a merged UNet folder), {', '.join(FILE_FORMATS)}.")
    if dtype not in DTYPES:
        raise UserError(f"Unknown --dtype '{dtype}'; allowed: {', '.join(DTYPES)}.")
    if format == "diffusers":
        given = [flag for flag, value in (("--rank", rank), ("--max-error", max_error), ("--naming", naming))
                 if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} apply to --format comfyui or lora (one .safetensors file); "
                            "--format diffusers writes the merged UNet folder.")
        return
    if naming is not None and naming not in NAMINGS:
        raise UserError(f"Unknown --naming '{naming}'; allowed: {', '.join(NAMINGS)} (diffusers is read by ComfyUI, "
                        "A1111/Forge and LyCORIS; ldm is kohya's SDXL spelling).")
    if format in ("comfyui", "waveft") and (rank is not None or max_error is not None):
        raise UserError(f"--rank and --max-error apply to --format lora only; --format {format} stores every layer's "
                        "update exactly.")
    if format == "lora":
        if rank is None and max_error is None:
            raise UserError("--format lora needs --rank R (the same rank for every layer, e.g. --rank 32) or "
                            "--max-error E (the smallest rank per layer whose relative error is at most E, e.g. "
                            "--max-error 0.05), or both (--rank is then the largest rank used).")
        if rank is not None and rank < 1:
            raise UserError(f"--rank {rank} is not a positive integer; e.g. --rank 32.")
        if max_error is not None and not (math.isfinite(max_error) and 0 < max_error < 1):
            raise UserError(f"--max-error {max_error} is not between 0 and 1 (a relative Frobenius error, e.g. 0.05).")


def check_target(out: Path, adapter_dir: Path, format: str, force: bool) -> None:
    """Refuse an --out that would overwrite or mix with the adapter, or replace anything but an earlier export of
    ours (and that only with `force`): a new or empty folder for diffusers, a new .safetensors file otherwise."""
    if format in FILE_FORMATS and out.suffix.lower() != ".safetensors":
        raise UserError(f"--out {out} must end with .safetensors: this format is one safetensors file.")
    out_real, adapter_real = out.resolve(), adapter_dir.absolute().resolve()
    inside = adapter_real in out_real.parents
    if out_real == adapter_real or inside or out_real in adapter_real.parents:
        relation = ("is the adapter folder" if out_real == adapter_real else "lies inside the adapter folder" if inside
                    else "contains the adapter folder")
        example = adapter_real.parent / (adapter_real.name + ("-merged" if format == "diffusers" else ".safetensors"))
        raise UserError(f"--out {out} {relation} ({adapter_real}); the export would replace or mix with the adapter. "
                        f"Choose an --out outside the adapter folder, e.g. {example}.")
    if format == "diffusers":
        _check_folder_target(out, force)
    else:
        _check_file_target(out, force)


def _check_folder_target(out: Path, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise UserError(f"{out} is a file; --out names the folder to write the merged UNet to.")
    entries = sorted(out.iterdir())
    if not entries:
        return
    foreign = not_an_export(out, entries)
    if foreign is not None:
        raise UserError(
            f"{out} already exists and is not an earlier UNet export: {foreign}. --out must be a new or empty "
            f"folder, or (with --force) a folder written by `waveft-train export` ({EXPORT_CONFIG_NAME}, "
            f"{EXPORT_SCHEDULER_NAME} and {EXPORT_WEIGHTS_PATTERN} only). Choose another --out folder; nothing was "
            "changed."
        )
    if not force:
        raise UserError(f"{out} already holds a merged UNet; pass --force to replace it, or choose another --out folder.")


def _check_file_target(out: Path, force: bool) -> None:
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the path of the .safetensors file to write.")
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise UserError(f"{out} already exists; pass --force to replace an earlier export, or choose another --out.")
    try:
        with safe_open(str(out), framework="pt") as existing:
            ours = FORMAT_KEY in (existing.metadata() or {})
    except Exception:  # not a readable safetensors file
        ours = False
    if not ours:
        raise UserError(f"{out} exists and was not written by `waveft-train export`; --force replaces only such "
                        "files. Choose another --out; nothing was changed.")


def export_lock(out: Path) -> FolderLock:
    """One export at a time into `out`: the lock file sits beside it (`out` itself is swapped atomically)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return FolderLock(out, what="export", lock_path=out.parent / f".{out.name}.lock")
