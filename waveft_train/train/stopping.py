"""Preemption: SIGTERM (how SLURM, Kubernetes and spot clouds stop a job) or Ctrl-C ends a run at a step boundary.

The first signal lets the current optimizer step finish; the run then writes a checkpoint, says where it will
resume and exits with 128 + the signal's number (143 for SIGTERM, 130 for Ctrl-C). A second signal aborts at
once (the newest checkpoint stays the last good state). Every process of a multi-process run stops at the same
step: the run asks `agreed()` after each step, a collective that tells all of them whether any got a signal.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType, TracebackType

import torch

from waveft_train.common.errors import RunInterrupted
from waveft_train.train.checkpoint import find_latest_checkpoint

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        self.pid = os.getpid()
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if os.getpid() != self.pid:  # a forked worker (e.g. torch.compile's) that inherited the handler: end as asked
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        name = signal.Signals(number).name
        if self.received is not None:
            latest = find_latest_checkpoint(self.output_dir)
            where = f"rerunning the same command resumes from {latest}" if latest else "no checkpoint was written yet"
            raise RunInterrupted(f"Aborted at once on a second {name}; {where}.", number)
        self.received = number
        print(f"\n{name} received: the run stops after the current step and writes a checkpoint (send it again to "
              "abort at once).", file=sys.stderr, flush=True)

    def agreed(self, accelerator) -> int | None:
        """Collective: the signal this or any other process received, or None (every process gets the same answer)."""
        flag = torch.tensor([float(self.received or 0)], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.gather(flag)
        number = int(flag.max().item())
        return number or None

    def end_run_if_asked(self, accelerator, *, saved: int | None) -> None:
        """Collective. After a signal: end the run, saying where it resumes (a checkpoint was just `saved`, or none)."""
        number = self.agreed(accelerator)
        if number is None:
            return

        latest = find_latest_checkpoint(self.output_dir)
        done = f"after step {saved}, with a checkpoint ({latest})" if saved else "before training further"
        resume = f"from {latest}" if latest else "from the start (no checkpoint yet)"
        raise RunInterrupted(f"Stopped on {signal.Signals(number).name} {done}. Rerun the same command to resume "
                             f"{resume}.", number)
