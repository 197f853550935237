"""What a run reports as it goes, on the main process: metrics.jsonl, the trackers, report.html, the CPU hint.

One home for everything a user watches a run by, so the run itself only says "step N gave these metrics",
"step N's grid is here" and "the run is done". The trackers (`train.report_to`: TensorBoard, Weights & Biases, or
both) are accelerate's: they get every logged step's metrics and each validation grid as an image at its step.
report.html (train/report_html.py) is rewritten after each validation and at the end.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from waveft_train.common.errors import UserError
from waveft_train.common.files import writing
from waveft_train.config import TrainSection
from waveft_train.train.metrics import MetricsLog, StepTimeWatch
from waveft_train.train.report_html import write_report

GRID_KEY = "validation"  # the trackers' name for the validation grids


class RunReport:
    """Made by the main process once the run has resumed (metrics.jsonl then drops lines past `start_step`).
    `settings`: the run's resolved config as plain data, which the trackers record with the run."""

    def __init__(self, output_dir: Path, start_step: int, train: TrainSection, accelerator, settings: dict):
        self.output_dir, self.train, self.accelerator = output_dir, train, accelerator
        with writing(output_dir / "metrics.jsonl", "the metrics log"):
            self.metrics_log = MetricsLog(output_dir / "metrics.jsonl", start_step)
        self.step_times = StepTimeWatch(accelerator.device)
        if train.report_to:
            start_trackers(accelerator, train, output_dir, settings)

    @property
    def last_logged(self) -> dict | None:
        return self.metrics_log.last

    def step(self, step: int, metrics: dict) -> None:
        """Step `step`'s metrics: every `train.log_every` steps, and always the last step (summary.json's
        final_loss)."""
        if hint := self.step_times.hint(metrics["seconds"]):
            tqdm.write(hint, file=sys.stderr)
        if step % self.train.log_every and step != self.train.max_steps:
            return
        with writing(self.metrics_log.path, "the metrics log"):
            self.metrics_log.write({"step": step, **metrics})
        if self.train.report_to:
            self.accelerator.log({name: value for name, value in metrics.items() if value is not None}, step=step)

    def validation(self, step: int, grid: Path | None) -> None:
        """After the validation of step `step` (`grid`: its file, None when none was drawn): the grid to every
        tracker, and report.html rewritten."""
        if grid is not None and self.train.report_to:
            log_grid(self.accelerator, step, grid)
        write_report(self.output_dir)

    def finish(self) -> Path:
        """The final report.html (with summary.json); returns its path."""
        return write_report(self.output_dir)


def tracker_settings(settings: dict) -> dict:
    """The config flattened to `section.key` values that every tracker takes (TensorBoard's hparams want numbers,
    strings and booleans: lists and mappings become their JSON text)."""
    return {f"{section}.{key}": json.dumps(value) if isinstance(value, (list, dict)) else value
            for section, values in settings.items() if isinstance(values, dict) for key, value in values.items()}


def start_trackers(accelerator, train: TrainSection, output_dir: Path, settings: dict) -> None:
    """accelerate's trackers for `train.report_to`, with the run's settings. TensorBoard writes to
    output.dir/<tracker_project>; W&B to output.dir/wandb (or WANDB_DIR), as run `tracker_run_name` (default: the
    output folder's name) of project `tracker_project`."""
    wandb_options = {"name": train.tracker_run_name or output_dir.name,
                     "dir": os.environ.get("WANDB_DIR") or str(output_dir)}
    try:
        accelerator.init_trackers(train.tracker_project, config=tracker_settings(settings),
                                  init_kwargs={"wandb": wandb_options})
    except Exception as error:
        if not type(error).__module__.startswith("wandb"):
            raise
        raise UserError(f"train.report_to: wandb could not start a W&B run: {str(error).strip()}. Log in with "
                        "`wandb login` (or set WANDB_API_KEY), set WANDB_MODE=offline to keep the run on this "
                        "machine (`wandb sync` uploads it later), or leave wandb out of train.report_to.") from error


def log_grid(accelerator, step: int, grid: Path) -> None:
    """The validation grid as an image at step `step`: TensorBoard's add_image, W&B's wandb.Image (through
    accelerate's log_images)."""
    with Image.open(grid) as opened:
        image = opened.convert("RGB")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(GRID_KEY, np.asarray(image), global_step=step, dataformats="HWC")
            tracker.writer.flush()
        else:
            tracker.log_images({GRID_KEY: [image]}, step=step)
