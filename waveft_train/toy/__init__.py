"""The toy world: a procedural, captioned scene renderer, a small SDXL-class pipeline pretrained on it, and a judge.

It is the project's ground truth for quality (docs/toy-world.md): the demo, the learning tests and the
WaveFT-vs-LoRA bench run on it. `model.pretrained: toy` loads the committed pipeline (models/builtin.py names it)
through the same `from_pretrained` path as a hub model. The recipe that trained it is not part of the package:
`python -m scripts.pretrain_toy` (scripts/toy_pretraining.py holds its stages).

- `world`: scenes, rendering, captions, the held-out split;
- `judge`: the classifier that reads generated images, and what the VAE makes of a scene (`round_trip`);
- `subjects`: novel DreamBooth subjects and their instance photos;
- `evaluate`: subject/context fidelity, prior preservation and diversity of an adapter.
"""
