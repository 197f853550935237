"""Train a few steps with a guard around each training step, to show that a step never waits for the device.

A step (forward, backward, clipping, optimizer, LR schedule, drawing the next batch) runs inside `guard()`; the
run's read of the step's metrics, checkpoints and validation run outside it. On a GPU the guard is
`torch.cuda.set_sync_debug_mode("error")`, which raises at any call that waits for the device (an `.item()`, a
device-to-host copy, `nonzero`, a blocking host-to-device copy); tests/test_no_sync.py uses the same wrapper on the
CPU with a dispatch mode that refuses the syncing aten calls.

Usage (from the repository root; part of scripts/gpu_check.sh):
    python -m scripts.sync_check [--steps 3] [--device-check]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from waveft_train.config import load_config
from waveft_train.train import run

REPO = Path(__file__).resolve().parents[1]


def train_with_step_guard(config, guard: Callable[[dict], contextlib.AbstractContextManager]) -> Path:
    """Train `config`, each step inside `guard(kwargs)` (kwargs: what the run hands the loop: optimizer, …)."""
    real_steps = run.training_steps

    def guarded_steps(**kwargs):
        steps = real_steps(**kwargs)
        while True:
            with guard(kwargs):
                try:
                    item = next(steps)  # one whole step, and the batches it draws
                except StopIteration:
                    return
            yield item  # the run reads the step's metrics out here

    run.training_steps = guarded_steps
    try:
        return run.train_from_config(config, progress=False)
    finally:
        run.training_steps = real_steps


@contextlib.contextmanager
def cuda_sync_errors(kwargs: dict):
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sync_check needs a CUDA GPU (tests/test_no_sync.py is the CPU's check)")
    with tempfile.TemporaryDirectory() as work:
        overrides = {"output.dir": f"{work}/run", "prior.class_dir": f"{work}/class", "prior.num_class_images": 2,
                     "train.max_steps": args.steps, "train.checkpoint_every": 0, "validation.every": 0,
                     "validation.prompts": "[]", "model.dtype": "bf16", "train.mixed_precision": "bf16"}
        config = load_config(args.config, [f"{key}={value}" for key, value in overrides.items()])
        train_with_step_guard(config, cuda_sync_errors)
    print(f"sync_check: {args.steps} training steps on {torch.cuda.get_device_name()} made no call that waits for the "
          "device")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
