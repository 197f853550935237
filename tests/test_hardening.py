"""What a demanding user broke, reproduced and fixed: image modes, two runs in one folder, preemption, damaged
state, non-UTF-8 captions, full disks, inf, silent changes to the user's data, and a black `sample` grid."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli as shared_run_cli
from PIL import Image
from safetensors.torch import load_file

from waveft_train.common.errors import UserError
from waveft_train.common.lock import FolderLock
from waveft_train.config import load_config
from waveft_train.data.images import UnconvertibleImage, load_images, to_rgb, validate_image_folder
from waveft_train.train import checkpoint, run

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "tests" / "data" / "tiny.yaml"
SUBJECT = REPO / "tests" / "data" / "subject"


def overrides(output_dir: Path, **extra) -> list[str]:
    values = {"model.pretrained": "tiny", "output.dir": output_dir, "prior.enabled": False, "data.resolution": 32,
              "train.max_steps": 6, "train.gradient_accumulation": 1, "train.checkpoint_every": 2,
              "train.checkpoints_keep": 3, "validation.every": 0, "validation.prompts": "[]",
              "waveft.n_frequency": 128, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def set_args(values: list[str]) -> list[str]:
    return [part for value in values for part in ("--set", value)]


def cli_command(output_dir: Path, **extra) -> list[str]:
    return [sys.executable, "-m", "waveft_train", "--config", str(DEMO), *set_args(overrides(output_dir, **extra))]


def run_cli(args: list, capsys) -> tuple[int, str]:
    code, _, err = shared_run_cli(args, capsys)
    return code, err


def same_adapter(a: Path, b: Path) -> bool:
    first, second = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def environment() -> dict[str, str]:
    """Read when a test runs: the session's WAVEFT_TRAIN_CACHE (set by conftest) must reach the processes."""
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


# ------------------------------------------------------------------------------------------- image modes
def gray_ramp() -> np.ndarray:
    return np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1))  # 16x64, every 4th grey level


def rgb_scene() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)


MODES = {  # mode -> (image in that mode, the 8-bit RGB it shows, allowed difference per channel)
    "L": lambda: (Image.fromarray(gray_ramp()), np.repeat(gray_ramp()[..., None], 3, -1), 0),
    "I;16": lambda: (Image.fromarray(gray_ramp().astype(np.uint16) * 257), np.repeat(gray_ramp()[..., None], 3, -1), 0),
    "I": lambda: (Image.fromarray(gray_ramp().astype(np.int32) * 257, mode="I"),
                  np.repeat(gray_ramp()[..., None], 3, -1), 0),
    "F in [0, 1]": lambda: (Image.fromarray(gray_ramp().astype(np.float32) / 255, mode="F"),
                            np.repeat(gray_ramp()[..., None], 3, -1), 0),
    "F in [0, 255]": lambda: (Image.fromarray(gray_ramp().astype(np.float32), mode="F"),
                              np.repeat(gray_ramp()[..., None], 3, -1), 0),
    "1": lambda: (Image.fromarray(gray_ramp() >= 128), np.repeat(np.where(gray_ramp() >= 128, 255, 0)[..., None], 3,
                                                                   -1).astype(np.uint8), 0),
    "P": lambda: (Image.fromarray(rgb_scene()).quantize(64), None, 0),
    "RGBA opaque": lambda: (Image.fromarray(rgb_scene()).convert("RGBA"), rgb_scene(), 0),
    "LA transparent": lambda: (Image.fromarray(np.stack([gray_ramp(), np.zeros_like(gray_ramp())], -1), mode="LA"),
                               np.full((16, 64, 3), 255, np.uint8), 0),
    "CMYK": lambda: (Image.fromarray(rgb_scene()).convert("CMYK"), rgb_scene(), 1),
    "YCbCr": lambda: (Image.fromarray(rgb_scene()).convert("YCbCr"), rgb_scene(), 4),
    "HSV": lambda: (Image.fromarray(rgb_scene()).convert("HSV"), rgb_scene(), 6),
    # 8-bit CIELAB cannot hold every sRGB colour exactly: a round trip of random colours is off by ~1 on average
    "LAB": lambda: (_to_lab(rgb_scene()), rgb_scene(), 24),
}


def _to_lab(rgb: np.ndarray) -> Image.Image:
    from PIL import ImageCms

    transform = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    return ImageCms.applyTransform(Image.fromarray(rgb), transform)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_decodes_to_the_rgb_it_shows(mode):
    image, expected, tolerance = MODES[mode]()
    if expected is None:  # a palette image shows its palette's colours: Pillow's own conversion is the reference
        expected = np.asarray(image.convert("RGB"))
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == image.size
    difference = np.abs(np.asarray(converted).astype(int) - expected.astype(int))
    assert difference.max() <= tolerance and difference.mean() <= 1.5, f"{mode}: off by {difference.max()}"


@pytest.mark.parametrize("suffix", [".png", ".tiff"])
def test_sixteen_bit_and_float_files_train_as_what_they_show(tmp_path, suffix):
    """The reported defect: a 16-bit grayscale PNG was trained as an almost all-white image, a float TIFF as black."""
    gray = np.asarray(Image.open(SUBJECT / "ball_01.png").convert("L"))
    folder = tmp_path / "photos"
    folder.mkdir()
    if suffix == ".png":
        Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "g16.png")
    else:
        Image.fromarray(gray.astype(np.float32) / 255.0, mode="F").save(folder / "f32.tiff")
    images = load_images(folder, caption_column=None, default_prompt="a photo of sks toy")
    loaded = np.asarray(to_rgb(images.image(0)).convert("L")).astype(float)
    assert abs(loaded.mean() - gray.mean()) < 1.0 and np.abs(loaded - gray).max() <= 1


@pytest.mark.parametrize("values, reason", [
    (np.full((8, 8), 300.0, np.float32), "neither [0, 1] nor [0, 255]"),
    (np.array([[0.5, np.nan]], np.float32), "NaN or infinity"),
])
def test_images_without_a_faithful_rendering_are_refused_naming_the_file(tmp_path, values, reason):
    with pytest.raises(UnconvertibleImage, match=reason.replace("[", r"\[").replace("]", r"\]")):
        to_rgb(Image.fromarray(values, mode="F"))
    Image.fromarray(values, mode="F").save(tmp_path / "hdr.tiff")
    with pytest.raises(UserError, match=r"hdr.tiff.*data.instance_dir.*no faithful 8-bit RGB rendering"):
        validate_image_folder(tmp_path, config_key="data.instance_dir")


def test_negative_integer_images_are_refused():
    with pytest.raises(UnconvertibleImage, match="beyond 16 bits"):
        to_rgb(Image.fromarray(np.array([[-5, 10]], np.int32), mode="I"))


# ------------------------------------------------------------------------------------------- captions, sizes
def test_non_utf8_metadata_names_file_and_line(tmp_path):
    shutil.copy(SUBJECT / "ball_01.png", tmp_path / "a.png")
    shutil.copy(SUBJECT / "ball_02.png", tmp_path / "b.png")
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "ok"}\n'
                                              b'{"file_name": "b.png", "text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"metadata.jsonl line 2 is not UTF-8 text \(byte 0xe9 at column 36\)"):
        validate_image_folder(tmp_path, config_key="data.instance_dir")


def test_blank_captions_and_tiny_images_are_named_in_warnings(tmp_path, caplog):
    from waveft_train.data.images import warn_about_small_images

    shutil.copy(SUBJECT / "ball_01.png", tmp_path / "a.png")
    Image.new("RGB", (1, 1), "red").save(tmp_path / "dot.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a photo of sks toy"}) + "\n"
                                             + json.dumps({"file_name": "dot.png", "text": "  "}) + "\n")
    logger = logging.getLogger("waveft_train")
    logger.addHandler(caplog.handler)
    try:
        images = load_images(tmp_path, caption_column="text", default_prompt="a photo of sks ball")
        warn_about_small_images(images, 64, "data.instance_dir")
    finally:
        logger.removeHandler(caplog.handler)
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert images.prompts == ("a photo of sks toy", "a photo of sks ball")
    assert "dot.png" in messages and "no caption" in messages and "'a photo of sks ball'" in messages
    assert "dot.png (data.instance_dir) is 1x1, far below data.resolution 64" in messages
    assert "a.png (data.instance_dir) is" not in messages  # big enough: not named


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("key", ["train.learning_rate", "waveft.scaling", "train.adam_weight_decay"])
def test_infinite_numbers_are_config_errors(tmp_path, capsys, key):
    code, err = run_cli(["--config", DEMO, *set_args(overrides(tmp_path / "run", **{key: ".inf"}))], capsys)
    assert code == 2 and f"`{key}`" in err and "finite number" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- damaged state
def test_a_checkpoint_whose_state_lacks_content_is_skipped_for_the_older_one(tmp_path, capsys, caplog):
    output_dir = run.train_from_config(load_config(DEMO, overrides(tmp_path / "run", **{"train.max_steps": 4})),
                                       progress=False)
    newest = output_dir / "checkpoints" / "step-000004"
    state = json.loads((newest / "training_state.json").read_text())
    del state["state"]["optimizer"]
    (newest / "training_state.json").write_text(json.dumps(state))
    (output_dir / "summary.json").unlink()
    capsys.readouterr()
    logger = logging.getLogger("waveft_train")
    logger.addHandler(caplog.handler)
    try:
        run.train_from_config(load_config(DEMO, overrides(output_dir, **{"train.max_steps": 4})), progress=False)
    finally:
        logger.removeHandler(caplog.handler)
    assert f"Resuming from {output_dir / 'checkpoints' / 'step-000002'}" in capsys.readouterr().out
    assert any("step-000004" in r.getMessage() and "lacks optimizer" in r.getMessage() for r in caplog.records)
    assert json.loads((output_dir / "summary.json").read_text())["steps"] == 4


# ------------------------------------------------------------------------------------------- one writer
def test_a_folder_lock_is_refused_naming_the_holder_and_released_with_it(tmp_path):
    with FolderLock(tmp_path, what="training run"):
        with pytest.raises(UserError, match=rf"in use by another training run \(PID {os.getpid()} on host "):
            FolderLock(tmp_path, what="training run").acquire()
    with FolderLock(tmp_path, what="training run"):  # released: taken again
        pass
    assert list(tmp_path.iterdir()) == []  # and the lock file is gone with it


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared: {process.stderr.read() if process.poll() is not None else ''}"


def test_a_second_run_on_the_folder_is_refused_and_a_killed_holder_frees_it(tmp_path):
    output_dir = tmp_path / "run"
    first = subprocess.Popen(cli_command(output_dir, **{"train.max_steps": 400, "train.checkpoint_every": 0}),
                             env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(output_dir / "metrics.jsonl", first)  # the first run is training
        second = subprocess.run(cli_command(output_dir, **{"train.max_steps": 400, "train.checkpoint_every": 0}),
                                env=environment(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another training run (PID {first.pid} on host" in " ".join(second.stderr.split())
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    after = subprocess.run(cli_command(output_dir, **{"train.max_steps": 1, "train.checkpoint_every": 0}),
                           env=environment(), capture_output=True, text=True, timeout=300)
    assert after.returncode == 0, after.stderr[-2000:]
    assert not (output_dir / ".waveft-train.lock").exists()


# ------------------------------------------------------------------------------------------- preemption
@pytest.mark.usefixtures("trains_on_the_cpu")
def test_sigterm_mid_run_then_the_same_command_gives_the_uninterrupted_adapter(tmp_path):
    reference = run.train_from_config(load_config(DEMO, overrides(tmp_path / "reference")), progress=False)
    output_dir = tmp_path / "preempted"
    process = subprocess.Popen(cli_command(output_dir), env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    wait_for(output_dir / "checkpoints" / "step-000002", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    assert "SIGTERM received" in stderr and "Stopped on SIGTERM after step" in stderr and "Traceback" not in stderr
    stopped_at = checkpoint.find_latest_checkpoint(output_dir)
    assert not (output_dir / "adapter").exists() and stopped_at is not None
    assert f"Rerun the same command to resume from {stopped_at}" in " ".join(stderr.split())

    rerun = subprocess.run(cli_command(output_dir), env=environment(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"Resuming from {stopped_at}" in rerun.stdout
    assert same_adapter(reference / "adapter", output_dir / "adapter")  # bit for bit
    steps = [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


# ------------------------------------------------------------------------------------------- changed data
def test_swapped_subject_photos_are_refused_on_resume_unless_forced(tmp_path, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(SUBJECT, photos)
    options = overrides(tmp_path / "run", **{"data.instance_dir": photos, "train.max_steps": 2})
    output_dir = run.train_from_config(load_config(DEMO, options), progress=False)
    (output_dir / "summary.json").unlink()  # interrupted after its last checkpoint
    shutil.copy(photos / "ball_02.png", photos / "ball_01.png")
    code, err = run_cli(["--config", DEMO, *set_args(options)], capsys)
    message = " ".join(err.split())
    assert code == 2 and "subject photos (data.instance_dir) changed since it was written: 1 changed" in message
    assert "ball_01.png" in message and "--force" in message
    code, err = run_cli(["--config", DEMO, "--force", *set_args(options)], capsys)
    assert code == 0, err
    assert json.loads((output_dir / "summary.json").read_text())["steps"] == 2


# ------------------------------------------------------------------------------------------- outputs
@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("adapter-run") / "run"
    options = overrides(output_dir, **{"train.max_steps": 2, "waveft.init_weights": False})
    return run.train_from_config(load_config(DEMO, options), progress=False) / "adapter"


def test_export_to_a_full_disk_is_exit_2_naming_the_path(adapter_dir, tmp_path, capsys, monkeypatch):
    from diffusers import UNet2DConditionModel
    from safetensors import SafetensorError

    def full_disk(self, folder, **kwargs):
        (Path(folder) / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr(UNet2DConditionModel, "save_pretrained", full_disk)
    code, err = run_cli(["export", "--adapter", adapter_dir, "--out", tmp_path / "merged"], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"Could not write the merged UNet to {tmp_path / 'merged'}" in err and "No space" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written, no lock left


def test_final_adapter_and_class_images_on_a_full_disk_name_the_path(tmp_path, capsys, monkeypatch):
    import errno

    from waveft_train.adapter import files as adapter_files
    from waveft_train.data import prior

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prior, "save_image_atomically", full_disk)
    options = overrides(tmp_path / "run", **{"prior.enabled": True, "prior.class_dir": tmp_path / "class",
                                             "prior.class_prompt": "a photo of toy", "prior.num_class_images": 1,
                                             "prior.generation_steps": 1})
    code, err = run_cli(["--config", DEMO, *set_args(options)], capsys)
    assert code == 2 and f"Could not write a generated class image to {tmp_path / 'class'}" in err

    monkeypatch.undo()
    monkeypatch.setattr(adapter_files, "write_adapter_files", full_disk)
    code, err = run_cli(["--config", DEMO, *set_args(overrides(tmp_path / "run2", **{"train.max_steps": 1}))], capsys)
    assert code == 2 and f"Could not write the final adapter and summary.json to {tmp_path / 'run2' / 'adapter'}" in err


def test_sample_refuses_a_scale_that_turns_the_grid_black(adapter_dir, tmp_path, capsys):
    args = ["sample", "--adapter", adapter_dir, "--prompt", "a photo of sks toy", "-n", 1, "--steps", 2,
            "--height", 32, "--width", 32, "--out", tmp_path / "grid.png"]
    code, err = run_cli([*args, "--scale", "1e30"], capsys)
    assert code == 2 and "not finite" in err and "--scale" in err and "Traceback" not in err
    assert not (tmp_path / "grid.png").exists()
    code, err = run_cli([*args, "--scale", "1"], capsys)
    assert code == 0, err
    pixels = np.asarray(Image.open(tmp_path / "grid.png"))
    assert pixels.std() > 1  # an image, not one flat colour


def test_prompts_past_clips_window_are_named_with_what_is_cut(tiny_model_dir, caplog):
    from transformers import CLIPTokenizer

    from waveft_train.data.encode import warn_about_long_prompts

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    long = "a photo of sks dog " + " ".join(["on the beach"] * 30) + " wearing a red hat"
    logger = logging.getLogger("waveft_train")
    logger.addHandler(caplog.handler)
    try:
        warn_about_long_prompts([("photos/dog1.png", long), ("photos/dog2.png", long),
                                 ("validation.prompts", "a photo of sks dog")], tokenizer)
    finally:
        logger.removeHandler(caplog.handler)
    messages = sorted({record.getMessage() for record in caplog.records if record.name.startswith("waveft_train")})
    assert len(messages) == 1  # one warning per distinct prompt, naming every place it comes from
    assert "photos/dog1.png, photos/dog2.png" in messages[0] and "CLIP reads 75" in messages[0]
    assert "wearing a red hat" in messages[0]  # the words the model never sees
