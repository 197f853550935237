"""The toy model as committed: the trained modules written as an fp16 diffusers folder with its judge, and
manifest.json (every file's sha256, the command and settings, stage times, versions, and the model's version).

Each retrain adds ~12 MB to git history for good: the version tells which model a checkout holds, and a commit that
ships a new one says why (docs/toy-world.md).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

from waveft_train.models import architecture
from waveft_train.models.tokenizer import write_tokenizer_files
from waveft_train.toy.judge import JUDGE_FOLDER, save_judge
from waveft_train.toy.world import vocabulary


def previous_version(out: Path) -> int:
    """The version of the model at `out` before this run replaces it (0 when there is none, or none recorded)."""
    try:
        return int(json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("version", 0))
    except (OSError, ValueError):
        return 0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_release(out: Path, *, vae, denoiser: dict, judge, judge_accuracy: dict, prompt_accuracy: dict, command: str,
                  seed: int, settings: dict, stage_seconds: dict) -> None:
    """The model folder as committed: fp16 pipeline, tokenizer files, judge, and manifest.json (hashes, version)."""
    version = previous_version(out) + 1
    if out.exists():
        shutil.rmtree(out)
    half = {name: copy_half(module) for name, module in
            {"vae": vae, "unet": denoiser["unet"], "text_encoder": denoiser["text_encoder"],
             "text_encoder_2": denoiser["text_encoder_2"]}.items()}
    pipeline = architecture.assemble_pipeline(tokenizer=denoiser["tokenizer"], scheduler=architecture.build_scheduler(),
                                              **half)
    pipeline.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # transformers 4.x's CLIPTokenizer reads these; 5.x writes only tokenizer.json
        write_tokenizer_files(out / name, vocabulary())
    prefix_text_model_keys(out / "text_encoder" / "model.safetensors")
    drop_local_paths(out)
    save_judge(judge, out / JUDGE_FOLDER, judge_accuracy)
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {
        "what": "the toy-world SDXL pipeline (diffusers folder, fp16 safetensors) and its judge; see waveft_train/toy",
        "version": version,
        "command": command,
        "seed": seed,
        "settings": settings,
        "stage_seconds": stage_seconds,
        "wall_seconds": round(sum(stage_seconds.values()), 1),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__},
        "judge_held_out_accuracy": judge_accuracy,
        "prompt_accuracy": prompt_accuracy,
        "files": {str(p.relative_to(out)): sha256(p) for p in files},
        "total_bytes": sum(p.stat().st_size for p in files),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} ({manifest['total_bytes'] / 2**20:.1f} MiB, {manifest['wall_seconds']:.0f} s of stages)")


def prefix_text_model_keys(path: Path) -> None:
    """Write CLIPTextModel weights under the `text_model.` names every transformers release reads (hub SDXL's own
    layout). transformers 5 saves them without the prefix, and transformers 4.x then silently initializes the
    whole encoder at random."""
    state = load_file(str(path))
    renamed = {name if name.startswith("text_model.") else f"text_model.{name}": tensor for name, tensor in state.items()}
    save_file(renamed, str(path), metadata={"format": "pt"})


def drop_local_paths(out: Path) -> None:
    """diffusers records where a module was loaded from (`_name_or_path`: a path in the work folder); the committed
    configs should not carry this machine's paths."""
    for path in out.glob("*/config.json"):
        config = json.loads(path.read_text(encoding="utf-8"))
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_half(module):
    return copy.deepcopy(module).to(torch.float16)
