"""Issue 33: `train.optimizer: prodigy` (prodigyopt) and `train.ema_decay` (diffusers' EMAModel), in one process.

The layouts and kill -9 (2 processes, then a resume on 1) are in tests/test_scale_out.py; the sync-free step with EMA
on is in tests/test_no_sync.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import Interrupted, crash_after_checkpoint
from safetensors.torch import load_file
from test_train import DEMO, fast_overrides

from waveft_train.common.errors import UserError
from waveft_train.config import load_config
from waveft_train.train import checkpoint, preflight, run
from waveft_train.train.validation import ValidationGrids

EMA_DECAY = 0.2  # low enough that diffusers' warm-up, (1 + n) / (10 + n), reaches it within the 4 steps


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("class-images")


def train(output_dir: Path, class_dir: Path, **extra) -> Path:
    values = {"train.learning_rate": 1e-2, "train.checkpoint_every": 1, "train.checkpoints_keep": "null", **extra}
    return run.train_from_config(load_config(DEMO, fast_overrides(output_dir, class_dir, **values)), progress=False)


def spectra(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def hand_ema(raw_by_step: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """The oracle: the average of the raw weights after each step, with the decay schedule diffusers documents."""
    average = None
    for step, raw in enumerate(raw_by_step, start=1):
        n = step - 1
        weight = 0.0 if n <= 0 else min((1 + n) / (10 + n), decay)
        average = dict(raw) if average is None else {key: weight * average[key] + (1 - weight) * raw[key] for key in raw}
    return average


@pytest.mark.usefixtures("trains_on_the_cpu")
def test_ema_is_saved_sampled_and_checkpointed_while_the_raw_weights_train_on(tmp_path, class_dir, monkeypatch):
    drawn = {}  # step -> the spectrum the validation grid was drawn with
    real_draw = ValidationGrids.draw

    def recording_draw(self, step, components, unet, *args):
        drawn[step] = {name: parameter.detach().clone() for name, parameter in unet.named_parameters()
                       if parameter.requires_grad}
        return real_draw(self, step, components, unet, *args)

    monkeypatch.setattr(ValidationGrids, "draw", recording_draw)
    output_dir = train(tmp_path / "ema", class_dir, **{"train.ema_decay": EMA_DECAY})
    monkeypatch.undo()

    folders = checkpoint.list_checkpoints(output_dir)
    assert [checkpoint.checkpoint_record(folder)["step"] for folder in folders] == [1, 2, 3, 4]
    raw_by_step = [spectra(folder) for folder in folders]  # a checkpoint's adapter holds the raw weights
    expected = hand_ema(raw_by_step, EMA_DECAY)
    final = spectra(output_dir / "adapter")
    assert final.keys() == expected.keys()
    for key in final:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-5, atol=1e-9)
    moved = max((final[key] - raw_by_step[-1][key]).abs().max().item() for key in final)
    assert moved > 1e-4 * max(tensor.abs().max().item() for tensor in final.values())  # the average is not the raw

    _, state = checkpoint.load_checkpoint(folders[1])  # step 2: the average in the state, as tensors
    assert state["ema"]["optimization_step"] == 2 and len(state["ema"]["shadow_params"]) == len(final)
    # the grid of step 2 was drawn with that average, and training went on from the raw weights (the oracle above)
    assert sorted(drawn) == [2, 4]
    for drawn_tensor, shadow in zip(drawn[2].values(), state["ema"]["shadow_params"]):
        torch.testing.assert_close(drawn_tensor, shadow, rtol=0, atol=0)

    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["adapter_weights"] == "ema"
    assert f"EMA of the trained weights (decay {EMA_DECAY})" in (output_dir / "adapter" / "README.md").read_text()

    plain = train(tmp_path / "plain", class_dir)  # EMA off: the same raw weights, the raw ones saved
    assert json.loads((plain / "summary.json").read_text())["adapter_weights"] == "raw"
    for key, tensor in spectra(plain / "adapter").items():
        torch.testing.assert_close(tensor, raw_by_step[-1][key], rtol=0, atol=0)


@pytest.mark.usefixtures("trains_on_the_cpu")
def test_prodigy_trains_and_resumes_exactly(tmp_path, class_dir, monkeypatch):
    prodigy = {"train.optimizer": "prodigy", "train.learning_rate": 1.0, "train.prodigy_d_coef": 100.0,
               "train.ema_decay": EMA_DECAY}
    reference = train(tmp_path / "uninterrupted", class_dir, **prodigy)
    _, state = checkpoint.load_checkpoint(checkpoint.find_latest_checkpoint(reference))
    group = state["optimizer"]["param_groups"][0]
    assert group["d"] > group["d0"]  # the step size estimate grew: its state is what resuming must carry

    crash_after_checkpoint(monkeypatch, 2)
    with pytest.raises(Interrupted):
        train(tmp_path / "resumed", class_dir, **prodigy)
    monkeypatch.undo()
    resumed = train(tmp_path / "resumed", class_dir, **prodigy)
    for key, tensor in spectra(reference / "adapter").items():
        torch.testing.assert_close(spectra(resumed / "adapter")[key], tensor, rtol=1e-5, atol=1e-9)


def test_prodigy_with_an_adamw_learning_rate_is_refused(tmp_path, class_dir):
    with pytest.raises(UserError, match=r"train.learning_rate is 0.0001 with train.optimizer: prodigy.*"
                                        r"set train.learning_rate: 1.0"):
        load_config(DEMO, fast_overrides(tmp_path / "run", class_dir, **{"train.optimizer": "prodigy",
                                                                          "train.learning_rate": 1e-4}))


def test_prodigy_without_prodigyopt_names_the_extra(tmp_path, class_dir, monkeypatch):
    config = load_config(DEMO, fast_overrides(tmp_path / "run", class_dir, **{"train.optimizer": "prodigy",
                                                                               "train.learning_rate": 1.0}))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "prodigyopt" else real_find_spec(name, *args))
    with pytest.raises(UserError, match=r"pip install 'waveft-train\[prodigy\]'"):
        preflight.check_optional_dependencies(config.train)
