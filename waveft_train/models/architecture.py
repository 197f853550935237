"""The SDXL architecture at three sizes, and the one builder that makes its parts at any of them.

Why one builder: the embedded `tiny` model (random weights, tests), the pretrained `toy` model (the toy world's
recipe, `python -m scripts.pretrain_toy`) and the benchmarks (real SDXL's shapes, random weights, nothing
downloaded) must all be the same classes wired the same way as stabilityai/stable-diffusion-xl-base-1.0: two CLIP
text encoders (the second with projection), a UNet with `text_time` conditioning, an AutoencoderKL, an
EulerDiscreteScheduler with SDXL's noise schedule. Only the sizes differ, so a size is data (`SDXLSize`) and the
wiring is code, once.

SDXL's constraints every size keeps: the UNet's `cross_attention_dim` is the two encoders' hidden sizes added;
`projection_class_embeddings_input_dim` is 6 × `addition_time_embed_dim` + the second encoder's projection dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention linears waveft-train adapts by default


@dataclass(frozen=True)
class SDXLSize:
    """The configs of SDXL's parts at one size (treat them as read-only: copy with dict(...) to change one)."""

    unet: Mapping[str, Any]  # UNet2DConditionModel arguments
    text_encoder: Mapping[str, Any]  # CLIPTextConfig fields; vocabulary and special tokens come from the tokenizer
    text_encoder_2: Mapping[str, Any]
    vae: Mapping[str, Any]  # AutoencoderKL arguments


SDXL_BASE = SDXLSize(  # stabilityai/stable-diffusion-xl-base-1.0: unet/, text_encoder/, text_encoder_2/, vae/config.json
    unet={
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": (5, 10, 20),
        "block_out_channels": (320, 640, 1280),
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 2048,
        "cross_attention_norm": None,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "sample_size": 128,
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": (1, 2, 10),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "upcast_attention": None,
        "use_linear_projection": True,
    },
    text_encoder={  # CLIPTextModel (ViT-L/14), 123 M parameters
        "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
        "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768,
    },
    text_encoder_2={  # CLIPTextModelWithProjection (OpenCLIP ViT-bigG/14), 695 M parameters
        "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
        "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu", "projection_dim": 1280,
    },
    vae={  # AutoencoderKL, 84 M parameters; force_upcast: it overflows in fp16
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "block_out_channels": (128, 256, 512, 512), "act_fn": "silu", "sample_size": 1024, "scaling_factor": 0.13025,
        "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
        "force_upcast": True,
    },
)  # fmt: skip

_TOY_TEXT = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3,  # SDXL reads hidden_states[-2]
             "num_attention_heads": 4, "max_position_embeddings": 77, "projection_dim": 64, "hidden_act": "gelu"}
_TOY_UNET_CHANNELS = (32, 64, 128)
TOY = SDXLSize(  # 64 px images, 16×16×8 latents: the toy world's model (sizes chosen by measurement, docs/toy-world.md)
    unet={
        "sample_size": 16, "in_channels": 8, "out_channels": 8,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),  # no attention at 16×16
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": _TOY_UNET_CHANNELS, "layers_per_block": 1,
        "attention_head_dim": tuple(max(1, channels // 32) for channels in _TOY_UNET_CHANNELS),  # heads, as SDXL's
        "transformer_layers_per_block": (1, 1, 1), "norm_num_groups": 16, "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 16, "cross_attention_dim": 2 * 64,
        "projection_class_embeddings_input_dim": 6 * 16 + 64,
    },
    text_encoder=_TOY_TEXT,
    text_encoder_2=_TOY_TEXT,
    vae={
        "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3, "block_out_channels": (16, 32, 64), "layers_per_block": 1,
        "latent_channels": 8, "norm_num_groups": 8, "sample_size": 64,
        "scaling_factor": 1.0,  # set after training to 1 / std of the latents, as SDXL's 0.13025 was
        "force_upcast": False,
    },
)  # fmt: skip

_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,  # SDXL reads hidden_states[-2]
              "num_attention_heads": 4, "max_position_embeddings": 77, "projection_dim": 32, "hidden_act": "gelu"}
TINY = SDXLSize(  # kilobytes of random weights: the fast tests' model (tiny.py builds and caches it)
    unet={
        "sample_size": 32, "in_channels": 4, "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (32, 64), "layers_per_block": 1, "attention_head_dim": (2, 4),
        "transformer_layers_per_block": (1, 2), "use_linear_projection": True, "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8, "cross_attention_dim": 32 + 32, "projection_class_embeddings_input_dim": 6 * 8 + 32,
    },
    text_encoder=_TINY_TEXT,
    text_encoder_2=_TINY_TEXT,
    vae={
        "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2, "block_out_channels": (16, 32), "norm_num_groups": 8,
        "layers_per_block": 1, "latent_channels": 4, "sample_size": 64,
        "scaling_factor": 0.13025,  # SDXL's value, so code that hard-codes SD1's 0.18215 shows up in tests
        "force_upcast": True,
    },
)  # fmt: skip


def build_unet(size: SDXLSize) -> UNet2DConditionModel:
    """Randomly initialised from the global RNG (seed it, or fork it, first)."""
    return UNet2DConditionModel(**size.unet)


def build_text_encoder(size: SDXLSize, tokenizer, *, second: bool) -> CLIPTextModel | CLIPTextModelWithProjection:
    """text_encoder (CLIPTextModel) or, with `second`, text_encoder_2 (with projection), sized for `tokenizer`."""
    fields = dict(size.text_encoder_2 if second else size.text_encoder)
    config = CLIPTextConfig(**{**fields, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    return (CLIPTextModelWithProjection if second else CLIPTextModel)(config)


def build_vae(size: SDXLSize) -> AutoencoderKL:
    return AutoencoderKL(**size.vae)


def build_scheduler() -> EulerDiscreteScheduler:
    """SDXL's own scheduler settings (the same at every size)."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
        use_karras_sigmas=False,
    )


def assemble_pipeline(*, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2=None, unet,
                      scheduler) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2 if tokenizer_2 is not None else tokenizer, unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
