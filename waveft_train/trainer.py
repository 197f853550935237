"""The training loop: noise, the DreamBooth loss with prior preservation, accumulation, clipping, NaN guard.

It knows no YAML and no file layout: the run (`run.py`) hands it prepared objects and a stream of batches that
already starts at the resume point, and `training_steps` yields after every optimizer step, so the run logs,
checkpoints and validates between steps in plain sight. All randomness is derived from (seed, micro-batch index,
process), so a resumed run draws exactly the noise and timesteps an uninterrupted one would.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from waveft_train.encode import Conditioning, UNetInputs
from waveft_train.errors import UserError


class TrainingDiverged(UserError):
    """A non-finite loss or gradient: the run stops, the last good checkpoint stays."""

    exit_code = 3


@dataclass(frozen=True)
class LoopSettings:
    max_steps: int
    gradient_accumulation: int
    max_grad_norm: Optional[float]
    prediction_type: str  # "epsilon" | "v_prediction"
    snr_gamma: Optional[float]
    noise_offset: float
    prior_loss_weight: Optional[float]  # None: no prior preservation
    seed: int


def micro_batch_generator(seed: int, micro_index: int, process_index: int) -> torch.Generator:
    """The CPU generator for one micro-batch's noise and timesteps."""
    state = np.random.SeedSequence([seed, micro_index, process_index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), per example."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def diffusion_loss(
    unet, noise_scheduler, inputs: UNetInputs, generator: torch.Generator, settings: LoopSettings, input_dtype: torch.dtype
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Instance MSE (optionally Min-SNR weighted) + prior_loss_weight × class MSE on the class half of the batch."""
    latents = inputs.latents.float()
    batch, channels = latents.shape[:2]
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device)
    if settings.noise_offset:
        noise = noise + settings.noise_offset * torch.randn((batch, channels, 1, 1), generator=generator).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator).to(device)
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
    instance_loss = instance.mean()
    parts = {"instance_loss": instance_loss.detach()}
    loss = instance_loss
    if settings.prior_loss_weight is not None and per_example.shape[0] > n:
        prior_loss = per_example[n:].mean()
        loss = loss + settings.prior_loss_weight * prior_loss
        parts["prior_loss"] = prior_loss.detach()
    return loss, parts


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
) -> Iterator[tuple[int, dict[str, float]]]:
    """Run optimizer steps start_step+1 … max_steps, yielding (step, metrics) after each one.

    Collective: every process iterates in lockstep (gradients sync in backward; the finiteness check and the
    metrics are reduced across processes every step).
    """
    accumulation = settings.gradient_accumulation
    bar = tqdm(
        total=settings.max_steps, initial=start_step, desc="training", disable=not (progress and accelerator.is_main_process)
    )
    unet.train()
    step = start_step
    try:
        while step < settings.max_steps:
            started = time.perf_counter()
            totals: dict[str, torch.Tensor] = {}
            for micro in range(accumulation):
                inputs = conditioning(next(batches))
                generator = micro_batch_generator(settings.seed, step * accumulation + micro, accelerator.process_index)
                syncing = micro == accumulation - 1
                with nullcontext() if syncing else accelerator.no_sync(unet):
                    loss, parts = diffusion_loss(unet, noise_scheduler, inputs, generator, settings, input_dtype)
                    if not _finite_everywhere(accelerator, loss):  # every process stops together, none hangs
                        raise TrainingDiverged(_diverged_message(step + 1, "loss", loss.item()))
                    accelerator.backward(loss / accumulation)
                for name, value in {"loss": loss.detach(), **parts}.items():
                    totals[name] = totals.get(name, 0.0) + value / accumulation

            grad_norm = accelerator.clip_grad_norm_(trainable_params, settings.max_grad_norm or float("inf"))
            if accelerator.scaler is None and not torch.isfinite(torch.as_tensor(grad_norm)):
                raise TrainingDiverged(_diverged_message(step + 1, "gradient norm", float(grad_norm)))
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            reduced = {name: accelerator.reduce(value.reshape(1), reduction="mean").item()
                       for name, value in totals.items()}
            reduced.setdefault("prior_loss", None)  # every line has the same keys; null without prior preservation
            seconds = time.perf_counter() - started
            metrics = {**reduced, "lr": lr_scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                       "seconds": seconds}
            bar.update(1)
            bar.set_postfix(loss=f"{reduced['loss']:.4f}", lr=f"{metrics['lr']:.2e}", s_per_step=f"{seconds:.2f}")
            yield step, metrics
    finally:
        bar.close()


def _finite_everywhere(accelerator, loss: torch.Tensor) -> bool:
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.gather(finite)
    return bool(finite.min() > 0)


def _diverged_message(step: int, what: str, value: float) -> str:
    return (
        f"Training diverged at step {step}: the {what} is {value}. The run stopped; rerunning resumes from the "
        "newest checkpoint under checkpoints/, the last good state (or starts over if none was written yet). Lower "
        "train.learning_rate or waveft.scaling, use train.mixed_precision: bf16 instead of fp16, or set a model.vae "
        "that is fp16-safe."
    )
