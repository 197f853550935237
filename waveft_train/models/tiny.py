"""The embedded tiny SDXL model: real diffusers/transformers classes, random weights, built in code.

Why: tests, the demo config and `model.pretrained: tiny` need an SDXL pipeline without network access.
Building it from real classes and loading it back with `from_pretrained` means the code under test
takes exactly the path it takes for `stabilityai/stable-diffusion-xl-base-1.0`, only with kilobytes of
weights. Every component is seeded, so the bytes on disk are the same on every build.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch

from waveft_train.common.files import atomic_folder
from waveft_train.models import architecture
from waveft_train.models.tokenizer import build_tokenizer

# Bump when anything below changes the files written, so stale caches are never reused.
TINY_MODEL_VERSION = "tiny-sdxl-v1"
TINY_SEED = 0

# Words that become single tokens; any other text still tokenizes (byte-level fallback).
PROMPT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "photo", "picture", "painting", "drawing", "portrait", "of", "in", "on", "at",
    "with", "and", "by", "sks", "dog", "cat", "person", "man", "woman", "toy", "backpack", "bowl",
    "car", "house", "tree", "beach", "snow", "city", "park", "forest", "street", "sunset", "red",
    "blue", "green", "yellow", "black", "white", "wearing", "hat", "sitting", "running", "style",
    "high", "quality", "detailed", "close", "up", "background", "front", "rvs",
)  # fmt: skip


def build_tiny_pipeline(path: Path) -> Path:
    """Write the tiny SDXL pipeline as a diffusers folder at `path`; same weight bytes on every call."""
    tokenizer = build_tokenizer(PROMPT_WORDS)
    # fork_rng: seed locally without disturbing the caller's global RNG state; one seed per component.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        text_encoder = architecture.build_text_encoder(architecture.TINY, tokenizer, second=False)
        torch.manual_seed(TINY_SEED + 1)
        text_encoder_2 = architecture.build_text_encoder(architecture.TINY, tokenizer, second=True)
        torch.manual_seed(TINY_SEED + 2)
        unet = architecture.build_unet(architecture.TINY)
        torch.manual_seed(TINY_SEED + 3)
        vae = architecture.build_vae(architecture.TINY)
    pipeline = architecture.assemble_pipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                              tokenizer=tokenizer, tokenizer_2=copy.deepcopy(tokenizer), unet=unet,
                                              scheduler=architecture.build_scheduler())
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def default_cache_root() -> Path:
    """`$WAVEFT_TRAIN_CACHE` if set, else `~/.cache/waveft-train`."""
    configured = os.environ.get("WAVEFT_TRAIN_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "waveft-train"


def is_complete_model_dir(folder: Path) -> bool:
    """A finished build has its index and every component folder (the rename makes this all-or-nothing)."""
    components = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    return (folder / "model_index.json").is_file() and all((folder / name).is_dir() for name in components)


def tiny_model_dir(cache_dir: Path | None = None) -> Path:
    """The cached tiny model folder, built once.

    Built in a private sibling and renamed into place (`files.atomic_folder`), so a reader never sees a
    half-written folder and concurrent builders cannot corrupt each other: whoever loses the rename uses the
    winner's.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / TINY_MODEL_VERSION
    if is_complete_model_dir(target):
        return target
    if target.exists():  # damaged by hand (a complete build is never partial); replace it
        shutil.rmtree(target, ignore_errors=True)
    with atomic_folder(target, replace=False) as staging:
        build_tiny_pipeline(staging)
    return target
