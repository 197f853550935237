"""The DreamBooth paper's metrics for adapters of real SDXL, read by DINO and CLIP (metric_models.py).

For one model's samples (the adapter's, or the base model's on the same prompts and seeds):
- `dino`: subject fidelity, the mean cosine similarity of every pair (subject-prompt sample, instance photo) of DINO
  ViT-S/16 CLS features; `clip_i`: the same with CLIP image embeddings;
- `clip_t`: prompt fidelity, the mean cosine similarity of each subject-prompt sample's CLIP image embedding and the
  CLIP text embedding of its prompt with the class prompt in place of the instance prompt ("a photo of dog on the
  beach" for "a photo of sks dog on the beach": CLIP has never seen the identifier);
- `diversity`: 1 − the mean DINO similarity of two samples of one prompt on different seeds (the paper's DIV uses
  LPIPS, which has no transformers checkpoint; DINO is the stand-in, higher = more varied);
- class drift, from the class prompt's samples against the instance photos: `class_dino`, `class_clip_i` and
  `class_colour_similarity` (the palette overlap of evaluation/colour.py, which sees a class slide toward the
  subject's colours that the features miss).
The ranking reads `subject_similarity` (mean of dino and clip_i), `class_subject_similarity` (mean of class_dino and
class_clip_i), `class_colour_similarity` and `prompt_fidelity` (clip_t); evaluation/ranking.py says how.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from waveft_train.evaluation.colour import colour_histogram, palette_overlap
from waveft_train.evaluation.metric_models import MetricModels

# From the DreamBooth paper's prompt list for objects: places the instance photos rarely show.
DEFAULT_CONTEXTS = ("on the beach", "in the jungle", "in the snow", "on a cobblestone street",
                    "with a city in the background", "on top of a wooden floor")


@dataclass(frozen=True)
class DreamBoothPrompts:
    """What is sampled: "<instance prompt> <context>" for every context, and the class prompt alone."""

    instance_prompt: str
    class_prompt: str
    contexts: tuple[str, ...] = DEFAULT_CONTEXTS

    def subject_prompts(self) -> list[str]:
        return [f"{self.instance_prompt} {context}" for context in self.contexts]

    def clip_t_texts(self) -> list[str]:
        """The subject prompts as CLIP-T reads them: the class prompt in place of the instance prompt."""
        return [f"{self.class_prompt} {context}" for context in self.contexts]


@dataclass
class References:
    """The instance photos as the metrics see them, computed once per run."""

    dino: torch.Tensor
    clip: torch.Tensor
    palette: np.ndarray

    @classmethod
    def of(cls, models: MetricModels, photos: Sequence[Image.Image]) -> References:
        return cls(models.dino_features(photos), models.clip_image_features(photos), colour_histogram(photos))


def mean_cosine(features: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine similarity over every (row of features, row of references) pair; rows are unit vectors."""
    return float((features @ references.T).mean())


def within_group_similarity(features: torch.Tensor, group_size: int) -> float:
    """Mean cosine similarity of two different rows of one group (consecutive rows of `group_size`)."""
    groups = features.reshape(-1, group_size, features.shape[-1])
    similarity = groups @ groups.transpose(1, 2)
    off_diagonal = ~torch.eye(group_size, dtype=torch.bool)
    return float(similarity[:, off_diagonal].mean())


def dreambooth_scores(models: MetricModels, references: References, prompts: DreamBoothPrompts,
                      subject_images: Sequence[Image.Image], class_images: Sequence[Image.Image], seeds: int) -> dict:
    """The metrics of one model's samples: `subject_images` hold `seeds` samples per context, context by context, in
    the order of prompts.contexts; `class_images` are the class prompt's samples."""
    if len(subject_images) != seeds * len(prompts.contexts):
        raise ValueError(f"{len(subject_images)} subject samples for {len(prompts.contexts)} contexts × {seeds} seeds")
    dino, clip = models.dino_features(subject_images), models.clip_image_features(subject_images)
    texts = models.clip_text_features(prompts.clip_t_texts()).repeat_interleave(seeds, dim=0)
    class_dino, class_clip = models.dino_features(class_images), models.clip_image_features(class_images)
    result = {
        "dino": mean_cosine(dino, references.dino),
        "clip_i": mean_cosine(clip, references.clip),
        "clip_t": float((clip * texts).sum(dim=-1).mean()),
        "diversity": 1.0 - within_group_similarity(dino, seeds) if seeds > 1 else 0.0,
        "class_dino": mean_cosine(class_dino, references.dino),
        "class_clip_i": mean_cosine(class_clip, references.clip),
        "class_colour_similarity": palette_overlap(colour_histogram(class_images), references.palette),
    }
    result["subject_similarity"] = (result["dino"] + result["clip_i"]) / 2
    result["class_subject_similarity"] = (result["class_dino"] + result["class_clip_i"]) / 2
    result["prompt_fidelity"] = result["clip_t"]
    return result
