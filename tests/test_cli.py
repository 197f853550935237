"""User mistakes through the real command line: exit status 2, one paragraph naming the culprit, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from waveft_train.cli import main as cli
from waveft_train.common.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SUBJECT = REPO / "tests" / "data" / "subject"


def write_config(folder: Path, body: str = "", instance_dir: Path = SUBJECT) -> Path:
    """A valid small config (no prior, no validation) plus `body` appended."""
    path = folder / "run.yaml"
    path.write_text(
        f"data:\n  instance_dir: {instance_dir}\n  instance_prompt: a photo of sks toy\n  resolution: 32\n"
        f"prior:\n  enabled: false\nvalidation:\n  every: 0\n  prompts: []\noutput:\n  dir: {folder / 'out'}\n"
        "model:\n  pretrained: tiny\n  dtype: fp32\nwaveft:\n  n_frequency: 64\n" + body
    )
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(arg) for arg in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_info.value.code, err


def expect_user_error(args, capsys, *fragments: str) -> str:
    code, err = run_cli(args, capsys)
    assert code == 2, err
    message = err[err.index("error: "):]  # after any progress bars (e.g. the first build of the tiny model)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_version(capsys):
    from importlib.metadata import version

    try:
        cli.main(["--version"])
    except SystemExit as exit_info:
        assert exit_info.code in (0, None)
    assert capsys.readouterr().out == f"waveft-train {version('waveft-train')}\n"


def test_missing_config_file(tmp_path, capsys):
    expect_user_error(["--config", tmp_path / "nope.yaml"], capsys, "nope.yaml", "does not exist")


def test_yaml_syntax_error_names_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  instance_dir: x\n  instance_prompt: [unclosed\n")
    err = expect_user_error(["--config", path], capsys, "broken.yaml")
    assert "line" in err or ":3:" in err or ":4:" in err


def test_unknown_key_suggests_the_right_one(tmp_path, capsys):
    expect_user_error(["--config", write_config(tmp_path, "train:\n  learning_rat: 1.0e-4\n")], capsys,
                      "train.learning_rat", "did you mean `train.learning_rate`")


def test_wrong_type(tmp_path, capsys):
    expect_user_error(["--config", write_config(tmp_path, "train:\n  max_steps: lots\n")], capsys,
                      "train.max_steps", "lots")


def test_instance_folder_missing_or_empty(tmp_path, capsys):
    expect_user_error(["--config", write_config(tmp_path, instance_dir=tmp_path / "missing")], capsys,
                      str(tmp_path / "missing"), "data.instance_dir")
    (tmp_path / "empty").mkdir()
    expect_user_error(["--config", write_config(tmp_path, instance_dir=tmp_path / "empty")], capsys,
                      str(tmp_path / "empty"), ".png")


def test_corrupt_image_is_named(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "good.png").write_bytes((SUBJECT / "ball_01.png").read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    expect_user_error(["--config", write_config(tmp_path, instance_dir=folder)], capsys, "broken.jpg")


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("waveft.n_frequency=0", ("waveft.n_frequency",)),
        ("waveft.n_frequency=5000", ("n_frequency=5000", "64x64", "1 to 4096", "to_q")),
        ("waveft.wavelet_family=db99", ("db99", "db1-db38")),
        ("waveft.target_modules=[to_z]", ("to_z", "matched no module", "Names in a list match the end", "to_out.0")),
        ("waveft.target_modules=to_q", ("'to_q' matched no module", "A string is a regular expression that must match "
                                        "a whole module path")),
        ("model.pretrained=someone/no-such-model", ("someone/no-such-model", "model.pretrained", "Offline mode is on")),
        ("model.pretrained=/no/such/folder", ("/no/such/folder",)),
        ("model.vae=/no/such/vae", ("/no/such/vae", "VAE")),
    ],
)
def test_adapter_and_model_mistakes_fail_before_training(tmp_path, capsys, override, fragments):
    with warnings.catch_warnings(record=True) as caught:  # nothing but our one paragraph reaches the user
        warnings.simplefilter("always")
        expect_user_error(["--config", write_config(tmp_path), "--set", override], capsys, *fragments)
    assert [str(w.message) for w in caught] == []
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_output_dir_holding_another_run(tmp_path, capsys):
    path = write_config(tmp_path)
    (tmp_path / "out").mkdir()
    other = write_config(tmp_path / "out", "train:\n  learning_rate: 0.5\n")
    (tmp_path / "out" / "config.yaml").write_text(other.read_text())
    (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.1}\n')  # that run produced something
    expect_user_error(["--config", path], capsys, "different config", "--force")


def test_sample_and_export_on_bad_adapters(tmp_path, capsys):
    expect_user_error(["sample", "--adapter", tmp_path / "nope", "--prompt", "x", "--out", tmp_path / "g.png"],
                      capsys, "nope")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "WAVEFT", "base_model_name_or_path": "tiny"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    expect_user_error(["export", "--adapter", adapter, "--out", tmp_path / "merged"], capsys,
                      "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    expect_user_error(["sample", "--adapter", adapter, "--prompt", "x", "--out", tmp_path / "g.png"], capsys,
                      "pickle")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UserError):
        cli.main(["--debug", "--config", str(tmp_path / "nope.yaml")])


def test_console_script_exits_2_without_traceback(tmp_path):
    """The real entry point, in its own process, as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "waveft_train", "--config", str(write_config(tmp_path, "train:\n  max_step: 3\n"))],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "did you mean `train.max_steps`" in result.stderr and "Traceback" not in result.stderr


def test_init_writes_a_starter_config_that_loads(tmp_path, capsys):
    from waveft_train.config import load_config

    target = tmp_path / "starter.yaml"
    cli.main(["init", str(target)])
    assert load_config(target).waveft.n_frequency == 2592
    expect_user_error(["init", target], capsys, "already exists", "--force")
    nested = tmp_path / "new" / "folders" / "subject.yaml"
    cli.main(["init", str(nested)])  # missing folders are made, as for every output path
    assert nested.read_text() == target.read_text()
    expect_user_error(["init", tmp_path / "new"], capsys, "is a folder", "waveft.yaml")
    expect_user_error(["init", target / "x.yaml"], capsys, f"The config's folder {target} cannot be used as a folder: "
                      "it is a file")
    link = tmp_path / "link.yaml"
    link.symlink_to(nested)
    nested.write_text("x: 1\n")
    cli.main(["init", str(link), "--force"])  # writes through the link, as a plain write would
    assert link.is_symlink() and nested.read_text() == target.read_text()


def test_missing_optional_optimizer_is_named(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    expect_user_error(["--config", write_config(tmp_path), "--set", "train.optimizer=adamw8bit"], capsys,
                      "bitsandbytes", "waveft-train[bnb]", "adamw")


def test_missing_tracker_package_is_named_before_any_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib's find_spec now says wandb is not installed
    expect_user_error(["--config", write_config(tmp_path), "--set", "train.report_to=[tensorboard, wandb]"], capsys,
                      "train.report_to: wandb needs the wandb package", "pip install 'waveft-train[wandb]'",
                      "or set train.report_to: [tensorboard]")


def test_out_of_memory_is_one_paragraph_with_what_to_change(tmp_path, capsys, monkeypatch):
    import torch

    from waveft_train.train import loop as trainer

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(trainer, "diffusion_loss", out_of_memory)
    expect_user_error(["--config", write_config(tmp_path)], capsys, "ran out of memory", "gradient_checkpointing",
                      "batch_size")


def test_full_disk_outside_checkpoints_is_one_paragraph(tmp_path, capsys, monkeypatch):
    import errno

    from waveft_train.train import run

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(run, "atomic_write_text", full_disk)
    expect_user_error(["--config", write_config(tmp_path)], capsys, "config.yaml", "No space left on device")


def test_fp16_weights_without_loss_scaling_are_refused(tmp_path, capsys):
    expect_user_error(["--config", write_config(tmp_path), "--set", "model.dtype=fp16", "--set",
                       "train.mixed_precision=no"], capsys, "model.dtype: fp16", "train.mixed_precision")


@pytest.mark.parametrize(
    "args",
    [["sampel"], ["--bogus"], ["sample"], ["sample", "--adapter", "a", "--prompt", "p", "--out", "g.png",
                                            "--scale", "abc"]],
    ids=["unknown-command", "unknown-option", "missing-option", "bad-value"],
)
def test_usage_errors_exit_2_with_the_usage_and_no_traceback(args, capsys):
    code, err = run_cli(args, capsys)
    assert code == 2 and "Usage:" in err, err


def test_ctrl_c_exits_130(tmp_path, capsys, monkeypatch):
    """A shell's `train && export` must not go on after an interrupted run."""
    from waveft_train.train import loop as trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "diffusion_loss", interrupted)
    code, err = run_cli(["--config", write_config(tmp_path)], capsys)
    assert code == 130 and "Aborted (Ctrl-C)" in err and "resumes from its newest checkpoint" in err


def test_output_dir_that_is_a_file_is_one_paragraph(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    for output_dir, reason in ((blocker / "out", f"{blocker} is a file"), (blocker, "it is a file")):
        expect_user_error(["--config", write_config(tmp_path), "--set", f"output.dir={output_dir}"], capsys,
                          f"output.dir {output_dir} cannot be used as a folder: {reason}")
    prior = ["--set", "prior.enabled=true", "--set", "prior.class_prompt=a toy", "--set", f"prior.class_dir={blocker / 'class'}"]
    expect_user_error(["--config", write_config(tmp_path), *prior], capsys,
                      f"prior.class_dir {blocker / 'class'} cannot be used as a folder: {blocker} is a file")


def test_broken_local_model_folder_is_named_without_the_hub_hint(tmp_path, tiny_model_dir):
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    result = subprocess.run(
        [sys.executable, "-m", "waveft_train", "--config", str(write_config(tmp_path)), "--set",
         f"model.pretrained={broken}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"Could not load the unet of model '{broken}'" in result.stderr
    assert "Offline mode" not in result.stderr and "An error occurred while trying to fetch" not in result.stderr


def test_output_dir_holding_a_run_whose_config_no_longer_loads(tmp_path, capsys):
    path = write_config(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.yaml").write_text(path.read_text() + "train:\n  lr_warmup_steps: 10\n")
    (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.1}\n')
    expect_user_error(["--config", path], capsys, "does not load with this version", "lr_warmup_steps",
                      "cannot be resumed", "--force")
