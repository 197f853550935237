"""Training the text encoders' WaveFT adapters (`waveft.text_encoders`): what the run adds to its optimizer and loop.

While they train, every item's prompts are encoded through them with gradients (data/encode.py's live encoding: no
cached embeddings go stale). From `train.text_encoder_stop_step` on they are frozen: prompts are still encoded through
the adapted encoders, but without gradients, so their parameters get no gradient, and the optimizer (AdamW, 8-bit
AdamW, Prodigy: all skip a parameter whose gradient is None) leaves them and their state untouched. They stay in the
optimizer, so its state and resume are the same whichever side of the stop step a run is interrupted on.

The encoders are not wrapped in DDP (only the UNet is); with several processes their gradients are averaged over the
processes by the loop (`average_gradients`), which is what DDP does for the UNet's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from waveft_train import waveft as tuner
from waveft_train.adapter.files import load_adapter_weights_into
from waveft_train.adapter.text_encoders import TEXT_ENCODERS, read_text_encoder_tensors, text_encoder_config
from waveft_train.common.errors import UserError
from waveft_train.config import TrainSection, WaveFTSection
from waveft_train.train.optim import trainable_parameters_in_float32


class TextEncoderTraining:
    """Both CLIP encoders of `components` with a WaveFT adapter each, on `device`, and their trainable parameters;
    with waveft.text_encoders off, none (no encoders, no parameters: the run is the UNet-only one)."""

    def __init__(self, components, waveft: WaveFTSection, train: TrainSection, device: torch.device):
        self.encoders: dict[str, torch.nn.Module] = {}
        self.parameters: list[torch.nn.Parameter] = []
        self.learning_rate = train.text_encoder_lr or train.learning_rate
        self.stop_step = train.text_encoder_stop_step
        if not waveft.text_encoders:
            return
        tuner.register()
        config = text_encoder_config(waveft)
        for name in TEXT_ENCODERS:
            encoder = getattr(components, name).to(device)
            try:
                encoder.add_adapter(copy.deepcopy(config))
            except (ValueError, TypeError) as error:  # e.g. n_frequency larger than a layer
                raise UserError(f"WaveFT does not fit the {name} of the model (waveft.text_encoders): {error} Set "
                                "waveft.text_encoder_n_frequency to at most hidden size² of the encoder.") from None
            self.encoders[name] = encoder
            self.parameters += trainable_parameters_in_float32(encoder)

    def param_groups(self, unet_parameters: list[torch.nn.Parameter]) -> list:
        """The optimizer's groups: the UNet's parameters at train.learning_rate, the encoders' at their own rate (no
        encoders: the UNet's parameters as they are, the optimizer exactly as before)."""
        if not self.encoders:
            return unet_parameters
        return [{"params": unet_parameters}, {"params": self.parameters, "lr": self.learning_rate}]

    def trains_at(self, step: int) -> bool:
        """Whether optimizer step `step` + 1 (the one about to run after `step`) trains the encoders."""
        return self.stop_step is None or step < self.stop_step

    def load(self, checkpoint: Path) -> None:
        """Set the encoders' adapters to those saved in `checkpoint` (a checkpoint folder; resume)."""
        for name, tensors in read_text_encoder_tensors(checkpoint, list(self.encoders)).items():
            load_adapter_weights_into(self.encoders[name], tensors, misfit=f"The {name} adapter of the checkpoint "
                                      f"{checkpoint} does not fit this run's", remedy="Use another output.dir.")

    def average_gradients(self, processes: int) -> None:
        """Collective. The encoders' gradients averaged over the processes (DDP does the UNet's), in one all-reduce of
        them laid end to end: a step pays one collective, not one per layer."""
        grads = [parameter.grad for parameter in self.parameters if parameter.grad is not None]
        if processes > 1 and grads:
            flat = torch.cat([grad.reshape(-1) for grad in grads])
            torch.distributed.all_reduce(flat)
            flat.div_(processes)
            for grad, averaged in zip(grads, flat.split([grad.numel() for grad in grads])):
                grad.copy_(averaged.view_as(grad))
