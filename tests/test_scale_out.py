"""One run, any layout: 1 process or 2, one machine or two (over loopback), resumed on another layout, and a rank
killed mid-run. Everything on CPU processes over gloo, with the tiny model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from waveft_train.config import load_config
from waveft_train.train import checkpoint, run

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "tests" / "data" / "tiny.yaml"


def environment() -> dict[str, str]:
    """Read when a test runs: the session's WAVEFT_TRAIN_CACHE (set by conftest) must reach the processes."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def overrides(output_dir: Path, class_dir: Path, **extra) -> list[str]:
    values = {"model.pretrained": "tiny", "output.dir": output_dir, "prior.class_dir": class_dir,
              "prior.num_class_images": 2, "prior.generation_steps": 2, "data.resolution": 32, "train.max_steps": 4,
              "train.batch_size": 1, "train.gradient_accumulation": 1, "train.checkpoint_every": 2,
              "validation.every": 0, "validation.prompts": "[]", "waveft.n_frequency": 128,
              "train.learning_rate": 1e-2, "train.noise_offset": 0.05, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def set_args(values: list[str]) -> list[str]:
    return [part for value in values for part in ("--set", value)]


def launch(processes: int, *, machines: int = 1, machine_rank: int = 0, port: int | None = None) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", str(machines), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if machines > 1:
        command += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
                    "--main_process_port", str(port)]
    return command + ["-m", "waveft_train", "--config", str(DEMO)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relative_difference(a: Path, b: Path) -> float:
    first, second = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    difference = torch.cat([(first[key] - second[key]).flatten() for key in first]).norm()
    return (difference / torch.cat([second[key].flatten() for key in second]).norm()).item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every process here computes with one thread: CPU kernels split their sums by thread count, and a different
    split rounds differently (the launched processes get OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("class-images")


@pytest.fixture(scope="module", autouse=True)
def on_the_cpu():
    """The adapters of different layouts are compared with `reference`, trained in this process: that one too runs on
    the CPU on a GPU machine (the launched processes get ACCELERATE_USE_CPU from `environment`). Module-scoped, as
    `reference` is: tests/conftest.py's `trains_on_the_cpu` would come after it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "true")
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory, class_dir, on_the_cpu) -> Path:
    """1 process, batch 2: the global batch of 2 every other layout below splits differently."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    config = load_config(DEMO, overrides(output_dir, class_dir, **{"train.batch_size": 2}))
    return run.train_from_config(config, progress=False) / "adapter"


def test_accumulation_gives_the_same_adapter_as_a_larger_batch(reference, class_dir, tmp_path):
    config = load_config(DEMO, overrides(tmp_path / "run", class_dir, **{"train.gradient_accumulation": 2}))
    adapter = run.train_from_config(config, progress=False) / "adapter"
    assert relative_difference(adapter, reference) <= 1e-5


def test_two_processes_then_a_resume_on_one_give_the_1x_batch_2_adapter(reference, class_dir, tmp_path):
    output_dir = tmp_path / "run"
    first = subprocess.run([*launch(2), *set_args(overrides(output_dir, class_dir, **{"train.max_steps": 2}))],
                           env=environment(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((output_dir / "summary.json").read_text())["num_processes"] == 2
    two_steps = json.loads((output_dir / "metrics.jsonl").read_text().splitlines()[0])

    config = load_config(DEMO, overrides(output_dir, class_dir, **{"train.batch_size": 2}))  # 1 process, batch 2
    run.train_from_config(config, progress=False)
    assert relative_difference(output_dir / "adapter", reference) <= 1e-5
    one_process = json.loads((reference.parent / "metrics.jsonl").read_text().splitlines()[0])
    assert two_steps["loss"] == pytest.approx(one_process["loss"], rel=1e-5)  # the logged global mean, too
    assert two_steps["grad_norm"] == pytest.approx(one_process["grad_norm"], rel=1e-4)
    zero = load_file(reference / "adapter_model.safetensors")
    assert max(tensor.abs().max().item() for tensor in zero.values()) > 1e-3  # the adapter really moved


def test_a_different_global_batch_is_refused_on_resume(reference, class_dir, tmp_path):
    from waveft_train.common.errors import UserError

    output_dir = tmp_path / "run"
    run.train_from_config(load_config(DEMO, overrides(output_dir, class_dir, **{"train.max_steps": 2})),
                          progress=False)
    (output_dir / "summary.json").unlink()
    with pytest.raises(UserError, match=r"global batch of 1 images per step and this launch has 2"):
        run.train_from_config(load_config(DEMO, overrides(output_dir, class_dir, **{"train.batch_size": 2})),
                              progress=False)


def test_caption_dropout_and_tag_shuffling_keep_one_adapter_on_any_layout_and_across_a_resume(class_dir, tmp_path):
    """2 processes for 2 steps, resumed on 1 process with batch 2 for 2 more, against 1 process with batch 2 throughout:
    the captions each example trains with (dropped, tags reordered) come from the seed and its place in the run."""
    from helpers import SUBJECT_PHOTOS, captioned_subject

    from waveft_train.data.caption_variation import CaptionVariation

    tags = {name: f"sks toy, ball, stripes, grass {number}, daylight, close-up"
            for number, name in enumerate(SUBJECT_PHOTOS)}
    captions = {"data.instance_dir": captioned_subject(tmp_path / "subject", captions=tags),
                "data.caption_column": "text", "data.caption_dropout": 0.3, "data.shuffle_tags": "true",
                "data.keep_tags": 1}
    variation = CaptionVariation(seed=0, dropout=0.3, shuffle_tags=True, keep_tags=1)  # tiny.yaml's train.seed: 0
    drawn = [variation.caption_for(tags[SUBJECT_PHOTOS[0]], position) for position in range(8)]  # 4 steps × 2
    assert None in drawn and len({caption for caption in drawn if caption is not None}) > 1  # both really happen

    reference_dir = tmp_path / "one-process"
    run.train_from_config(load_config(DEMO, overrides(reference_dir, class_dir, **captions, **{"train.batch_size": 2})),
                          progress=False)
    output_dir = tmp_path / "two-then-one"
    first = subprocess.run([*launch(2), *set_args(overrides(output_dir, class_dir, **captions, **{"train.max_steps": 2}))],
                           env=environment(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    run.train_from_config(load_config(DEMO, overrides(output_dir, class_dir, **captions, **{"train.batch_size": 2})),
                          progress=False)
    ours, theirs = (load_file(folder / "adapter" / "adapter_model.safetensors") for folder in (output_dir, reference_dir))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)  # bit for bit


def test_two_machines_over_loopback_match_one_process(reference, class_dir, tmp_path):
    output_dir = tmp_path / "run"
    port = free_port()
    arguments = set_args(overrides(output_dir, class_dir))
    machines = [subprocess.Popen([*launch(2, machines=2, machine_rank=rank, port=port), *arguments], env=environment(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [machine.communicate(timeout=600) for machine in machines]
    for machine, (_, stderr) in zip(machines, outputs):
        assert machine.returncode == 0, stderr[-3000:]
    assert sum(stdout.count("Done: adapter in") for stdout, _ in outputs) == 1  # written once
    assert json.loads((output_dir / "summary.json").read_text())["num_processes"] == 2
    assert [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert relative_difference(output_dir / "adapter", reference) <= 1e-5


def test_a_killed_rank_ends_every_process_within_a_minute_and_the_rerun_resumes(class_dir, tmp_path):
    output_dir = tmp_path / "run"
    arguments = set_args(overrides(output_dir, class_dir, **{"train.max_steps": 500, "train.checkpoint_every": 1}))
    launcher = subprocess.Popen([*launch(2), *arguments], env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    deadline = time.monotonic() + 400
    while not (output_dir / "checkpoints" / "step-000001").exists() and launcher.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.1)
    tree = psutil.Process(launcher.pid).children(recursive=True)
    workers = [process for process in tree if "waveft_train" in " ".join(process.cmdline())]
    assert len(workers) == 2, [process.cmdline() for process in tree]
    victim = max(workers, key=lambda process: process.pid)  # one rank (which one does not matter)
    killed = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    launcher.wait(timeout=90)
    _, alive = psutil.wait_procs(tree, timeout=max(1.0, 60 - (time.monotonic() - killed)))
    elapsed = time.monotonic() - killed
    assert not alive and elapsed < 60, f"{len(alive)} process(es) still alive after {elapsed:.0f} s"
    assert launcher.returncode != 0

    latest = checkpoint.find_latest_checkpoint(output_dir)
    step = checkpoint.checkpoint_record(latest)["step"]
    rerun = subprocess.run([sys.executable, "-m", "waveft_train", "--config", str(DEMO),
                            *set_args(overrides(output_dir, class_dir, **{"train.max_steps": step + 1,
                                                                          "train.checkpoint_every": 1,
                                                                          "train.batch_size": 2}))],
                           env=environment(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resuming from {latest}" in rerun.stdout
    assert json.loads((output_dir / "summary.json").read_text())["steps"] == step + 1


def test_prodigy_with_ema_killed_on_two_processes_resumes_on_one_to_the_uninterrupted_adapter(class_dir, tmp_path):
    """Issue 33: Prodigy's step-size estimate and the EMA are layout-invariant and survive kill -9 (their state is in
    the checkpoint); the resumed run's final adapter (the average) is the uninterrupted 1-process run's."""
    extra = {"train.optimizer": "prodigy", "train.learning_rate": 1.0, "train.prodigy_d_coef": 100.0,
             "train.ema_decay": 0.2, "train.checkpoint_every": 1, "train.checkpoints_keep": "null"}
    output_dir = tmp_path / "run"
    launcher = subprocess.Popen([*launch(2), *set_args(overrides(output_dir, class_dir, **extra,
                                                                 **{"train.max_steps": 500}))],
                                env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 400
    while not (output_dir / "checkpoints" / "step-000002").exists() and launcher.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.1)
    workers = [process for process in psutil.Process(launcher.pid).children(recursive=True)
               if "waveft_train" in " ".join(process.cmdline())]
    assert len(workers) == 2
    os.kill(max(workers, key=lambda process: process.pid).pid, signal.SIGKILL)
    launcher.wait(timeout=90)
    assert launcher.returncode != 0
    step = checkpoint.checkpoint_record(checkpoint.find_latest_checkpoint(output_dir))["step"]
    assert step >= 2

    one_process = {**extra, "train.max_steps": step + 2, "train.batch_size": 2}
    run.train_from_config(load_config(DEMO, overrides(output_dir, class_dir, **one_process)), progress=False)
    reference = run.train_from_config(load_config(DEMO, overrides(tmp_path / "reference", class_dir, **one_process)),
                                      progress=False)
    assert relative_difference(output_dir / "adapter", reference / "adapter") <= 1e-5
    _, state = checkpoint.load_checkpoint(checkpoint.find_latest_checkpoint(reference))
    assert state["optimizer"]["param_groups"][0]["d"] > state["optimizer"]["param_groups"][0]["d0"]  # it adapted
    assert state["ema"]["optimization_step"] == step + 2
