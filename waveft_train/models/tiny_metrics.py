"""Tiny random metric models: a DINO-style ViT and a CLIP, real transformers classes, built in code.

Why: `evaluate` scores adapters on real SDXL with DINO ViT-S/16 and CLIP (evaluation/metric_models.py), which
cannot be downloaded where tests run. These folders have the layout of facebook/dino-vits16 and
openai/clip-vit-large-patch14 (config.json, model.safetensors, the image processor's and the tokenizer's files), so
the code under test loads them exactly as it loads the real ones, with `from_pretrained(use_safetensors=True)`.
Seeded: the bytes are the same on every build. `--dino tiny` / `--clip tiny` name them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, ViTConfig, ViTImageProcessor, ViTModel

from waveft_train.common.files import atomic_folder
from waveft_train.models.tiny import PROMPT_WORDS, default_cache_root
from waveft_train.models.tokenizer import TOKENIZER_MAX_LENGTH, build_tokenizer

TINY_METRICS_VERSION = "tiny-metrics-v1"  # bump when anything below changes the files written
TINY_METRICS_SEED = 0
IMAGE_SIZE = 32
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # DINO's preprocessor_config.json
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def build_tiny_dino(path: Path) -> Path:
    """A ViTModel (no pooling layer, as DINO's checkpoints) with DINO's image processor settings at 32 px."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_METRICS_SEED)
        model = ViTModel(ViTConfig(image_size=IMAGE_SIZE, patch_size=8, **SMALL), add_pooling_layer=False)
    model.save_pretrained(path, safe_serialization=True)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=IMAGENET_MEAN,
                      image_std=IMAGENET_STD).save_pretrained(path)
    return path


def build_tiny_clip(path: Path) -> Path:
    """A CLIPModel with a small vocabulary, and a CLIPProcessor (image processor + tokenizer) beside it."""
    tokenizer = build_tokenizer(PROMPT_WORDS)
    text = {**SMALL, "vocab_size": len(tokenizer), "max_position_embeddings": TOKENIZER_MAX_LENGTH,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(text_config=text, vision_config={**SMALL, "image_size": IMAGE_SIZE, "patch_size": 8},
                        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_METRICS_SEED + 1)
        model = CLIPModel(config)
    model.save_pretrained(path, safe_serialization=True)
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                image_mean=CLIP_MEAN, image_std=CLIP_STD)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


def tiny_metric_model_dir(kind: str, cache_dir: Path | None = None) -> Path:
    """The cached folder of the tiny `dino` or `clip`, built once (atomically, as models/tiny.py builds its model)."""
    builders = {"dino": build_tiny_dino, "clip": build_tiny_clip}
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / TINY_METRICS_VERSION / kind
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    if target.exists():  # damaged by hand (a complete build is never partial); replace it
        shutil.rmtree(target, ignore_errors=True)
    with atomic_folder(target, replace=False) as staging:
        builders[kind](staging)
    return target
