"""How much GPU memory a run needs, estimated from the UNet's config: no torch, no weights, microseconds.

What a process keeps on the device: the frozen UNet weights; the adapter (trainable parameters in float32 and its
buffers: ~300 KiB of index tensors per layer for waveft-train's tuner); their gradients; AdamW's two float32 moments
(8-bit Adam: one byte each); the activations of one micro-batch (batch_size latents, doubled by prior preservation),
which gradient checkpointing trades for compute; and the VAE when latents are not cached. The text encoders are parked
on the CPU once the prompts are encoded (unless data.shuffle_tags makes captions to encode at every step). Validation
sampling brings them and the VAE back beside the UNet and the training state, and a first run with prior preservation
generates its class images with the base pipeline; `peak` is the largest of those phases.

Activations: per latent token of a level and per channel, a resnet keeps `res` bytes (input and output channels),
a transformer block `block`, everything else `other` (a transformer's norm and projections, the samplers, conv_in
and conv_out: mean of input and output channels), and each cross-attention block `text` per text token. With
checkpointing a resnet keeps `res` per input channel, and one unit at a time is recomputed (`unit` × the largest
unit's own activations). Inference keeps `INFERENCE` bytes per element of the largest resnet. The coefficients are
least-squares fits to fake-tensor counts of live bytes (what torch.cuda.max_memory_allocated counts) of
waveft-train's tuner on the attention linears, under CUDA's autocast rules: SDXL-base at 512-1024 px with batches
1-4, SDXL with one transformer block per level, and the embedded tiny UNet (residuals ≤ 0.6 %; res and other are
only identified together). Refit: `python -m benchmarks.memory --sweep` prints COEFFICIENTS. Measured for real on a
GPU (`python -m benchmarks.memory --device cuda`, an H200, CUDA 13.0; BENCHMARKS.md §6), where fake tensors miss
what CUDA's libraries allocate: the VAE constants (SDXL's VAE at 1024 px: 1.2× / 1.6× the fake count to encode /
decode; not its attention, whose kernels gave peaks within 4 %), UNet inference, and the cuBLAS/cuDNN workspaces
every phase holds. Not covered: fp32 weights under half-precision autocast (each layer would also keep a half copy of
its weight), the CUDA context and the caching allocator's slack (`device_need` adds an allowance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

GiB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SDXL_TEXT_ENCODER_PARAMS = 123_060_480 + 694_659_840  # CLIP ViT-L/14 + OpenCLIP ViT-bigG/14 with projection
SDXL_VAE_PARAMS = 83_653_863
TEXT_TOKENS = 77
GPU_SIZES = (8, 12, 16, 24, 32, 40, 48, 80)  # GB as sold, i.e. GiB of device memory

COEFFICIENTS = {  # bytes per element, by (activation precision, gradient checkpointing)
    ("half", False): {"res": 6.32, "block": 60.226, "other": 12.606, "text": 4.946},
    ("half", True): {"res": 1.069, "block": 3.939, "other": 0.593, "unit": 2.268},
    ("fp32", False): {"res": 2.712, "block": 92.054, "other": 27.722, "text": 4.093},
    ("fp32", True): {"res": 3.249, "block": 3.935, "other": 1.598, "unit": 1.434},
}
INFERENCE = {"half": 11.13, "fp32": 15.75}  # bytes per element of the largest resnet, per latent (no grad)
VAE_PER_PIXEL = {"encode": 772.6, "decode": 1220.6}  # bytes per image pixel and VAE weight byte-width (fp32: × 4)
LIBRARY_WORKSPACES = 88 * 2**20  # cuBLAS/cuDNN workspaces, allocated through torch's allocator once a step has run
CUDA_CONTEXT = int(0.75 * GiB)  # device memory outside torch's allocator (H200, CUDA 13.0: total − free − reserved)
ALLOCATOR_SLACK = 0.10  # the caching allocator reserves more than it hands out


def _per_level(value: Any, levels: int) -> list:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * levels
    return [v if isinstance(v, int) else v[0] for v in values]


def unet_units(config: Mapping[str, Any], height: int, width: int) -> list[tuple[str, int, int, int]]:
    """(kind, tokens, in_channels, out_channels) of every unit of a diffusers UNet2DConditionModel at a latent size:
    "resnet", "block" (a transformer block), "text" (its cross-attention's text tokens), "other"."""
    channels = list(config["block_out_channels"])
    levels = len(channels)
    layers = _per_level(config.get("layers_per_block", 2), levels)
    depth = _per_level(config.get("transformer_layers_per_block", 1), levels)
    up_depth = _per_level(config.get("reverse_transformer_layers_per_block") or depth[::-1], levels)
    tokens = [(height >> level) * (width >> level) for level in range(levels)]
    units = [("other", tokens[0], config.get("in_channels", 4), channels[0])]  # conv_in

    def transformer(level: int, blocks: int) -> None:
        units.append(("other", tokens[level], channels[level], channels[level]))  # norm, proj_in, proj_out
        units.extend(("block", tokens[level], channels[level], channels[level]) for _ in range(blocks))
        units.extend(("text", TEXT_TOKENS, channels[level], channels[level]) for _ in range(blocks))

    skips = [channels[0]]
    for level, kind in enumerate(config["down_block_types"]):
        for index in range(layers[level]):
            units.append(("resnet", tokens[level], channels[max(level - 1, 0)] if index == 0 else channels[level],
                          channels[level]))  # fmt: skip
            if "CrossAttn" in kind:
                transformer(level, depth[level])
            skips.append(channels[level])
        if level < levels - 1:  # downsampler
            units.append(("other", tokens[level + 1], channels[level], channels[level]))
            skips.append(channels[level])
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid:
        units.append(("resnet", tokens[-1], channels[-1], channels[-1]))
        if "CrossAttn" in mid:
            transformer(levels - 1, depth[-1])
        units.append(("resnet", tokens[-1], channels[-1], channels[-1]))
    previous = channels[-1]
    for index, kind in enumerate(config["up_block_types"]):
        level = levels - 1 - index
        for _ in range(layers[level] + 1):  # each takes a skip connection: concatenated channels
            units.append(("resnet", tokens[level], previous + skips.pop(), channels[level]))
            previous = channels[level]
            if "CrossAttn" in kind:
                transformer(level, up_depth[index])
        if level > 0:  # upsampler
            units.append(("other", tokens[level - 1], channels[level], channels[level]))
    units.append(("other", tokens[0], channels[0], config.get("out_channels", 4)))  # norm_out, conv_out
    return units


def activation_features(config: Mapping[str, Any], height: int, width: int) -> dict[str, float]:
    """Elements per sample that the coefficients multiply."""
    f = dict.fromkeys(("res", "res_in", "block", "other", "text", "unit_res", "unit_block"), 0.0)
    for kind, tokens, in_channels, out_channels in unet_units(config, height, width):
        if kind == "resnet":
            f["res"] += tokens * (in_channels + out_channels)
            f["res_in"] += tokens * in_channels
            f["unit_res"] = max(f["unit_res"], tokens * (in_channels + out_channels))
        elif kind == "block":
            f["block"] += tokens * out_channels
            f["unit_block"] = max(f["unit_block"], tokens * out_channels)
        else:
            f[kind] += tokens * (in_channels + out_channels) / (2 if kind == "other" else 1)
    return f


def activation_bytes(config: Mapping[str, Any], *, side: int, batch: int, precision: str, checkpointing: bool) -> int:
    """Peak bytes one micro-batch's forward and backward add over what is resident before it."""
    f, c = activation_features(config, side, side), COEFFICIENTS[(precision, checkpointing)]
    if not checkpointing:
        return int(batch * sum(c[name] * f[name] for name in ("res", "block", "other", "text")))
    off = COEFFICIENTS[(precision, False)]
    largest = max(off["res"] * f["unit_res"], off["block"] * f["unit_block"])
    return int(batch * (c["res"] * f["res_in"] + c["block"] * f["block"] + c["other"] * f["other"] + c["unit"] * largest))


# fp32 state per trainable parameter: AdamW's two moments; 8-bit AdamW's in one byte each; Prodigy's two moments, its
# initial weights and its step-size statistic
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}


def estimate_training_memory(
    unet_config: Mapping[str, Any],
    *,
    unet_params: int,
    trainable_params: int,
    adapter_buffer_bytes: int = 0,
    resolution: int = 1024,
    batch_size: int = 1,
    prior: bool = True,
    gradient_checkpointing: bool = True,
    weight_dtype: str = "bf16",
    mixed_precision: str = "bf16",
    optimizer: str = "adamw",
    ema: bool = False,
    cache_latents: bool = True,
    validation: bool = True,
    generate_class_images: bool = False,
    generation_batch_size: int = 2,
    vae_scale_factor: int = 8,
    text_encoder_params: int = SDXL_TEXT_ENCODER_PARAMS,
    vae_params: int = SDXL_VAE_PARAMS,
    vae_dtype: str = "fp32",
    text_encoders_in_training: bool = False,
    text_encoder_activations: int = 0,
) -> dict[str, int]:
    """Device bytes of a run's parts and phases, per process. Defaults: SDXL-base's encoders and VAE (fp32, as
    force_upcast keeps it; "bf16" for an fp16-fix VAE) and the paper's recipe. The sizes come from the adapted UNet
    on the meta device (`sizes_of`). Returns unet_weights, adapter, gradients, optimizer_state, activations,
    library_workspaces (CUDA's, in every phase), training_step, text_encoders, vae, validation_sampling and
    class_image_generation (0 when off), and peak. `text_encoders_in_training`: they stay beside the UNet to encode
    captions as they come (data.shuffle_tags, waveft.text_encoders); `text_encoder_activations`: what training them keeps
    for backward (`text_encoder_activation_bytes`). `ema`: optimizer_state includes the EMA's fp32 copy."""
    side = resolution // vae_scale_factor
    state_bytes = OPTIMIZER_STATE_BYTES[optimizer] + (4 if ema else 0)
    precision = "fp32" if weight_dtype == "fp32" and mixed_precision == "no" else "half"
    pixels, vae_width = resolution * resolution, BYTES[vae_dtype]
    weights, vae = unet_params * BYTES[weight_dtype], vae_params * vae_width
    text_encoders = text_encoder_params * BYTES[weight_dtype]
    activations = activation_bytes(unet_config, side=side, batch=batch_size * (2 if prior else 1), precision=precision,
                                   checkpointing=gradient_checkpointing)  # fmt: skip
    parts = {"unet_weights": weights, "adapter": trainable_params * 4 + adapter_buffer_bytes,
             "gradients": trainable_params * 4, "optimizer_state": trainable_params * state_bytes,
             "activations": activations}  # fmt: skip
    training = (sum(parts.values()) + LIBRARY_WORKSPACES + (text_encoders if text_encoders_in_training else 0)
                + text_encoder_activations)
    if not cache_latents:  # the VAE stays and encodes each batch (instance and class images) before the UNet runs
        encode = VAE_PER_PIXEL["encode"] * vae_width * pixels * batch_size * (2 if prior else 1)
        training += vae + max(0, int(encode) - activations)
    largest_resnet = activation_features(unet_config, side, side)["unit_res"]

    def sampling(images: int, resident: int) -> int:  # the denoising loop (guidance: 2 latents an image), then the
        unet = INFERENCE[precision] * largest_resnet * 2 * images  # decode, one image at a time (VAE slicing)
        decode = VAE_PER_PIXEL["decode"] * vae_width * pixels
        return int(resident + LIBRARY_WORKSPACES + text_encoders + vae + max(unet, decode))

    state = weights + parts["adapter"] + parts["optimizer_state"]
    validating = sampling(1, state) if validation else 0
    generating = sampling(generation_batch_size, weights) if prior and generate_class_images else 0
    return {**parts, "library_workspaces": LIBRARY_WORKSPACES, "training_step": training,
            "text_encoders": text_encoders, "vae": vae, "validation_sampling": validating,
            "class_image_generation": generating, "peak": max(training, validating, generating)}  # fmt: skip


def text_encoder_activation_bytes(configs: list, *, prompts: int, tokens: int = 77, width: int = 2) -> int:
    """What backward through the text encoders keeps of one item's forward (`prompts`: its instance and class prompts):
    per layer and token about 8 hidden-size and 2 MLP-size values and the attention probabilities, in half precision.
    Counted, not fitted (SDXL's two encoders: ~0.15 GiB per prompt), small beside the UNet's."""
    per_prompt = sum(config.num_hidden_layers * tokens * (8 * config.hidden_size + 2 * config.intermediate_size
                                                         + 2 * config.num_attention_heads * tokens) for config in configs)
    return per_prompt * prompts * width


def device_need(peak: int) -> int:
    """Device memory for an allocated peak: the allocator's slack and the CUDA context on top."""
    return int(peak * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT)


def smallest_gpu(peak: int) -> int | None:
    """The smallest common GPU size (GB as sold) that holds `peak` allocated bytes by `device_need`, or None."""
    return next((size for size in GPU_SIZES if device_need(peak) <= size * GiB), None)


def sizes_of(unet) -> dict[str, int]:
    """unet_params, trainable_params and adapter_buffer_bytes of a UNet with an adapter (the meta device will do)."""
    return {
        "unet_params": sum(p.numel() for p in unet.parameters() if not p.requires_grad),
        "trainable_params": sum(p.numel() for p in unet.parameters() if p.requires_grad),
        "adapter_buffer_bytes": sum(b.numel() * b.element_size() for n, b in unet.named_buffers() if "waveft_" in n),
    }
