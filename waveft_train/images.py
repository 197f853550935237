"""Subject and class images: folder checks, and loading via `datasets` (local folders or hub datasets).

Why it looks like this: local folders are checked by us (`validate_image_folder`) before `datasets` or any model
touches them, so a missing folder, an empty one, a corrupt file or a metadata.jsonl that silently drops images is
one readable UserError, not a traceback from inside the imagefolder builder (or a crash at step 300).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
from PIL import Image

from waveft_train.errors import UserError
from waveft_train.paths import is_hidden, is_local

COMMON_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
try:  # What imagefolder picks up (a semi-private path): anything it would load, we check first.
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder as _ImageFolder

    _IMAGEFOLDER_EXTENSIONS = frozenset(extension.lower() for extension in _ImageFolder.EXTENSIONS)
except (ImportError, AttributeError):
    _IMAGEFOLDER_EXTENSIONS = frozenset()
IMAGE_EXTENSIONS = _IMAGEFOLDER_EXTENSIONS | frozenset(COMMON_IMAGE_EXTENSIONS)
_ALLOWED_TEXT = (
    f"Allowed image extensions: {', '.join(COMMON_IMAGE_EXTENSIONS)} (and the other formats Pillow reads); "
    "other files such as metadata.jsonl or .txt notes are ignored."
)


# ----------------------------------------------------------------------------------------------- folders
def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(p, folder)
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
    if is_local(source_text):
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


