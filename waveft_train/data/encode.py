"""SDXL conditioning: text embeddings from both encoders, micro-conditioning time ids, and VAE latents.

Text encoders and the VAE are frozen, so prompt embeddings are computed once per distinct prompt and (by
default) each training example's latents once; then both can leave device memory for the training loop. When the text
encoders train (waveft.text_encoders), nothing of them is cached: each item's prompts are encoded as it comes.
Latents are the mean of the VAE posterior (no sampling): deterministic, so cached and uncached runs agree.

`Conditioning` is the one owner of these decisions: whether latents are cached, where the text encoders and the
VAE live (on the device only while they work), and what the loop's examples are. The loop gets UNet inputs.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from waveft_train.data.caption_variation import CaptionVariation


def warn_about_long_prompts(prompts_by_source: Sequence[tuple[str, str]], tokenizer) -> None:
    """Name every prompt longer than CLIP's window, and what of it is cut.

    Both SDXL text encoders read 77 tokens (75 of text); the rest is dropped, in training as by every stock SDXL
    pipeline at inference. Training on exactly what inference will see is the point, so long prompts are cut, not
    encoded in chunks; the warning says which words the model never sees.
    """
    limit = tokenizer.model_max_length - 2  # the start and end tokens
    sources: dict[str, list[str]] = {}
    for source, prompt in prompts_by_source:
        sources.setdefault(prompt, []).append(source)
    for prompt, names in sources.items():
        ids = tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False).input_ids
        if len(ids) > limit:
            where = ", ".join(elide(name, 40) for name in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3
                                                                          else "")
            logging.getLogger(__name__).warning(
                "The prompt of %s is %d tokens long; CLIP reads %d, so SDXL never sees its end (%r). Shorten it, or put "
                "what matters first.", where, len(ids), limit, elide(tokenizer.decode(ids[limit:]), 60))


def elide(text: str, limit: int) -> str:
    """`text` cut to about `limit` characters, its middle replaced by how much was left out."""
    if len(text) <= limit:
        return text
    keep = max(limit // 2 - 8, 4)
    return f"{text[:keep]}…[{len(text) - 2 * keep} chars]…{text[-keep:]}"


@torch.no_grad()
def encode_prompts(prompts: Sequence[str], tokenizers: Sequence, text_encoders: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, 77, D1+D2), pooled (B, P)) exactly as diffusers' SDXL pipeline computes them."""
    return encode_prompts_differentiably(prompts, tokenizers, text_encoders)


def encode_prompts_differentiably(prompts: Sequence[str], tokenizers: Sequence, text_encoders: Sequence
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_prompts` with gradients where they are enabled (text encoders in training)."""
    hidden_states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        tokens = tokenizer(
            list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        # non_blocking: safe from pageable memory, and a training step that encodes does not wait for the device
        output = encoder(tokens.input_ids.to(encoder.device, non_blocking=True), output_hidden_states=True)
        pooled = output[0]  # the last encoder's (projected) pooled embedding is the one SDXL uses
        hidden_states.append(output.hidden_states[-2])
    return torch.cat(hidden_states, dim=-1), pooled


def compute_time_ids(original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, target_sizes: torch.Tensor) -> torch.Tensor:
    """SDXL micro-conditioning (B, 6): original (h, w) + crop (top, left) + target (h, w), per example."""
    return torch.cat([original_sizes.long(), crop_top_lefts.long(), target_sizes.long()], dim=1)


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
    """Embeddings of every prompt the run uses, computed once; lookups stack them per batch.

    The prompts given up front (every caption and the class prompt) are encoded together. Any other prompt (a caption
    with its tags shuffled) is encoded on its own when first asked for, by the text encoders wherever they are, and the
    newest `VARIANTS_KEPT` of those are kept: encoded alone, a prompt gets the same embedding whenever and wherever it
    is first asked for (a resumed run, another process). None is no prompt: zeros, SDXL's unconditional input.
    """

    VARIANTS_KEPT = 256  # ~160 MB of SDXL embeddings; shuffled tags of a short caption repeat, of a long one rarely

    def __init__(self, prompts: Sequence[str], tokenizers: Sequence, text_encoders: Sequence, batch_size: int = 8):
        unique = sorted(set(prompts))
        self._index = {prompt: i for i, prompt in enumerate(unique)}
        embeds, pooled = [], []
        for start in range(0, len(unique), batch_size):
            e, p = encode_prompts(unique[start : start + batch_size], tokenizers, text_encoders)
            embeds.append(e.float().cpu())
            pooled.append(p.float().cpu())
        self.embeds, self.pooled = torch.cat(embeds), torch.cat(pooled)
        self._tokenizers, self._text_encoders = tokenizers, text_encoders
        self._variants: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _one(self, prompt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        if prompt is None:
            return torch.zeros_like(self.embeds[0]), torch.zeros_like(self.pooled[0])
        if prompt in self._index:
            return self.embeds[self._index[prompt]], self.pooled[self._index[prompt]]
        if prompt not in self._variants:
            embeds, pooled = encode_prompts([prompt], self._tokenizers, self._text_encoders)
            self._variants[prompt] = (embeds[0].float().cpu(), pooled[0].float().cpu())
            if len(self._variants) > self.VARIANTS_KEPT:
                self._variants.popitem(last=False)
        self._variants.move_to_end(prompt)
        return self._variants[prompt]

    def __call__(self, prompts: Sequence[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        if all(prompt in self._index for prompt in prompts):  # every prompt encoded up front: one gather
            rows = torch.tensor([self._index[prompt] for prompt in prompts])
            return self.embeds[rows], self.pooled[rows]
        embeds, pooled = zip(*(self._one(prompt) for prompt in prompts))
        return torch.stack(embeds), torch.stack(pooled)


class LatentCache(torch.utils.data.Dataset):
    """A DreamBooth dataset whose images were VAE-encoded once (epoch 0's crops and flips are kept).

    Items look like the source dataset's, with latents as their `image`; index i maps to position i % len, so the
    same samplers work on both. One image at a time: a 1024 px SDXL VAE encode in float32 needs several GB of
    activations.
    """

    def __init__(self, dataset, vae, *, progress: bool = True):
        self.items: list[dict[str, dict[str, Any]]] = []
        for position in tqdm(range(len(dataset)), desc="caching latents", disable=not progress, leave=False):
            item = dataset[position]
            self.items.append({role: {**example, "image": encode_latents(vae, example["image"][None]).cpu()[0]}
                               for role, example in item.items()})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, dict[str, Any]]:
        return self.items[index % len(self.items)]


@dataclass
class UNetInputs:
    """A collated batch for the UNet: its `num_instance` instance examples first, then as many class examples (if
    any)."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor | None  # None: encoded per item by `encode` (text encoders in training)
    pooled: torch.Tensor | None
    time_ids: torch.Tensor
    num_instance: int
    prompts: Sequence[str | None] = ()
    encode: Callable[[Sequence[str | None]], tuple[torch.Tensor, torch.Tensor]] | None = None

    def item(self, index: int) -> UNetInputs:
        """Instance example `index` and, with prior preservation, its class example: one DreamBooth item (its prompts
        encoded now when the text encoders train: each item's backward pass goes through its own encoding)."""
        rows = [index] + ([self.num_instance + index] if self.latents.shape[0] > self.num_instance else [])
        if self.encode is not None:
            embeds, pooled = self.encode([self.prompts[row] for row in rows])
            return UNetInputs(self.latents[rows], embeds, pooled, self.time_ids[rows], 1)
        return UNetInputs(self.latents[rows], self.prompt_embeds[rows], self.pooled[rows], self.time_ids[rows], 1)


class Conditioning:
    """Everything the loop needs from the frozen SDXL parts, built once: UNet inputs for each collated batch.

    Prompts are encoded up front (text encoders visit the device, then stay on the CPU). With `cache_latents`,
    every example is VAE-encoded once and `examples` is that cache, so the VAE leaves the device too; otherwise
    `examples` is the dataset itself and the VAE encodes each batch on the device. `lent_to_pipeline()` brings
    every module to the device for sampling (validation) and puts each back where training keeps it.

    `captions` (caption_variation.py) varies each subject example's caption by its position in the run, which the
    loop passes with every batch: dropped captions are zeros, shuffled tags are encoded as they come, so with
    `shuffle_tags` the text encoders stay on the device.
    """

    def __init__(self, components, dataset, *, device: torch.device, cache_latents: bool, progress: bool = True,
                 captions: CaptionVariation | None = None, encode_live: bool = False):
        """`encode_live` (waveft.text_encoders): no prompt cache; every item's prompts are encoded as it comes, through
        the encoders as they are then, with gradients while `text_gradients` is true (the loop sets it per step)."""
        self.components, self.device = components, device
        self.cache_latents = cache_latents
        self.captions = captions if captions is not None and captions.varies else None
        self.encode_live, self.text_gradients = encode_live, encode_live
        self.encodes_while_training = encode_live or (self.captions is not None and self.captions.shuffle_tags)
        prompts = list(dataset.instance_images.prompts)
        if dataset.class_images is not None:
            prompts += list(dataset.class_images.prompts)
        encoders = [components.text_encoder.to(device), components.text_encoder_2.to(device)]
        self.prompts = None if encode_live else PromptCache(prompts, [components.tokenizer, components.tokenizer_2],
                                                             encoders)
        vae = components.vae.to(device)
        self.examples = LatentCache(dataset, vae, progress=progress) if cache_latents else dataset
        self._park()

    def _park(self) -> None:
        """Where the frozen modules live during training: only a VAE that still encodes, and text encoders that still
        encode (shuffled tags), stay on the device."""
        self.components.text_encoder.to(self.device if self.encodes_while_training else "cpu")
        self.components.text_encoder_2.to(self.device if self.encodes_while_training else "cpu")
        self.components.vae.to("cpu" if self.cache_latents else self.device)

    @contextmanager
    def lent_to_pipeline(self) -> Iterator[None]:
        """Text encoders and VAE on the device for the duration (a sampling pipeline needs them), then parked."""
        for module in (self.components.text_encoder, self.components.text_encoder_2, self.components.vae):
            module.to(self.device)
        try:
            yield
        finally:
            self._park()

    def __call__(self, batch: dict[str, Any], first_position: int = 0) -> UNetInputs:
        """UNet inputs of a collated batch whose first instance example is example `first_position` of the run."""
        images = batch["images"]
        latents = images if self.cache_latents else encode_latents(self.components.vae, images)
        prompts = batch["prompts"]
        if self.captions is not None:
            count = batch["num_instance"]
            prompts = [self.captions.caption_for(prompt, first_position + index)
                       for index, prompt in enumerate(prompts[:count])] + list(prompts[count:])
        time_ids = compute_time_ids(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"])
        if self.encode_live:
            return UNetInputs(latents.to(self.device, non_blocking=True), None, None,
                              time_ids.to(self.device, non_blocking=True), batch["num_instance"], list(prompts),
                              self._encode_live)
        embeds, pooled = self.prompts(prompts)
        return UNetInputs(
            # non_blocking: from pageable host memory it is safe, and the step does not wait for the device
            latents=latents.to(self.device, non_blocking=True),
            prompt_embeds=embeds.to(self.device, non_blocking=True),
            pooled=pooled.to(self.device, non_blocking=True),
            time_ids=time_ids.to(self.device, non_blocking=True),
            num_instance=batch["num_instance"],
        )

    def _encode_live(self, prompts: Sequence[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of `prompts` through the text encoders as they are now (None: zeros, the unconditional input)."""
        components = self.components
        given = [prompt for prompt in prompts if prompt is not None]
        with torch.set_grad_enabled(self.text_gradients):
            embeds, pooled = encode_prompts_differentiably(given or [""], [components.tokenizer, components.tokenizer_2],
                                                           [components.text_encoder, components.text_encoder_2])
        if len(given) == len(prompts):
            return embeds, pooled
        found = iter(range(len(given)))
        rows = [next(found) if prompt is not None else None for prompt in prompts]
        return (torch.stack([embeds[row] if row is not None else torch.zeros_like(embeds[0]) for row in rows]),
                torch.stack([pooled[row] if row is not None else torch.zeros_like(pooled[0]) for row in rows]))
