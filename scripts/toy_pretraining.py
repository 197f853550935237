"""Training the toy pipeline and its judge from scratch (driven by `python -m scripts.pretrain_toy`).

Why here and not in the script: the stages are plain functions of (data, steps, seed), so they can be read, reused
and smoke-tested on their own; the script only orders them, caches their results and writes the folder + manifest.

Stages, each deterministic from its seed on one machine (float reductions may differ across CPUs):
1. `render_dataset`: solid pretraining scenes (held-out combinations excluded) plus scenes of the whole world
   (patterns too) for the VAE, the judge and the denoiser's pattern phase.
2. `train_vae`: the AutoencoderKL as a generic image codec, on everything it will ever have to draw (as SDXL's VAE
   saw far more than its UNet's captions describe), mostly on crops around objects; `encode` then fixes the latent
   scaling factor.
3. `train_denoiser`: both CLIP text encoders and the UNet jointly, epsilon prediction on SDXL's noise schedule
   (Min-SNR-5 weighted), 10 % unconditioned examples with zero embeddings (what the SDXL pipeline feeds
   classifier-free guidance when `force_zeros_for_empty_prompt` is set), an exponential moving average of the
   weights, which is what gets saved. The script runs it in phases: solid scenes first, then with the world's
   patterned scenes added (all but the subjects' looks, `Scene.in_pretraining`).
4. `train_judge`: the classifier, on rendered images and their VAE round trips, with noise and blur (generated
   images are never crisp), half of each batch patterned.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from waveft_train.toy.judge import to_pixels
from waveft_train.toy.world import IMAGE_SIZE, Scene, caption, object_coverage, render, sample_scene

TIME_IDS = (IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE)  # original size, crop corner, target size


# ----------------------------------------------------------------------------------------------- data
def dataset_scene(seed: int, index: int, pretraining: bool) -> Scene:
    return sample_scene(np.random.default_rng([seed, index]), pretraining=pretraining)


def _render_chunk(arguments: tuple[int, int, int, int]) -> np.ndarray:
    seed, start, stop, pretraining_count = arguments
    return np.stack([render(dataset_scene(seed, i, i < pretraining_count)) for i in range(start, stop)])


def render_dataset(count: int, pretraining_count: int, seed: int, *, workers: int = 1,
                   progress: bool = True) -> tuple[np.ndarray, list[Scene]]:
    """(uint8 (count, 64, 64, 3), scenes): the first `pretraining_count` scenes are pretraining scenes."""
    scenes = [dataset_scene(seed, i, i < pretraining_count) for i in range(count)]
    chunks = [(seed, start, min(start + 256, count), pretraining_count) for start in range(0, count, 256)]
    bar = tqdm(total=count, desc="rendering", unit="image", disable=not progress)
    parts = []
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for part in pool.imap(_render_chunk, chunks):
                parts.append(part)
                bar.update(len(part))
    else:
        for chunk in chunks:
            parts.append(_render_chunk(chunk))
            bar.update(len(parts[-1]))
    bar.close()
    return np.concatenate(parts), scenes


def _cosine(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------------------------- VAE
def object_crops(pixels: torch.Tensor, scenes: Sequence[Scene], generator: torch.Generator,
                 centred: float = 0.75) -> torch.Tensor:
    """32 px crops: most around the object (± 6 px), the rest anywhere. Objects cover a tenth of an image, so
    random crops would teach mostly sky and floor."""
    crop, crops = IMAGE_SIZE // 2, []
    for row, scene in enumerate(scenes):
        if torch.rand(1, generator=generator).item() < centred:
            jitter = torch.randint(-6, 7, (2,), generator=generator).tolist()
            top = int(scene.centre_y * IMAGE_SIZE) - crop // 2 + jitter[0]
            left = int(scene.x * IMAGE_SIZE) - crop // 2 + jitter[1]
        else:
            top, left = torch.randint(0, IMAGE_SIZE - crop + 1, (2,), generator=generator).tolist()
        top, left = min(max(top, 0), IMAGE_SIZE - crop), min(max(left, 0), IMAGE_SIZE - crop)
        crops.append(pixels[row, :, top:top + crop, left:left + crop])
    return torch.stack(crops)


def train_vae(vae, images: np.ndarray, scenes: Sequence[Scene], *, steps: int, batch_size: int, seed: int,
              lr: float = 3e-3, latent_noise: float = 0.05, progress: bool = True) -> list[float]:
    """L1 + MSE reconstruction of 32 px crops (4× cheaper than whole images, the same convolutions; see
    `object_crops`). The decoder sees the posterior mean plus a little noise (`latent_noise` × the latents' std):
    a nearly deterministic autoencoder learns far faster than a KL-weighted one in this budget, and the noise keeps
    the decoder tolerant of the imperfect latents a denoiser produces. The log-variance head is left untrained:
    training and sampling only use the posterior mean."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    losses = []
    for step in (bar := tqdm(range(steps), desc="vae", disable=not progress)):
        _set_lr(optimizer, _cosine(step, steps, lr, warmup=50, floor=0.02))
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        pixels = object_crops(to_pixels(images[index.numpy()]), [scenes[i] for i in index.tolist()], generator)
        latents = vae.encode(pixels).latent_dist.mean
        noise = torch.randn(latents.shape, generator=generator) * latent_noise * latents.detach().std()
        decoded = vae.decode(latents + noise).sample
        loss = (decoded - pixels).abs().mean() + (decoded - pixels).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    vae.eval()
    return losses


@torch.no_grad()
def encode(vae, images: np.ndarray, batch_size: int = 128, progress: bool = True) -> torch.Tensor:
    """Unscaled posterior means (as waveft_train.data.encode takes them), (N, 4, 16, 16) float32."""
    latents = [vae.encode(to_pixels(images[start:start + batch_size])).latent_dist.mean
               for start in tqdm(range(0, len(images), batch_size), desc="encoding", disable=not progress)]
    return torch.cat(latents)


# ----------------------------------------------------------------------------------------------- denoiser
def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Captions with words left out, so "a photo of a ball" (the class prompt) and "a photo of ball on the beach"
    (an instance prompt's grammar) are in the language the model learns; an empty caption means unconditioned."""
    if rng.random() < 0.1:
        return ""
    return caption(scene, colour=rng.random() > 0.25, context=rng.random() > 0.25, article=rng.random() > 0.15)


def text_conditioning(tokenizer, text_encoder, text_encoder_2, captions: Sequence[str]):
    """(prompt_embeds (B, 77, 128), pooled (B, 64)) as the SDXL pipeline computes them, with gradients; empty
    captions become zeros (the pipeline's unconditioned input under force_zeros_for_empty_prompt)."""
    ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    first = text_encoder(ids, output_hidden_states=True)
    second = text_encoder_2(ids, output_hidden_states=True)
    embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    pooled = second.text_embeds
    keep = torch.tensor([bool(text) for text in captions], dtype=embeds.dtype)
    return embeds * keep[:, None, None], pooled * keep[:, None]


class EMA:
    """Exponential moving average of a module's parameters (warm-up: decay (1+t)/(10+t) up to `decay`)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, live in zip(self.shadow.parameters(), module.parameters()):
            shadow.lerp_(live.detach(), 1 - decay)


def train_denoiser(*, unet, text_encoder, text_encoder_2, tokenizer, noise_scheduler, latents: torch.Tensor,
                   scenes: Sequence[Scene], steps: int, batch_size: int, seed: int, lr: float = 1e-3,
                   ema_decay: float = 0.999, snr_gamma: float = 5.0, progress: bool = True,
                   on_step: Callable[[int, dict], None] | None = None, resume: Path | None = None,
                   save_every: int = 100) -> tuple[dict, list[float]]:
    """Train the three modules jointly on (latents, scenes); returns ({name: EMA copy}, losses).

    With `resume` (a file path) the complete state is written there every `save_every` steps and picked up again
    on the next call, so an interrupted run continues exactly where its last save left off."""
    from diffusers.training_utils import compute_snr

    modules = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    parameters = [p for module in modules.values() for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-2)
    emas = {name: EMA(module, ema_decay) for name, module in modules.items()}
    generator = torch.Generator().manual_seed(seed)
    caption_rng = np.random.default_rng([seed, 1])
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).expand(batch_size, -1)
    for module in modules.values():
        module.train()
    losses, start = [], 0
    if resume is not None and resume.exists():
        start, losses = _load_denoiser_state(resume, modules, emas, optimizer, generator, caption_rng)
    for step in (bar := tqdm(range(start, steps), desc="unet + text encoders", disable=not progress,
                             initial=start, total=steps)):
        _set_lr(optimizer, _cosine(step, steps, lr, warmup=100))
        index = torch.randint(0, len(scenes), (batch_size,), generator=generator)
        clean = latents[index]
        captions = [random_caption(scenes[i], caption_rng) for i in index.tolist()]
        embeds, pooled = text_conditioning(tokenizer, text_encoder, text_encoder_2, captions)
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=embeds,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.minimum(snr, torch.full_like(snr, snr_gamma)) / snr
        loss = (F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name, module in modules.items():
            emas[name].update(module)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if on_step is not None:
            on_step(step + 1, {name: ema.shadow for name, ema in emas.items()})
        if resume is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
            _save_denoiser_state(resume, step + 1, losses, modules, emas, optimizer, generator, caption_rng)
    return {name: ema.shadow for name, ema in emas.items()}, losses


def _save_denoiser_state(path: Path, step, losses, modules, emas, optimizer, generator, caption_rng) -> None:
    """Everything the loop depends on, written to a temporary file and renamed (an interrupted save loses nothing)."""
    state = {"step": step, "losses": losses, "optimizer": optimizer.state_dict(),
             "generator": generator.get_state(), "caption_rng": json.dumps(caption_rng.bit_generator.state),
             "modules": {name: module.state_dict() for name, module in modules.items()},
             "emas": {name: (ema.shadow.state_dict(), ema.updates) for name, ema in emas.items()}}
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _load_denoiser_state(path: Path, modules, emas, optimizer, generator, caption_rng) -> tuple[int, list[float]]:
    state = torch.load(path, weights_only=True)  # tensors and plain containers only: no code runs
    for name, module in modules.items():
        module.load_state_dict(state["modules"][name])
        emas[name].shadow.load_state_dict(state["emas"][name][0])
        emas[name].updates = state["emas"][name][1]
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    caption_rng.bit_generator.state = json.loads(state["caption_rng"])
    return state["step"], list(state["losses"])


# ----------------------------------------------------------------------------------------------- judge
def degrade(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What generated images suffer, at a random strength per image: blur, grain, a colour cast, a contrast change
    and smooth blotches (the muddy, off-colour patches of the model's backgrounds). Strong enough that the judge
    reads samples by the object's form and the scene's layout, mild enough that red, orange and yellow stay apart.
    (A smooth random warp of up to 2 px, for the model's lumpy outlines, was tried and read held-out samples no
    better: shape 67 % vs 65 %.)"""
    batch, size = pixels.shape[0], pixels.shape[-1]

    def per_image() -> torch.Tensor:
        return torch.rand(batch, 1, 1, 1, generator=generator)

    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)

    def blur(images: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)

    blurred = blur(pixels)
    twice = blur(blurred)
    which = per_image()
    pixels = torch.where(which < 0.25, blurred, torch.where(which < 0.4, twice, pixels))
    mean = pixels.mean(dim=(1, 2, 3), keepdim=True)
    pixels = mean + (pixels - mean) * (0.8 + 0.4 * per_image())
    blotches = torch.randn(batch, 3, 4, 4, generator=generator)
    blotches = F.interpolate(blotches, size=(size, size), mode="bicubic", align_corners=False)
    pixels = pixels + blotches * 0.12 * per_image()
    pixels = pixels + torch.randn(pixels.shape, generator=generator) * 0.1 * per_image()
    pixels = pixels + (torch.rand(batch, 3, 1, 1, generator=generator) - 0.5) * 0.1
    return pixels.clamp(-1, 1)


def regenerate(pipeline, images: np.ndarray, scenes: Sequence[Scene], *, seed: int, batch_size: int = 32,
               steps: int = 25, progress: bool = True) -> np.ndarray:
    """The model redraws solid renders (SDEdit: noise each image most of the way, strength 0.5-0.9, then denoise it
    with its full caption), so the judge learns what the model's samples look like (blur, grain, muddy backgrounds,
    its colour casts) with labels: the render's, which the caption asked for. Callers pass pretraining scenes only, so
    the judge never sees the model's take on a held-out combination.

    Only solid scenes: a redrawn pattern can come out erased or recoloured (the model before its pattern phase did
    so from strength 0.08), and its label would then be wrong in the direction that flatters a subject's samples.
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline

    img2img = StableDiffusionXLImg2ImgPipeline(**pipeline.components)
    img2img.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(seed)
    out = np.empty_like(images)
    bar = tqdm(total=len(images), desc="regenerating for the judge", unit="image", disable=not progress)
    for start in range(0, len(images), batch_size):
        rows = range(start, min(start + batch_size, len(images)))
        if any(scenes[i].pattern != "solid" for i in rows):
            raise ValueError("regenerate() takes solid scenes only")
        strength = float(rng.uniform(0.5, 0.9))
        prompts = [caption(scenes[i]) for i in rows]
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        with torch.no_grad():
            result = img2img(prompt=prompts, image=(to_pixels(images[start:rows[-1] + 1]) + 1) / 2, strength=strength,
                             num_inference_steps=steps, guidance_scale=5.0, generator=generator, output_type="np")
        out[start:rows[-1] + 1] = (np.clip(result.images, 0, 1) * 255).round().astype(np.uint8)
        bar.update(len(rows))
    bar.close()
    return out


def recolour_backgrounds(images: np.ndarray, scenes: Sequence[Scene], *, seed: int) -> np.ndarray:
    """Renders with their background (everything but the object: `world.object_coverage`) recoloured: half by a
    random gain and offset per channel (the moon, stars and horizon stay), half by a random two-colour ramp. The
    model paints skies the world never has (a purple night, where the world's nights are navy); a judge that saw
    only the world's backgrounds read a crisp striped ball in front of a purple sky as a box every time. The object's
    pixels are untouched, so its shape, colours, pattern and layout labels hold; its context label does not."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(images)
    rows = (np.arange(images.shape[1], dtype=np.float32)[:, None, None] + 0.5) / images.shape[1]
    for index, (image, scene) in enumerate(zip(images, scenes)):
        pixels = image.astype(np.float32) / 255
        if rng.random() < 0.5:
            background = pixels * rng.uniform(0.4, 2.2, 3) + rng.uniform(-0.25, 0.35, 3)
        else:
            top, bottom = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
            background = np.broadcast_to(top + (bottom - top) * rows, pixels.shape)
        cover = object_coverage(scene, images.shape[1])[..., None]
        out[index] = np.round(np.clip(cover * pixels + (1 - cover) * background, 0, 1) * 255).astype(np.uint8)
    return out


def train_judge(judge, images: np.ndarray, scenes: Sequence[Scene], *, steps: int, batch_size: int, seed: int,
                lr: float = 2e-3, context_known: Sequence[bool] | None = None, progress: bool = True) -> list[float]:
    """Half of every batch is patterned scenes, half solid ones: patterns are rarer in the rendered set (most of it
    is pretraining scenes) but they are what subject fidelity hinges on. Images whose `context_known` is False
    (recoloured backgrounds) teach everything but the context."""
    from waveft_train.toy.judge import judge_loss, scene_targets

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    patterned = torch.tensor([i for i, scene in enumerate(scenes) if scene.pattern != "solid"])
    solid = torch.tensor([i for i, scene in enumerate(scenes) if scene.pattern == "solid"])
    judge.train()
    losses = []
    for step in (bar := tqdm(range(steps), desc="judge", disable=not progress)):
        _set_lr(optimizer, _cosine(step, steps, lr, warmup=50, floor=0.02))
        half = batch_size // 2
        index = torch.cat([patterned[torch.randint(0, len(patterned), (half,), generator=generator)],
                           solid[torch.randint(0, len(solid), (batch_size - half,), generator=generator)]])
        pixels = degrade(to_pixels(images[index.numpy()]), generator)
        rows = index.tolist()
        known = None if context_known is None else [context_known[i] for i in rows]
        loss = judge_loss(judge(pixels), scene_targets([scenes[i] for i in rows], known))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    judge.eval()
    return losses


def judge_accuracy(judge, images, scenes: Sequence[Scene]) -> dict[str, float]:
    """Per-head accuracy of the judge on images whose scenes are known (colour: the set of colours is exact)."""
    from waveft_train.toy.judge import judge_images

    verdicts = judge_images(judge, images)
    pairs = list(zip(verdicts, scenes))
    accuracy = {
        "shape": np.mean([v.shape == s.shape for v, s in pairs]),
        "colour": np.mean([set(v.colours) == set(s.colours) for v, s in pairs]),
        "pattern": np.mean([v.pattern == s.pattern for v, s in pairs]),
        "context": np.mean([v.context == s.context for v, s in pairs]),
        "layout_error": np.mean([abs(v.x - s.x) + abs(v.y - s.centre_y) + abs(v.size - s.size) for v, s in pairs]) / 3,
    }
    return {name: round(float(value), 4) for name, value in accuracy.items()}
