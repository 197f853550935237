"""What a run reports as it goes, on the main process: metrics.jsonl, the trackers (TensorBoard), the CPU hint.

One home for everything a user watches a run by, so the run itself only says "step N gave these metrics" and
"step N's grid is here".
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm.auto import tqdm

from waveft_train.common.files import writing
from waveft_train.config import TrainSection
from waveft_train.train.metrics import MetricsLog, StepTimeWatch


class RunReport:
    """Made by the main process once the run has resumed (metrics.jsonl then drops lines past `start_step`)."""

    def __init__(self, output_dir: Path, start_step: int, train: TrainSection, accelerator):
        self.train, self.accelerator = train, accelerator
        with writing(output_dir / "metrics.jsonl", "the metrics log"):
            self.metrics_log = MetricsLog(output_dir / "metrics.jsonl", start_step)
        self.step_times = StepTimeWatch(accelerator.device)
        if train.report_to == "tensorboard":
            accelerator.init_trackers("waveft-train")

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
        if self.train.report_to == "tensorboard":
            self.accelerator.log({name: value for name, value in metrics.items() if value is not None}, step=step)
