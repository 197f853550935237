"""The run's measurements: metrics.jsonl (one line per logged step) and the peak memory summary.json reports."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch

from waveft_train.common.files import atomic_write_text


class MetricsLog:
    """metrics.jsonl, one line per logged step; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        kept = []
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
        self.last = json.loads(kept[-1]) if kept else None

    def write(self, record: dict) -> None:
        # strict JSON: a non-finite value (an fp16 overflow step's grad norm) is written as null
        record = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                  for key, value in record.items()}
        self.last = record
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class StepTimeWatch:
    """One hint, once, when step times swing widely on the CPU (a step over 4× the median of the 20 before it, past
    warm-up): another busy program on the machine slows torch's default threads far more than it slows one thread."""

    def __init__(self, device: torch.device):
        self.watching, self.times = device.type == "cpu", []

    def hint(self, seconds: float) -> str | None:
        if not self.watching:
            return None
        recent = sorted(self.times[-20:])
        self.times.append(seconds)
        if len(recent) < 20 or seconds <= 4 * recent[len(recent) // 2]:
            return None
        self.watching = False
        return (f"Training steps on the CPU vary widely ({recent[len(recent) // 2]:.2f} s typical, then {seconds:.2f} s): "
                "another program may be competing for the cores. Set train.cpu_threads: 1 (or OMP_NUM_THREADS=1) to "
                "keep steps steady; docs/troubleshooting.md.")
