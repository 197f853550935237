"""SDXL's four parts in the single-file layout of A1111, ComfyUI and Stability's own releases (the "ldm" layout), from
diffusers names; and what a checkpoint's keys say about which model family it holds.

Why: fine-tuned SDXL checkpoints (Pony, Illustrious, Juggernaut, ...) are shared as one `.safetensors` file in this
layout. diffusers reads them (`from_single_file`), but writes none, so this module is the other direction: tests
write the tiny and toy models as such files and check them with diffusers' own loader, and users can turn a
diffusers folder into a file (`python -m waveft_train.models.to_single_file`).

The layout, as diffusers' reader (`diffusers.loaders.single_file_utils`) expects it:
- UNet under `model.diffusion_model.`, in ldm module names (`input_blocks.4.1.…`; unet_names.py maps them);
- VAE under `first_stage_model.`: `encoder.down.{i}.block.{j}`, `decoder.up.{n-1-i}` (ldm counts the decoder's
  levels from the bottom), `mid.block_1/2`, `mid.attn_1.{norm,q,k,v,proj_out}` with 1×1-convolution weights,
  `nin_shortcut` for diffusers' `conv_shortcut`, `norm_out` for `conv_norm_out`;
- CLIP ViT-L (text_encoder) under `conditioner.embedders.0.transformer.`, keyed as transformers keys it;
- OpenCLIP ViT-bigG (text_encoder_2) under `conditioner.embedders.1.model.`, in OpenCLIP's names: fused
  `attn.in_proj_weight` (q, k, v stacked), `ln_1`, `mlp.c_fc`, `positional_embedding`, and `text_projection`
  stored transposed (in × out).

The functions take state dicts and work on meta tensors too, which is how a file's keys and shapes are checked
against the model a config describes before any weight is read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from waveft_train.models.unet_names import UNetNames

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "conditioner.embedders.0.transformer."  # text_encoder (CLIP ViT-L/14)
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # text_encoder_2 (OpenCLIP ViT-bigG/14)
PART_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": CLIP_PREFIX, "text_encoder_2": OPEN_CLIP_PREFIX}

_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict (with its config) in ldm names under `model.diffusion_model.`."""
    names = UNetNames(config)
    converted = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        converted[f"{UNET_PREFIX}{names.to_ldm(module)}.{leaf}"] = tensor
    return converted


def _vae_key(key: str, levels: int) -> str:
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):  # quant_conv, post_quant_conv
        return key
    rest = re.sub(r"^conv_norm_out\.", "norm_out.", rest)
    rest = re.sub(r"^down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.block.\2.", rest)
    rest = re.sub(r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", rest)
    rest = re.sub(r"^up_blocks\.(\d+)\.resnets\.(\d+)\.",
                  lambda match: f"up.{levels - 1 - int(match[1])}.block.{match[2]}.", rest)
    rest = re.sub(r"^up_blocks\.(\d+)\.upsamplers\.0\.", lambda match: f"up.{levels - 1 - int(match[1])}.upsample.", rest)
    rest = re.sub(r"^mid_block\.resnets\.(\d+)\.", lambda match: f"mid.block_{int(match[1]) + 1}.", rest)
    attention = re.match(r"^mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)$", rest)
    if attention:
        rest = f"mid.attn_1.{_VAE_ATTENTION[attention[1]]}.{attention[2]}"
    rest = rest.replace(".conv_shortcut.", ".nin_shortcut.")
    return f"{side}.{rest}"


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in ldm names under `first_stage_model.`; the mid attention's linear
    weights become the 1×1 convolutions ldm stores."""
    levels = len(config["up_block_types"])
    converted = {}
    for key, tensor in state.items():
        name = _vae_key(key, levels)
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", name) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        converted[VAE_PREFIX + name] = tensor
    return converted


def _with_text_model(key: str) -> str:
    """transformers ≥ 5.6 may key CLIPTextModel without its `text_model.` wrapper; the file always has it."""
    return key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"


def clip_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """text_encoder (transformers CLIPTextModel): the same keys, under `conditioner.embedders.0.transformer.`."""
    return {CLIP_PREFIX + _with_text_model(key): tensor for key, tensor in state.items()
            if not key.endswith("position_ids")}


def open_clip_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """text_encoder_2 (transformers CLIPTextModelWithProjection) in OpenCLIP's names under
    `conditioner.embedders.1.model.`: q, k and v stacked into `in_proj`, the projection transposed."""
    converted: dict[str, torch.Tensor] = {}
    stacked: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        key = _with_text_model(key)
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            converted["text_projection"] = tensor.T.contiguous()
            continue
        inner = key.removeprefix("text_model.")
        if inner in _OPEN_CLIP_TOP:
            converted[_OPEN_CLIP_TOP[inner]] = tensor
            continue
        layer = re.match(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", inner)
        if layer is None:
            raise ValueError(f"{key!r} is not a parameter of a CLIP text encoder")
        index, module, leaf = layer.groups()
        block = f"transformer.resblocks.{index}"
        projection = re.fullmatch(r"self_attn\.(q|k|v)_proj", module)
        if projection:
            stacked.setdefault(f"{block}.attn.in_proj_{leaf}", {})[projection[1]] = tensor
        else:
            converted[f"{block}.{_OPEN_CLIP_LAYER[module]}.{leaf}"] = tensor
    for name, parts in stacked.items():
        converted[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return {OPEN_CLIP_PREFIX + key: tensor for key, tensor in converted.items()}


def sdxl_to_ldm(*, unet: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any], vae: Mapping[str, torch.Tensor],
                vae_config: Mapping[str, Any], text_encoder: Mapping[str, torch.Tensor],
                text_encoder_2: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One single-file state dict from the four parts' diffusers/transformers state dicts."""
    return {**unet_to_ldm(unet, unet_config), **vae_to_ldm(vae, vae_config), **clip_to_ldm(text_encoder),
            **open_clip_to_ldm(text_encoder_2)}


# --------------------------------------------------------------------------------------------------- model families
_OTHER_FAMILIES = (  # key prefix, what a file holding it is
    ("cond_stage_model.transformer.", "a Stable Diffusion 1.x checkpoint (one CLIP text encoder, "
                                      "cond_stage_model.transformer.*)"),
    ("cond_stage_model.model.", "a Stable Diffusion 2.x checkpoint (one OpenCLIP text encoder, cond_stage_model.model.*)"),
    ("conditioner.embedders.0.model.", "the SDXL refiner (only an OpenCLIP text encoder, conditioner.embedders.0.model.*), "
                                       "which refines images but is not a base model to personalize"),
    ("lora_unet_", "a LoRA/LyCORIS file (lora_unet_* keys), not a base model"),
    ("lora_te", "a LoRA/LyCORIS file (lora_te* keys), not a base model"),
    ("model.diffusion_model.joint_blocks.", "a Stable Diffusion 3 checkpoint (MMDiT joint_blocks)"),
    ("double_blocks.", "a Flux checkpoint (double_blocks)"),
    ("model.diffusion_model.double_blocks.", "a Flux checkpoint (double_blocks)"),
    ("down_blocks.", "diffusers-named weights (down_blocks.*), a part of a diffusers folder rather than an A1111/ComfyUI "
                     "checkpoint: point model.pretrained at the diffusers folder that holds model_index.json"),
)


def family_problem(keys: Iterable[str]) -> str | None:
    """Why a single file with these keys is not an SDXL-family base checkpoint (None when it is one: UNet, both text
    encoders; the VAE is checked apart, since model.vae can stand in for it)."""
    keys = list(keys)
    for prefix, what in _OTHER_FAMILIES:
        if any(key.startswith(prefix) for key in keys):
            return f"it is {what}"
    missing = [f"{part} ({prefix}*)" for part, prefix in PART_PREFIXES.items()
               if part != "vae" and not any(key.startswith(prefix) for key in keys)]
    if missing:
        return f"it has no {' and no '.join(missing)} weights, which an SDXL checkpoint in the A1111/ComfyUI layout holds"
    if f"{UNET_PREFIX}label_emb.0.0.weight" not in keys:
        return "its UNet has no SDXL size-and-crop conditioning (model.diffusion_model.label_emb.*)"
    return None


def has_vae(keys: Iterable[str]) -> bool:
    return any(key.startswith(VAE_PREFIX) for key in keys)
