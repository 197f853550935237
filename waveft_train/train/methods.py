"""What a run trains: the declared extension point of `DreamBoothRun`.

A method makes the loaded UNet trainable (`attach`, called once the UNet is on its device and before the optimizer
is built) and says whether what it trains is a WaveFT adapter the run can checkpoint, resume and save
(`saves_adapter`). The trainer's own method is `WaveFT`. Anything else gets the trainer's data, class images,
caches, loss and loop unchanged, and keeps its trained UNet in memory (`run.unet`): benchmarks/quality.py trains
LoRA and full fine-tuning of the same attention linears this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from peft import WaveFTConfig

from waveft_train import waveft
from waveft_train.config import WaveFTSection


class TrainingMethod(Protocol):
    saves_adapter: bool

    def attach(self, unet: torch.nn.Module) -> None:
        """Add the trainable parameters to `unet` (everything else stays frozen)."""


@dataclass(frozen=True)
class WaveFT:
    """WaveFT on the UNet through diffusers' `add_adapter` and our registered tuner."""

    settings: WaveFTSection
    saves_adapter: ClassVar[bool] = True

    def attach(self, unet: torch.nn.Module) -> None:
        waveft.register()
        unet.add_adapter(WaveFTConfig(**self.settings.peft_kwargs()))
