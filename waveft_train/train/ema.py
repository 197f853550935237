"""An exponential moving average of the trainable weights (`train.ema_decay`), through diffusers' `EMAModel`.

The average is what the validation grids draw with and what the final adapter holds; the raw weights keep training.
Checkpoints hold both (the raw ones as the checkpoint's adapter, the average and its step counter in the training
state, as tensors), so a resumed run continues the same average. The update runs on the device right after each
optimizer step and never waits for it: `EMAModel.step` computes the decay on the host from its own integer step
counter (diffusers' warm-up, (1 + n) / (10 + n) capped at `ema_decay`), then updates the copies in place. It depends
only on the weights, which are equal on every process, so the layout invariance holds for the average too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.training_utils import EMAModel

from waveft_train.common.errors import UserError


class WeightAverage:
    """The EMA of `parameters`, or nothing at all when `decay` is None (every method is then a no-op)."""

    def __init__(self, decay: float | None, parameters: list[torch.nn.Parameter]):
        self.parameters = parameters
        self.average = EMAModel(parameters, decay=decay) if decay is not None else None

    @property
    def which(self) -> str:
        """What the saved adapter holds: "ema" or "raw"."""
        return "raw" if self.average is None else "ema"

    def step(self) -> None:
        if self.average is not None:
            self.average.step(self.parameters)

    def state_dict(self) -> dict | None:
        if self.average is None:
            return None
        return {**self.average.state_dict(), "shadow_params": list(self.average.shadow_params)}

    def load_state_dict(self, state: dict | None, *, source: str) -> None:
        if self.average is None:
            return
        if state is None:
            raise UserError(f"The checkpoint {source} holds no EMA weights (train.ema_decay was off when it was "
                            "written); use another output.dir, or --force to start this run from scratch there.")
        device = self.parameters[0].device
        self.average.load_state_dict({**state, "shadow_params": [tensor.to(device) for tensor in state["shadow_params"]]})

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The average in the parameters for the block (grids, the final adapter), the raw weights back after it."""
        if self.average is None:
            yield
            return
        self.average.store(self.parameters)
        self.average.copy_to(self.parameters)
        try:
            yield
        finally:
            self.average.restore(self.parameters)
