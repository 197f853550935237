"""What the optimizer sees: the trainable parameters (in float32), AdamW (8-bit AdamW, Prodigy), the LR schedule.

Prodigy (prodigyopt) estimates the step size `d` from sums over the parameters of gradient × distance travelled; under
DDP the gradients it sees are already averaged and the parameters are equal on every process, so every layout computes
the same `d` (its `fsdp_in_use` option is for FSDP's sharded parameters, which waveft-train does not use). `d` and its
statistics live in the optimizer's param groups and state, so they checkpoint and resume with it. Its step reads two
sums back to the host per parameter (`.item()`), so a Prodigy step is not free of host synchronisation.
"""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from waveft_train.config import TrainSection


def trainable_parameters_in_float32(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters, moved to float32 (as diffusers' `cast_training_params` does).

    `unet.add_adapter` leaves the spectrum in the UNet's dtype (peft's inject_adapter_in_model never autocasts), and
    base biases (`waveft.bias: all` or `waveft_only`) and `modules_to_save` copies would otherwise keep the frozen
    weights' bf16/fp16, where Adam's small steps round away and fp16 gradients cannot be unscaled.
    Mixed precision (autocast) then runs them next to half-precision weights.
    """
    trainable = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.float()
    return trainable


def make_optimizer(train: TrainSection, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    options = dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                   weight_decay=train.adam_weight_decay, eps=train.adam_epsilon)
    if train.optimizer == "prodigy":
        import prodigyopt  # checked up front by `preflight.check_optional_dependencies`

        return prodigyopt.Prodigy(parameters, **options, beta3=train.prodigy_beta3, d_coef=train.prodigy_d_coef,
                                  decouple=True, use_bias_correction=train.prodigy_use_bias_correction,
                                  safeguard_warmup=train.prodigy_safeguard_warmup)
    if train.optimizer == "adamw8bit":
        import bitsandbytes  # checked up front by `preflight.check_optional_dependencies`

        return bitsandbytes.optim.AdamW8bit(parameters, **options)
    return torch.optim.AdamW(parameters, **options)


def make_lr_scheduler(train: TrainSection, optimizer: torch.optim.Optimizer):
    """diffusers' schedulers; stepped once per optimizer step by the loop (not through accelerate)."""
    return get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=train.lr_warmup_steps,
                         num_training_steps=train.max_steps)
