"""The toy world: a procedural, captioned scene renderer, a small SDXL-class pipeline pretrained on it, and a judge.

It is the project's ground truth for quality (see the README's "Toy world" section): the demo, the learning tests and
the WaveFT-vs-LoRA bench run on it. `model.pretrained: toy` loads the committed pipeline through the same
`from_pretrained` path as a hub model. Importing this package is cheap: the modules import torch and diffusers
only when they are used.

- `world`: scenes, rendering, captions, the held-out split;
- `architecture`: the SDXL classes at toy size (used by scripts/pretrain_toy.py);
- `judge`: the classifier that reads generated images;
- `subjects`: novel DreamBooth subjects and their instance photos;
- `evaluate`: subject/context fidelity, prior preservation and diversity of an adapter.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

TOY_MODEL_NAME = "toy"


def toy_model_dir() -> Path:
    """The committed toy pipeline folder (a diffusers folder: model_index.json, unet/, vae/, ...; judge/ beside)."""
    return Path(__file__).resolve().parent.parent / "assets" / "toy"


def toy_weights_version() -> str:
    """12 hex digits naming the committed weights: a hash of the manifest's file hashes. The folder's path stays the
    same when a release retrains the model, so caches of what the model drew (class images) key on this instead."""
    files = json.loads((toy_model_dir() / "manifest.json").read_text(encoding="utf-8"))["files"]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode("utf-8")).hexdigest()[:12]
