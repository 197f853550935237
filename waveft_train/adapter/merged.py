"""The merged export: the adapter folded into its base UNet, saved as a plain diffusers UNet folder.

Loading it needs no peft: `UNet2DConditionModel.from_pretrained(out)`; beside it, `scheduler_config.json` is the base
model's scheduler set to the prediction type the adapter was trained for (`EulerDiscreteScheduler.from_pretrained`).
Which folders may be written or replaced is export.py's `check_target`; `not_an_export` tells it what an earlier
merged export looks like.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from waveft_train.adapter.files import read_adapter
from waveft_train.adapter.load import base_model_of, inject, scheduler_for
from waveft_train.common.errors import UserError
from waveft_train.common.files import atomic_folder
from waveft_train.models.loading import DTYPES, load_scheduler, load_unet
from waveft_train.models.single_file import quiet_diffusers_fp32_notice

EXPORT_CONFIG_NAME = "config.json"
EXPORT_SCHEDULER_NAME = "scheduler_config.json"
EXPORT_WEIGHTS_PATTERN = "diffusion_pytorch_model*.safetensors"
EXPORT_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"  # written when diffusers shards the weights


def write_merged_unet(adapter_dir: Path, out: Path, *, base: str | None, dtype: str, base_config: str | None = None) -> int:
    """Merge in fp32, cast to `dtype` once, write to a temporary sibling and rename it into place (so `out` is never
    half-written); returns the number of merged layers."""
    adapter = read_adapter(adapter_dir)
    chosen = base_model_of(adapter, base, base_config)
    unet = load_unet(chosen.name, dtype=torch.float32, config=chosen.config)
    scheduler = scheduler_for(adapter, load_scheduler(chosen.name, config=chosen.config))
    base_keys = set(unet.state_dict())
    model = inject(unet, adapter, chosen.name, 1.0)
    layers = sum(isinstance(module, BaseTunerLayer) for module in model.modules())
    merged = model.merge_and_unload()
    extra = sorted(set(merged.state_dict()) - base_keys)
    if extra:
        raise UserError(
            f"The adapter {adapter.folder} adds weights the base UNet does not have (first: {extra[0]}); a plain "
            "diffusers UNet cannot hold them. Load the adapter with peft instead of exporting it."
        )
    with quiet_diffusers_fp32_notice():
        merged.to(DTYPES[dtype])
    with atomic_folder(out) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        scheduler.save_config(staging)
        for config_path in (staging / EXPORT_CONFIG_NAME, staging / EXPORT_SCHEDULER_NAME):
            config = json.loads(config_path.read_text(encoding="utf-8"))
            if config.pop("_name_or_path", None) is not None:  # where the base was loaded from: this machine's path
                config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return layers


def not_an_export(out: Path, entries: list[Path]) -> str | None:
    """Why the non-empty folder `out` is not a UNet written by `write_merged_unet`, or None when it is one."""
    for entry in entries:
        allowed = entry.name in (EXPORT_CONFIG_NAME, EXPORT_SCHEDULER_NAME, EXPORT_INDEX_NAME) or fnmatch.fnmatch(
            entry.name, EXPORT_WEIGHTS_PATTERN
        )
        if not allowed or entry.is_symlink() or not entry.is_file():
            kind = "folder" if entry.is_dir() and not entry.is_symlink() else "file"
            return f"it holds the {kind} {entry.name}"
    config_path = out / EXPORT_CONFIG_NAME
    if not config_path.is_file():
        return f"it has no {EXPORT_CONFIG_NAME}"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"its {EXPORT_CONFIG_NAME} is not readable JSON"
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if class_name != "UNet2DConditionModel":
        return f"its {EXPORT_CONFIG_NAME} describes {class_name!r}, not a UNet2DConditionModel"
    if not any(fnmatch.fnmatch(entry.name, EXPORT_WEIGHTS_PATTERN) for entry in entries):
        return f"it has no {EXPORT_WEIGHTS_PATTERN}"
    return None
