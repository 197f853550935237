"""The end of a run: the final adapter folder and summary.json, which appear together or not at all.

Order: the adapter folder is staged complete (weights, config, model card, the last validation grid); summary.json
lands, atomically, while the staged folder waits; only then is the folder renamed into place. So `adapter/` never
exists without `samples.png` (when there is a grid) and `summary.json`; a failure before the rename leaves no new
`adapter/`, and since a run counts as finished only with both (checkpoint.finished_step), rerunning the same command
completes the folder.

A run may take several invocations (interrupted, resumed, extended). Each one's figures travel in the training state
of the checkpoints it writes, so summary.json gives totals over all of them and each one's own figures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from waveft_train.adapter.files import ADAPTER_WEIGHTS, save_adapter
from waveft_train.adapter.text_encoders import write_text_encoder_adapters
from waveft_train.common.files import atomic_write_text, writing


def invocation_record(*, started_at: float, start_step: int, end_step: int, step_seconds: Sequence[float],
                      wall_seconds: float, num_processes: int, peak_memory_bytes: int | None) -> dict:
    """One invocation's figures; its first step pays for warm-up and is left out of seconds_per_step."""
    timed = list(step_seconds[1:] or step_seconds)
    return {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)), "start_step": start_step,
            "end_step": end_step, "seconds_per_step": sum(timed) / len(timed) if timed else None,
            "wall_seconds": round(wall_seconds, 3), "num_processes": num_processes,
            "peak_memory_bytes": peak_memory_bytes}


def run_summary(invocations: Sequence[dict], *, trainable_params: int, buckets: dict, final_loss: float | None) -> dict:
    """summary.json: totals over every invocation (wall time summed, seconds per step averaged over the steps each
    trained, the highest peak memory), the last one's process count, and the per-invocation figures."""
    last = invocations[-1]
    trained = [(record["end_step"] - record["start_step"], record["seconds_per_step"]) for record in invocations
               if record["seconds_per_step"] is not None and record["end_step"] > record["start_step"]]
    steps_timed = sum(steps for steps, _ in trained)
    peaks = [record["peak_memory_bytes"] for record in invocations if record["peak_memory_bytes"] is not None]
    return {
        "trainable_params": trainable_params,
        "adapter_bytes": None,  # filled in once the adapter is written
        "steps": last["end_step"],
        "seconds_per_step": sum(steps * seconds for steps, seconds in trained) / steps_timed if steps_timed else None,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "num_processes": last["num_processes"],
        "buckets": buckets,
        "final_loss": final_loss,
        "wall_seconds": round(sum(record["wall_seconds"] for record in invocations), 3),
        "invocations": list(invocations),
    }


def write_final(output_dir: Path, summary: dict, *, unet: torch.nn.Module | None, base_model_name: str,
                prediction_type: str | None, model_card: str | None, last_samples: Path | None,
                base_metadata: Mapping[str, str] | None = None,
                text_encoders: Mapping[str, torch.nn.Module] | None = None) -> Path | None:
    """The final adapter folder (when `unet` is given; with `text_encoders`' adapters in their subfolders) and
    summary.json, together; returns the adapter folder."""
    summary_path, adapter_dir = output_dir / "summary.json", output_dir / "adapter"
    if unet is None:  # a training method that keeps no adapter: the summary alone
        with writing(summary_path, "the run summary"):
            atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
        return None

    def land_with_the_adapter(staging: Path) -> None:
        write_text_encoder_adapters(staging, text_encoders or {}, base_model_name_or_path=base_model_name,
                                    base_metadata=base_metadata)
        if last_samples is not None:
            (staging / "samples.png").write_bytes(last_samples.read_bytes())
        done = {**summary, "adapter_bytes": (staging / ADAPTER_WEIGHTS).stat().st_size}
        atomic_write_text(summary_path, json.dumps(done, indent=2) + "\n")

    with writing(adapter_dir, "the final adapter and summary.json"):
        save_adapter(adapter_dir, unet, base_model_name_or_path=base_model_name, prediction_type=prediction_type,
                     model_card=model_card, before_landing=land_with_the_adapter, base_metadata=base_metadata)
    return adapter_dir
