"""The first hour of a demanding new user, round 3 (issue 37): conventions of the command line, names carried over
from other trainers, an atomic finish, totals over resumed invocations, short warnings, early checks, shareable
exports, steady CPU steps. Photos of every format and size are tests/test_photos.py's."""

from __future__ import annotations

import errno
import json
import re

import pytest
import torch
from helpers import REPO, run_cli
from test_sampling import make_adapter
from test_train import DEMO, fast_overrides

from waveft_train.adapter import load as adapter_load
from waveft_train.cli import main as cli
from waveft_train.common.errors import UserError
from waveft_train.config import config_from_mapping, load_config
from waveft_train.train import finish
from waveft_train.train.metrics import StepTimeWatch
from waveft_train.train.run import train_from_config

BASE = {"model": {"pretrained": "tiny"}, "data": {"instance_dir": str(REPO / "tests" / "data" / "subject"),
                                                  "instance_prompt": "a photo of sks dog"}, "prior": {"enabled": False}}


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("class-images")


def test_keys_named_as_the_diffusers_and_kohya_scripts_name_them_get_ours():
    with pytest.raises(UserError) as caught:
        config_from_mapping({**BASE, "max_train_steps": 800, "train": {"train_batch_size": 2,
                                                                        "gradient_accumulation_steps": 4},
                             "waveft": {"rank": 4}}, source="subject.yaml")
    message = str(caught.value)
    assert "unknown section `max_train_steps` (waveft-train calls it `train.max_steps`)" in message
    assert "`train.train_batch_size` (waveft-train calls it `train.batch_size`)" in message
    assert "`train.gradient_accumulation_steps` (waveft-train calls it `train.gradient_accumulation`)" in message
    assert "`waveft.rank` (waveft-train calls it `waveft.n_frequency` (WaveFT's budget" in message


def test_train_is_a_command_help_shows_it_and_on_off_options_are_flags(tmp_path, class_dir, capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "waveft-train train --config" in " ".join(out.split())
    assert "--force" in out and "--no-force" in out
    overrides = fast_overrides(tmp_path / "run", class_dir, **{"train.max_steps": 1, "validation.every": 0,
                                                                  "validation.prompts": "[]"})
    args = ["train", "--config", DEMO, "--no-force", *[arg for item in overrides for arg in ("--set", item)]]
    code, _, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1
    code, _, stderr = run_cli(["params", "--force", "--config", DEMO], capsys)
    assert code == 2 and "No such option: --force" in stderr  # params has no --force; the flag is a flag


def test_help_paragraphs_are_whole_lines_the_terminal_wraps():
    cli._register_adapter_commands()
    texts = [cli.app.info.help] + [command.help or command.callback.__doc__ for command in cli.app.registered_commands]
    for text in texts:
        assert text and all("\n" not in paragraph for paragraph in text.split("\n\n")), text[:80]
    assert cli.paragraphs("""One sentence
        that goes on.

        Another.""") == "One sentence that goes on.\n\nAnother."


def test_a_full_disk_at_the_finish_leaves_no_adapter_and_a_rerun_completes_it(tmp_path, class_dir, capsys,
                                                                             monkeypatch):
    """adapter/ never exists without samples.png and summary.json; the error starts its own line (not the bar's)."""
    output_dir = tmp_path / "run"
    overrides = fast_overrides(output_dir, class_dir, **{"train.max_steps": 2, "validation.every": 0})
    args = ["--config", DEMO, *[arg for item in overrides for arg in ("--set", item)]]
    write = finish.atomic_write_text

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(finish, "atomic_write_text", full_disk)
    code, _, stderr = run_cli(args, capsys)
    assert code == 2 and re.search(r"(^|\n)error: Could not write the final adapter and summary.json", stderr)
    assert not (output_dir / "adapter").exists() and not (output_dir / "summary.json").exists()
    assert not [path for path in output_dir.iterdir() if path.name.startswith(".")]  # no staging left behind

    monkeypatch.setattr(finish, "atomic_write_text", write)
    code, _, stderr = run_cli(args, capsys)  # the same command completes the folder
    assert code == 0, stderr
    assert sorted(path.name for path in (output_dir / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "samples.png"]
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["adapter_bytes"] > 0


def test_summary_json_totals_every_invocation_of_a_resumed_run(tmp_path, class_dir):
    output_dir = tmp_path / "run"
    for max_steps in (2, 4):  # a finished run extended by raising max_steps: a second invocation
        config = load_config(DEMO, fast_overrides(output_dir, class_dir, **{"train.max_steps": max_steps,
                                                                             "validation.every": 0}))
        train_from_config(config, progress=False)
    summary = json.loads((output_dir / "summary.json").read_text())
    first, second = summary["invocations"]
    assert (first["start_step"], first["end_step"], second["start_step"], second["end_step"]) == (0, 2, 2, 4)
    assert summary["steps"] == 4
    assert summary["wall_seconds"] == pytest.approx(first["wall_seconds"] + second["wall_seconds"], abs=2e-3)
    expected = (2 * first["seconds_per_step"] + 2 * second["seconds_per_step"]) / 4
    assert summary["seconds_per_step"] == pytest.approx(expected)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


def test_sample_checks_its_out_folder_before_loading_anything(adapter_dir, tmp_path, capsys, monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("models were loaded before --out was checked")

    monkeypatch.setattr(adapter_load, "load_adapter_unet", no_models)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, stderr = run_cli(["sample", "-a", adapter_dir, "-p", "a dog", "-o", blocker / "grid.png"], capsys)
    assert code == 2 and "The folder of --out" in stderr and "Traceback" not in stderr


def test_a_prompt_past_clips_window_is_named_once_and_briefly(adapter_dir, tmp_path, capsys):
    long = " ".join(["a photo of sks dog in the snow with a red hat"] * 60)
    code, _, stderr = run_cli(["sample", "-a", adapter_dir, "-p", long, "-o", tmp_path / "g.png", "-n", "1",
                               "--steps", "1"], capsys)
    assert code == 0, stderr
    lines = [line for line in stderr.splitlines() if "tokens long" in line]
    assert len(lines) == 1 and len(lines[0]) <= 300, lines
    assert "The following part of your input was truncated" not in stderr
    assert "Token indices sequence length" not in stderr and len(stderr) < 5000


def test_exports_name_the_base_model_never_this_machines_path(adapter_dir, tiny_model_dir, tmp_path, capsys):
    code, _, stderr = run_cli(["export", "-a", adapter_dir, "-o", tmp_path / "merged"], capsys)
    assert code == 0, stderr
    for name in ("config.json", "scheduler_config.json"):
        assert str(tiny_model_dir) not in (tmp_path / "merged" / name).read_text()


def test_one_hint_when_cpu_steps_swing_widely():
    watch = StepTimeWatch(torch.device("cpu"))
    assert [watch.hint(0.2) for _ in range(20)] == [None] * 20
    assert watch.hint(0.5) is None  # under 4x the median
    hint = watch.hint(1.5)
    assert hint and "train.cpu_threads" in hint and "0.20 s typical" in hint
    assert watch.hint(3.0) is None  # once
    gpu = StepTimeWatch(torch.device("cuda"))
    assert all(gpu.hint(seconds) is None for seconds in [0.1] * 20 + [5.0])


def test_train_cpu_threads_sets_torchs_threads(tmp_path, class_dir):
    before = torch.get_num_threads()
    try:
        config = load_config(DEMO, fast_overrides(tmp_path / "run", class_dir, **{"train.max_steps": 1,
                                                                                   "train.cpu_threads": 1,
                                                                                   "validation.every": 0}))
        train_from_config(config, progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
