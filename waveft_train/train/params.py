"""`waveft-train params`: per-layer n_frequency and totals, and the GPU memory the run needs, from the
architecture on the meta device (no weights load)."""

from __future__ import annotations

from accelerate import init_empty_weights
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from waveft_train import waveft as tuner
from waveft_train.config import DataSection, ModelSection, PriorSection, TrainSection, ValidationSection, WaveFTSection
from waveft_train.models.sources import locate_model, resolve_vae
from waveft_train.train import memory
from waveft_train.train.preflight import adapter_on_meta_unet, text_encoders_on_meta


def describe_parameters(model: ModelSection, waveft: WaveFTSection, unet=None) -> str:
    """Per-layer n_frequency, the trainable total and the LoRA rank with the same budget (no weights are loaded);
    with waveft.text_encoders, the encoders' layers too (named `text_encoder.…`, `text_encoder_2.…`).
    `unet`: the adapted meta UNet when the caller has it (`adapter_on_meta_unet`)."""
    unet = unet if unet is not None else adapter_on_meta_unet(model, waveft)
    models = {"": unet, **(text_encoders_on_meta(model, waveft) if waveft.text_encoders else {})}
    rows, total, lora_unit = [], 0, 0
    for prefix, adapted in models.items():
        for name, module in adapted.named_modules():
            if not isinstance(module, tuner.WaveFTLayer):
                continue
            n = module.waveft_n_frequency["default"]
            label = f"{prefix}.{name}" if prefix else name
            rows.append(f"{label:<72} {module.out_features:>5}x{module.in_features:<5} {n:>8}")
            base_bias = module.get_base_layer().bias  # waveft_only trains it, as peft's <method>_only does (UNet only)
            trains_bias = waveft.bias == "waveft_only" and not prefix and base_bias is not None
            total += n + (base_bias.numel() if trains_bias else 0)
            lora_unit += module.in_features + module.out_features
    lines = [f"{'layer':<72} {'d_out x d_in':>11} {'n_freq':>8}", *rows, "",
             f"adapted layers: {len(rows)}", f"trainable parameters: {total:,}",
             f"LoRA with the same budget: rank {total / lora_unit:.2f} (one LoRA rank costs {lora_unit:,} parameters here)"]
    return "\n".join(lines)


def describe_memory(model: ModelSection, data: DataSection, prior: PriorSection, train: TrainSection,
                    validation: ValidationSection, unet, text_encoders: dict | None = None) -> str:
    """The device memory a run of this config needs per process, by phase, and the smallest GPU that holds it
    (`waveft_train.train.memory`'s estimate, fitted to fake-tensor counts of CUDA's allocations; BENCHMARKS.md §3).
    `unet`: the config's UNet with its adapter, on the meta device (`adapter_on_meta_unet`); `text_encoders`: the
    adapted meta encoders of waveft.text_encoders (`text_encoders_on_meta`): their coefficients train beside the
    UNet's, they stay on the device, and each item's prompts keep their activations for the backward pass."""
    sizes = _component_sizes(model)
    unet_sizes = memory.sizes_of(unet)
    encoders = list((text_encoders or {}).values())
    unet_sizes["trainable_params"] += sum(p.numel() for encoder in encoders for p in encoder.parameters() if p.requires_grad)
    encoder_activations = memory.text_encoder_activation_bytes([encoder.config for encoder in encoders],
                                                               prompts=2 if prior.enabled else 1)
    weight = model.dtype  # "fp32" / "fp16" / "bf16", the names memory.BYTES uses
    estimate = memory.estimate_training_memory(
        dict(unet.config), **unet_sizes, resolution=data.resolution, batch_size=train.batch_size,
        prior=prior.enabled, gradient_checkpointing=train.gradient_checkpointing, weight_dtype=weight,
        mixed_precision=train.mixed_precision, optimizer=train.optimizer, ema=train.ema_decay is not None,
        cache_latents=train.cache_latents,
        validation=bool(validation.prompts), generate_class_images=prior.enabled,
        generation_batch_size=prior.generation_batch_size, vae_scale_factor=sizes["vae_scale_factor"],
        text_encoder_params=sizes["text_encoder_params"], vae_params=sizes["vae_params"],
        vae_dtype="fp32" if sizes["vae_force_upcast"] else weight, text_encoders_in_training=data.shuffle_tags or bool(encoders),
        text_encoder_activations=encoder_activations,
    )

    def gib(value: int) -> str:
        return f"{value / memory.GiB:6.2f} GiB"

    def fits(value: int) -> str:
        size = memory.smallest_gpu(value)
        return f"fits {size} GB" if size else f"needs more than {memory.GPU_SIZES[-1]} GB"

    phases = [("training step", estimate["training_step"]),
              ("validation sampling", estimate["validation_sampling"]),
              ("class-image generation (first run)", estimate["class_image_generation"])]
    setting = (f"{data.resolution} px, batch {train.batch_size}{' + class images' if prior.enabled else ''}, "
               f"gradient checkpointing {'on' if train.gradient_checkpointing else 'off'}, {model.dtype} weights")
    state = estimate["adapter"] + estimate["gradients"] + estimate["optimizer_state"]
    parts = (f"  UNet weights {gib(estimate['unet_weights'])}, adapter + optimizer {gib(state)}, "
             f"activations {gib(estimate['activations'])}")
    peak = (f"  peak {gib(estimate['peak'])}: {fits(estimate['peak'])} "
            f"(allowing {memory.ALLOCATOR_SLACK:.0%} allocator slack + {memory.CUDA_CONTEXT / memory.GiB:.2f} GiB of "
            "CUDA context)")
    lines = [f"GPU memory per process (estimate; {setting}):", parts,
             *(f"  {name:<36} {gib(value)}  {fits(value)}" for name, value in phases if value), peak]
    return "\n".join(lines)


def _component_sizes(model: ModelSection) -> dict:
    """Parameter counts of the text encoders and the VAE, and the VAE's downsampling, from their configs (meta)."""
    files = locate_model(model.pretrained, model.config, model.revision)
    path, revision = files.configs, None if files.weights_file else model.revision  # a single file: model.config's
    # the trainer's own rules: a separate VAE is an AutoencoderKL folder, a pipeline folder's vae/, or a hub id
    vae_path, vae_folder, vae_revision = (*resolve_vae(model.vae), None) if model.vae else (path, "vae", revision)
    try:
        vae_config = AutoencoderKL.load_config(vae_path, subfolder=vae_folder, revision=vae_revision)
        text_configs = [CLIPTextConfig.from_pretrained(path, subfolder=folder, revision=revision)
                        for folder in ("text_encoder", "text_encoder_2")]
    except (OSError, ValueError):  # a hub model not in the cache: SDXL-base's sizes
        return {"text_encoder_params": memory.SDXL_TEXT_ENCODER_PARAMS, "vae_params": memory.SDXL_VAE_PARAMS,
                "vae_scale_factor": 8, "vae_force_upcast": model.vae is None}
    with init_empty_weights():
        encoders = [CLIPTextModel(text_configs[0]), CLIPTextModelWithProjection(text_configs[1])]
        vae = AutoencoderKL.from_config(vae_config)
    return {"text_encoder_params": sum(p.numel() for encoder in encoders for p in encoder.parameters()),
            "vae_params": sum(p.numel() for p in vae.parameters()),
            "vae_scale_factor": 2 ** (len(vae_config["block_out_channels"]) - 1),
            "vae_force_upcast": bool(vae_config.get("force_upcast", True))}
