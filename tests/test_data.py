"""Data stage: folder validation, loading via datasets, SDXL transforms, dataset indexing and collate."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from waveft_train.common.errors import UserError
from waveft_train.data import dataset as data
from waveft_train.data.dataset import DreamBoothDataset, collate, epoch_indices, iter_transformed, transform_image
from waveft_train.data.images import load_images, validate_image_folder

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "tests" / "data" / "subject"


# ----------------------------------------------------------------------------------------------- helpers
def coded_array(height: int, width: int) -> np.ndarray:
    """RGB uint8 image whose pixels say where they are: R = column, G = row, B = constant 7."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([cols % 256, rows % 256, np.full_like(rows, 7)], axis=-1).astype(np.uint8)


def write_images(folder: Path, sizes: list[tuple[int, int]], prefix: str = "img") -> list[Path]:
    """Write solid-colour PNGs of the given (height, width); colour i*40 makes them distinguishable."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (height, width) in enumerate(sizes):
        path = folder / f"{prefix}{i}.png"
        Image.new("RGB", (width, height), (i * 40, 255 - i * 40, 100)).save(path)
        paths.append(path)
    return paths


def load(folder: Path, tmp_path: Path, **kwargs):
    kwargs.setdefault("caption_column", None)
    kwargs.setdefault("default_prompt", "a photo of sks ball")
    return load_images(folder, cache_dir=str(tmp_path / "hf_cache"), **kwargs)


def expected_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------- folders
def test_missing_folder_names_path_and_config_key(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError) as caught:
        validate_image_folder(missing, config_key="data.instance_dir")
    assert str(missing) in str(caught.value) and "data.instance_dir" in str(caught.value)


def test_file_instead_of_folder(tmp_path):
    file = write_images(tmp_path, [(8, 8)])[0]
    with pytest.raises(UserError, match="is a file"):
        validate_image_folder(file, config_key="prior.class_dir", role="class")


def test_empty_folder_lists_allowed_extensions(tmp_path):
    (tmp_path / "notes.txt").write_text("no pictures here")
    with pytest.raises(UserError) as caught:
        validate_image_folder(tmp_path, config_key="prior.class_dir", role="class")
    message = str(caught.value)
    assert "prior.class_dir" in message and "contains no images" in message
    assert ".png" in message and ".jpg" in message and ".webp" in message


@pytest.mark.parametrize("payload", [b"this is not a png", b""])
def test_non_image_with_image_extension_is_named(tmp_path, payload):
    write_images(tmp_path, [(8, 8)])
    bad = tmp_path / "broken.png"
    bad.write_bytes(payload)
    with pytest.raises(UserError) as caught:
        validate_image_folder(tmp_path, config_key="data.instance_dir")
    assert str(bad) in str(caught.value)


def test_truncated_jpeg_is_named(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(UserError, match="cut.jpg"):
        validate_image_folder(tmp_path, config_key="data.instance_dir")


def test_non_image_files_are_ignored_and_hidden_files_skipped(tmp_path):
    images = write_images(tmp_path, [(8, 8), (8, 9)])
    (tmp_path / "LICENSE.txt").write_text("CC0")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "junk.png").write_bytes(b"not an image, but hidden")
    assert validate_image_folder(tmp_path, config_key="data.instance_dir") == images


def test_allow_empty_accepts_missing_but_still_reports_corrupt(tmp_path):
    assert validate_image_folder(tmp_path / "later", config_key="prior.class_dir", allow_empty=True) == []
    (tmp_path / "bad.jpg").write_text("nope")
    with pytest.raises(UserError, match="bad.jpg"):
        validate_image_folder(tmp_path, config_key="prior.class_dir", role="class", allow_empty=True)


def test_metadata_must_list_every_image(tmp_path):
    write_images(tmp_path, [(8, 8), (8, 8)])
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.png", "text": "x"}) + "\n")
    with pytest.raises(UserError, match="img1.png"):
        validate_image_folder(tmp_path, config_key="data.instance_dir")


@pytest.mark.parametrize(
    ("line", "fragment"),
    [("{not json", "line 1 is not valid JSON"), ('{"text": "x"}', 'no "file_name"'),
     ('{"file_name": "ghost.png", "text": "x"}', "ghost.png")],
)
def test_bad_metadata_lines(tmp_path, line, fragment):
    write_images(tmp_path, [(8, 8)])
    (tmp_path / "metadata.jsonl").write_text(line + "\n")
    with pytest.raises(UserError, match=fragment):
        validate_image_folder(tmp_path, config_key="data.instance_dir")


# ----------------------------------------------------------------------------------------------- loading
def test_default_prompt_without_caption_column(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, [(8, 8), (9, 8), (8, 10)])
    images = load(folder, tmp_path, default_prompt="a photo of sks ball")
    assert len(images) == 3
    assert images.prompts == ("a photo of sks ball",) * 3
    assert images.image(2).size == (10, 8)  # sorted by file name: img2 is 8 high, 10 wide


def test_a_local_folder_loads_without_datasets_progress_bars_and_leaves_them_on(tmp_path, capsys):
    import datasets

    folder = tmp_path / "imgs"
    write_images(folder, [(8, 8), (9, 8)])
    datasets.enable_progress_bars()
    assert len(load(folder, tmp_path)) == 2
    assert "split" not in capsys.readouterr().err  # no "Generating train split: 2 examples"
    assert datasets.is_progress_bar_enabled()  # hub downloads still show theirs


def test_metadata_captions_are_picked_up(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, [(8, 8), (8, 8), (8, 8)])
    lines = [{"file_name": "img1.png", "caption": "second"}, {"file_name": "img0.png", "caption": "first"},
             {"file_name": "img2.png", "caption": "  "}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    images = load(folder, tmp_path, caption_column="caption", default_prompt="fallback")
    colours = [images.image(i).getpixel((0, 0))[0] for i in range(3)]
    by_colour = dict(zip(colours, images.prompts))
    assert by_colour == {0: "first", 40: "second", 80: "fallback"}  # blank caption -> default prompt


def test_unknown_caption_column_lists_available(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, [(8, 8)])
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.png", "text": "x"}) + "\n")
    with pytest.raises(UserError) as caught:
        load(folder, tmp_path, caption_column="prompt")
    message = str(caught.value)
    assert "'prompt'" in message and "'image'" in message and "'text'" in message


def test_hub_id_offline_is_a_user_error_naming_the_id(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="someone/no-such-dataset-xyz"):
        load_images("someone/no-such-dataset-xyz", caption_column=None, default_prompt="p",
                    cache_dir=str(tmp_path / "hf_cache"))


def test_missing_explicit_path_is_a_folder_error_not_a_hub_lookup(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load(tmp_path / "absent", tmp_path)


# ----------------------------------------------------------------------------------------------- transforms
def run_transform(array: np.ndarray, resolution: int, *, center_crop: bool, random_flip: bool, seed: int = 0):
    return transform_image(Image.fromarray(array), resolution=resolution, center_crop=center_crop,
                           random_flip=random_flip, rng=np.random.default_rng(seed))


def test_resize_shape_range_and_original_size():
    out = run_transform(np.full((50, 100, 3), 255, np.uint8), 32, center_crop=False, random_flip=False)
    assert out.pixel_values.shape == (3, 32, 32) and out.pixel_values.dtype == torch.float32
    assert torch.all(out.pixel_values == 1.0)
    assert out.original_size == (50, 100)
    # resized to (32, 64): the crop's top is 0 and its left anywhere in 0..32
    assert out.crop_top_left[0] == 0 and 0 <= out.crop_top_left[1] <= 32
    black = run_transform(np.zeros((40, 30, 3), np.uint8), 16, center_crop=True, random_flip=False)
    assert torch.all(black.pixel_values == -1.0) and black.original_size == (40, 30)


def test_resized_size_follows_shorter_side_rule():
    assert data.resized_size(50, 100, 32) == (32, 64)
    assert data.resized_size(100, 50, 32) == (64, 32)
    assert data.resized_size(30, 47, 16) == (16, 25)  # 16 * 47 / 30 = 25.07 -> truncated


def test_center_crop_of_non_square_image_exact_pixels_and_corner():
    array = coded_array(32, 64)  # already at resized size for resolution 32: no resampling
    out = run_transform(array, 32, center_crop=True, random_flip=False)
    assert out.crop_top_left == (0, 16)
    assert torch.equal(out.pixel_values, expected_tensor(array[:, 16:48]))
    tall = run_transform(coded_array(90, 32), 32, center_crop=True, random_flip=False)
    assert tall.crop_top_left == (29, 0)  # round(58 / 2)
    odd = run_transform(coded_array(32, 65), 32, center_crop=True, random_flip=False)
    assert odd.crop_top_left == (0, 16)  # round(16.5) == 16, torchvision's CenterCrop rounding


def test_random_crop_pixels_match_recorded_corner():
    lefts = set()
    for seed in range(12):
        out = run_transform(coded_array(40, 64), 32, center_crop=False, random_flip=False, seed=seed)
        assert out.original_size == (40, 64)
        top, left = out.crop_top_left  # resized to (32, 51): top is 0, left in 0..19
        assert top == 0 and 0 <= left <= 19
        lefts.add(left)
    assert len(lefts) > 3
    exact = coded_array(32, 64)
    for seed in range(5):
        out = run_transform(exact, 32, center_crop=False, random_flip=False, seed=seed)
        top, left = out.crop_top_left
        assert torch.equal(out.pixel_values, expected_tensor(exact[top:top + 32, left:left + 32]))


def test_flip_mirrors_pixels_and_crop_corner_is_in_flipped_image():
    array = coded_array(32, 64)
    outs = [run_transform(array, 32, center_crop=False, random_flip=True, seed=s) for s in range(16)]
    flipped = [o for o in outs if o.flipped]
    assert flipped and len(flipped) < len(outs)
    mirrored = array[:, ::-1]
    for out in outs:
        source = mirrored if out.flipped else array
        top, left = out.crop_top_left
        assert torch.equal(out.pixel_values, expected_tensor(source[top:top + 32, left:left + 32]))
    # Said the other way round: a flipped example is the mirror of the unflipped window whose left edge is
    # resized_width - left - resolution (diffusers' DreamBooth SDXL convention, flip before crop).
    for out in flipped:
        top, left = out.crop_top_left
        unflipped_left = 64 - left - 32
        window = expected_tensor(array[top:top + 32, unflipped_left:unflipped_left + 32])
        assert torch.equal(out.pixel_values, window.flip(-1))


def test_center_crop_flip_is_exact_mirror():
    array = coded_array(32, 64)
    plain = run_transform(array, 32, center_crop=True, random_flip=False)
    seed = next(s for s in range(32) if run_transform(array, 32, center_crop=True, random_flip=True, seed=s).flipped)
    flipped = run_transform(array, 32, center_crop=True, random_flip=True, seed=seed)
    assert torch.equal(flipped.pixel_values, plain.pixel_values.flip(-1))
    assert flipped.crop_top_left == (0, 16)


def test_exif_orientation_and_transparency():
    image = Image.fromarray(coded_array(20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    buffer.seek(0)
    out = transform_image(Image.open(buffer), resolution=16, center_crop=True, random_flip=False,
                          rng=np.random.default_rng(0))
    assert out.original_size == (40, 20)
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgb = transform_image(transparent, resolution=8, center_crop=True, random_flip=False,
                          rng=np.random.default_rng(0))
    assert torch.all(rgb.pixel_values == 1.0)  # composited on white, not black


# ----------------------------------------------------------------------------------------------- dataset
@pytest.fixture()
def instance_and_class(tmp_path):
    instance_dir = tmp_path / "instance"
    write_images(instance_dir, [(40, 60), (48, 48), (60, 40)])
    (instance_dir / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"img{i}.png", "text": f"instance {i}"}) + "\n" for i in range(3)))
    class_dir = tmp_path / "class"
    write_images(class_dir, [(32, 32)] * 10, prefix="c")
    instance = load(instance_dir, tmp_path, caption_column="text")
    classes = load(class_dir, tmp_path, default_prompt="a photo of ball", config_key="prior.class_dir", role="class")
    return instance, classes


def make_dataset(instance, classes=None, **kwargs):
    kwargs.setdefault("resolution", 16)
    kwargs.setdefault("seed", 42)
    kwargs.setdefault("random_flip", True)
    return DreamBoothDataset(instance, class_images=classes, **kwargs)


def test_length_repeats_and_class_logic(instance_and_class):
    instance, classes = instance_and_class
    assert len(make_dataset(instance)) == 3
    assert len(make_dataset(instance, repeats=2)) == 6
    assert len(make_dataset(instance, classes)) == 10
    assert len(make_dataset(instance, classes, repeats=5)) == 15
    limited = make_dataset(instance, classes, num_class_images=4)
    assert len(limited) == 4 and limited.num_class == 4
    dataset = make_dataset(instance, classes, repeats=2)
    prompts = [dataset[i]["instance"]["prompt"] for i in range(len(dataset))]
    assert prompts == [f"instance {i % 3}" for i in range(10)]
    class_prompts = {dataset[i]["class"]["prompt"] for i in range(len(dataset))}
    assert class_prompts == {"a photo of ball"}
    assert "class" not in make_dataset(instance)[0]


def test_repeats_give_fresh_crops(instance_and_class):
    instance, _ = instance_and_class
    dataset = make_dataset(instance, repeats=8)
    corners = {(dataset[i]["instance"]["crop_top_left"], torch.sum(dataset[i]["instance"]["image"]).item())
               for i in range(0, 24, 3)}  # all the same image (img0, 40x60)
    assert len(corners) > 1


def test_determinism_same_seed_and_different_seed(instance_and_class):
    instance, classes = instance_and_class
    first, again = make_dataset(instance, classes), make_dataset(instance, classes)
    other = make_dataset(instance, classes, seed=7)

    def signature(dataset, index):
        item = dataset[index]
        return [(part["crop_top_left"], part["image"]) for part in (item["instance"], item["class"])]

    for index in range(len(first)):
        for (corner_a, pixels_a), (corner_b, pixels_b) in zip(signature(first, index), signature(again, index)):
            assert corner_a == corner_b and torch.equal(pixels_a, pixels_b)
    corners = [first[i]["instance"]["crop_top_left"] for i in range(len(first))]
    assert corners != [other[i]["instance"]["crop_top_left"] for i in range(len(other))]
    # Indices past the end are later epochs: same image and prompt, new augmentation.
    later = [first[i + len(first)]["instance"] for i in range(len(first))]
    assert [e["prompt"] for e in later] == [first[i]["instance"]["prompt"] for i in range(len(first))]
    assert [e["crop_top_left"] for e in later] != corners


def test_epoch_indices_are_seeded_permutations():
    assert sorted(epoch_indices(5, epoch=2, seed=1)) == [10, 11, 12, 13, 14]
    assert epoch_indices(5, epoch=2, seed=1) == epoch_indices(5, epoch=2, seed=1)
    assert epoch_indices(50, epoch=0, seed=1) != epoch_indices(50, epoch=0, seed=2)


def test_collate_puts_instance_first(instance_and_class):
    instance, classes = instance_and_class
    dataset = make_dataset(instance, classes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=partial(collate, with_prior=True))
    batch = next(iter(loader))
    assert batch["num_instance"] == 2
    assert batch["images"].shape == (4, 3, 16, 16) and batch["images"].dtype == torch.float32
    assert batch["prompts"] == ["instance 0", "instance 1", "a photo of ball", "a photo of ball"]
    assert batch["original_sizes"].dtype == torch.long
    assert batch["original_sizes"].tolist() == [[40, 60], [48, 48], [32, 32], [32, 32]]
    assert batch["crop_top_lefts"].shape == (4, 2) and batch["crop_top_lefts"].dtype == torch.long
    assert torch.equal(batch["images"][0], dataset[0]["instance"]["image"])
    assert torch.equal(batch["images"][3], dataset[1]["class"]["image"])
    solo = collate([dataset[0], dataset[1]], with_prior=False)
    assert solo["images"].shape == (2, 3, 16, 16) and solo["num_instance"] == 2
    with pytest.raises(ValueError):
        collate([make_dataset(instance)[0]], with_prior=True)


def test_iter_transformed_matches_first_epoch(instance_and_class):
    instance, _ = instance_and_class
    cached = list(iter_transformed(instance, resolution=16, center_crop=False, random_flip=True, seed=42))
    dataset = make_dataset(instance)
    assert [e["crop_top_left"] for e in cached] == [dataset[i]["instance"]["crop_top_left"] for i in range(3)]


# ----------------------------------------------------------------------------------------------- the tests' subject
def test_test_subject_folder_is_small_licensed_and_loads(tmp_path):
    images = sorted(DEMO_DIR.glob("*.png"))
    assert len(images) == 5
    assert sum(p.stat().st_size for p in DEMO_DIR.iterdir()) <= 300 * 1024
    assert "CC0" in (DEMO_DIR / "LICENSE.txt").read_text()
    loaded = load(DEMO_DIR, tmp_path, default_prompt="a photo of sks ball")
    assert len(loaded) == 5
    example = next(iter_transformed(loaded, resolution=64, center_crop=True, random_flip=False, seed=0))
    assert example["image"].shape == (3, 64, 64)


def test_test_subject_script_reproduces_the_images(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_test_subject", REPO / "scripts" / "make_test_subject.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_test_subject", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    for path in module.write_test_subject(tmp_path):
        fresh = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        stored = np.asarray(Image.open(DEMO_DIR / path.name).convert("RGB"), dtype=np.int16)
        assert fresh.shape == stored.shape and np.abs(fresh - stored).max() <= 2
