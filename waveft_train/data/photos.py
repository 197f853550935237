"""One photo file: what Pillow can read, how it is decoded for training, and its faithful 8-bit RGB rendering.

Why it looks like this:
- A photo is any file Pillow can open, whatever its name; HEIC/HEIF (the iPhone's default) through pillow-heif, the
  `heif` extra, taught to Pillow where it is installed (`teach_pillow_heif`). AVIF needs only Pillow (>= 11.3).
- Pillow's decompression-bomb guard (a warning past 89 megapixels, an error past 179) refuses today's 200-megapixel
  phone photos, so it is replaced while we read a photo by our own limit, `MAX_PHOTO_PIXELS`. Photos past
  `LARGE_PHOTO_PIXELS` are decoded reduced (a JPEG at 1/2, 1/4 or 1/8 scale, so memory stays that of a 12-megapixel
  photo) to 2048-4096 px (`REDUCED_LONG_SIDE`) on the long side: still at least twice the 1024 px SDXL trains at.
- Everything below `LARGE_PHOTO_PIXELS` (every photo Pillow read without a word before) decodes exactly as `datasets`
  decodes it: open, load, and the EXIF orientation applied when there is one.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps

from waveft_train.common.paths import is_hidden

try:  # the `heif` extra: HEIC/HEIF photos
    import pillow_heif
except ImportError:
    pillow_heif = None
try:  # What imagefolder would pick up (a semi-private path): a file so named that Pillow cannot read is an error.
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder as _ImageFolder

    _IMAGEFOLDER_EXTENSIONS = frozenset(extension.lower() for extension in _ImageFolder.EXTENSIONS)
except (ImportError, AttributeError):
    _IMAGEFOLDER_EXTENSIONS = frozenset()

MAX_PHOTO_PIXELS = 1_000_000_000  # refused beyond: past any camera, more likely a decompression bomb than a photo
LARGE_PHOTO_PIXELS = 89_478_485  # Pillow's own warning threshold: photos up to it decode exactly as before
REDUCED_LONG_SIDE = 4096  # photos past LARGE_PHOTO_PIXELS are decoded to a long side of 2048 to 4096 px
HEIF_SUFFIXES = (".heic", ".heif", ".hif")
HEIF_EXTRA = 'pip install "waveft-train[heif]"'
COMMON_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".avif", ".heic", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_EXTENSIONS = _IMAGEFOLDER_EXTENSIONS | frozenset(COMMON_IMAGE_EXTENSIONS) | frozenset(HEIF_SUFFIXES)
METADATA = "metadata.jsonl"  # a folder's captions
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, RuntimeError)  # what reading a file that is no image raises
_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "F")  # what Image.reduce averages faithfully


def teach_pillow_heif() -> bool:
    """Register pillow-heif's HEIC/HEIF opener with Pillow (cheap, idempotent); False when the extra is missing."""
    if pillow_heif is None:
        return False
    pillow_heif.register_heif_opener()
    return True


@contextmanager
def _our_pixel_limit() -> Iterator[None]:
    """Pillow's decompression-bomb guard off while we read a photo: `MAX_PHOTO_PIXELS` is checked instead."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def megapixels(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}, {size[0] * size[1] / 1e6:.0f} megapixels"


class PhotoTooLarge(ValueError):
    """A photo past MAX_PHOTO_PIXELS; its message is its size."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__(megapixels(size))


TOO_LARGE_ADVICE = (f"beyond {MAX_PHOTO_PIXELS // 10**6} megapixels, waveft-train's limit: a file that large is more "
                    f"likely a decompression bomb than a photo. Downscale it (training uses at most {REDUCED_LONG_SIDE} "
                    "px of its long side) or remove it")


def _check_size(size: tuple[int, int]) -> None:
    if size[0] * size[1] > MAX_PHOTO_PIXELS:
        raise PhotoTooLarge(size)


@dataclass(frozen=True)
class PhotoHeader:
    """What a photo's header says: its stored size, how many frames it holds, its format."""

    size: tuple[int, int]
    frames: int
    format: str

    @property
    def large(self) -> bool:
        return self.size[0] * self.size[1] > LARGE_PHOTO_PIXELS


def _source(file: str | Path | bytes) -> str | Path | io.BytesIO:
    return io.BytesIO(file) if isinstance(file, bytes) else file


def read_header(file: str | Path | bytes) -> PhotoHeader:
    """Open a photo (a path or the file's bytes) without decoding its pixels. Raises what Pillow raises for a file it
    cannot read, and PhotoTooLarge past MAX_PHOTO_PIXELS. A JPEG that carries a second picture (MPO: a depth or gain
    map) counts as one frame: its first picture is the photo."""
    teach_pillow_heif()
    with _our_pixel_limit(), Image.open(_source(file)) as image:
        _check_size(image.size)
        frames = 1 if image.format == "MPO" else getattr(image, "n_frames", 1)
        return PhotoHeader(image.size, frames, image.format or "")


def upright_size(file: str | Path | bytes) -> tuple[int, int]:
    """(width, height) of a photo as it is shown, EXIF orientation applied, from its header only."""
    teach_pillow_heif()
    with _our_pixel_limit(), Image.open(_source(file)) as image:
        width, height = image.size
        if image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
            width, height = height, width
    return width, height


def decode_photo(file: str | Path | bytes) -> Image.Image:
    """What training sees of a photo (a path or the file's bytes): its first frame, decoded and upright.

    Up to LARGE_PHOTO_PIXELS exactly as `datasets` decodes it. Past that, decoded reduced: a JPEG at the smallest DCT
    scale that keeps 2048 px on the long side (libjpeg never holds the full-size pixels), then, like other formats, box-
    averaged by a whole factor to at most REDUCED_LONG_SIDE px. Raises PhotoTooLarge past MAX_PHOTO_PIXELS.
    """
    teach_pillow_heif()
    with _our_pixel_limit():
        image = Image.open(_source(file))
        try:
            _check_size(image.size)
            large = image.size[0] * image.size[1] > LARGE_PHOTO_PIXELS
            if large:
                scale = (REDUCED_LONG_SIDE // 2) / max(image.size)
                image.draft(None, (max(1, math.ceil(image.size[0] * scale)), max(1, math.ceil(image.size[1] * scale))))
            image.load()
        except BaseException:
            image.close()
            raise
    if image.getexif().get(ExifTags.Base.Orientation) is not None:
        image = ImageOps.exif_transpose(image)
    factor = math.ceil(max(image.size) / REDUCED_LONG_SIDE)
    if large and factor > 1:
        image = (image if image.mode in _REDUCIBLE_MODES else to_rgb(image)).reduce(factor)
    return image


def check_photo(file: str | Path | bytes) -> None:
    """Verify, decode and convert one photo as training will: a truncated, fake or unconvertible file fails here."""
    teach_pillow_heif()
    with _our_pixel_limit(), Image.open(_source(file)) as image:
        image.verify()
    with decode_photo(file) as image:
        to_rgb(image)


# ----------------------------------------------------------------------------------------------- folders
@dataclass
class FolderPhotos:
    """A folder's files sorted out: the photos (in imagefolder's order) with their headers, the files skipped with the
    reason (as "name (reason)"), and what cannot be skipped silently: files with an image extension that Pillow cannot
    read, HEIC/HEIF files while pillow-heif is missing, photos past MAX_PHOTO_PIXELS."""

    photos: list[Path] = field(default_factory=list)
    headers: list[tuple[str, PhotoHeader]] = field(default_factory=list)  # (name relative to the folder, header)
    skipped: list[str] = field(default_factory=list)
    unreadable: list[tuple[Path, BaseException]] = field(default_factory=list)
    heif_missing: list[str] = field(default_factory=list)
    too_large: list[str] = field(default_factory=list)


def find_photos(folder: Path) -> FolderPhotos:
    """Every file below `folder` that Pillow opens is a photo, whatever its name. Hidden files (names starting with
    '.' or '__', which `datasets` skips too) and the top metadata.jsonl are passed over without a word."""
    found = FolderPhotos()
    heif = teach_pillow_heif()
    files = sorted((p for p in folder.rglob("*") if p.is_file() and not is_hidden(p, folder)),
                   key=lambda p: p.relative_to(folder).as_posix())  # imagefolder's order: by path
    for path in files:
        name, suffix = path.relative_to(folder).as_posix(), path.suffix.lower()
        if name == METADATA:
            continue
        try:
            found.headers.append((name, read_header(path)))
            found.photos.append(path)
        except PhotoTooLarge as error:
            found.too_large.append(f"{name} ({error})")
        except READ_ERRORS as error:
            if suffix in HEIF_SUFFIXES and not heif:
                found.heif_missing.append(name)
            elif path.name.startswith("metadata."):
                found.skipped.append(f"{name} (captions come from the top folder's {METADATA} only)")
            elif suffix in IMAGE_EXTENSIONS:
                found.unreadable.append((path, error))
            elif isinstance(error, Image.UnidentifiedImageError):
                found.skipped.append(f"{name} (not an image)")
            else:
                found.skipped.append(f"{name} (unreadable: {getattr(error, 'strerror', None) or error})")
    return found


# ----------------------------------------------------------------------------------------------- 8-bit RGB
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
