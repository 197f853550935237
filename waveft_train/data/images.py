"""Subject and class images: folder checks, loading (local folders or hub datasets via `datasets`), notices.

Why it looks like this:
- Local folders are checked by us (`validate_image_folder`) before any model touches them, so a missing folder, an
  empty one, a corrupt file, an image mode with no faithful RGB rendering, HEIC photos without the `heif` extra, or a
  metadata.jsonl that names what is not a photo (or is not UTF-8) is one readable UserError, not a traceback (or a
  crash at step 300).
- A photo is any file Pillow opens (photos.py), whatever its extension, so a local folder is loaded from the list
  the check made (`datasets`' imagefolder would pick files by a fixed extension list and drop .avif and .heic): what
  we check is exactly what gets trained on, in imagefolder's order, under imagefolder's names.
- What we change about the user's data or leave out is said once, naming the files: skipped files with the reason,
  photos decoded reduced, multi-frame images (first frame), blank captions replaced by the instance prompt, images
  far below the training resolution (upscaled, so blurry).
- `image_manifest` hashes every image and caption (from metadata.jsonl or a .txt file), so a resumed run can tell
  that the subject photos or their captions changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import datasets
from PIL import Image

from waveft_train.common.errors import UserError
from waveft_train.common.paths import is_local
from waveft_train.data import photos
from waveft_train.data.caption_files import merge_caption_files
from waveft_train.data.photos import IMAGE_EXTENSIONS, UnconvertibleImage, to_rgb

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "ImageSet", "UnconvertibleImage", "image_manifest", "images_from_files", "load_images",
           "manifest_changes", "to_rgb", "validate_image_folder", "warn_about_small_images"]

_ALLOWED_TEXT = (f"Photos are the files Pillow reads: {', '.join(photos.COMMON_IMAGE_EXTENSIONS)} (HEIC/HEIF with "
                 f"`{photos.HEIF_EXTRA}`) and more; other files such as metadata.jsonl or .txt notes are skipped.")
NOTE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".md", ".yaml", ".yml", ".toml")
NOTICE_CHARS = 300  # a notice is one line: a few names, then "… and N more"


# ----------------------------------------------------------------------------------------------- folders
def _unreadable(path: Path, role: str, config_key: str, error: BaseException) -> UserError:
    return UserError(
        f"The {role} image {path} (in the folder set by {config_key}) cannot be read as an image: {error}. Every "
        "file with an image extension in that folder is used for training; remove or replace this one."
    )


def _found_photos(folder: Path, role: str, config_key: str) -> photos.FolderPhotos:
    """The folder's photos (photos.find_photos); image-named files Pillow cannot read, HEIC photos without the extra
    and photos past the pixel limit are refused, naming them."""
    found = photos.find_photos(folder)
    for path, error in found.unreadable:
        raise _unreadable(path, role, config_key, error)
    if found.heif_missing:
        raise UserError(f"The {role} image folder {folder} (set by {config_key}) holds HEIC/HEIF photos "
                        f"({_listed(found.heif_missing)}), which Pillow reads only with pillow-heif: install it with "
                        f"`{photos.HEIF_EXTRA}`, or convert them to JPEG or PNG.")
    if found.too_large:
        raise UserError(f"The {role} image folder {folder} (set by {config_key}) holds photos "
                        f"({_listed(found.too_large)}) {photos.TOO_LARGE_ADVICE}.")
    return found


def _check_decodes(path: Path, role: str, config_key: str) -> None:
    """Open, verify and fully decode one file: truncated, fake or unconvertible images fail here, not mid-training."""
    try:
        photos.check_photo(path)
    except UnconvertibleImage as error:
        raise UserError(
            f"The {role} image {path} (in the folder set by {config_key}) has no faithful 8-bit RGB rendering: "
            f"{error}. Convert it to an 8-bit (or 16-bit) PNG or JPEG, or remove it from the folder."
        ) from None
    except photos.READ_ERRORS as error:
        raise _unreadable(path, role, config_key, error) from None


def _read_metadata(folder: Path, images: list[Path], config_key: str) -> list[dict] | None:
    """The rows of the folder's metadata.jsonl (None without one), which must be valid, name only photos and list
    every photo: as in imagefolder, the rows (their order, any repeats) are what is trained on."""
    metadata = folder / photos.METADATA
    if not metadata.is_file():
        return None
    resolved = {p.resolve() for p in images}
    listed: set[Path] = set()
    rows = []
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
        relative = os.path.normpath(row["file_name"])
        if target not in resolved or os.path.isabs(relative) or relative.split(os.sep)[0] == "..":
            raise UserError(f"{metadata} line {number} names {row['file_name']!r}, which is not a photo in {folder} "
                            f"(the folder set by {config_key}): only photos Pillow reads, not hidden, are trained on. "
                            "Remove the line, or name a photo.")
        listed.add(target)
        rows.append(row)
    unlisted = [p for p in images if p.resolve() not in listed]
    if unlisted:
        names = ", ".join(str(p.relative_to(folder)) for p in unlisted[:5])
        more = f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else ""
        raise UserError(f"{metadata} has no line for {len(unlisted)} image(s) in {folder} ({names}{more}); "
                        "they would silently be left out. Add a line per image or remove the images.")
    return rows


def validate_image_folder(
    path: str | Path, *, config_key: str, role: str = "instance", allow_empty: bool = False
) -> list[Path]:
    """Check a local image folder before any model loads; return its image files (sorted).

    `config_key` (e.g. "data.instance_dir", "prior.class_dir") is named in every message so the user knows
    what to fix. `allow_empty=True` suits a class folder that prior generation will create and fill: a
    missing or empty folder then returns [], but corrupt files are still reported.
    """
    return _checked_folder(Path(path).expanduser(), config_key=config_key, role=role, allow_empty=allow_empty)[0].photos


def _checked_folder(folder: Path, *, config_key: str, role: str,
                    allow_empty: bool) -> tuple[photos.FolderPhotos, list[dict] | None]:
    """The folder's photos, each checked to decode, and its metadata.jsonl rows (None without one)."""
    if not folder.exists():
        if allow_empty:
            return photos.FolderPhotos(), None
        raise UserError(f"The {role} image folder {folder} (set by {config_key}) does not exist. Point "
                        f"{config_key} at a folder of images. {_ALLOWED_TEXT}")
    if not folder.is_dir():
        raise UserError(f"{config_key} must be a folder of {role} images, but {folder} is a file. {_ALLOWED_TEXT}")
    found = _found_photos(folder, role, config_key)
    if not found.photos and not allow_empty:
        skipped = f" It holds only files that are not photos: {_listed(found.skipped)}." if found.skipped else ""
        raise UserError(f"The {role} image folder {folder} (set by {config_key}) contains no images.{skipped} "
                        f"{_ALLOWED_TEXT}")
    for image_path in found.photos:
        _check_decodes(image_path, role, config_key)
    return found, _read_metadata(folder, found.photos, config_key)


def _listed(items: Sequence[str], shown: int = 4) -> str:
    """The first few items, then how many more: a notice names files without growing past a line."""
    more = f" … and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _notice(text: str) -> str:
    return text if len(text) <= NOTICE_CHARS else text[:NOTICE_CHARS - 1] + "…"


def _report(headers: Sequence[tuple[str, photos.PhotoHeader]], skipped: Sequence[str], config_key: str) -> None:
    """One line per kind of change: the skipped files, the photos decoded reduced, the multi-frame images."""
    if skipped:  # notes beside the photos (a license, captions, subject.json) are expected: said, not warned about
        notes_only = all(Path(entry.rpartition(" (")[0]).suffix.lower() in NOTE_SUFFIXES for entry in skipped)
        logger.log(logging.INFO if notes_only else logging.WARNING,
                   _notice(f"{config_key}: {len(skipped)} file(s) skipped, not photos: {_listed(skipped)}"))
    large = [f"{name} ({header.size[0]}x{header.size[1]})" for name, header in headers if header.large]
    if large:
        logger.info(_notice(f"{config_key}: {len(large)} photo(s) over {photos.LARGE_PHOTO_PIXELS / 1e6:.0f} megapixels "
                            f"are decoded reduced, to at most {photos.REDUCED_LONG_SIDE} px on the long side: "
                            f"{_listed(large)}"))
    animated = [f"{name} ({header.frames} frames)" for name, header in headers if header.frames > 1]
    if animated:
        logger.warning(_notice(f"{config_key}: {len(animated)} image(s) hold several frames; each trains on its "
                               f"first frame only: {_listed(animated)}"))


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

    @cached_property
    def _files(self) -> datasets.Dataset:
        return self.rows.cast_column(self.image_column, datasets.Image(decode=False))

    def image(self, index: int) -> Image.Image:
        """The image of a row as training sees it (photos.decode_photo): what `datasets` decodes, but without Pillow's
        decompression-bomb guard, and reduced for photos past photos.LARGE_PHOTO_PIXELS."""
        entry = self._files[index][self.image_column]
        try:
            return photos.decode_photo(entry.get("bytes") or entry["path"])
        except photos.PhotoTooLarge as error:
            name = entry.get("path") or f"row {index} of {self.source}"
            raise UserError(f"The image {name} ({error}) is {photos.TOO_LARGE_ADVICE}.") from None

    def upright_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of every image as it is shown, EXIF orientation applied, read from the headers only."""
        return [photos.upright_size(data) for _name, data in self.encoded()]

    def names(self) -> list[str]:
        """A name per row, for messages: the file path for local images, else "row i of <source>"."""
        entries = self._files[self.image_column]
        return [entry.get("path") or f"row {index} of {self.source}" for index, entry in enumerate(entries)]

    def encoded(self) -> list[tuple[str, bytes]]:
        """(name, file bytes) per row, without decoding."""
        return [(name, entry.get("bytes") or Path(entry["path"]).read_bytes())
                for name, entry in zip(self.names(), self._files[self.image_column])]


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
            width, height = photos.upright_size(data)
        except photos.READ_ERRORS:
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
            f"{rows.column_names}. For a local folder, captions come from a .txt file beside each photo (photo.txt "
            f"for photo.jpg) or a metadata.jsonl with a \"file_name\" key and a {caption_column!r} key per image; "
            "or set the caption column to null to use the prompt from the config for every image."
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
    report: bool = True,
) -> ImageSet:
    """Load images from a local folder (captions: its .txt files and metadata.jsonl, by caption_files.py's rule) or a
    hub dataset id (`split`, `cache_dir`).

    Local folders are validated first (see `validate_image_folder`) and loaded from the photos the check found. A
    source that is not an existing path and does not look like one ("./x", "/x", "~/x") is taken as a hub dataset
    id. `report` logs, once, what the loading changes: skipped files, photos decoded reduced, multi-frame images.
    """
    source_text = str(source)
    if is_local(source_text):
        folder = Path(source_text).expanduser()
        found, metadata = _checked_folder(folder, config_key=config_key, role=role, allow_empty=False)
        columns = _folder_columns(folder, found.photos, metadata)
        caption_files = merge_caption_files(columns, folder, caption_column, default_prompt=default_prompt,
                                            config_key=config_key, report=report)
        rows, headers = _as_rows(columns, folder), found.headers
        skipped = [entry for entry in found.skipped if entry.rpartition(" (")[0] not in caption_files]
        source_text = str(folder)
    else:
        rows, headers, skipped = _load_hub(source_text, split, cache_dir), None, []
    column = _image_column(rows, image_column, source_text)
    if len(rows) == 0:
        raise UserError(f"The {role} images from {source_text} (set by {config_key}) are empty. {_ALLOWED_TEXT}")
    images = ImageSet(source_text, rows, column, _prompts(rows, caption_column, default_prompt, source_text, column))
    if headers is None:
        headers = _row_headers(images, role, config_key)
    if report:
        _report(headers, skipped, config_key)
    return images


def _folder_columns(folder: Path, files: list[Path], metadata: list[dict] | None) -> dict[str, list]:
    """The rows imagefolder would make of the folder, from the photos the check found: one per photo, sorted, or one
    per metadata.jsonl line with its keys as columns; named by path under the resolved folder, as imagefolder names
    them (checkpoints record photos by these names)."""
    base = folder.resolve()
    if metadata is None:
        return {"image": [str(base / path.relative_to(folder)) for path in files]}
    keys = dict.fromkeys(key for row in metadata for key in row if key not in ("file_name", "image"))
    return {"image": [os.path.join(base, os.path.normpath(row["file_name"])) for row in metadata],
            **{key: [row.get(key) for row in metadata] for key in keys}}


def _as_rows(columns: dict[str, list], folder: Path) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
    except (ValueError, TypeError) as error:  # pyarrow: one key holding values of different types
        raise UserError(f"The captions of {folder / photos.METADATA} cannot be read as a table: {error}. Give each "
                        "key (e.g. text) one type, a string, on every line.") from None


def _row_headers(images: ImageSet, role: str, config_key: str) -> list[tuple[str, photos.PhotoHeader]]:
    """The header of every row of a hub dataset; rows past the pixel limit are refused here, not mid-training."""
    headers = []
    for name, data in images.encoded():
        try:
            headers.append((name, photos.read_header(data)))
        except photos.PhotoTooLarge as error:
            raise UserError(f"The {role} image {name} (set by {config_key}) ({error}) is "
                            f"{photos.TOO_LARGE_ADVICE}.") from None
        except photos.READ_ERRORS:
            continue  # a row Pillow cannot read fails, naming it, where it is decoded
    return headers


def images_from_files(files: Sequence[Path], *, prompt: str, source: str) -> ImageSet:
    """An ImageSet of explicit files (e.g. the class images prior preservation chose), all with one prompt."""
    rows = datasets.Dataset.from_dict({"image": [str(path) for path in files]}).cast_column("image", datasets.Image())
    return ImageSet(source, rows, "image", tuple(prompt for _ in files))
