"""Images from SDXL pipelines: prompt × seed grids.

The trainer's validation and `waveft-train sample` share `generate_grid_images` and `make_grid`, so a grid
from a saved adapter looks exactly like the validation grid of the step that wrote it. Saved adapters (reading,
checking, loading, exporting) are in load.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from waveft_train.adapter.load import adapters_disabled

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

logger = logging.getLogger(__name__)


class NonFiniteImage(ValueError):
    """The pipeline produced NaN or inf pixels for one (prompt, seed)."""

    def __init__(self, prompt: str, seed: int):
        super().__init__(f"the image for {prompt!r} with seed {seed} is not finite (NaN or inf)")
        self.prompt, self.seed = prompt, seed


# --------------------------------------------------------------------------------------------------- grids


def label_height(tile_width: int) -> int:
    """Height in pixels of one text band of `make_grid` (scales with the tile so labels stay readable)."""
    return max(16, tile_width // 32)


def make_grid(
    rows: Sequence[Sequence[Image.Image]],
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    group_size: int | None = None,
    group_gap: int = 0,
) -> Image.Image:
    """Paste equally sized images into one RGB grid: one row per prompt, one column per seed.

    Pixel geometry, with tiles of W×H, C columns and R rows:
    - no labels and `group_gap=0` (the default): no padding at all; the grid is exactly (C·W, R·H) and tile
      (r, c) sits at (c·W, r·H);
    - `group_gap=g` inserts g white pixels after every `group_size` columns (default: all columns form one
      group, so no gap): tile x = c·W + (c // group_size)·g;
    - `col_labels` add one white band of `label_height(W)` pixels above the grid (label c above column c);
      `row_labels` add one such band above every row (the label spans the row). With both, tile y =
      L + r·(H + L) + L, where L = label_height(W) and each term is 0 when its labels are absent.
    Labels that do not fit their width are shortened with "…".
    """
    if not rows or not rows[0]:
        raise ValueError("make_grid needs at least one row with at least one image.")
    columns = len(rows[0])
    if any(len(row) != columns for row in rows):
        raise ValueError(f"Every grid row needs {columns} images, got {[len(row) for row in rows]}.")
    tile_width, tile_height = rows[0][0].size
    if any(image.size != (tile_width, tile_height) for row in rows for image in row):
        raise ValueError(f"Every grid image must be {tile_width}x{tile_height}.")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows.")
    if col_labels is not None and len(col_labels) != columns:
        raise ValueError(f"{len(col_labels)} column labels for {columns} columns.")
    group_size = columns if group_size is None else group_size
    if group_size < 1 or group_gap < 0:
        raise ValueError(f"group_size must be >= 1 and group_gap >= 0, got {group_size} and {group_gap}.")

    band = label_height(tile_width)
    top = band if col_labels is not None else 0
    row_band = band if row_labels is not None else 0
    groups = math.ceil(columns / group_size)
    size = (columns * tile_width + (groups - 1) * group_gap, top + len(rows) * (tile_height + row_band))
    grid = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(grid)
    font = _label_font(band)

    def x_of(column: int) -> int:
        return column * tile_width + (column // group_size) * group_gap

    if col_labels is not None:
        for column, text in enumerate(col_labels):
            _draw_label(draw, font, text, (x_of(column), 0), tile_width, band)
    for row_index, row in enumerate(rows):
        y = top + row_index * (tile_height + row_band)
        if row_labels is not None:
            _draw_label(draw, font, row_labels[row_index], (0, y), grid.width, band)
        for column, image in enumerate(row):
            grid.paste(image.convert("RGB"), (x_of(column), y + row_band))
    return grid


def _label_font(band: int):
    return ImageFont.load_default(size=max(8, band * 3 // 4))  # Pillow >= 10.1: a scalable font with Unicode


def _draw_label(draw, font, text: str, origin: tuple[int, int], width: int, band: int) -> None:
    """Black text, vertically centred in a band of `band` pixels, shortened with … to fit `width`."""
    margin = 2
    shown = str(text)
    while shown and draw.textlength(shown if shown == text else shown + "…", font=font) > width - 2 * margin:
        shown = shown[:-1]
    if shown != text:
        shown = shown + "…" if shown else ""
    x, y = origin
    draw.text((x + margin, y + band // 2), shown, fill="black", font=font, anchor="lm")


def generate_grid_images(
    pipeline: StableDiffusionXLPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance: float,
    height: int,
    width: int,
    progress: bool = True,
) -> list[list[Image.Image]]:
    """One image per prompt × seed, as rows of prompts and columns of seeds.

    Each image is generated on its own, from a CPU generator seeded with its seed: the image for (prompt,
    seed) does not depend on the other prompts or seeds, and on CPU it is bit-identical across runs. (Batching
    would be faster on GPUs but would tie each image to its batch.) An image that comes out non-finite (NaN or
    inf before it is turned into pixels, which would show as black) raises `NonFiniteImage`; a constant one (a
    single colour) is named in a warning.
    """
    rows: list[list[Image.Image]] = []
    with tqdm(total=len(prompts) * len(seeds), desc="images", unit="image", disable=not progress) as bar:
        for prompt in prompts:
            row = []
            for seed in seeds:
                result = pipeline(
                    prompt=prompt,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    height=height,
                    width=width,
                    generator=torch.Generator("cpu").manual_seed(int(seed)),
                    output_type="np",
                )
                pixels = np.asarray(result.images[0])
                if not np.isfinite(pixels).all():
                    raise NonFiniteImage(prompt, int(seed))
                if pixels.size and np.ptp(pixels) == 0:
                    logger.warning("The image for %r with seed %d is a single flat colour: the model's output "
                                   "collapsed (too large an adapter scale or guidance, or too few steps?).", prompt, seed)
                row.append(pipeline.numpy_to_pil(pixels[None])[0])
                bar.update(1)
            rows.append(row)
    return rows


def base_and_adapter_grid(pipeline: StableDiffusionXLPipeline, unet: torch.nn.Module, prompts: Sequence[str],
                          seeds: Sequence[int], *, base_rows: list | None = None, **options) -> tuple[Image.Image, list]:
    """A validation grid: per prompt, the base model's images, then the adapter's, for the same seeds.

    The base model's rows do not change during a run: pass the returned `base_rows` back to reuse them.
    """
    adapted = generate_grid_images(pipeline, prompts, seeds, **options)
    if base_rows is None:
        with adapters_disabled(unet, pipeline.text_encoder, pipeline.text_encoder_2):
            base_rows = generate_grid_images(pipeline, prompts, seeds, **options)
    return make_grid([base + ours for base, ours in zip(base_rows, adapted)]), base_rows


def default_image_size(pipeline: StableDiffusionXLPipeline) -> int:
    """The size the model was trained at: UNet sample_size × VAE scale factor (1024 for SDXL, 64 for `tiny`)."""
    return int(pipeline.default_sample_size * pipeline.vae_scale_factor)
