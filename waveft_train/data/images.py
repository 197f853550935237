"""Subject and class images: folder checks, loading via `datasets` (local folders or hub datasets), decoding.

Why it looks like this:
- Local folders are checked by us (`validate_image_folder`) before `datasets` or any model touches them, so a
  missing folder, an empty one, a corrupt file, an image mode with no faithful RGB rendering, or a metadata.jsonl
  that silently drops images (or is not UTF-8) is one readable UserError, not a traceback from inside the
  imagefolder builder (or a crash at step 300).
- What we change about the user's data is said, naming the file: blank captions replaced by the instance prompt,
  images far below the training resolution (upscaled, so blurry).
- `image_manifest` hashes every image and caption, so a resumed run can tell that the subject photos changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageCms, ImageOps

from waveft_train.common.errors import UserError
from waveft_train.common.paths import is_hidden, is_local

logger = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------------------------- decoding
class UnconvertibleImage(ValueError):
    """An image whose pixels have no faithful 8-bit RGB rendering (e.g. HDR floats, negative integers)."""


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB, faithful to what the file shows, for every mode Pillow opens.

    Pillow's own `convert("RGB")` clips high-bit-depth grayscale instead of scaling it (a 16-bit PNG comes out
    almost all white) and truncates floats (a [0, 1] float TIFF comes out black), so those are scaled here:
    16-bit values by 255/65535, 32-bit integers the same when they fit 16 bits, floats in [0, 1] by 255 (floats
    already in [0, 255] as they are). Transparency is composited on white. CIELAB goes through ImageCms. What has
    no faithful rendering (negative or over-16-bit integers, floats outside [0, 255], NaN) raises
    `UnconvertibleImage`, which the folder check turns into a message naming the file.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UnconvertibleImage(f"its {mode} pixel values span {values.min()}..{values.max()}, beyond 16 bits")
        gray = np.round(values * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise UnconvertibleImage("its floating-point pixels include NaN or infinity")
        low, high = (values.min(), values.max()) if values.size else (0.0, 1.0)
        if low < 0 or high > 255:
            raise UnconvertibleImage(f"its floating-point pixels span {low:g}..{high:g}, neither [0, 1] nor [0, 255] "
                                     "(HDR or unnormalized data)")
        scaled = values * 255.0 if high <= 1.0 else values
        return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L").convert("RGB")
    if mode == "LAB":
        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(image, transform)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:  # a mode Pillow reads but cannot convert
        raise UnconvertibleImage(f"Pillow cannot convert its mode {mode} to RGB ({error})") from None


def _check_decodes(path: Path, role: str, config_key: str) -> None:
    """Open, verify and fully decode one file: truncated, fake or unconvertible images fail here, not mid-training."""
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
            to_rgb(image)
    except UnconvertibleImage as error:
        raise UserError(
            f"The {role} image {path} (in the folder set by {config_key}) has no faithful 8-bit RGB rendering: "
            f"{error}. Convert it to an 8-bit (or 16-bit) PNG or JPEG, or remove it from the folder."
        ) from None
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
    for number, raw in enumerate(metadata.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UserError(f"{metadata} line {number} is not UTF-8 text (byte {raw[error.start]:#04x} at column "
                            f"{error.start + 1}); save the file as UTF-8 (captions may hold any language in UTF-8)."
                            ) from None
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

    def upright_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of every image as it is shown, EXIF orientation applied, read from the headers only."""
        sizes = []
        for _name, data in self.encoded():
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if image.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
                    width, height = height, width
            sizes.append((width, height))
        return sizes

    def names(self) -> list[str]:
        """A name per row, for messages: the file path for local images, else "row i of <source>"."""
        entries = self.rows.cast_column(self.image_column, datasets.Image(decode=False))[self.image_column]
        return [entry.get("path") or f"row {index} of {self.source}" for index, entry in enumerate(entries)]

    def encoded(self) -> list[tuple[str, bytes]]:
        """(name, file bytes) per row, without decoding."""
        entries = self.rows.cast_column(self.image_column, datasets.Image(decode=False))[self.image_column]
        return [(name, entry.get("bytes") or Path(entry["path"]).read_bytes())
                for name, entry in zip(self.names(), entries)]


def image_manifest(images: ImageSet) -> dict[str, str]:
    """A content hash per image (and its caption), keyed by its name: what a resumed run must still train on."""
    return {name: hashlib.sha256(data + b"\0" + prompt.encode("utf-8")).hexdigest()[:16]
            for (name, data), prompt in zip(images.encoded(), images.prompts)}


def manifest_changes(before: dict[str, str], now: dict[str, str]) -> str:
    """What changed between two image manifests, in words ('' when nothing did)."""
    parts = []
    for what, names in (("added", sorted(set(now) - set(before))), ("removed", sorted(set(before) - set(now))),
                        ("changed", sorted(name for name in set(now) & set(before) if now[name] != before[name]))):
        if names:
            parts.append(f"{len(names)} {what} ({', '.join(names[:3])}{' …' if len(names) > 3 else ''})")
    return "; ".join(parts)


def warn_about_small_images(images: ImageSet, resolution: int, config_key: str) -> None:
    """Name every image whose shorter side is under half of `resolution`: it is upscaled, so training sees blur."""
    for name, data in images.encoded():
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except (OSError, ValueError):
            continue  # unreadable images are reported by the folder check or when decoded
        if min(width, height) * 2 < resolution:
            logger.warning("The image %s (%s) is %dx%d, far below %s: it is upscaled %.1fx to %d px and will look "
                           "blurry to the model. Use photos at least %d px on the shorter side, or a lower resolution.",
                           name, config_key, width, height, f"data.resolution {resolution}",
                           resolution / min(width, height), resolution, resolution // 2)


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


def _prompts(rows: datasets.Dataset, caption_column: str | None, default_prompt: str, source: str,
             image_column: str) -> tuple[str, ...]:
    """Caption per row; rows with no caption (None/blank) fall back to default_prompt, with a warning naming them."""
    if caption_column is None:
        return (default_prompt,) * len(rows)
    if caption_column not in rows.column_names:
        raise UserError(
            f"The caption column {caption_column!r} does not exist in {source}; available columns: "
            f"{rows.column_names}. For a local folder, captions come from a metadata.jsonl with a "
            f"\"file_name\" key and a {caption_column!r} key per image; or set the caption column to null "
            "to use the prompt from the config for every image."
        )
    prompts, blank = [], []
    for row_number, caption in enumerate(rows[caption_column]):
        if caption is not None and not isinstance(caption, str):
            raise UserError(f"Caption column {caption_column!r} of {source} holds a {type(caption).__name__} "
                            f"in row {row_number}; captions must be strings.")
        if not (caption and caption.strip()):
            blank.append(row_number)
        prompts.append(caption.strip() if caption and caption.strip() else default_prompt)
    if blank:
        entries = rows.cast_column(image_column, datasets.Image(decode=False))[image_column]
        names = [entries[row].get("path") or f"row {row}" for row in blank]
        logger.warning("%d image(s) of %s have no caption in %r (%s%s); they are trained with the instance prompt "
                       "%r instead.", len(blank), source, caption_column, ", ".join(names[:5]),
                       " …" if len(names) > 5 else "", default_prompt)
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
        shown = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # "Generating train split: 5 examples" says nothing a DreamBooth user needs
        try:
            rows = datasets.load_dataset("imagefolder", data_dir=str(folder), split=split, cache_dir=cache_dir)
        except (ValueError, datasets.exceptions.DatasetsError) as error:
            raise UserError(f"datasets could not read the {role} image folder {folder} (set by {config_key}) "
                            f"as split {split!r}: {error}") from None
        finally:
            if shown:
                datasets.enable_progress_bars()
        source_text = str(folder)
    else:
        rows = _load_hub(source_text, split, cache_dir)
    column = _image_column(rows, image_column, source_text)
    if len(rows) == 0:
        raise UserError(f"The {role} images from {source_text} (set by {config_key}) are empty. {_ALLOWED_TEXT}")
    return ImageSet(source_text, rows, column, _prompts(rows, caption_column, default_prompt, source_text, column))


def images_from_files(files: Sequence[Path], *, prompt: str, source: str) -> ImageSet:
    """An ImageSet of explicit files (e.g. the class images prior preservation chose), all with one prompt."""
    rows = datasets.Dataset.from_dict({"image": [str(path) for path in files]}).cast_column("image", datasets.Image())
    return ImageSet(source, rows, "image", tuple(prompt for _ in files))


