"""Class-image top-up for prior preservation: counts, manifest, determinism, several processes."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from waveft_train.common.errors import UserError
from waveft_train.data.prior import (
    GENERATED_NAME,
    MANIFEST_NAME,
    GenerationSettings,
    ensure_class_images,
    model_identity,
    shard_batches,
)
from waveft_train.models.loading import build_pipeline

PROMPT = "a photo of dog"
MODEL_ID = "tiny-test-model"
SETTINGS = {"prompt": PROMPT, "model_id": MODEL_ID, "resolution": 64, "steps": 2, "guidance": 5.0, "seed": 7}


class CountingFactory:
    """A `make_pipeline` that counts its calls and hands out the tiny pipeline."""

    def __init__(self, components: Any) -> None:
        self.components = components
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return build_pipeline(self.components)


def refuse_pipeline():
    raise AssertionError("make_pipeline must not be called: nothing needs generating")


class FakeAccelerator:
    """The Accelerator attributes ensure_class_images uses; the barrier only counts (calls run one by one)."""

    def __init__(self, process_index: int, num_processes: int) -> None:
        self.process_index = process_index
        self.num_processes = num_processes
        self.is_main_process = process_index == 0
        self.barriers = 0

    def wait_for_everyone(self) -> None:
        self.barriers += 1


def ensure(class_dir: Path, make_pipeline: Callable[[], Any], *, num_images: int, batch_size: int = 2,
           **overrides: Any) -> list[Path]:
    arguments = {**SETTINGS, **overrides}
    return ensure_class_images(class_dir, num_images=num_images, batch_size=batch_size, make_pipeline=make_pipeline,
                               progress=False, **arguments)


def settings(**overrides: Any) -> GenerationSettings:
    arguments = {**SETTINGS, **overrides}
    return GenerationSettings.of(model=arguments.pop("model_id"), **arguments)


def generated_names(count: int, **overrides: Any) -> list[str]:
    return [settings(**overrides).file_name(index) for index in range(count)]


def write_user_images(class_dir: Path, names: list[str]) -> list[Path]:
    paths = []
    for number, name in enumerate(names):
        path = class_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (40 * number, 100, 200)).save(path)
        paths.append(path)
    return paths


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def files_in(class_dir: Path) -> set[str]:
    return {path.name for path in class_dir.iterdir()}


def test_tops_up_user_images_then_second_call_generates_nothing(tmp_path: Path, tiny_components) -> None:
    class_dir = tmp_path / "class"
    user = write_user_images(class_dir, ["b_dog.jpg", "a_dog.png"])
    factory = CountingFactory(tiny_components)

    images = ensure(class_dir, factory, num_images=5)

    names = generated_names(3)
    assert factory.calls == 1
    assert images == [user[1], user[0]] + [class_dir / name for name in names]
    assert files_in(class_dir) == {"a_dog.png", "b_dog.jpg", MANIFEST_NAME, *names}
    for name in names:
        assert GENERATED_NAME.fullmatch(name)
        with Image.open(class_dir / name) as image:
            assert (image.size, image.mode, image.format) == ((64, 64), "RGB", "PNG")

    before = {name: (class_dir / name).read_bytes() for name in files_in(class_dir)}
    assert ensure(class_dir, refuse_pipeline, num_images=5) == images
    assert {name: (class_dir / name).read_bytes() for name in files_in(class_dir)} == before


def test_manifest_content_is_exact(tmp_path: Path, tiny_components) -> None:
    class_dir = tmp_path / "missing" / "class"  # created, parents included
    ensure(class_dir, CountingFactory(tiny_components), num_images=2, guidance=5)  # int guidance == 5.0

    digest = settings().digest()
    assert len(digest) == 8 and int(digest, 16) >= 0
    manifest = json.loads((class_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest == {"version": 1, "images": [
        {"file": f"class-{digest}-00000{index}.png", "index": index, "model": MODEL_ID, "prompt": PROMPT,
         "seed": 7, "resolution": 64, "steps": 2, "guidance": 5.0}
        for index in range(2)
    ]}
    assert list(manifest["images"][0]) == ["file", "index", "model", "prompt", "seed", "resolution", "steps",
                                           "guidance"]
    assert not [name for name in files_in(class_dir) if name.startswith(".")]  # no temp files left


def test_changed_prompt_tops_up_fresh_images_and_leaves_old_ones(tmp_path: Path, tiny_components) -> None:
    class_dir = tmp_path / "class"
    old = ensure(class_dir, CountingFactory(tiny_components), num_images=2)
    old_bytes = [path.read_bytes() for path in old]

    factory = CountingFactory(tiny_components)
    new = ensure(class_dir, factory, num_images=2, prompt="a photo of cat")

    assert factory.calls == 1
    assert new == [class_dir / name for name in generated_names(2, prompt="a photo of cat")]
    assert not set(new) & set(old)
    assert [path.read_bytes() for path in old] == old_bytes  # untouched, still on disk
    assert not np.array_equal(pixels(new[0]), pixels(old[0]))
    recorded = json.loads((class_dir / MANIFEST_NAME).read_text(encoding="utf-8"))["images"]
    assert sorted(entry["prompt"] for entry in recorded) == ["a photo of cat", "a photo of cat", PROMPT, PROMPT]

    # The old generated files are not user images: going back to the old prompt reuses them as they are.
    assert ensure(class_dir, refuse_pipeline, num_images=2) == old
    # A changed model (or any other setting) also tops up.
    factory = CountingFactory(tiny_components)
    assert ensure(class_dir, factory, num_images=1, model_id="other-model") == [
        class_dir / generated_names(1, model_id="other-model")[0]]
    assert factory.calls == 1


def test_same_seed_gives_the_same_images_whatever_the_batch_size(tmp_path: Path, tiny_components) -> None:
    one_by_one = ensure(tmp_path / "b1", CountingFactory(tiny_components), num_images=3, batch_size=1)
    in_pairs = ensure(tmp_path / "b2", CountingFactory(tiny_components), num_images=3, batch_size=2)

    assert [path.name for path in one_by_one] == [path.name for path in in_pairs]
    for single, batched in zip(one_by_one, in_pairs, strict=True):
        difference = np.abs(pixels(single) - pixels(batched))
        # Same noise, same image; batched float kernels may round a rare pixel to the next uint8 level.
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    # Index i is seeded with seed + i: image 1 is a direct sample with seed 8, and differs from image 0.
    direct = build_pipeline(tiny_components)(
        prompt=[PROMPT], height=64, width=64, num_inference_steps=2, guidance_scale=5.0,
        generator=[torch.Generator("cpu").manual_seed(8)],
    ).images[0]
    assert np.array_equal(np.asarray(direct).astype(np.int16), pixels(one_by_one[1]))
    assert np.abs(pixels(one_by_one[0]) - pixels(one_by_one[1])).mean() > 5


def test_a_batch_is_decoded_one_image_at_a_time_and_the_vae_is_left_as_it_was(tmp_path: Path, tiny_components,
                                                                              monkeypatch) -> None:
    """At 1024 px the decode sets the peak: with an fp16-fix VAE two at once needed a 16 GB card, one at a time 12 GB."""
    vae = tiny_components.vae
    decoded: list[int] = []
    real_decode = vae._decode

    def counting_decode(z, *args, **kwargs):
        decoded.append(z.shape[0])
        return real_decode(z, *args, **kwargs)

    monkeypatch.setattr(vae, "_decode", counting_decode)
    ensure(tmp_path / "class", CountingFactory(tiny_components), num_images=3, batch_size=2)
    assert decoded == [1, 1, 1]  # batches of 2 and 1, every image decoded on its own
    assert vae.use_slicing is False  # the run's VAE encodes and samples as before


def test_deleted_generated_file_is_regenerated(tmp_path: Path, tiny_components) -> None:
    class_dir = tmp_path / "class"
    images = ensure(class_dir, CountingFactory(tiny_components), num_images=3, batch_size=1)
    original = {path: path.read_bytes() for path in images}
    images[1].unlink()

    factory = CountingFactory(tiny_components)
    assert ensure(class_dir, factory, num_images=3, batch_size=1) == images
    assert factory.calls == 1
    assert {path: path.read_bytes() for path in images} == original  # same seed + index, same bytes


def test_corrupt_manifest_is_tolerated(tmp_path: Path, tiny_components, caplog: pytest.LogCaptureFixture) -> None:
    class_dir = tmp_path / "class"
    images = ensure(class_dir, CountingFactory(tiny_components), num_images=2)
    (class_dir / MANIFEST_NAME).write_text("{not json", encoding="utf-8")

    factory = CountingFactory(tiny_components)
    with caplog.at_level(logging.WARNING, logger="waveft_train.data.prior"):
        again = ensure(class_dir, factory, num_images=2)

    assert "cannot be read" in caplog.text and str(class_dir / MANIFEST_NAME) in caplog.text
    assert factory.calls == 0  # the files of the current settings are recognized by name ...
    assert again == images  # ... and not mistaken for user images
    assert len(json.loads((class_dir / MANIFEST_NAME).read_text(encoding="utf-8"))["images"]) == 2

    (class_dir / MANIFEST_NAME).write_text(json.dumps({"version": 99, "images": []}), encoding="utf-8")
    caplog.clear()
    factory = CountingFactory(tiny_components)
    with caplog.at_level(logging.WARNING, logger="waveft_train.data.prior"):
        assert ensure(class_dir, factory, num_images=2) == images
    assert "version-1 manifest" in caplog.text and factory.calls == 0


def test_images_of_an_interrupted_generation_are_kept(tmp_path: Path, tiny_components) -> None:
    """A run killed after writing some images (before recording them) loses none of them."""
    class_dir = tmp_path / "class"
    first = ensure(class_dir, CountingFactory(tiny_components), num_images=2)
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in first}
    (class_dir / MANIFEST_NAME).unlink()  # died between writing the images and the manifest

    factory = CountingFactory(tiny_components)
    four = ensure(class_dir, factory, num_images=4)
    assert four[:2] == first and factory.calls == 1
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in first} == before  # not regenerated
    assert sorted(entry["index"] for entry in json.loads((class_dir / MANIFEST_NAME).read_text())["images"]) == [0, 1, 2, 3]


def test_returned_list_length_and_order(tmp_path: Path, tiny_components, caplog: pytest.LogCaptureFixture) -> None:
    class_dir = tmp_path / "class"
    user = write_user_images(class_dir, ["c.png", "a.png", "sub/b.png"])
    # Enough user images (subfolders included, sorted): nothing is generated, only the first num_images used.
    assert ensure(class_dir, refuse_pipeline, num_images=2) == sorted(user)[:2]

    factory = CountingFactory(tiny_components)
    with caplog.at_level(logging.INFO, logger="waveft_train.data.prior"):
        images = ensure(class_dir, factory, num_images=6)
    assert "3 provided, 0 generated earlier with these settings; generating 3" in caplog.text
    assert images == sorted(user) + [class_dir / name for name in generated_names(3)]
    # Fewer wanted later: the lowest generation indices are kept.
    assert ensure(class_dir, refuse_pipeline, num_images=4) == sorted(user) + [class_dir / generated_names(1)[0]]
    # A hidden or non-image file is no user image.
    (class_dir / ".hidden.png").write_bytes(b"x")
    (class_dir / "notes.txt").write_text("hi", encoding="utf-8")
    assert ensure(class_dir, refuse_pipeline, num_images=6) == images


def test_class_dir_that_is_a_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "class.png"
    path.write_bytes(b"")
    with pytest.raises(UserError, match="prior.class_dir"):
        ensure(path, refuse_pipeline, num_images=1)


def test_shard_batches_keeps_every_generation_batch_whole_whatever_the_processes() -> None:
    """Batch composition decides the pixels (batched kernels round differently), so it must not depend on layout."""
    assert shard_batches([0, 1, 2, 5, 6], 2, 0, 2) == [[0, 1], [5]]
    assert shard_batches([0, 1, 2, 5, 6], 2, 1, 2) == [[2], [6]]
    assert shard_batches([0, 1, 2, 5, 6], 2, 0, 1) == [[0, 1], [2], [5], [6]]
    assert shard_batches([3, 4], 1, 0, 1) == [[3], [4]]
    assert shard_batches([1], 2, 2, 3) == []


def test_two_processes_generate_the_same_images_as_one(tmp_path: Path, tiny_components) -> None:
    """Process 1 then process 0 of 2 (the fake barrier lets them run one after the other)."""
    single = ensure(tmp_path / "single", CountingFactory(tiny_components), num_images=5, batch_size=1)

    class_dir = tmp_path / "shared"
    write_user_images(class_dir, ["user.png"])
    second, first = FakeAccelerator(1, 2), FakeAccelerator(0, 2)
    names = generated_names(4)

    second_factory = CountingFactory(tiny_components)
    from_second = ensure(class_dir, second_factory, num_images=5, batch_size=1, accelerator=second)
    assert files_in(class_dir) == {"user.png", names[1], names[3]}  # its share only, and no manifest
    first_factory = CountingFactory(tiny_components)
    from_first = ensure(class_dir, first_factory, num_images=5, batch_size=1, accelerator=first)

    assert (second_factory.calls, first_factory.calls) == (1, 1)
    assert (second.barriers, first.barriers) == (3, 3)
    assert from_first == from_second == [class_dir / "user.png"] + [class_dir / name for name in names]
    assert [path.name for path in single] == names + [generated_names(5)[4]]
    for shared, alone in zip(from_first[1:], single, strict=False):
        assert shared.read_bytes() == alone.read_bytes()
    manifest = json.loads((class_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert [entry["index"] for entry in manifest["images"]] == [0, 1, 2, 3]
    # Complete now: no process generates or waits.
    assert ensure(class_dir, refuse_pipeline, num_images=5, accelerator=FakeAccelerator(1, 2)) == from_first


def test_share_missing_after_the_barrier_is_a_user_error(tmp_path: Path, tiny_components) -> None:
    """The main process finds another process's images absent (e.g. class_dir not on a shared filesystem)."""
    with pytest.raises(UserError, match=r"indices \[1\] are missing .*all of them share"):
        ensure(tmp_path / "class", CountingFactory(tiny_components), num_images=2, batch_size=1,
               accelerator=FakeAccelerator(0, 2))
    assert not (tmp_path / "class" / MANIFEST_NAME).exists()


def test_toy_class_images_are_keyed_on_the_weights_not_only_the_folder(tmp_path: Path, monkeypatch) -> None:
    """The bundled toy model's folder stays put when a release retrains it: class images it drew before must not be
    reused, so its identity carries a hash of the manifest's file hashes."""
    from waveft_train.config import ModelSection
    from waveft_train.models import builtin as toy

    folder = str(toy.toy_model_dir())
    toy_identity = model_identity(ModelSection(pretrained="toy", dtype="fp32"), folder)
    assert toy_identity == f"{folder}#{toy.toy_weights_version()}|fp32"
    assert model_identity(ModelSection(pretrained=folder, dtype="fp32"), folder) == f"{folder}|fp32"  # a user folder

    retrained = tmp_path / "toy"
    retrained.mkdir()
    manifest = json.loads((toy.toy_model_dir() / "manifest.json").read_text())
    manifest["files"]["unet/diffusion_pytorch_model.safetensors"] = "0" * 64
    (retrained / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(toy, "toy_model_dir", lambda: retrained)
    assert model_identity(ModelSection(pretrained="toy", dtype="fp32"), folder) != toy_identity


def test_single_file_class_images_are_keyed_on_the_file_content_not_only_its_path() -> None:
    """A checkpoint file replaced at the same path (a new version of a community model) must not reuse the class
    images the old one drew; a diffusers folder's identity stays as it was (existing class folders keep matching)."""
    from waveft_train.config import ModelSection
    from waveft_train.models.single_file import RECORD_CONFIG, RECORD_SHA256

    path = "/models/pony.safetensors"
    model = ModelSection(pretrained=path, dtype="bf16")
    old, new = ({RECORD_SHA256: digest, RECORD_CONFIG: "stabilityai/stable-diffusion-xl-base-1.0"}
                for digest in ("a" * 64, "b" * 64))
    assert model_identity(model, path, old) != model_identity(model, path, new)
    assert model_identity(model, path, old) != model_identity(model, path, {**old, RECORD_CONFIG: "./sdxl"})
    assert model_identity(model, path, old) == model_identity(model, path, dict(old))
    assert model_identity(model, path, {}) == model_identity(model, path) == f"{path}|bf16"

