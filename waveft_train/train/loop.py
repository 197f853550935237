"""The training loop: noise, the DreamBooth loss with prior preservation, accumulation, clipping, NaN guard.

It knows no YAML and no file layout: the run (`run.py`) hands it prepared objects and a stream of batches that
already starts at the resume point, and `training_steps` yields after every optimizer step, so the run logs,
checkpoints and validates between steps in plain sight.

A run is a function of its config and its global batch (batch_size × processes × accumulation), not of how that batch
is split: every random draw belongs to an example, keyed by the example's position in the run (the k-th example drawn:
its noise, its timestep, and through the conditioning its caption's dropout and tag order), and the loss is the mean
over the global batch whatever the split (each process scales its sum by processes / global batch; DDP then averages
the processes' gradients). Each DreamBooth item (an instance example and its class example) goes through the UNet as
its own forward and backward: batched kernels round differently for different batch sizes, and Adam turns such
rounding in near-zero gradients into visible differences, so one item per pass is what makes every layout compute the
same numbers. So 1 process with batch 2, 2 processes with batch 1, or accumulation 2 train the same adapter to float
rounding (bit for bit on CPU), and a resumed run, on any layout with the same global batch, draws exactly the noise
and timesteps an uninterrupted one would. `batch_size` is therefore how many items a step takes per process, not a
kernel batch: it costs nothing in memory beyond one item.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from tqdm.auto import tqdm

from waveft_train.common.errors import UserError
from waveft_train.data.encode import Conditioning, UNetInputs
from waveft_train.train.ema import WeightAverage
from waveft_train.train.text_encoders import TextEncoderTraining


class TrainingDiverged(UserError):
    """A non-finite loss or gradient: the run stops, the last good checkpoint stays."""

    exit_code = 3


@dataclass(frozen=True)
class LoopSettings:
    max_steps: int
    gradient_accumulation: int
    max_grad_norm: float | None
    prediction_type: str  # "epsilon" | "v_prediction"
    snr_gamma: float | None
    noise_offset: float
    prior_loss_weight: float | None  # None: no prior preservation
    seed: int


ROLES = {"instance": 0, "class": 1}


def example_generator(seed: int, position: int, role: str) -> torch.Generator:
    """The CPU generator of one example's noise and timestep: example `position` of the run, instance or class."""
    state = np.random.SeedSequence([seed, position, ROLES[role]]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def batch_generators(seed: int, first_position: int, num_instance: int, with_prior: bool) -> list[torch.Generator]:
    """Generators for a collated batch: its instance examples (run positions first_position…), then its class ones."""
    positions = range(first_position, first_position + num_instance)
    roles = ["instance"] + (["class"] if with_prior else [])
    return [example_generator(seed, position, role) for role in roles for position in positions]


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), per example."""
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def diffusion_loss(
    unet, noise_scheduler, inputs: UNetInputs, generators: list[torch.Generator], settings: LoopSettings,
    input_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-example losses: (instance MSEs, optionally Min-SNR weighted; class MSEs, or None without prior).

    Each example draws its noise (then its offset noise, then its timestep) from its own generator.
    """
    latents = inputs.latents.float()
    channels = latents.shape[1]
    device = latents.device
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
    if settings.noise_offset:
        noise = noise + settings.noise_offset * torch.stack([torch.randn((channels, 1, 1), generator=g)
                                                             for g in generators])
    noise = noise.to(device, non_blocking=True)  # from pageable memory: safe, and no wait for the device
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generators]).to(device, non_blocking=True)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(
        noisy.to(input_dtype),
        timesteps,
        encoder_hidden_states=inputs.prompt_embeds.to(input_dtype),
        # time ids stay float32: sizes like 1179 are not representable in bf16, and the UNet casts their embedding
        added_cond_kwargs={"text_embeds": inputs.pooled.to(input_dtype), "time_ids": inputs.time_ids.float()},
        return_dict=False,
    )[0].float()
    if settings.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    per_example = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))

    n = inputs.num_instance
    instance = per_example[:n]
    if settings.snr_gamma is not None:
        instance = instance * min_snr_weights(noise_scheduler, timesteps[:n], settings.snr_gamma, settings.prediction_type)
    prior = per_example[n:] if settings.prior_loss_weight is not None and per_example.shape[0] > n else None
    return instance, prior


class StepMetrics:
    """One optimizer step's figures, left on the device until `read()`: the step itself never waits for the device
    (no `.item()`, no device-to-host copy), so CUDA graphs and torch.compile can capture it whole. Reading waits,
    once, for the step to finish, and raises `TrainingDiverged` when a loss or the gradient norm was not finite
    (the same on every process: the losses are reduced over processes, the norm is of DDP's averaged gradients).

    A non-finite step has already been applied when it is read; the run reads every step before it writes anything,
    so no checkpoint ever holds it.
    """

    def __init__(self, step: int, losses: torch.Tensor, grad_norm: torch.Tensor, *, check_grad_norm: bool,
                 prior_weight: float | None, lr: float, started: float, on_read=None):
        self.step, self.losses, self.grad_norm, self.check_grad_norm = step, losses, grad_norm, check_grad_norm
        self.prior_weight, self.lr, self.started, self.on_read = prior_weight, lr, started, on_read
        self._values: dict[str, float | None] | None = None

    def read(self) -> dict[str, float | None]:
        """loss, instance_loss, prior_loss, lr, grad_norm and seconds (the step's start until its end was read)."""
        if self._values is not None:
            return self._values
        *losses, grad_norm = torch.cat([self.losses, torch.as_tensor(self.grad_norm, dtype=torch.float32,
                                                                     device=self.losses.device).reshape(1)]).tolist()
        instance_loss, prior_loss = losses
        weight = self.prior_weight
        loss = instance_loss + (weight * prior_loss if weight is not None else 0.0)
        if not math.isfinite(loss):
            raise TrainingDiverged(_diverged_message(self.step, "loss", loss))
        if self.check_grad_norm and not math.isfinite(grad_norm):
            raise TrainingDiverged(_diverged_message(self.step, "gradient norm", grad_norm))
        self._values = {"loss": loss, "instance_loss": instance_loss, "prior_loss": prior_loss if weight is not None
                        else None, "lr": self.lr, "grad_norm": grad_norm, "seconds": time.perf_counter() - self.started}
        if self.on_read is not None:
            self.on_read(self._values)
        return self._values


def training_steps(
    *,
    accelerator,
    unet,
    noise_scheduler,
    optimizer,
    lr_scheduler,
    batches: Iterator[dict],
    conditioning: Conditioning,
    settings: LoopSettings,
    trainable_params: list[torch.nn.Parameter],
    start_step: int,
    input_dtype: torch.dtype,
    progress: bool = True,
    ema: WeightAverage | None = None,
    text_encoders: TextEncoderTraining | None = None,
) -> Iterator[tuple[int, StepMetrics]]:
    """Run optimizer steps start_step+1 … max_steps, yielding (step, its StepMetrics) after each one is queued.

    Collective: every process iterates in lockstep (gradients sync in backward, the losses are reduced every step).
    The caller reads each step's metrics before it writes anything (that read is the step's only wait for the
    device, and where a diverged step is caught). `text_encoders`: trained too, until their stop step
    (train/text_encoders.py; their parameters are among `trainable_params`).
    """
    accumulation = settings.gradient_accumulation
    processes = accelerator.num_processes
    bar = tqdm(
        total=settings.max_steps, initial=start_step, desc="training", disable=not (progress and accelerator.is_main_process)
    )

    def show(values: dict) -> None:
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", s_per_step=f"{values['seconds']:.2f}")

    unet.train()
    step = start_step
    prior_weight = settings.prior_loss_weight
    try:
        while step < settings.max_steps:
            started = time.perf_counter()
            if text_encoders is not None and text_encoders.encoders:  # gradients through them only while they train
                conditioning.text_gradients = text_encoders.trains_at(step)
            sums = torch.zeros(2, device=accelerator.device)  # summed instance and class losses
            global_batch = 0
            for micro in range(accumulation):
                batch = next(batches)
                local = batch["num_instance"]
                global_micro = local * processes  # every process draws the same number of examples
                global_batch = global_micro * accumulation
                first = (step * accumulation + micro) * global_micro + accelerator.process_index * local
                inputs = conditioning(batch, first_position=first)  # the run positions key the captions, too
                for index in range(local):
                    item = inputs.item(index)
                    generators = batch_generators(settings.seed, first + index, 1, prior_weight is not None)
                    syncing = micro == accumulation - 1 and index == local - 1
                    with nullcontext() if syncing else accelerator.no_sync(unet):
                        instance, prior = diffusion_loss(unet, noise_scheduler, item, generators, settings, input_dtype)
                        total = instance.sum() + (prior_weight * prior.sum() if prior is not None else 0.0)
                        # DDP averages gradients over processes: scaling by processes / global batch makes the
                        # result the gradient of the mean over the global batch, whatever the split.
                        accelerator.backward(total * (processes / global_batch))
                    sums[0] += instance.detach().sum()
                    if prior is not None:
                        sums[1] += prior.detach().sum()

            if text_encoders is not None and text_encoders.encoders:
                text_encoders.average_gradients(processes)
            grad_norm = accelerator.clip_grad_norm_(trainable_params, settings.max_grad_norm or float("inf"))
            optimizer.step()
            if ema is not None:  # the average follows the weights just stepped (no wait for the device)
                ema.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if processes > 1:  # a non-finite loss on any process makes every process's sum non-finite
                sums = accelerator.reduce(sums, reduction="sum")
            bar.update(1)
            yield step, StepMetrics(step, sums / global_batch, grad_norm, check_grad_norm=accelerator.scaler is None,
                                    prior_weight=prior_weight, lr=lr_scheduler.get_last_lr()[0], started=started,
                                    on_read=show)
    finally:
        bar.close()


def _diverged_message(step: int, what: str, value: float) -> str:
    return (
        f"Training diverged at step {step}: the {what} is {value}. The run stopped; rerunning resumes from the "
        "newest checkpoint under checkpoints/, the last good state (or starts over if none was written yet). Lower "
        "train.learning_rate or waveft.scaling, use train.mixed_precision: bf16 instead of fp16, or set a model.vae "
        "that is fp16-safe."
    )
