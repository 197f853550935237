"""The toy model's architecture: the classes real SDXL uses, sized for a 2-core CPU.

Why the same classes: `model.pretrained: toy` must take exactly the path `stabilityai/stable-diffusion-xl-base-1.0`
takes (two CLIP text encoders, the second with projection, an SDXL UNet with `text_time` conditioning, an
AutoencoderKL, an EulerDiscreteScheduler with SDXL's noise schedule), so that what a test or bench learns on the toy
world says something about the real path. Only the sizes differ:

- 64 px images, a VAE with three blocks (factor 4) and 4 latent channels: 16×16×4 latents;
- UNet levels 16×16 (no attention, as SDXL's first level), 8×8 and 4×4 with cross-attention;
- text encoders of width 64 over a tokenizer that makes every word of the world one token.

Sizes were chosen by measurement (see scripts/pretrain_toy.py and the README's toy-world section).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from waveft_train.toy.world import IMAGE_SIZE, vocabulary

TOKENIZER_MAX_LENGTH = 77  # SDXL's; shorter would save little (the text encoders are tiny)
TEXT_WIDTH = 64
TEXT_LAYERS = 3  # SDXL reads hidden_states[-2]: two layers feed the cross-attention
PROJECTION_DIM = 64
TIME_EMBED_DIM = 16
UNET_CHANNELS = (32, 64, 128)
VAE_CHANNELS = (16, 32, 64)
LATENT_CHANNELS = 8


def write_tokenizer_files(folder: Path) -> Path:
    """A CLIP `vocab.json` + `merges.txt` in which every word of the world is one token (byte-level fallback)."""
    from waveft_train import tiny

    return tiny.write_tokenizer_files(folder, vocabulary())


def build_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="waveft-toy-tokenizer-") as scratch:
        files = write_tokenizer_files(Path(scratch))
        return CLIPTokenizer.from_pretrained(files, model_max_length=TOKENIZER_MAX_LENGTH, local_files_only=True)


def build_text_encoders(tokenizer):
    """(CLIPTextModel, CLIPTextModelWithProjection), randomly initialised from the global RNG."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=TEXT_LAYERS, num_attention_heads=4, max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=PROJECTION_DIM, hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config), CLIPTextModelWithProjection(config)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        attention_head_dim=tuple(max(1, channels // 32) for channels in UNET_CHANNELS),  # heads, as SDXL's config
        transformer_layers_per_block=(1, 1, 1),
        norm_num_groups=16,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        cross_attention_dim=2 * TEXT_WIDTH,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION_DIM,
    )


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        block_out_channels=VAE_CHANNELS, layers_per_block=1, latent_channels=LATENT_CHANNELS,
        norm_num_groups=8, sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # set after training to 1 / std of the latents, as SDXL's 0.13025 was
        force_upcast=False,
    )


def build_scheduler():
    """SDXL's own scheduler settings."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
        use_karras_sigmas=False,
    )


def assemble_pipeline(*, vae, text_encoder, text_encoder_2, tokenizer, unet, scheduler):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
