"""The embedded tiny SDXL model: real diffusers/transformers classes, random weights, built in code.

Why: tests, the demo config and `model.pretrained: tiny` need an SDXL pipeline without network access.
Building it from real classes and loading it back with `from_pretrained` means the code under test
takes exactly the path it takes for `stabilityai/stable-diffusion-xl-base-1.0`, only with kilobytes of
weights. Every component is seeded, so the bytes on disk are the same on every build.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch

from waveft_train.files import atomic_folder

# Bump when anything below changes the files written, so stale caches are never reused.
TINY_MODEL_VERSION = "tiny-sdxl-v1"
TINY_SEED = 0
TOKENIZER_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# Words that become single tokens; any other text still tokenizes (byte-level fallback).
PROMPT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "photo", "picture", "painting", "drawing", "portrait", "of", "in", "on", "at",
    "with", "and", "by", "sks", "dog", "cat", "person", "man", "woman", "toy", "backpack", "bowl",
    "car", "house", "tree", "beach", "snow", "city", "park", "forest", "street", "sunset", "red",
    "blue", "green", "yellow", "black", "white", "wearing", "hat", "sitting", "running", "style",
    "high", "quality", "detailed", "close", "up", "background", "front", "rvs",
)  # fmt: skip


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to one printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def learn_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Plain BPE training on `words` until each is one token; ties break lexicographically (deterministic).

    Real training (rather than hand-chaining each word's letters) keeps the merge ranks consistent, so
    the tokenizer reassembles every listed word into exactly one token.
    """
    segmented = {word: [*word[:-1], word[-1] + END_OF_WORD] for word in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while True:
        pair_counts = Counter(
            (symbols[i], symbols[i + 1]) for symbols in segmented.values() for i in range(len(symbols) - 1)
        )
        if not pair_counts:
            return merges
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        for word, symbols in segmented.items():
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            segmented[word] = merged


def write_tokenizer_files(folder: Path, words: tuple[str, ...] = PROMPT_WORDS) -> Path:
    """Write a CLIP-style `vocab.json` + `merges.txt`: byte alphabet, its `</w>` forms, merges that make each of
    `words` one token, specials."""
    alphabet = list(bytes_to_unicode().values())
    merges = learn_merges(words)
    tokens = alphabet + [symbol + END_OF_WORD for symbol in alphabet] + ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    return folder


def build_tiny_pipeline(path: Path) -> Path:
    """Write the tiny SDXL pipeline as a diffusers folder at `path`; same weight bytes on every call."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="waveft-tiny-tokenizer-") as scratch:
        tokenizer_files = write_tokenizer_files(Path(scratch))
        # local_files_only: never look for the scratch folder on the hub (and it is saved into tokenizer_config).
        options = {"model_max_length": TOKENIZER_MAX_LENGTH, "local_files_only": True}
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_files, **options)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_files, **options)

    def text_config(projection_dim: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,  # SDXL reads hidden_states[-2]
            num_attention_heads=4,
            max_position_embeddings=TOKENIZER_MAX_LENGTH,
            projection_dim=projection_dim,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    # fork_rng: seed locally without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        text_encoder = CLIPTextModel(text_config(projection_dim=32))
        torch.manual_seed(TINY_SEED + 1)
        text_encoder_2 = CLIPTextModelWithProjection(text_config(projection_dim=32))
        addition_time_embed_dim = 8
        torch.manual_seed(TINY_SEED + 2)
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
            projection_class_embeddings_input_dim=6 * addition_time_embed_dim + text_encoder_2.config.projection_dim,
        )
        torch.manual_seed(TINY_SEED + 3)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(16, 32),
            norm_num_groups=8,
            layers_per_block=1,
            latent_channels=4,
            sample_size=64,
            scaling_factor=0.13025,  # SDXL's value, so code that hard-codes SD1's 0.18215 shows up in tests
            force_upcast=True,
        )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def default_cache_root() -> Path:
    """`$WAVEFT_TRAIN_CACHE` if set, else `~/.cache/waveft-train`."""
    configured = os.environ.get("WAVEFT_TRAIN_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "waveft-train"


def is_complete_model_dir(folder: Path) -> bool:
    """A finished build has its index and every component folder (the rename makes this all-or-nothing)."""
    components = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    return (folder / "model_index.json").is_file() and all((folder / name).is_dir() for name in components)


def tiny_model_dir(cache_dir: Path | None = None) -> Path:
    """The cached tiny model folder, built once.

    Built in a private sibling and renamed into place (`files.atomic_folder`), so a reader never sees a
    half-written folder and concurrent builders cannot corrupt each other: whoever loses the rename uses the
    winner's.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / TINY_MODEL_VERSION
    if is_complete_model_dir(target):
        return target
    if target.exists():  # damaged by hand (a complete build is never partial); replace it
        shutil.rmtree(target, ignore_errors=True)
    with atomic_folder(target, replace=False) as staging:
        build_tiny_pipeline(staging)
    return target
