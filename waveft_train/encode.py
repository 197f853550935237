"""SDXL conditioning: text embeddings from both encoders, micro-conditioning time ids, and VAE latents.

Text encoders and the VAE are frozen, so prompt embeddings are computed once per distinct prompt and (by
default) each training example's latents once; then both can leave device memory for the training loop.
Latents are the mean of the VAE posterior (no sampling): deterministic, so cached and uncached runs agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def encode_prompts(prompts: Sequence[str], tokenizers: Sequence, text_encoders: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, 77, D1+D2), pooled (B, P)) exactly as diffusers' SDXL pipeline computes them."""
    hidden_states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        tokens = tokenizer(
            list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        output = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=True)
        pooled = output[0]  # the last encoder's (projected) pooled embedding is the one SDXL uses
        hidden_states.append(output.hidden_states[-2])
    return torch.cat(hidden_states, dim=-1), pooled


def compute_time_ids(original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL micro-conditioning (B, 6): original (h, w) + crop (top, left) + target (h, w), per example."""
    target = torch.tensor(target_size, dtype=torch.long).expand(original_sizes.shape[0], 2)
    return torch.cat([original_sizes.long(), crop_top_lefts.long(), target], dim=1)


@torch.no_grad()
def encode_latents(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """Scaled latents (posterior mean) of images in [-1, 1], in float32."""
    posterior = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    latents = posterior.mean.float()
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae.config.scaling_factor


class PromptCache:
    """Embeddings of every prompt the run uses, computed once; lookups stack them per batch."""

    def __init__(self, prompts: Sequence[str], tokenizers: Sequence, text_encoders: Sequence, batch_size: int = 8):
        unique = sorted(set(prompts))
        self._index = {prompt: i for i, prompt in enumerate(unique)}
        embeds, pooled = [], []
        for start in range(0, len(unique), batch_size):
            e, p = encode_prompts(unique[start : start + batch_size], tokenizers, text_encoders)
            embeds.append(e.float().cpu())
            pooled.append(p.float().cpu())
        self.embeds, self.pooled = torch.cat(embeds), torch.cat(pooled)

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            rows = torch.tensor([self._index[prompt] for prompt in prompts])
        except KeyError as missing:
            raise KeyError(f"prompt {missing} was not encoded up front") from None
        return self.embeds[rows], self.pooled[rows]


class CachedLatentsDataset(torch.utils.data.Dataset):
    """A DreamBooth dataset whose images were VAE-encoded once (epoch 0's crops and flips are kept).

    Items look like the source dataset's, with `latents` in place of `pixel_values`; index i maps to position
    i % len, so the same samplers work on both. One image at a time by default: a 1024 px SDXL VAE encode in
    float32 needs several GB of activations.
    """

    def __init__(self, dataset, vae, *, batch_size: int = 1, progress: bool = True):
        self.items: list[dict[str, dict[str, Any]]] = []
        pending: list[tuple[dict, torch.Tensor]] = []

        def flush():
            latents = encode_latents(vae, torch.stack([pixels for _, pixels in pending])).cpu()
            for (example, _), latent in zip(pending, latents):
                example["latents"] = latent
            pending.clear()

        for position in tqdm(range(len(dataset)), desc="caching latents", disable=not progress, leave=False):
            item = dataset[position]
            cached = {}
            for role, example in item.items():
                entry = {key: value for key, value in example.items() if key != "pixel_values"}
                pending.append((entry, example["pixel_values"]))
                cached[role] = entry
            self.items.append(cached)
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, dict[str, Any]]:
        return self.items[index % len(self.items)]


@dataclass
class UNetInputs:
    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor
    num_instance: int


class Conditioner:
    """Turns a collated batch (pixels or cached latents) into what the SDXL UNet takes."""

    def __init__(self, prompts: PromptCache, resolution: int, vae=None):
        self.prompts, self.resolution, self.vae = prompts, resolution, vae

    def __call__(self, batch: dict[str, Any], device: torch.device) -> UNetInputs:
        if "latents" in batch:
            latents = batch["latents"]
        else:
            if self.vae is None:
                raise ValueError("batch holds pixels but the conditioner has no VAE")
            latents = encode_latents(self.vae, batch["pixel_values"])
        embeds, pooled = self.prompts(batch["prompts"])
        time_ids = compute_time_ids(batch["original_sizes"], batch["crop_top_lefts"], (self.resolution, self.resolution))
        return UNetInputs(
            latents=latents.to(device),
            prompt_embeds=embeds.to(device),
            pooled=pooled.to(device),
            time_ids=time_ids.to(device),
            num_instance=batch["num_instance"],
        )
