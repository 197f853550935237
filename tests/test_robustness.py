"""Nothing lost, nothing cryptic: kill -9 and resume, a full disk mid-checkpoint, NaNs, two processes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from waveft_train.cli import main as cli
from waveft_train.config import load_config
from waveft_train.train import checkpoint, run
from waveft_train.train import loop as trainer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "tests" / "data" / "tiny.yaml"


def overrides(output_dir: Path, class_dir: Path, **extra) -> list[str]:
    values = {
        "output.dir": output_dir, "prior.class_dir": class_dir, "prior.num_class_images": 3,
        "prior.generation_steps": 2, "data.resolution": 32, "train.max_steps": 6, "train.gradient_accumulation": 2,
        "train.checkpoint_every": 2, "train.checkpoints_keep": 2, "validation.every": 0, "validation.prompts": "[]",
        "waveft.n_frequency": 128, **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


def set_args(values: list[str]) -> list[str]:
    return [part for value in values for part in ("--set", value)]


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("class-images")


def adapters_equal(a: Path, b: Path) -> None:
    expected, actual = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("trains_on_the_cpu")
def test_kill_9_then_rerun_ends_with_the_same_adapter(tmp_path, class_dir, tiny_model_dir):
    reference = run.train_from_config(load_config(DEMO, overrides(tmp_path / "reference", class_dir)), progress=False)

    output_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "waveft_train", "--config", str(DEMO), *set_args(overrides(output_dir, class_dir))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = output_dir / "checkpoints" / "step-000002"
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (output_dir / "adapter").exists()
    killed_at = checkpoint.find_latest_checkpoint(output_dir)
    assert killed_at is not None and killed_at.name in {"step-000002", "step-000004"}

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"Resuming from {killed_at}" in rerun.stdout
    adapters_equal(reference / "adapter", output_dir / "adapter")
    steps = [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_full_disk_while_checkpointing_keeps_the_previous_one(tmp_path, class_dir, monkeypatch, capsys):
    output_dir = tmp_path / "run"
    real_write = checkpoint.write_bytes_synced

    def fail_in_second_checkpoint(path: Path, data: bytes) -> None:
        if "step-000004" in str(path) and path.name == "training_state.safetensors":
            real_write(path, data[: len(data) // 2])  # half the bytes reach the disk, then it is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "write_bytes_synced", fail_in_second_checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", str(DEMO), *set_args(overrides(output_dir, class_dir))])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "Could not write the checkpoint for step 4" in err and "No space left on device" in err
    assert "step-000002" in err
    leftovers = [p.name for p in (output_dir / "checkpoints").iterdir()]
    assert leftovers == ["step-000002"]
    adapter, state = checkpoint.load_checkpoint(output_dir / "checkpoints" / "step-000002")
    assert state["step"] == 2 and adapter

    monkeypatch.undo()  # space freed: the same command resumes from step 2 and finishes
    cli.main(["--config", str(DEMO), *set_args(overrides(output_dir, class_dir))])
    assert "Resuming from" in capsys.readouterr().out
    assert json.loads((output_dir / "summary.json").read_text())["steps"] == 6


def test_non_finite_loss_stops_naming_the_step(tmp_path, class_dir, monkeypatch, capsys):
    output_dir = tmp_path / "run"
    real_loss = trainer.diffusion_loss
    calls = {"n": 0}

    def nan_at_step_three(*args, **kwargs):
        calls["n"] += 1
        instance, prior = real_loss(*args, **kwargs)
        return (instance * float("nan"), prior) if calls["n"] == 5 else (instance, prior)  # micro-batch 5 = step 3

    monkeypatch.setattr(trainer, "diffusion_loss", nan_at_step_three)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", str(DEMO), *set_args(overrides(output_dir, class_dir))])
    err = capsys.readouterr().err
    assert exit_info.value.code == 3 and "Traceback" not in err
    assert "diverged at step 3" in err and "loss is nan" in err
    assert checkpoint.find_latest_checkpoint(output_dir).name == "step-000002"
    assert not (output_dir / "adapter").exists()


class InfiniteGradient(torch.autograd.Function):
    """Adds 0 to the loss but sends +inf back: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("inf"))


def test_non_finite_gradient_stops_too(tmp_path, class_dir, monkeypatch, capsys):
    output_dir = tmp_path / "run"
    real_loss = trainer.diffusion_loss

    def with_infinite_gradient(unet, *args, **kwargs):
        instance, prior = real_loss(unet, *args, **kwargs)
        spectrum = next(p for p in unet.parameters() if p.requires_grad)
        return instance + InfiniteGradient.apply(spectrum), prior

    monkeypatch.setattr(trainer, "diffusion_loss", with_infinite_gradient)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", str(DEMO), *set_args(overrides(output_dir, class_dir))])
    err = capsys.readouterr().err
    assert exit_info.value.code == 3 and "diverged at step 1" in err and "gradient norm is inf" in err
    assert checkpoint.find_latest_checkpoint(output_dir) is None


def test_two_processes_share_the_work_and_write_once(tmp_path, class_dir):
    """`accelerate launch --multi_gpu --num_processes 2` over gloo on the CPU, as the README shows."""
    output_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    shared_class_dir = tmp_path / "class-images"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "waveft_train", "--config", str(DEMO),
               *set_args(overrides(output_dir, shared_class_dir, **{"train.max_steps": 4, "validation.every": 2,
                                                                      "validation.prompts": "[a photo of sks toy]",
                                                                      "validation.num_images": 1,
                                                                      "validation.steps": 2}))]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 4
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # one writer
    assert result.stdout.count("Done: adapter in") == 1
    # the two text encoders' loading bars, from one process only (transformers < 5 shows none)
    bars = 2 if int(version("transformers").split(".")[0]) >= 5 else 0
    assert result.stderr.count("Loading weights:   0%") == bars
    assert "broadcast_buffers" not in result.stderr
    assert sorted(p.name for p in (output_dir / "samples").iterdir()) == ["step-000002.png", "step-000004.png"]
    manifest = json.loads((shared_class_dir / "manifest.json").read_text())
    assert sorted(entry["index"] for entry in manifest["images"]) == [0, 1, 2]
    assert len(list(shared_class_dir.glob("*.png"))) == 3
