"""Samples to score: batched SDXL sampling where each image starts from the noise of its own seed.

Shared by the DreamBooth metrics (dreambooth.py) and the toy world's judge (toy/evaluate.py): the same prompt and
seed give the same starting noise whatever the batch, so the adapter and the base model are compared image by image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from waveft_train.adapter.sampling import default_image_size


@dataclass
class Samples:
    """Images (N, 3, H, W) in [0, 1] with the prompt and seed of each."""

    images: object
    prompts: list[str]
    seeds: list[int]


def sample(pipeline, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float,
           batch_size: int = 16) -> Samples:
    """Batched sampling; image i starts from the noise of a CPU generator seeded with seeds[i]."""
    size = default_image_size(pipeline)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds[start:stop]]
        with torch.no_grad():
            out = pipeline(prompt=list(prompts[start:stop]), num_inference_steps=steps, guidance_scale=guidance,
                           height=size, width=size, generator=generators, output_type="pt")
        chunks.append(out.images.float().cpu().clamp(0, 1))
    return Samples(torch.cat(chunks), list(prompts), [int(seed) for seed in seeds])


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [0, 1] -> RGB images."""
    pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in pixels]
