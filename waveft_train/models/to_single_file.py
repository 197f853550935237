"""`python -m waveft_train.models.to_single_file SOURCE OUT.safetensors`: an SDXL diffusers folder (or `tiny`, `toy`) as
one checkpoint file in the A1111/ComfyUI layout (ldm_layout.py), which ComfyUI, A1111, Forge and diffusers'
`from_single_file` load, and which `model.pretrained` takes.

The weights are read from the folder's own safetensors files (sharded ones too) and written in their stored dtype
unless `--dtype` casts them, so the file holds exactly the folder's values. The output is written to a hidden
temporary file beside OUT and renamed into place: never half a file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from waveft_train.common.errors import UserError
from waveft_train.common.files import default_file_mode
from waveft_train.common.paths import SINGLE_FILE_SUFFIX
from waveft_train.models.ldm_layout import sdxl_to_ldm
from waveft_train.models.sources import resolve_pretrained

WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
           "text_encoder_2": "model"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _part_state(folder: Path, part: str) -> dict[str, torch.Tensor]:
    """One part's state dict from `<folder>/<part>/<name>.safetensors`, or from the shards its index lists."""
    stem = folder / part / WEIGHTS[part]
    single, index = stem.with_suffix(".safetensors"), Path(f"{stem}.safetensors.index.json")
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return {key: tensor for shard in shards for key, tensor in load_file(str(folder / part / shard)).items()}
    raise UserError(f"{folder / part} has no {single.name} (nor a sharded {index.name}); the source must be a diffusers "
                    "folder with safetensors weights (pickled .bin weights are refused: loading them can run code).")


def diffusers_to_single_file(source: str, out: Path, *, dtype: torch.dtype | None = None, force: bool = False) -> Path:
    """Write the SDXL model `source` (`tiny`, `toy` or a local diffusers folder) as the single file `out`."""
    out = Path(out).expanduser().absolute()
    if out.suffix.lower() != SINGLE_FILE_SUFFIX:
        raise UserError(f"{out} must end with {SINGLE_FILE_SUFFIX}: the checkpoint is written as safetensors.")
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to replace it, or choose another name.")
    folder = Path(resolve_pretrained(source))
    if not folder.is_dir():
        raise UserError(f"{source} is a hub id; download it first (`hf download {source}`) and pass the local folder.")
    configs = {part: json.loads((folder / part / "config.json").read_text(encoding="utf-8")) for part in ("unet", "vae")}
    state = sdxl_to_ldm(unet=_part_state(folder, "unet"), unet_config=configs["unet"], vae=_part_state(folder, "vae"),
                        vae_config=configs["vae"], text_encoder=_part_state(folder, "text_encoder"),
                        text_encoder_2=_part_state(folder, "text_encoder_2"))
    state = {key: (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).contiguous()
             for key, tensor in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(state, temporary, metadata={"format": "pt"})
        os.chmod(temporary, default_file_mode())
        os.replace(temporary, out)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m waveft_train.models.to_single_file",
        description="Write an SDXL diffusers folder (or the built-in `tiny` / `toy` model) as one .safetensors "
                    "checkpoint in the A1111/ComfyUI layout.")
    parser.add_argument("source", help="`tiny`, `toy`, or a local diffusers folder with model_index.json")
    parser.add_argument("out", type=Path, help="the checkpoint to write (.safetensors)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: as stored)")
    parser.add_argument("--force", action="store_true", help="replace an existing file at OUT")
    args = parser.parse_args(argv)
    try:
        written = diffusers_to_single_file(args.source, args.out, dtype=DTYPES.get(args.dtype), force=args.force)
    except UserError as error:
        print(f"Error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
    print(f"Wrote {written} ({written.stat().st_size:,} bytes).")


if __name__ == "__main__":
    main()
