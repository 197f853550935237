"""Training examples for DreamBooth: SDXL transforms, the instance/class pairing, collate, and the batch sampler.

Why it looks like this:
- Every random choice (crop window, flip) comes from a generator derived from (seed, epoch, position,
  role), never from global RNG: the same seed gives the same batches, and a resumed run reproduces the
  data of step N without replaying the steps before it (see `DreamBoothDataset`).
- SDXL is conditioned on each image's original size, crop corner and target size; they are recorded the way
  diffusers' `train_dreambooth_lora_sdxl.py` records them (see `transform_image`).
- With `bucketing`, each subject photo trains at the aspect-ratio bucket nearest its shape (buckets.py); the
  class image of an item is brought to the same bucket (a crop of the square class image, recorded like any
  crop), and every optimizer step draws its whole global batch from one bucket (`StepBatchSampler`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from waveft_train.data.buckets import bucket_sizes, cover_size, nearest_bucket
from waveft_train.data.images import ImageSet, to_rgb

_ROLE_IDS = {"instance": 0, "class": 1}


# ----------------------------------------------------------------------------------------------- transforms
@dataclass(frozen=True)
class TransformedImage:
    """A training-ready image and the SDXL micro-conditioning that describes it."""

    pixel_values: torch.Tensor  # (3, height, width) of the target size, float32 in [-1, 1]
    original_size: tuple[int, int]  # (height, width) after EXIF rotation, before resize
    crop_top_left: tuple[int, int]  # (top, left) in the resized (and, if flipped, mirrored) image
    flipped: bool
    target_size: tuple[int, int] = (0, 0)  # (height, width) trained at


def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """Shorter side -> resolution, longer side scaled and truncated (torchvision `Resize(int)` rule)."""
    if height <= width:
        return resolution, int(resolution * width / height)
    return int(resolution * height / width), resolution


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1] (ToTensor + Normalize([0.5], [0.5]))."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def transform_image(
    image: Image.Image, *, resolution: int, center_crop: bool, random_flip: bool, rng: np.random.Generator,
    target: tuple[int, int] | None = None,
) -> TransformedImage:
    """RGB -> resize to cover the target -> maybe flip -> crop -> tensor, recording SDXL conditioning.

    `target` is (height, width), by default resolution × resolution: the square case resizes the shorter side to
    `resolution` (torchvision's `Resize(int)` rule), a bucket resizes so that the image just covers it.
    Order and coordinates follow diffusers' train_dreambooth_lora_sdxl.py: the resized image is flipped
    *before* cropping, so `crop_top_left` is the crop window's corner in the image the pixels came from
    (the mirrored one when flipped). Equivalently: a window at `left` in the unflipped resized image is
    recorded as `resized_width - left - width` when flipped. (diffusers' text-to-image SDXL script
    records `resolution - left` instead, which is not a coordinate of either image; we do not copy that.)
    Center crop uses torchvision's rounding: top = round((height - target height) / 2).
    Two draws are taken from `rng` every call (flip, then crop), whatever the settings, so the stream
    stays aligned across configs.
    """
    image = to_rgb(image)
    original_size = (image.height, image.width)
    target_height, target_width = target or (resolution, resolution)
    if target_height == target_width:
        height, width = resized_size(image.height, image.width, target_height)
    else:
        width, height = cover_size(image.width, image.height, (target_width, target_height))
    if (height, width) != original_size:
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    flip_draw = float(rng.random())
    crop_draw = rng.random(2)
    flipped = random_flip and flip_draw < 0.5
    if flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if center_crop:
        top = max(0, int(round((height - target_height) / 2.0)))
        left = max(0, int(round((width - target_width) / 2.0)))
    else:
        top = int(crop_draw[0] * (height - target_height + 1))
        left = int(crop_draw[1] * (width - target_width + 1))
    image = image.crop((left, top, left + target_width, top + target_height))
    return TransformedImage(to_tensor(image), original_size, (top, left), flipped, (target_height, target_width))


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    """An independent numpy generator per (train.seed, keys...): every random draw of the data order and the
    augmentations comes from one, so any of them can be recomputed on its own, without replay."""
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFF_FFFF_FFFF_FFFF, *keys]))


def item_rng(seed: int, epoch: int, position: int, role: str) -> np.random.Generator:
    """Independent generator per (seed, epoch, dataset position, role): reproducible without replay."""
    return seeded_rng(seed, epoch, position, _ROLE_IDS[role])


def make_example(images: ImageSet, image_index: int, *, resolution: int, center_crop: bool,
                 random_flip: bool, rng: np.random.Generator, target: tuple[int, int] | None = None) -> dict[str, Any]:
    """One example dict: image (pixels in [-1, 1]), prompt, original_size, crop_top_left, target_size."""
    out = transform_image(images.image(image_index), resolution=resolution, center_crop=center_crop,
                          random_flip=random_flip, rng=rng, target=target)
    return {"image": out.pixel_values, "prompt": images.prompts[image_index], "original_size": out.original_size,
            "crop_top_left": out.crop_top_left, "target_size": out.target_size}


def iter_transformed(images: ImageSet, *, resolution: int, center_crop: bool, random_flip: bool, seed: int,
                     epoch: int = 0, role: str = "instance") -> Iterator[dict[str, Any]]:
    """Each image once, transformed with its own seeded generator (e.g. to cache latents up front)."""
    for index in range(len(images)):
        yield make_example(images, index, resolution=resolution, center_crop=center_crop,
                           random_flip=random_flip, rng=item_rng(seed, epoch, index, role))


def image_buckets(images: ImageSet, resolution: int) -> list[tuple[int, int]]:
    """The (height, width) bucket of every image, from its upright size (EXIF orientation applied)."""
    buckets = bucket_sizes(resolution)
    chosen = []
    for width, height in images.upright_sizes():
        bucket_width, bucket_height = nearest_bucket(width, height, buckets)
        chosen.append((bucket_height, bucket_width))
    return chosen


# ----------------------------------------------------------------------------------------------- dataset
class DreamBoothDataset(torch.utils.data.Dataset):
    """Pairs each instance example (images x repeats) with a class example, diffusers-style.

    len = max(instance images x repeats, class images). `dataset[i]` for i >= len is allowed and means
    position i % len in epoch i // len: same images, fresh crops/flips. A sampler that yields
    `epoch * len + position` (see `epoch_indices`) gives every epoch new augmentations, with no mutable
    epoch counter to keep in sync across DataLoader workers or processes, and a resumed run can regenerate
    any step's data directly.
    """

    def __init__(self, instance_images: ImageSet, *, resolution: int, seed: int, center_crop: bool = False,
                 random_flip: bool = False, repeats: int = 1, class_images: ImageSet | None = None,
                 num_class_images: int | None = None, bucketing: bool = False) -> None:
        if len(instance_images) == 0 or repeats < 1 or resolution < 1:
            raise ValueError("need instance images, repeats >= 1 and resolution >= 1")
        if class_images is not None and len(class_images) == 0:
            raise ValueError("class_images is empty; validate the class folder (and generate images) first")
        if num_class_images is not None and num_class_images < 1:
            raise ValueError("num_class_images must be >= 1 when given")
        self.instance_images = instance_images
        self.class_images = class_images
        self.resolution = resolution
        self.seed = seed
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.repeats = repeats
        self.num_instance = len(instance_images) * repeats
        square = (resolution, resolution)
        self.buckets = image_buckets(instance_images, resolution) if bucketing else [square] * len(instance_images)
        self.num_class = 0
        if class_images is not None:
            limit = len(class_images) if num_class_images is None else num_class_images
            self.num_class = min(len(class_images), limit)

    def __len__(self) -> int:
        return max(self.num_instance, self.num_class)

    def _instance_index(self, position: int) -> int:
        return (position % self.num_instance) % len(self.instance_images)

    def bucket_of(self, position: int) -> tuple[int, int]:
        """(height, width) that the item at `position` trains at: its instance image's bucket."""
        return self.buckets[self._instance_index(position)]

    def _example(self, images: ImageSet, image_index: int, rng: np.random.Generator,
                 target: tuple[int, int]) -> dict[str, Any]:
        return make_example(images, image_index, resolution=self.resolution, center_crop=self.center_crop,
                            random_flip=self.random_flip, rng=rng, target=target)

    def __getitem__(self, index: int) -> dict[str, dict[str, Any]]:
        if index < 0:
            raise IndexError(f"negative index {index}")
        epoch, position = divmod(index, len(self))
        return self.item_at(epoch, position, rng_position=position)

    def item_at(self, epoch: int, position: int, *, rng_position: int) -> dict[str, dict[str, Any]]:
        """The item at `position` in `epoch`, its random draws keyed by `rng_position` (its place in a larger
        dataset when this one is a concept of several: data/concepts.py)."""
        instance_index, target = self._instance_index(position), self.bucket_of(position)
        item = {"instance": self._example(self.instance_images, instance_index,
                                          item_rng(self.seed, epoch, rng_position, "instance"), target)}
        if self.class_images is not None:
            item["class"] = self._example(self.class_images, position % self.num_class,
                                          item_rng(self.seed, epoch, rng_position, "class"), target)
        return item


def epoch_indices(length: int, *, epoch: int, seed: int) -> list[int]:
    """A seeded shuffle of one epoch's positions, offset by epoch * length (for DreamBoothDataset)."""
    order = seeded_rng(seed, epoch).permutation(length)
    return [epoch * length + int(position) for position in order]


def collate(examples: Sequence[dict[str, dict[str, Any]]], with_prior: bool) -> dict[str, Any]:
    """Batch instance examples first, then class examples: the prior loss splits the batch at num_instance.

    `images` are pixels, or latents when the examples come from a latent cache; the conditioning knows which.
    """
    items = [example["instance"] for example in examples]
    if with_prior:
        if any("class" not in example for example in examples):
            raise ValueError("with_prior=True but the dataset was built without class images")
        items += [example["class"] for example in examples]
    return {
        "images": torch.stack([item["image"] for item in items]).contiguous(),
        "prompts": [item["prompt"] for item in items],
        "original_sizes": torch.tensor([item["original_size"] for item in items], dtype=torch.long),
        "crop_top_lefts": torch.tensor([item["crop_top_left"] for item in items], dtype=torch.long),
        "target_sizes": torch.tensor([item["target_size"] for item in items], dtype=torch.long),
        "num_instance": len(examples),
    }


class StepBatchSampler(torch.utils.data.Sampler):
    """An endless stream of this process's micro-batches, starting at optimizer step `start_step`.

    Every step draws its whole global batch (`batch_size` × processes × accumulation positions) from one bucket,
    so every micro-batch of every process stacks, and the draw depends on the global batch only: any layout that
    keeps it sees the same examples in the same order. Each bucket has its own seeded stream of shuffled epochs
    over its positions; a step picks a bucket with probability proportional to its size. With one bucket (no
    bucketing, or square photos) this is plain epoch after epoch of one shuffled order. Yielded indices are
    `epoch * len + position`, the bucket's epoch, so every pass over a photo gets fresh crops and flips. Starting
    at any step gives exactly what an uninterrupted run drew there (the bucket choices before it are replayed,
    which is cheap; no data is).
    """

    def __init__(self, buckets: Sequence[tuple[int, int]], *, batch_size: int, accumulation: int, seed: int,
                 start_step: int = 0, process_index: int = 0, num_processes: int = 1) -> None:
        self.length, self.batch_size, self.accumulation, self.seed = len(buckets), batch_size, accumulation, seed
        self.start_step, self.process_index, self.num_processes = start_step, process_index, num_processes
        groups: dict[tuple[int, int], list[int]] = {}
        for position, bucket in enumerate(buckets):
            groups.setdefault(bucket, []).append(position)
        self.groups = [groups[bucket] for bucket in sorted(groups)]

    def _stream(self, group: int, start: int) -> Iterator[int]:
        """Bucket `group`'s endless shuffled positions (as dataset indices), from its `start`-th draw on."""
        positions = self.groups[group]
        epoch, offset = divmod(start, len(positions))
        while True:
            if len(self.groups) == 1:
                order = epoch_indices(self.length, epoch=epoch, seed=self.seed)
            else:
                shuffled = seeded_rng(self.seed, epoch, group + 1).permutation(len(positions))
                order = [epoch * self.length + positions[int(i)] for i in shuffled]
            yield from order[offset:]
            offset, epoch = 0, epoch + 1

    def _group_of_step(self, step: int) -> int:
        if len(self.groups) == 1:
            return 0
        sizes = np.array([len(group) for group in self.groups], dtype=float)
        return int(seeded_rng(self.seed, step, 0xB0C4E7).choice(len(self.groups), p=sizes / sizes.sum()))

    def __iter__(self) -> Iterator[list[int]]:
        span = self.batch_size * self.num_processes
        per_step = span * self.accumulation
        drawn = [0] * len(self.groups)
        for step in range(self.start_step):
            drawn[self._group_of_step(step)] += per_step
        streams = [self._stream(group, start) for group, start in enumerate(drawn)]
        step = self.start_step
        while True:
            stream = streams[self._group_of_step(step)]
            for _ in range(self.accumulation):
                chunk = [next(stream) for _ in range(span)]
                mine = self.process_index * self.batch_size
                yield chunk[mine:mine + self.batch_size]
            step += 1
