"""What every benchmark shares: interleaved timing on a noisy machine, peak memory of one step, the machine's name,
the methods' configs, and the results file.

Timing: every round times each method once, in an order shuffled per round (seeded), so load from other processes
hits all methods alike and no method always runs right after the same neighbour; ratios are medians over rounds of
per-round ratios.

CPU memory: the peak resident set size (VmHWM, reset through /proc/self/clear_refs) a step adds over what was
resident before it, with glibc told to return every block of 64 KiB or more to the system on free, so the resident
size follows the live tensors. CUDA memory: torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import ctypes
import functools
import json
import platform
import random
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "outputs" / "bench"  # git-ignored (outputs/*)


# ---- the methods ---------------------------------------------------------------------------------------------------


def lora_rank(n_frequency: int, in_features: int, out_features: int) -> int:
    """The LoRA rank whose parameter count r·(d_in + d_out) is closest to WaveFT's n."""
    return max(1, round(n_frequency / (in_features + out_features)))


def waveft_config(n_frequency: int, family: str, use_idwt: bool = True, **kwargs):
    from peft import WaveFTConfig

    return WaveFTConfig(n_frequency=n_frequency, wavelet_family=family, use_idwt=use_idwt, init_weights=False, **kwargs)


@contextmanager
def sampled_kernel(kernel: str):
    """Force the spectrum gradient's sampled-product kernel of ours (auto, gather, csr, dense) while inside."""
    from waveft_train.waveft import functional

    original = functional.sampled_products
    functional.sampled_products = functools.partial(original, kernel=kernel)
    try:
        yield
    finally:
        functional.sampled_products = original


@contextmanager
def launch_light_path(forced: bool = True):
    """Force ours onto (or off) the launch-light path of accelerators while inside, on any device: its operations
    can then be counted on the CPU."""
    from waveft_train.waveft import functional

    original = functional.launch_light
    functional.launch_light = lambda device: forced
    try:
        yield
    finally:
        functional.launch_light = original


# ---- timing --------------------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def busy_fraction(interval: float = 0.3) -> float:
    """Fraction of all CPUs' time spent busy over `interval` (this process sleeps meanwhile: it is the others)."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    total, idle = sample()
    time.sleep(interval)
    total_after, idle_after = sample()
    return 1.0 - (idle_after - idle) / max(1, total_after - total)


def wait_until_quiet(max_wait: float, threshold: float = 0.1) -> None:
    """On a shared machine: before a round, wait (up to `max_wait` s) until other processes leave the CPUs idle."""
    deadline = time.monotonic() + max_wait
    while max_wait > 0 and time.monotonic() < deadline and busy_fraction() > threshold:
        pass


def round_order(methods, round_index: int) -> list:
    """This round's order of the methods: a seeded shuffle, so that over the rounds every method follows every
    other about equally often. (A fixed cyclic rotation would always run one method right after the same
    neighbour, e.g. ours after the cache-flushing reference and frozen after ours, which biases the ratios.)"""
    order = list(methods)
    random.Random(round_index).shuffle(order)
    return order


class CacheFlusher:
    """Evicts the CPU caches before a timed step (`--cold`): inside a UNet step each layer's weight and index
    buffers are cold, since dozens of other layers ran since its last call; a loop over one layer keeps them warm."""

    def __init__(self, device: str, megabytes: int = 256):
        self.buffer = torch.zeros(megabytes << 18) if device == "cpu" else None  # float32: 4 bytes each

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.add_(1.0)


def time_interleaved(
    step: Callable[[str], None], methods, rounds: int, device: str = "cpu", quiet_wait: float = 0.0, cold: bool = False
) -> dict[str, list[float]]:
    """Seconds per `step(method)`, each method once per round in a shuffled order (after two warm-up steps each)."""
    flush = CacheFlusher(device) if cold else (lambda: None)
    times: dict[str, list[float]] = {method: [] for method in methods}
    for method in methods:  # warm-up: allocator, lazy init, caches
        for _ in range(2):
            step(method)
    synchronize(device)
    for round_index in range(rounds):
        wait_until_quiet(quiet_wait)
        for method in round_order(methods, round_index):
            flush()
            synchronize(device)
            start = time.perf_counter()
            step(method)
            synchronize(device)
            times[method].append(time.perf_counter() - start)
    return times


def median_ratio(times: dict[str, list[float]], method: str, reference_method: str) -> float:
    """The median over rounds of method's time / reference_method's time in the same round."""
    return statistics.median(a / b for a, b in zip(times[method], times[reference_method]))


# ---- CPU peak memory -----------------------------------------------------------------------------------------------


def status_bytes(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def cpu_peak_step_bytes(step, prepare=lambda: None) -> int:
    """Peak resident bytes a call of `step` adds (VmHWM reset before; malloc must return big blocks on free)."""
    step()  # warm-up
    prepare()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # free heap pages must fault in again when reused, to be seen
    before = status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step()
    return status_bytes("VmHWM") - before


def return_freed_memory_to_system() -> None:
    """glibc: serve every allocation ≥ 64 KiB by mmap and trim the heap, so RSS tracks live memory."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (also disables the dynamic threshold)
    libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD


# ---- the machine and the results file ------------------------------------------------------------------------------


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def command_line(module: str, argv=None) -> str:
    """The command as typed from the repository root, e.g. `python -m benchmarks.layer --rounds 31`."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", module, *map(shlex.quote, arguments)])


def add_json_argument(parser, name: str) -> None:
    parser.add_argument(
        "--json", type=Path, default=None, metavar="PATH",
        help=f"where to write the results as JSON (default: outputs/bench/{name}-<date>-<time>.json)",
    )  # fmt: skip


def write_results(results: dict, path: Path | None, name: str) -> Path:
    """Write `results` as JSON to `path`, or to a new dated file under outputs/bench/; returns where."""
    if path is None:
        path = RESULTS_DIR / f"{name}-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {path}", flush=True)
    return path
