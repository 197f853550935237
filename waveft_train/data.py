"""Instance and class images for DreamBooth: folder checks, loading via `datasets`, SDXL transforms, collate.

Why it looks like this:
- Local folders are checked by us (`validate_image_folder`) before `datasets` or any model touches them, so
  a missing folder, an empty one, a corrupt file or a metadata.jsonl that silently drops images is one
  readable UserError, not a traceback from inside the imagefolder builder (or a crash at step 300).
- Every random choice (crop window, flip) comes from a generator derived from (seed, epoch, position,
  role), never from global RNG: the same seed gives the same batches, and a resumed run reproduces the
  data of step N without replaying the steps before it (see `DreamBoothDataset`).
- SDXL is conditioned on each image's original size and crop corner; both are recorded the way diffusers'
  `train_dreambooth_lora_sdxl.py` records them (see `transform_image`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps

from waveft_train.errors import UserError

COMMON_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
try:  # What imagefolder picks up (a semi-private path): anything it would load, we check first.
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder as _ImageFolder

    _IMAGEFOLDER_EXTENSIONS = frozenset(extension.lower() for extension in _ImageFolder.EXTENSIONS)
except (ImportError, AttributeError):
    _IMAGEFOLDER_EXTENSIONS = frozenset()
IMAGE_EXTENSIONS = _IMAGEFOLDER_EXTENSIONS | frozenset(COMMON_IMAGE_EXTENSIONS)
_ROLE_IDS = {"instance": 0, "class": 1}
_ALLOWED_TEXT = (
    f"Allowed image extensions: {', '.join(COMMON_IMAGE_EXTENSIONS)} (and the other formats Pillow reads); "
    "other files such as metadata.jsonl or .txt notes are ignored."
)


# ----------------------------------------------------------------------------------------------- folders
def _is_hidden(path: Path, root: Path) -> bool:
    """datasets skips files under names starting with '.' or '__'; so do we."""
    return any(part.startswith((".", "__")) for part in path.relative_to(root).parts)


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(p, folder)
    )


def _check_decodes(path: Path, role: str, config_key: str) -> None:
    """Open, verify and fully decode one file: truncated or fake images fail here, not mid-training."""
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise UserError(
            f"The {role} image {path} (in the folder set by {config_key}) cannot be read as an image: "
            f"{error}. Every file with an image extension in that folder is used for training; remove or "
            "replace this one."
        ) from None


def _check_metadata(folder: Path, images: list[Path], config_key: str) -> None:
    """A metadata.jsonl must be valid and list every image: imagefolder silently drops unlisted ones."""
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        return
    listed: set[Path] = set()
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{metadata} line {number} is not valid JSON ({error}); each line must be one "
                            'object like {"file_name": "dog1.jpg", "text": "a photo of sks dog"}.') from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise UserError(f'{metadata} line {number} has no "file_name" string; each line must name the '
                            'image it captions, e.g. {"file_name": "dog1.jpg", "text": "a photo of sks dog"}.')
        target = (folder / row["file_name"]).resolve()
        if not target.is_file():
            raise UserError(f"{metadata} line {number} names {row['file_name']!r}, which is not a file in "
                            f"{folder} (the folder set by {config_key}); file_name is relative to that folder.")
        listed.add(target)
    unlisted = [p for p in images if p.resolve() not in listed]
    if unlisted:
        names = ", ".join(str(p.relative_to(folder)) for p in unlisted[:5])
        more = f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else ""
        raise UserError(f"{metadata} has no line for {len(unlisted)} image(s) in {folder} ({names}{more}); "
                        "datasets would silently leave them out. Add a line per image or remove the images.")


def validate_image_folder(
    path: str | Path, *, config_key: str, role: str = "instance", allow_empty: bool = False
) -> list[Path]:
    """Check a local image folder before any model loads; return its image files (sorted).

    `config_key` (e.g. "data.instance_dir", "prior.class_dir") is named in every message so the user knows
    what to fix. `allow_empty=True` suits a class folder that prior generation will create and fill: a
    missing or empty folder then returns [], but corrupt files are still reported.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        if allow_empty:
            return []
        raise UserError(f"The {role} image folder {folder} (set by {config_key}) does not exist. Point "
                        f"{config_key} at a folder of images. {_ALLOWED_TEXT}")
    if not folder.is_dir():
        raise UserError(f"{config_key} must be a folder of {role} images, but {folder} is a file. {_ALLOWED_TEXT}")
    images = _image_files(folder)
    if not images and not allow_empty:
        raise UserError(f"The {role} image folder {folder} (set by {config_key}) contains no images. "
                        f"{_ALLOWED_TEXT}")
    for image_path in images:
        _check_decodes(image_path, role, config_key)
    _check_metadata(folder, images, config_key)
    return images


# ----------------------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class ImageSet:
    """Images from one source (local folder or hub dataset) and the prompt of each, decoded lazily."""

    source: str
    rows: datasets.Dataset
    image_column: str
    prompts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def image(self, index: int) -> Image.Image:
        return self.rows[index][self.image_column]


def _looks_like_local_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or "\\" in source or Path(source).expanduser().exists()


def _load_hub(source: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
        raise UserError(
            f"Could not load the hub dataset {source!r} (split {split!r}): {error}. There is no local folder "
            "by that name either. Check the id and split, that you are online (or that the dataset is "
            "already in the Hugging Face cache when HF_HUB_OFFLINE=1), or give a path to a local image folder."
        ) from None


def _image_column(rows: datasets.Dataset, requested: str | None, source: str) -> str:
    if requested is not None and requested in rows.column_names:
        return requested
    candidates = [name for name, feature in rows.features.items() if isinstance(feature, datasets.Image)]
    if requested is None and candidates:
        return candidates[0]
    wanted = f"the image column {requested!r}" if requested else "an image column"
    raise UserError(f"The dataset {source} has no {wanted}; its columns are {rows.column_names} "
                    f"(image-typed: {candidates or 'none'}).")


def _prompts(rows: datasets.Dataset, caption_column: str | None, default_prompt: str, source: str) -> tuple[str, ...]:
    """Caption per row; rows with no caption (None/blank) fall back to default_prompt."""
    if caption_column is None:
        return (default_prompt,) * len(rows)
    if caption_column not in rows.column_names:
        raise UserError(
            f"The caption column {caption_column!r} does not exist in {source}; available columns: "
            f"{rows.column_names}. For a local folder, captions come from a metadata.jsonl with a "
            f"\"file_name\" key and a {caption_column!r} key per image; or set the caption column to null "
            "to use the prompt from the config for every image."
        )
    prompts = []
    for row_number, caption in enumerate(rows[caption_column]):
        if caption is not None and not isinstance(caption, str):
            raise UserError(f"Caption column {caption_column!r} of {source} holds a {type(caption).__name__} "
                            f"in row {row_number}; captions must be strings.")
        prompts.append(caption.strip() if caption and caption.strip() else default_prompt)
    return tuple(prompts)


def load_images(
    source: str | Path,
    *,
    caption_column: str | None,
    default_prompt: str,
    split: str = "train",
    config_key: str = "data.instance_dir",
    role: str = "instance",
    image_column: str | None = None,
    cache_dir: str | None = None,
) -> ImageSet:
    """Load images from a local folder (imagefolder, captions from metadata.jsonl) or a hub dataset id.

    Local folders are validated first (see `validate_image_folder`). A source that is not an existing path
    and does not look like one ("./x", "/x", "~/x") is taken as a hub dataset id.
    """
    source_text = str(source)
    if _looks_like_local_path(source_text):
        folder = Path(source_text).expanduser()
        validate_image_folder(folder, config_key=config_key, role=role)
        try:
            rows = datasets.load_dataset("imagefolder", data_dir=str(folder), split=split, cache_dir=cache_dir)
        except (ValueError, datasets.exceptions.DatasetsError) as error:
            raise UserError(f"datasets could not read the {role} image folder {folder} (set by {config_key}) "
                            f"as split {split!r}: {error}") from None
        source_text = str(folder)
    else:
        rows = _load_hub(source_text, split, cache_dir)
    column = _image_column(rows, image_column, source_text)
    if len(rows) == 0:
        raise UserError(f"The {role} images from {source_text} (set by {config_key}) are empty. {_ALLOWED_TEXT}")
    return ImageSet(source_text, rows, column, _prompts(rows, caption_column, default_prompt, source_text))


def images_from_files(files: Sequence[Path], *, prompt: str, source: str) -> ImageSet:
    """An ImageSet of explicit files (e.g. the class images prior preservation chose), all with one prompt."""
    rows = datasets.Dataset.from_dict({"image": [str(path) for path in files]}).cast_column("image", datasets.Image())
    return ImageSet(source, rows, "image", tuple(prompt for _ in files))


# ----------------------------------------------------------------------------------------------- transforms
@dataclass(frozen=True)
class TransformedImage:
    """A training-ready image and the SDXL micro-conditioning that describes it."""

    pixel_values: torch.Tensor  # (3, resolution, resolution) float32 in [-1, 1]
    original_size: tuple[int, int]  # (height, width) after EXIF rotation, before resize
    crop_top_left: tuple[int, int]  # (top, left) in the resized (and, if flipped, mirrored) image
    flipped: bool


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB: apply EXIF orientation; composite transparency on white rather than on black garbage."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


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
    image: Image.Image, *, resolution: int, center_crop: bool, random_flip: bool, rng: np.random.Generator
) -> TransformedImage:
    """RGB -> resize shorter side -> maybe flip -> crop -> tensor, recording SDXL conditioning.

    Order and coordinates follow diffusers' train_dreambooth_lora_sdxl.py: the resized image is flipped
    *before* cropping, so `crop_top_left` is the crop window's corner in the image the pixels came from
    (the mirrored one when flipped). Equivalently: a window at `left` in the unflipped resized image is
    recorded as `resized_width - left - resolution` when flipped. (diffusers' text-to-image SDXL script
    records `resolution - left` instead, which is not a coordinate of either image; we do not copy that.)
    Center crop uses torchvision's rounding: top = round((height - resolution) / 2).
    Two draws are taken from `rng` every call (flip, then crop), whatever the settings, so the stream
    stays aligned across configs.
    """
    image = to_rgb(image)
    original_size = (image.height, image.width)
    height, width = resized_size(image.height, image.width, resolution)
    if (height, width) != original_size:
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    flip_draw = float(rng.random())
    crop_draw = rng.random(2)
    flipped = random_flip and flip_draw < 0.5
    if flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if center_crop:
        top = max(0, int(round((height - resolution) / 2.0)))
        left = max(0, int(round((width - resolution) / 2.0)))
    else:
        top = int(crop_draw[0] * (height - resolution + 1))
        left = int(crop_draw[1] * (width - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    return TransformedImage(to_tensor(image), original_size, (top, left), flipped)


def item_rng(seed: int, epoch: int, position: int, role: str) -> np.random.Generator:
    """Independent generator per (seed, epoch, dataset position, role): reproducible without replay."""
    entropy = [seed & 0xFFFF_FFFF_FFFF_FFFF, epoch, position, _ROLE_IDS[role]]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def make_example(images: ImageSet, image_index: int, *, resolution: int, center_crop: bool,
                 random_flip: bool, rng: np.random.Generator) -> dict[str, Any]:
    """One example dict: pixel_values, prompt, original_size, crop_top_left."""
    out = transform_image(images.image(image_index), resolution=resolution, center_crop=center_crop,
                          random_flip=random_flip, rng=rng)
    return {"pixel_values": out.pixel_values, "prompt": images.prompts[image_index],
            "original_size": out.original_size, "crop_top_left": out.crop_top_left}


def iter_transformed(images: ImageSet, *, resolution: int, center_crop: bool, random_flip: bool, seed: int,
                     epoch: int = 0, role: str = "instance") -> Iterator[dict[str, Any]]:
    """Each image once, transformed with its own seeded generator (e.g. to cache latents up front)."""
    for index in range(len(images)):
        yield make_example(images, index, resolution=resolution, center_crop=center_crop,
                           random_flip=random_flip, rng=item_rng(seed, epoch, index, role))


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
                 num_class_images: int | None = None) -> None:
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
        self.num_class = 0
        if class_images is not None:
            limit = len(class_images) if num_class_images is None else num_class_images
            self.num_class = min(len(class_images), limit)

    def __len__(self) -> int:
        return max(self.num_instance, self.num_class)

    def _example(self, images: ImageSet, image_index: int, rng: np.random.Generator) -> dict[str, Any]:
        return make_example(images, image_index, resolution=self.resolution, center_crop=self.center_crop,
                            random_flip=self.random_flip, rng=rng)

    def __getitem__(self, index: int) -> dict[str, dict[str, Any]]:
        if index < 0:
            raise IndexError(f"negative index {index}")
        epoch, position = divmod(index, len(self))
        instance_index = (position % self.num_instance) % len(self.instance_images)
        item = {"instance": self._example(self.instance_images, instance_index,
                                          item_rng(self.seed, epoch, position, "instance"))}
        if self.class_images is not None:
            item["class"] = self._example(self.class_images, position % self.num_class,
                                          item_rng(self.seed, epoch, position, "class"))
        return item


def epoch_indices(length: int, *, epoch: int, seed: int) -> list[int]:
    """A seeded shuffle of one epoch's positions, offset by epoch * length (for DreamBoothDataset)."""
    order = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFF_FFFF_FFFF_FFFF, epoch])).permutation(length)
    return [epoch * length + int(position) for position in order]


def collate(examples: Sequence[dict[str, dict[str, Any]]], with_prior: bool) -> dict[str, Any]:
    """Batch instance examples first, then class examples: the prior loss splits the batch at num_instance.

    Examples carry `pixel_values`, or `latents` when they come from a latent cache.
    """
    items = [example["instance"] for example in examples]
    if with_prior:
        if any("class" not in example for example in examples):
            raise ValueError("with_prior=True but the dataset was built without class images")
        items += [example["class"] for example in examples]
    image_key = "latents" if "latents" in items[0] else "pixel_values"  # cached latents or raw pixels
    return {
        image_key: torch.stack([item[image_key] for item in items]).contiguous(),
        "prompts": [item["prompt"] for item in items],
        "original_sizes": torch.tensor([item["original_size"] for item in items], dtype=torch.long),
        "crop_top_lefts": torch.tensor([item["crop_top_left"] for item in items], dtype=torch.long),
        "num_instance": len(examples),
    }


class ProcessBatchSampler(torch.utils.data.Sampler):
    """An endless stream of this process's batches, starting at micro-batch `start`.

    All processes walk one seeded global order (`epoch_indices`, epoch after epoch); each micro-batch takes
    `batch_size * num_processes` positions and this process keeps its own slice. Starting at any micro-batch
    gives exactly the batches an uninterrupted run would have drawn there: resume needs no replay.
    """

    def __init__(self, length: int, *, batch_size: int, seed: int, start: int = 0, process_index: int = 0,
                 num_processes: int = 1) -> None:
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.start, self.process_index, self.num_processes = start, process_index, num_processes

    def __iter__(self) -> Iterator[list[int]]:
        span = self.batch_size * self.num_processes
        epoch, offset = divmod(self.start * span, self.length)
        pending: list[int] = []
        while True:
            pending += epoch_indices(self.length, epoch=epoch, seed=self.seed)[offset:]
            offset, epoch = 0, epoch + 1
            while len(pending) >= span:
                mine = self.process_index * self.batch_size
                yield pending[mine : mine + self.batch_size]
                pending = pending[span:]
