"""Validation grids during training: samples/step-NNNNNN.png, per prompt the base model's images then the adapter's.

The base model's images are the same at every step (same prompts, seeds and sampler), so they are made once and
reused. Only the main process draws; `DreamBoothRun.validate` holds the barriers around it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from waveft_train.adapter.sampling import NonFiniteImage, base_and_adapter_grid
from waveft_train.common.files import save_png_atomically, writing
from waveft_train.config import ValidationSection
from waveft_train.models.loading import build_pipeline

logger = logging.getLogger(__name__)


class ValidationGrids:
    def __init__(self, settings: ValidationSection, resolution: int, samples_dir: Path, *, progress: bool):
        self.settings, self.resolution, self.samples_dir, self.progress = settings, resolution, samples_dir, progress
        self.base_rows: list | None = None  # the base model's images: the same at every step
        self.last: Path | None = None  # the newest grid written

    def draw(self, step: int, components, unet: torch.nn.Module, conditioning, prediction_type: str) -> Path | None:
        """The grid of step `step` (None, with a warning, when the adapter's images are not finite)."""
        settings = self.settings
        seeds = [settings.seed + i for i in range(settings.num_images)]
        unet.eval()
        try:
            with conditioning.lent_to_pipeline(), torch.no_grad():
                pipeline = build_pipeline(components, unet=unet, prediction_type=prediction_type)
                grid, self.base_rows = base_and_adapter_grid(
                    pipeline, unet, settings.prompts, seeds, base_rows=self.base_rows, steps=settings.steps,
                    guidance=settings.guidance, height=self.resolution, width=self.resolution, progress=self.progress)
        except NonFiniteImage as error:
            logger.warning("No validation grid at step %d: %s (the adapter or the sampling settings drive the "
                           "model out of range).", step, error)
            return None
        finally:
            unet.train()
        path = self.samples_dir / f"step-{step:06d}.png"
        with writing(path, "the validation grid"):
            save_png_atomically(grid, path)
        self.last = path
        return path
