"""Photos as phones and cameras write them (issue 37): every file Pillow reads is a photo (AVIF, HEIC through the `heif`
extra), skipped files are named once, 200-megapixel photos load reduced in bounded memory, beyond the project's pixel
limit is a clear refusal, and a multi-frame image trains on its first frame with a notice."""

from __future__ import annotations

import io
import logging
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image, features

from waveft_train.common.errors import UserError
from waveft_train.data import photos
from waveft_train.data.dataset import image_buckets, transform_image
from waveft_train.data.images import images_from_files, load_images, validate_image_folder

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "configs" / "demo_subject"
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 210), (230, 200, 20), (150, 40, 160), (20, 180, 190)]


@pytest.fixture
def notices():
    """Every record the package logs at INFO and above during the test, each once (whatever the root logger does)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("waveft_train")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def load(folder: Path):
    return load_images(folder, caption_column=None, default_prompt="a photo of sks ball")


def run_like_a_training_run(folder: Path):
    """What a run does with the photos: the preflight's folder check, then the load."""
    validate_image_folder(folder, config_key="data.instance_dir")
    return load(folder)


def write(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (64, 48), **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **options)
    return path


def heif_ready() -> None:
    pytest.importorskip("pillow_heif")
    photos.teach_pillow_heif()


def avif_ready() -> None:
    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")


# ----------------------------------------------------------------------------------------------- every format
def test_every_photo_pillow_reads_is_trained_on_whatever_its_extension(tmp_path):
    """The reported defect: a folder of PNG + AVIF trained on the PNGs only, a folder of .HEIC was 'no images'."""
    heif_ready()
    avif_ready()
    folder = tmp_path / "photos"
    files = {write(folder / "a.png", COLOURS[0]): COLOURS[0], write(folder / "b.jpg", COLOURS[1], quality=95): COLOURS[1],
             write(folder / "c.avif", COLOURS[2], quality=95): COLOURS[2],
             write(folder / "d.heic", COLOURS[3], quality=95): COLOURS[3],
             write(folder / "IMG_0005.HEIC", COLOURS[4], format="HEIF", quality=95): COLOURS[4],
             write(folder / "scan_0006", COLOURS[5], format="JPEG", quality=95): COLOURS[5]}  # no extension: a JPEG
    in_order = sorted(files, key=lambda path: path.name)  # imagefolder's order: by path ("IMG" before "a")
    assert validate_image_folder(folder, config_key="data.instance_dir") == in_order
    images = load(folder)
    assert [Path(name).name for name in images.names()] == [path.name for path in in_order]
    for index, path in enumerate(in_order):
        pixel = np.asarray(images.image(index).convert("RGB"))[24, 32].astype(int)
        assert np.abs(pixel - files[path]).max() <= 12, (path.name, pixel, files[path])


def test_a_folder_of_only_heic_photos_loads(tmp_path):
    heif_ready()
    for index in range(2):
        write(tmp_path / f"IMG_000{index}.HEIC", COLOURS[index], format="HEIF")
    assert len(load(tmp_path)) == 2


def test_heic_without_the_extra_names_the_extra_and_the_files(tmp_path, monkeypatch):
    heif_ready()
    write(tmp_path / "a.png", COLOURS[0])
    write(tmp_path / "IMG_0001.HEIC", COLOURS[1], format="HEIF")
    write(tmp_path / "IMG_0002.heif", COLOURS[2], format="HEIF")
    monkeypatch.setattr(photos, "pillow_heif", None)  # as if pillow-heif were not installed
    monkeypatch.setattr(Image, "ID", [name for name in Image.ID if name != "HEIF"])
    monkeypatch.delitem(Image.OPEN, "HEIF", raising=False)
    with pytest.raises(UserError) as caught:
        load(tmp_path)
    message = str(caught.value)
    assert 'pip install "waveft-train[heif]"' in message and "data.instance_dir" in message
    assert "IMG_0001.HEIC" in message and "IMG_0002.heif" in message and "a.png" not in message


def test_a_local_folder_loads_exactly_as_imagefolder_loads_it(tmp_path):
    """The demo's adapter stays bit-identical: same rows, order, names (checkpoints record photos by them), captions
    and pixels as `datasets`' imagefolder, which loaded local folders before."""
    ours = load_images(DEMO_DIR, caption_column="text", default_prompt="unused")
    theirs = datasets.load_dataset("imagefolder", data_dir=str(DEMO_DIR), split="train", cache_dir=str(tmp_path))
    names = [entry["path"] for entry in theirs.cast_column("image", datasets.Image(decode=False))["image"]]
    assert ours.names() == names and list(ours.prompts) == theirs["text"]
    for index in range(len(ours)):
        mine, reference = ours.image(index), theirs[index]["image"]
        assert (mine.mode, mine.size, mine.info) == (reference.mode, reference.size, reference.info)
        assert np.array_equal(np.asarray(mine), np.asarray(reference))


# ----------------------------------------------------------------------------------------------- skipped files
def test_skipped_files_are_listed_once_in_one_line_with_the_reason(tmp_path, notices):
    write(tmp_path / "a.png", COLOURS[0])
    write(tmp_path / "b.jpg", COLOURS[1])
    (tmp_path / "LICENSE.txt").write_text("CC0")
    (tmp_path / "IMG_0001.MOV").write_bytes(b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  " + bytes(64))
    (tmp_path / "IMG_0001.AAE").write_text("<?xml version='1.0'?><plist/>")
    for index in range(6):
        (tmp_path / f"notes_{index}.md").write_text("# not a photo")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": "b.jpg", "text": "y"}\n')
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: passed over without a word, as datasets does
    images = run_like_a_training_run(tmp_path)
    assert len(images) == 2
    lines = [record.getMessage() for record in notices if "skipped" in record.getMessage()]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "\n" not in line and len(line) <= 300
    assert "data.instance_dir" in line and "9 file(s)" in line
    assert "IMG_0001.AAE (not an image)" in line and "IMG_0001.MOV (not an image)" in line and "… and 5 more" in line
    assert "metadata.jsonl" not in line and ".DS_Store" not in line


def test_metadata_naming_a_file_that_is_not_a_photo_is_refused(tmp_path):
    write(tmp_path / "a.png", COLOURS[0])
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": "notes.txt", "text": "y"}\n')
    with pytest.raises(UserError, match=r"line 2 names 'notes.txt', which is not a photo"):
        validate_image_folder(tmp_path, config_key="data.instance_dir")


# ----------------------------------------------------------------------------------------------- very large photos
@pytest.fixture(scope="module")
def large_photos(tmp_path_factory) -> dict[str, Path]:
    """Folders of a 200-megapixel phone photo (16320x12240, the Samsung 200 MP sensor), a 96-megapixel one (which
    Pillow warned about) and a 12-megapixel one: solid JPEGs, a few megabytes on disk."""
    root = tmp_path_factory.mktemp("large")
    folders = {}
    for name, size in (("200mp", (16320, 12240)), ("96mp", (12000, 8000)), ("12mp", (4000, 3000))):
        folders[name] = root / name
        write(root / name / f"IMG_{name}.jpg", (90, 120, 150), size=size, quality=90)
    folders["tiny"] = root / "tiny"
    write(root / "tiny" / "dot.png", COLOURS[0], size=(8, 8))
    folders["both"] = root / "both"
    folders["both"].mkdir()
    for name in ("200mp", "96mp"):
        shutil.copy(folders[name] / f"IMG_{name}.jpg", root / "both")
    return folders


def test_very_large_photos_load_reduced_with_one_notice_and_no_pillow_warning(large_photos, notices):
    """The reported defects: 16320x12240 was refused as a decompression bomb; 12000x8000 printed Pillow's warning
    twice."""
    guard = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = run_like_a_training_run(large_photos["both"])
        decoded = [images.image(index) for index in range(len(images))]
        buckets = image_buckets(images, 64)
    assert not [warning for warning in caught if issubclass(warning.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == guard  # Pillow's guard is ours only while we read a photo
    assert [image.size for image in decoded] == [(4080, 3060), (3000, 2000)]  # 1/4 scale: long side 2048-4096 px
    assert np.abs(np.asarray(decoded[0])[1000, 1000].astype(int) - (90, 120, 150)).max() <= 3
    out = transform_image(decoded[0], resolution=64, center_crop=True, random_flip=False,
                          rng=np.random.default_rng(0), target=buckets[0])
    assert tuple(out.pixel_values.shape[1:]) == buckets[0]
    lines = [record.getMessage() for record in notices if "reduced" in record.getMessage()]
    assert len(lines) == 1 and len(notices) == 1, [record.getMessage() for record in notices]
    assert "IMG_200mp.jpg (16320x12240)" in lines[0] and "IMG_96mp.jpg (12000x8000)" in lines[0]


# The peak resident memory of this process's own address space (VmHWM: getrusage's maxrss would carry over the
# parent's peak through fork and exec, and pytest's is that of writing the 200-megapixel photo), reset where Linux
# allows after the imports, so that only the loading and decoding of the photo are measured.
PEAK_MEMORY = """
import sys
from pathlib import Path
from waveft_train.data.images import load_images
def peak_kib():
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
               .split()[1])
def load(folder):
    return load_images(folder, caption_column=None, default_prompt="p").image(0)
load(sys.argv[1])
try:
    Path("/proc/self/clear_refs").write_text("5")
except OSError:
    pass
before = peak_kib()
load(sys.argv[2])  # the folder check (which decodes every photo) and the decode for training
print(peak_kib() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from Linux's /proc")
def test_a_200_megapixel_photo_loads_in_the_memory_of_a_12_megapixel_one(large_photos):
    runs = {name: subprocess.Popen([sys.executable, "-c", PEAK_MEMORY, str(large_photos["tiny"]),
                                    str(large_photos[name])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in ("200mp", "12mp")}
    growth = {}
    for name, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        growth[name] = int(out.split()[-1])
    assert 0 < growth["200mp"] < 2 * growth["12mp"], growth  # decoded in full, 200 MP would take some 16 times more


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header claims `width` x `height` (with a valid checksum): what Pillow reads before decoding."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height, after the signature, length and type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_photos_beyond_the_pixel_limit_are_refused_naming_them(tmp_path):
    write(tmp_path / "a.png", COLOURS[0])
    bomb = png_claiming(tmp_path / "panorama.png", 40000, 30000)
    with pytest.raises(UserError) as caught:
        validate_image_folder(tmp_path, config_key="data.instance_dir")
    message = str(caught.value)
    assert "panorama.png (40000x30000, 1200 megapixels)" in message and "1000 megapixels" in message
    assert "data.instance_dir" in message and " a.png" not in message
    with pytest.raises(UserError, match=r"panorama.png \(40000x30000, 1200 megapixels\) is beyond 1000 megapixels"):
        images_from_files([bomb], prompt="p", source=str(tmp_path)).image(0)  # class images are decoded the same way


# ----------------------------------------------------------------------------------------------- several frames
def test_a_multi_frame_image_trains_on_its_first_frame_with_one_notice(tmp_path, notices):
    frames = [Image.new("RGB", (32, 32), colour) for colour in COLOURS[:3]]
    frames[0].save(tmp_path / "spin.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    write(tmp_path / "still.gif", COLOURS[3], format="GIF")
    images = run_like_a_training_run(tmp_path)
    assert len(images) == 2
    assert np.asarray(images.image(0).convert("RGB"))[5, 5].tolist() == list(COLOURS[0])
    lines = [record.getMessage() for record in notices]
    assert len(lines) == 1 and "spin.gif (3 frames)" in lines[0] and "first frame" in lines[0], lines
    assert "still.gif" not in lines[0]
