"""The composition root: the only module that sees the whole config.

`train_from_config` checks everything that can be checked cheaply (output folder, data folders) before any
model loads, then wires the stages together: models → class images → data → conditioning → WaveFT → loop →
checkpoints, samples and the final adapter. Only the main process writes files.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from waveft_train.config import TrainConfig, dump_config
from waveft_train.errors import UserError
from waveft_train.files import atomic_write_text, make_folder, save_png_atomically, write_atomically
from waveft_train.models import DTYPES
from waveft_train.outputs import MetricsLog, clear_previous_run, holds_other_run, stock_peft_caveats, validate_inputs
from waveft_train.params import adapter_on_meta_unet

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- training
@dataclass
class Session:
    """What the per-step hooks need; built once in `train_from_config`."""

    config: TrainConfig
    output_dir: Path
    accelerator: object
    components: object
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    base_samples: Optional[list] = None
    last_samples: Optional[Path] = None


def train_from_config(config: TrainConfig, *, force: bool = False, progress: bool = True) -> Path:
    """Train (or resume) the run `config` describes; returns the output folder."""
    started = time.perf_counter()
    output_dir = Path(config.output.dir)
    replace_other_run = holds_other_run(config, force=force)
    validate_inputs(config)
    check_optional_dependencies(config)
    adapter_on_meta_unet(config)  # target_modules and n_frequency checked against the UNet before weights load
    if config.model.vae is not None:
        from waveft_train.models import resolve_vae

        resolve_vae(config.model.vae)  # a wrong VAE path fails now, not after the base model has loaded
    instance_images = load_instance_images(config)

    from peft import WaveFTConfig

    from waveft_train import waveft
    from waveft_train.models import load_components
    from waveft_train.trainer import train_loop

    accelerator = make_accelerator(config, output_dir)
    # Made (empty, if new) once the cheap checks have passed and before the models load: a path that cannot be a
    # folder fails in seconds, and a refused run leaves no stray folders.
    make_folder(output_dir, "output.dir")
    if config.prior.enabled:
        make_folder(Path(config.prior.class_dir), "prior.class_dir")
    if accelerator.is_main_process:
        for caveat in stock_peft_caveats(config):
            logger.warning(caveat[0].upper() + caveat[1:])
    torch.manual_seed(config.train.seed)

    components = load_components(
        config.model.pretrained, revision=config.model.revision, vae=config.model.vae, weight_dtype=DTYPES[config.model.dtype]
    )
    device = accelerator.device
    dataset = build_dataset(config, instance_images, components, accelerator, progress)
    conditioner, dataset = build_conditioner(config, components, dataset, device,
                                             progress and accelerator.is_main_process)

    waveft.register()
    unet = components.unet.to(device)
    unet.add_adapter(WaveFTConfig(**config.waveft.peft_kwargs()))
    if config.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = trainable_parameters_in_float32(unet)
    optimizer = make_optimizer(config, trainable)
    lr_scheduler = make_lr_scheduler(config, optimizer)
    with warnings.catch_warnings():
        # torch ≥ 2.13 deprecates DDP's broadcast_buffers, which accelerate's handler still passes; its replacement
        # differs only in a one-time sync at start, and our buffers are equal on every process anyway.
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        unet, optimizer = accelerator.prepare(unet, optimizer)
    session = Session(config, output_dir, accelerator, components, unet, optimizer, lr_scheduler)

    # Only now, with everything loaded and built, is anything in the output folder touched (up front it was only
    # made, if missing): a run that fails before this point leaves the previous run (even one being replaced with
    # --force) as it was, and no config.yaml behind.
    if accelerator.is_main_process and replace_other_run:
        clear_previous_run(output_dir)
    accelerator.wait_for_everyone()
    start_step = resume(session)
    if start_step >= config.train.max_steps and (output_dir / "summary.json").exists():
        if accelerator.is_main_process:  # config.yaml stays as the finished run wrote it (its max_steps)
            print(f"{output_dir} already holds the finished run ({start_step} steps); nothing to do. Raise "
                  "train.max_steps to train further.", flush=True)
        accelerator.end_training()
        return output_dir
    if accelerator.is_main_process:
        atomic_write_text(output_dir / "config.yaml", dump_config(config))
    accelerator.wait_for_everyone()
    metrics_log = MetricsLog(output_dir / "metrics.jsonl", start_step) if accelerator.is_main_process else None
    if accelerator.is_main_process and config.train.report_to == "tensorboard":
        accelerator.init_trackers("waveft-train")

    loader = make_loader(config, dataset, start_step, accelerator)
    settings = loop_settings(config, components)
    input_dtype = torch.float32 if config.train.mixed_precision != "no" else DTYPES[config.model.dtype]

    def after_step(step: int, metrics: dict) -> None:
        if accelerator.is_main_process and (step % config.train.log_every == 0 or step == config.train.max_steps):
            metrics_log.write({"step": step, **metrics})  # the last step always: summary.json's final_loss is there
            if config.train.report_to == "tensorboard":
                accelerator.log({name: value for name, value in metrics.items() if value is not None}, step=step)
        if config.train.checkpoint_every and step % config.train.checkpoint_every == 0 and step < config.train.max_steps:
            save_training_checkpoint(session, step)
        if config.validation.every and step % config.validation.every == 0 and step < config.train.max_steps:
            validate(session, step, progress)

    result = train_loop(
        accelerator=accelerator, unet=unet, noise_scheduler=components.training_noise_scheduler(),
        optimizer=optimizer, lr_scheduler=lr_scheduler, batches=iter(loader), conditioner=conditioner,
        settings=settings, trainable_params=trainable, start_step=start_step, input_dtype=input_dtype,
        after_step=after_step, progress=progress,
    )
    if start_step < config.train.max_steps:  # always: a rerun or a raised max_steps continues from here
        save_training_checkpoint(session, result.step)
    validate(session, result.step, progress)  # the final grid (whenever validation prompts are set)
    finish(session, result, started, trainable, metrics_log)
    accelerator.end_training()
    return output_dir


def make_accelerator(config: TrainConfig, output_dir: Path):
    """accelerate for one or many processes; DeepSpeed/FSDP configs are refused (plain data parallel only)."""
    from datetime import timedelta

    from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

    accelerator = Accelerator(
        mixed_precision=config.train.mixed_precision,
        log_with="tensorboard" if config.train.report_to == "tensorboard" else None,
        project_dir=str(output_dir),
        kwargs_handlers=[
            # The adapter's index tensors are buffers; they never change, so DDP need not re-send them each step.
            DistributedDataParallelKwargs(broadcast_buffers=False),
            # Validation and class images run on the main process while the others wait at a barrier.
            InitProcessGroupKwargs(timeout=timedelta(hours=3)),
        ],
    )
    fp16 = [f"{key}: fp16" for key, value in (("model.dtype", config.model.dtype),
                                              ("train.mixed_precision", config.train.mixed_precision)) if value == "fp16"]
    if accelerator.device.type == "cpu" and fp16 and config.model.dtype == "fp32":
        logger.warning("train.mixed_precision: fp16 has no effect on the CPU (accelerate runs fp16 autocast only on "
                       "GPUs): this run trains in fp32. Use train.mixed_precision: bf16 for mixed precision here.")
    elif accelerator.device.type == "cpu" and fp16:
        raise UserError(
            f"{' with '.join(fp16)} needs a GPU: on the CPU accelerate runs no fp16 mixed precision and torch's "
            "autocast does not cover fp16 weights, so the first step would fail. On the CPU use "
            "train.mixed_precision: bf16 (or no) with model.dtype: bf16 or fp32."
        )
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM):
        raise UserError(
            f"This accelerate configuration uses {accelerator.distributed_type.value}, which waveft-train does not "
            "support yet: the adapter is tiny, so plain data parallelism is what pays. Launch with "
            "`accelerate launch --multi_gpu --num_processes N -m waveft_train --config ...` instead."
        )
    if not accelerator.is_main_process:  # one set of loading bars and library warnings, not one per process
        import diffusers.utils.logging
        import transformers.utils.logging

        for library in (diffusers.utils.logging, transformers.utils.logging):
            library.disable_progress_bar()
            library.set_verbosity_error()
    return accelerator


def make_loader(config: TrainConfig, dataset, start_step: int, accelerator):
    """This process's endless batches, starting where step `start_step` left off."""
    from torch.utils.data import DataLoader

    from waveft_train.data import ProcessBatchSampler, collate

    sampler = ProcessBatchSampler(
        len(dataset), batch_size=config.train.batch_size, seed=config.train.seed,
        start=start_step * config.train.gradient_accumulation,
        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=partial(collate, with_prior=config.prior.enabled),
                      num_workers=config.data.dataloader_workers)


def loop_settings(config: TrainConfig, components):
    from waveft_train.trainer import LoopSettings

    return LoopSettings(
        max_steps=config.train.max_steps,
        gradient_accumulation=config.train.gradient_accumulation,
        max_grad_norm=config.train.max_grad_norm,
        prediction_type=config.train.prediction_type or components.scheduler.config.get("prediction_type", "epsilon"),
        snr_gamma=config.train.snr_gamma,
        noise_offset=config.train.noise_offset,
        prior_loss_weight=config.prior.loss_weight if config.prior.enabled else None,
        seed=config.train.seed,
    )


def load_instance_images(config: TrainConfig):
    """The subject photos (a local folder or a hub dataset), read before any model loads."""
    from waveft_train.data import load_images

    return load_images(config.data.instance_dir, caption_column=config.data.caption_column,
                       default_prompt=config.data.instance_prompt)


def build_dataset(config: TrainConfig, instance, components, accelerator, progress: bool):
    """The instance images, class images (generated where missing) and the DreamBooth pairing."""
    from waveft_train.data import DreamBoothDataset, images_from_files
    from waveft_train.models import build_pipeline

    class_images = None
    if config.prior.enabled:
        from waveft_train.prior import ensure_class_images

        def make_pipeline():
            pipeline = build_pipeline(components, progress_bar=False)
            return pipeline.to(accelerator.device)

        files = ensure_class_images(
            Path(config.prior.class_dir), num_images=config.prior.num_class_images, prompt=config.prior.class_prompt,
            model_id=_model_identity(config, components.model_path), resolution=config.data.resolution, steps=config.prior.generation_steps,
            guidance=config.prior.generation_guidance, seed=config.train.seed,
            batch_size=config.prior.generation_batch_size, make_pipeline=make_pipeline, accelerator=accelerator,
            progress=progress,
        )
        class_images = images_from_files(files, prompt=config.prior.class_prompt, source=config.prior.class_dir)
    return DreamBoothDataset(
        instance, resolution=config.data.resolution, seed=config.train.seed, center_crop=config.data.center_crop,
        random_flip=config.data.random_flip, repeats=config.data.repeats, class_images=class_images,
        num_class_images=config.prior.num_class_images if config.prior.enabled else None,
    )


def _model_identity(config: TrainConfig, model_path: str) -> str:
    """What generated class images depend on, besides the sampling settings: model, revision, VAE and dtype."""
    identity = model_path + (f"@{config.model.revision}" if config.model.revision else "")
    return identity + (f"|vae={config.model.vae}" if config.model.vae else "") + f"|{config.model.dtype}"


def build_conditioner(config: TrainConfig, components, dataset, device: torch.device, progress: bool):
    """Encode every prompt once (and every example's latents, when cached); then park the encoders on the CPU.

    Returns the conditioner and the dataset the loop should draw from (the latent cache when caching).
    """
    from waveft_train.encode import CachedLatentsDataset, Conditioner, PromptCache

    prompts = list(dataset.instance_images.prompts)
    if dataset.class_images is not None:
        prompts += list(dataset.class_images.prompts)
    encoders = [components.text_encoder.to(device), components.text_encoder_2.to(device)]
    prompt_cache = PromptCache(prompts, [components.tokenizer, components.tokenizer_2], encoders)
    components.text_encoder.to("cpu")
    components.text_encoder_2.to("cpu")
    vae = components.vae.to(device)
    if config.train.cache_latents:
        cached = CachedLatentsDataset(dataset, vae, progress=progress)
        components.vae.to("cpu")
        return Conditioner(prompt_cache, config.data.resolution), cached
    return Conditioner(prompt_cache, config.data.resolution, vae=vae), dataset


def trainable_parameters_in_float32(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters, moved to float32 (as diffusers' `cast_training_params` does).

    `unet.add_adapter` leaves the spectrum in the UNet's dtype (peft's inject_adapter_in_model never autocasts), and
    base biases (`waveft.bias: all` or `waveft_only`) and `modules_to_save` copies would otherwise keep
    the frozen weights' bf16/fp16, where Adam's small steps round away and fp16 gradients cannot be unscaled.
    Mixed precision (autocast) then runs them next to half-precision weights.
    """
    trainable = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.float()
    return trainable


def make_optimizer(config: TrainConfig, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    train = config.train
    options = dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                   weight_decay=train.adam_weight_decay, eps=train.adam_epsilon)
    if train.optimizer == "adamw8bit":
        import bitsandbytes  # checked up front by `check_optional_dependencies`

        return bitsandbytes.optim.AdamW8bit(parameters, **options)
    return torch.optim.AdamW(parameters, **options)


def make_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """diffusers' schedulers; stepped once per optimizer step by the loop (not through accelerate)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.train.lr_scheduler, optimizer, num_warmup_steps=config.train.lr_warmup_steps,
                         num_training_steps=config.train.max_steps)


def check_optional_dependencies(config: TrainConfig) -> None:
    import importlib.util

    if config.train.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("train.optimizer: adamw8bit needs bitsandbytes, which is not installed. Install it with "
                        "`pip install 'waveft-train[bnb]'` (CUDA only), or use train.optimizer: adamw.")
    if config.train.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise UserError("train.report_to: tensorboard needs the tensorboard package. Install it with "
                        "`pip install 'waveft-train[tensorboard]'`, or set train.report_to: none.")


def resume(session: Session) -> int:
    """Load the newest complete checkpoint, if any; returns the step to continue from."""
    from waveft_train import checkpoint
    from waveft_train.config import config_fingerprint

    latest = checkpoint.find_latest_checkpoint(session.output_dir)
    if latest is None:
        return 0
    adapter, state = checkpoint.load_checkpoint(latest)
    if state.get("fingerprint") != config_fingerprint(session.config):
        raise UserError(f"The checkpoint {latest} was written by a run with a different config; use another "
                        "output.dir, or --force to start this run from scratch there.")
    checkpoint.load_adapter_weights_into(session.accelerator.unwrap_model(session.unet), adapter)
    session.optimizer.load_state_dict(state["optimizer"])
    session.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if session.accelerator.scaler is not None and state.get("scaler"):
        session.accelerator.scaler.load_state_dict(state["scaler"])
    step, max_steps = int(state["step"]), session.config.train.max_steps
    if session.accelerator.is_main_process:
        where = (f"step {step} of {max_steps}" if step <= max_steps else
                 f"step {step}, past train.max_steps {max_steps}: the run finishes there without training further")
        print(f"Resuming from {latest} ({where}).", flush=True)
    return step


def save_training_checkpoint(session: Session, step: int) -> None:
    """Adapter + optimizer/scheduler state under checkpoints/step-NNNNNN, written atomically by the main process."""
    from waveft_train import checkpoint
    from waveft_train.config import config_fingerprint

    accelerator = session.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {
            "step": step,
            "fingerprint": config_fingerprint(session.config),
            "optimizer": session.optimizer.state_dict(),
            "lr_scheduler": session.lr_scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        }
        try:
            checkpoint.save_checkpoint(
                session.output_dir, step, unet=accelerator.unwrap_model(session.unet),
                base_model_name_or_path=session.components.base_model_name, training_state=state,
                keep=session.config.train.checkpoints_keep,
            )
        except OSError as error:
            previous = checkpoint.find_latest_checkpoint(session.output_dir)
            raise UserError(
                f"Could not write the checkpoint for step {step} in {session.output_dir / 'checkpoints'}: {error}. "
                f"Nothing was half-written; the newest complete checkpoint ({previous or 'none yet'}) is intact. "
                "Free some disk space and rerun the same command to resume."
            ) from error
    accelerator.wait_for_everyone()


def validate(session: Session, step: int, progress: bool) -> None:
    """samples/step-NNNNNN.png: per prompt, the base model's images then the adapter's, for the same seeds."""
    from waveft_train.models import build_pipeline
    from waveft_train.adapters import adapters_disabled
    from waveft_train.sampling import generate_grid_images, make_grid

    config, accelerator = session.config, session.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and config.validation.prompts:
        unet = accelerator.unwrap_model(session.unet)
        components = session.components
        device = accelerator.device
        for module in (components.text_encoder, components.text_encoder_2, components.vae):
            module.to(device)
        unet.eval()
        pipeline = build_pipeline(components, unet=unet)
        if config.train.prediction_type:  # sample the way the adapter was trained
            pipeline.scheduler = type(pipeline.scheduler).from_config(
                pipeline.scheduler.config, prediction_type=config.train.prediction_type
            )
        seeds = [config.validation.seed + i for i in range(config.validation.num_images)]
        resolution = config.validation_resolution()
        options = dict(steps=config.validation.steps, guidance=config.validation.guidance, height=resolution,
                       width=resolution, progress=progress)
        with torch.no_grad():
            adapted = generate_grid_images(pipeline, config.validation.prompts, seeds, **options)
            if session.base_samples is None:
                with adapters_disabled(unet):
                    session.base_samples = generate_grid_images(pipeline, config.validation.prompts, seeds, **options)
        grid = make_grid([base + ours for base, ours in zip(session.base_samples, adapted)])
        path = session.output_dir / "samples" / f"step-{step:06d}.png"
        save_png_atomically(grid, path)
        session.last_samples = path
        for module in (components.text_encoder, components.text_encoder_2):
            module.to("cpu")
        if config.train.cache_latents:
            components.vae.to("cpu")
        unet.train()
    accelerator.wait_for_everyone()


def finish(session: Session, result, started: float, trainable: list[torch.nn.Parameter], metrics_log) -> None:
    """The final adapter (with model card and last sample grid) and summary.json."""
    from waveft_train import checkpoint
    from waveft_train.outputs import model_card, peak_memory_bytes

    accelerator = session.accelerator
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    config, output_dir = session.config, session.output_dir
    trainable_params = sum(p.numel() for p in trainable)
    adapter_dir = output_dir / "adapter"
    card = model_card(config, base_model=session.components.base_model_name, trainable_params=trainable_params,
                      steps=result.step, has_samples=session.last_samples is not None)
    checkpoint.save_adapter(adapter_dir, accelerator.unwrap_model(session.unet),
                            base_model_name_or_path=session.components.base_model_name, model_card=card)
    if session.last_samples is not None:
        last = session.last_samples.read_bytes()
        write_atomically(adapter_dir / "samples.png", lambda stream: stream.write(last))
    final_loss = result.final_loss if result.final_loss is not None else (metrics_log.last or {}).get("loss")
    summary = {
        "trainable_params": trainable_params,
        "adapter_bytes": (adapter_dir / "adapter_model.safetensors").stat().st_size,
        "steps": result.step,
        "seconds_per_step": result.seconds_per_step,
        "peak_memory_bytes": peak_memory_bytes(accelerator.device),
        "num_processes": accelerator.num_processes,
        "final_loss": final_loss,
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    samples = f", samples in {output_dir / 'samples'}" if session.last_samples is not None else ""
    print(f"Done: adapter in {adapter_dir}{samples}.", flush=True)
