"""A training step never waits for the device (issue 35): no `.item()`, `nonzero` or data-dependent shape in the
layer or the loop, so CUDA graphs and torch.compile can capture a step whole, and the host keeps queueing work.

On the CPU every op is "on the host", so the check is by operator: a dispatch mode records every aten call the loop
makes while it runs steps (forward, backward, clipping, optimizer, LR schedule, the next batch), and the ones that
read a device value back on the host are refused. Reading a step's metrics is the run's one wait per step, outside
the step. A GPU run checks the rest with `torch.cuda.set_sync_debug_mode("error")` (scripts/gpu_check.sh).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scripts.sync_check import train_with_step_guard
from waveft_train.config import load_config
from waveft_train.train import loop

REPO = Path(__file__).resolve().parents[1]
# Operators whose result on the host depends on a device value: each waits for the device to finish.
SYNCING = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_static", "equal", "allclose", "masked_select",
           "_unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave", "bincount", "histc"}


class SyncRecorder(TorchDispatchMode):
    """Records the syncing aten calls; `allowed(args)` exempts a call by its arguments."""

    def __init__(self, allowed):
        super().__init__()
        self.allowed, self.calls, self.seen = allowed, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen += 1
        name = func.overloadpacket.__name__
        if name in SYNCING and not self.allowed(name, args):
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def test_training_steps_make_no_syncing_call(tmp_path, tiny_model_dir):
    recorders = []

    def recording(kwargs):
        optimizer = kwargs["optimizer"].optimizer

        def optimizer_step_count(name, args):
            # torch's AdamW keeps its step counts on the host (capturable=False), so reading them waits for no device
            counts = [state["step"] for state in optimizer.state.values() if "step" in state]
            return name == "_local_scalar_dense" and any(args[0] is count for count in counts)

        recorders.append(SyncRecorder(optimizer_step_count))
        return recorders[-1]

    output_dir = tmp_path / "run"
    overrides = {"output.dir": output_dir, "prior.class_dir": tmp_path / "class", "prior.num_class_images": 2,
                 "prior.generation_steps": 2, "data.resolution": 32, "train.max_steps": 3,
                 "train.gradient_accumulation": 2, "train.batch_size": 2, "train.checkpoint_every": 0,
                 "validation.every": 0, "validation.prompts": "[]", "waveft.n_frequency": 64,
                 "train.snr_gamma": 5.0, "train.noise_offset": 0.05, "train.ema_decay": 0.99}  # EMA: no sync either
    config = load_config(REPO / "tests" / "data" / "tiny.yaml", [f"{key}={value}" for key, value in overrides.items()])
    train_with_step_guard(config, recording)

    assert len(recorders) == 4 and all(recorder.seen > 1000 for recorder in recorders[:3])  # it did record the steps
    assert [recorder.calls for recorder in recorders] == [[], [], [], []]
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["loss"] > 0 and m["prior_loss"] > 0 for m in metrics)


def test_the_recorder_catches_a_sync(tmp_path):
    """The check itself: an `.item()`, a `nonzero` and a `bool()` of a tensor are each caught."""
    recorder = SyncRecorder(lambda name, args: False)
    with recorder:
        x = torch.randn(4)
        x.sum().item()
        x.nonzero()
        bool(x[0] > 0)
    assert len(recorder.calls) == 3


def test_a_diverged_step_is_caught_when_read(monkeypatch):
    metrics = loop.StepMetrics(7, torch.tensor([float("nan"), 0.5]), torch.tensor(1.0), check_grad_norm=True,
                               prior_weight=1.0, lr=1e-4, started=0.0)
    try:
        metrics.read()
    except loop.TrainingDiverged as error:
        assert "diverged at step 7" in str(error) and "loss is nan" in str(error)
    else:
        raise AssertionError("a nan loss was read without an error")
    fine = loop.StepMetrics(8, torch.tensor([0.25, 0.5]), torch.tensor(float("inf")), check_grad_norm=False,
                            prior_weight=2.0, lr=1e-4, started=0.0)  # an fp16 step the loss scaler skips
    values = fine.read()
    assert values["loss"] == 1.25 and values["grad_norm"] == float("inf") and fine.read() is values
