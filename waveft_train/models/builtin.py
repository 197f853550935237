"""The two models waveft-train ships or builds, by name: `tiny` (random weights, built in code for fast tests; see
tiny.py) and `toy` (the pretrained toy-world pipeline committed under waveft_train/assets/toy).

Torch-free, so the config can accept the names before anything heavy is imported.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

TINY_MODEL_NAME = "tiny"
TOY_MODEL_NAME = "toy"
BUILTIN_MODELS = (TINY_MODEL_NAME, TOY_MODEL_NAME)  # model.pretrained keywords


def toy_model_dir() -> Path:
    """The committed toy pipeline folder (a diffusers folder: model_index.json, unet/, vae/, ...; judge/ beside)."""
    return Path(__file__).resolve().parents[1] / "assets" / "toy"


def toy_weights_version() -> str:
    """12 hex digits naming the committed weights: a hash of the manifest's file hashes. The folder's path stays the
    same when a release retrains the model, so caches of what the model drew (class images) key on this instead."""
    files = json.loads((toy_model_dir() / "manifest.json").read_text(encoding="utf-8"))["files"]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def is_toy_model(name: str) -> bool:
    """`toy`, or a folder holding a byte-identical copy of the toy model's manifest."""
    if name.strip() == TOY_MODEL_NAME:
        return True
    folder = Path(name).expanduser()
    manifest, reference = folder / "manifest.json", toy_model_dir() / "manifest.json"
    return folder.is_dir() and manifest.is_file() and reference.is_file() and \
        manifest.read_bytes() == reference.read_bytes()
