"""The judge: a small classifier that says what a toy-world image shows.

Why: for real photos, DreamBooth papers measure subject fidelity with DINO/CLIP similarity, which is only a proxy.
In the toy world the truth is known, so a classifier trained on rendered scenes can read a generated image
exactly: which shape, which colours, which pattern, which context, and where the object is and how big. It is
trained on the whole world (patterns and held-out combinations included), because it is a measuring instrument,
not the model being measured. Its held-out accuracy on freshly rendered images is recorded in the manifest.

Heads: shape, pattern, context and colours are single-label classifications (colours over the 6 single colours and
the 15 unordered pairs: a striped red-and-yellow ball is "red+yellow", whichever band is on top; a softmax over the
combinations learned far faster than one sigmoid per colour); layout regresses (x, centre y, size) as fractions of
the side.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from waveft_train.models.builtin import toy_model_dir
from waveft_train.toy.world import COLOURS, CONTEXTS, PATTERNS, SHAPES, Scene

JUDGE_FOLDER = "judge"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CLASSES = {"shape": SHAPES, "pattern": PATTERNS, "context": tuple(CONTEXTS)}
COLOUR_NAMES = tuple(COLOURS)
COLOUR_SETS: tuple[tuple[str, ...], ...] = tuple((name,) for name in COLOUR_NAMES) + tuple(
    (first, second) for i, first in enumerate(COLOUR_NAMES) for second in COLOUR_NAMES[i + 1:])


def colour_set_index(colours: Sequence[str]) -> int:
    """Index into COLOUR_SETS of a scene's colours, in any order."""
    return COLOUR_SETS.index(tuple(sorted(colours, key=COLOUR_NAMES.index)))


class Judge(nn.Module):
    """A plain strided CNN (about 0.9 M parameters); input (B, 3, 64, 64) in [-1, 1]."""

    def __init__(self, width: int = 48):
        super().__init__()

        def block(c_in: int, c_out: int, stride: int, kernel: int = 3) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, kernel, stride, padding=(kernel - 1) // 2 if stride == 1 else 1,
                              bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            *block(3, w // 3, 1),  # 64×64 at full resolution: dots and checks are 2-4 pixels wide
            *block(w // 3, w // 2, 2), *block(w // 2, w // 2, 1),  # 32×32
            *block(w // 2, w, 2), *block(w, w, 1),  # 16×16
            *block(w, 2 * w, 2), *block(2 * w, 2 * w, 1),  # 8×8
            *block(2 * w, 2 * w, 2),  # 4×4: the flattened map keeps where the object is
        )
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, 256), nn.ReLU(inplace=True), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(classes)) for name, classes in CLASSES.items()})
        self.colours = nn.Linear(256, len(COLOUR_SETS))
        self.layout = nn.Linear(256, 3)
        self.width = width

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-length features (B, 256) of the last hidden layer: what DINO's embedding is to DreamBooth's
        subject-fidelity score (cosine similarity to the subject's photos). Non-negative, so cosines lie in [0, 1]."""
        return nn.functional.normalize(self.trunk(self.features(images)), dim=1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.trunk(self.features(images))
        out = {name: head(hidden) for name, head in self.heads.items()}
        out["colours"] = self.colours(hidden)
        out["layout"] = self.layout(hidden)
        return out


IGNORED = -100  # cross_entropy's ignore_index: this head learns nothing from this image


def scene_targets(scenes: Sequence[Scene], context_known: Sequence[bool] | None = None) -> dict[str, torch.Tensor]:
    """Training targets for a batch of scenes (what `Judge.forward` predicts). Where `context_known` is False (a
    render whose background was recoloured) the context target is IGNORED; the object's labels still hold."""
    targets = {name: torch.tensor([classes.index(getattr(s, name)) for s in scenes]) for name, classes in CLASSES.items()}
    targets["colours"] = torch.tensor([colour_set_index(s.colours) for s in scenes])
    if context_known is not None:
        targets["context"][~torch.tensor(list(context_known), dtype=torch.bool)] = IGNORED
    targets["layout"] = torch.tensor([[s.x, s.centre_y, s.size] for s in scenes], dtype=torch.float32)
    return targets


def judge_loss(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = sum(nn.functional.cross_entropy(out[name], targets[name]) for name in CLASSES)
    loss = loss + nn.functional.cross_entropy(out["colours"], targets["colours"])
    return loss + 20.0 * nn.functional.mse_loss(out["layout"], targets["layout"])


@dataclass(frozen=True)
class Verdict:
    """What the judge sees in one image."""

    shape: str
    pattern: str
    context: str
    colours: tuple[str, ...]  # the colours it sees: one for a solid object, two (in COLOURS order) for a patterned one
    x: float
    y: float
    size: float

    @property
    def colour(self) -> str:
        """The single colour of a solid object ('' when the judge sees two)."""
        return self.colours[0] if len(self.colours) == 1 else ""

    def shows(self, *, shape: str, pattern: str, colours: Sequence[str]) -> bool:
        """Whether this is the object asked for: same shape and pattern, and the same set of colours."""
        return self.shape == shape and self.pattern == pattern and set(self.colours) == set(colours)


def to_tensor(images) -> torch.Tensor:
    """PIL images, uint8 (N, H, W, 3) arrays, or a float (N, 3, H, W) tensor in [0, 1] → (N, 3, 64, 64) in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float() * 2 - 1
    arrays = np.stack([np.asarray(image.convert("RGB") if hasattr(image, "convert") else image) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def judge_images(judge: Judge, images, batch_size: int = 64) -> list[Verdict]:
    """A `Verdict` per image (PIL images, uint8 arrays, or a (N, 3, 64, 64) tensor in [0, 1])."""
    judge.eval()
    pixels = to_tensor(images)
    verdicts: list[Verdict] = []
    for start in range(0, pixels.shape[0], batch_size):
        out = judge(pixels[start : start + batch_size].to(next(judge.parameters()).device))
        labels = {name: out[name].argmax(dim=1).tolist() for name in (*CLASSES, "colours")}
        for row in range(len(labels["shape"])):
            verdicts.append(Verdict(
                shape=SHAPES[labels["shape"][row]], pattern=PATTERNS[labels["pattern"][row]],
                context=tuple(CONTEXTS)[labels["context"][row]], colours=COLOUR_SETS[labels["colours"][row]],
                x=float(out["layout"][row, 0]), y=float(out["layout"][row, 1]), size=float(out["layout"][row, 2]),
            ))
    return verdicts


@torch.no_grad()
def embed_images(judge: Judge, images, batch_size: int = 64) -> torch.Tensor:
    """`Judge.embed` of PIL images, uint8 arrays, or a (N, 3, 64, 64) tensor in [0, 1], in eval mode."""
    judge.eval()
    pixels = to_tensor(images)
    device = next(judge.parameters()).device
    return torch.cat([judge.embed(pixels[start : start + batch_size].to(device)).cpu()
                      for start in range(0, pixels.shape[0], batch_size)])


def save_judge(judge: Judge, folder: Path, metrics: dict) -> list[Path]:
    """config.json (architecture + measured accuracy) and fp16 safetensors weights."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to(torch.float16 if tensor.is_floating_point() else tensor.dtype).contiguous()
             for name, tensor in judge.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME))
    config = {"class": "waveft_train.toy.judge.Judge", "width": judge.width, "classes": CLASSES,
              "colour_sets": ["+".join(names) for names in COLOUR_SETS], "held_out_accuracy": metrics}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return [folder / WEIGHTS_NAME, folder / CONFIG_NAME]


def load_judge(folder: Path | None = None) -> Judge:
    """The committed judge (next to the toy pipeline), in float32 and eval mode."""
    folder = Path(folder) if folder is not None else toy_model_dir() / JUDGE_FOLDER
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    judge = Judge(width=int(config["width"]))
    state = {name: tensor.float() if tensor.is_floating_point() else tensor
             for name, tensor in load_file(str(folder / WEIGHTS_NAME)).items()}
    judge.load_state_dict(state)
    return judge.eval()


# ----------------------------------------------------------------------------------------------- the VAE's view
def to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def round_trip(vae, images: np.ndarray, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """decode(encode(images)) as uint8: what the VAE (on any device, in any dtype) makes of each scene."""
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="vae round trips", disable=not progress):
        pixels = to_pixels(images[start:start + batch_size]).to(vae.device, vae.dtype)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.float().cpu()
        out.append(((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)
