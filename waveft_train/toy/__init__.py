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

from pathlib import Path

TOY_MODEL_NAME = "toy"


def toy_model_dir() -> Path:
    """The committed toy pipeline folder (a diffusers folder: model_index.json, unet/, vae/, ...; judge/ beside)."""
    return Path(__file__).resolve().parent.parent / "assets" / "toy"
