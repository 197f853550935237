"""Where one layer step's time goes: wall time, device busy time and operator calls per method (torch.profiler).

On a GPU a layer step at SDXL's shapes is a fraction of a millisecond of arithmetic, so the wall time (measured
without the profiler) against the kernels' own time says whether a method is bound by its kernels or by launching
them; the operator and kernel counts say how many launches each method costs. The same three shapes and methods as
benchmarks.layer, plus ours with the spectrum gradient's sampled product forced to each kernel ("ours-csr":
torch.sparse.sampled_addmm, the CPU default; "ours-gather": chunked gathers; "ours-dense": one full product, then a
gather), and "ours-light": ours with the launch-light path of accelerators forced (functional.launch_light: one token
chunk and the dense kernel), so that its operations are counted on the CPU as they run on a GPU.

Usage (from the repository root; results also go to outputs/bench/profile-<date>-<time>.json, or --json PATH):
    python -m benchmarks.profile --device cuda      # bf16 weights and inputs under bf16 autocast
    python -m benchmarks.profile --device cpu       # fp32 (device time is then CPU time)
    python -m benchmarks.profile --device cpu --bf16 --methods lora ours-light   # the GPU's operations, counted
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import layer
from benchmarks.common import (
    add_json_argument,
    command_line,
    launch_light_path,
    machine,
    sampled_kernel,
    synchronize,
    write_results,
)
from waveft_train.waveft import functional

METHODS = ("frozen", "lora", "ours", "ours-light", "ours-gather", "ours-csr", "ours-dense")


def measure(setup: layer.Setup, method: str, steps: int, device: str) -> dict:
    module_name = "ours" if method.startswith("ours") else method
    variant = method.partition("-")[2]
    light = launch_light_path() if variant == "light" else nullcontext()
    kernel = functional.AUTO if variant in ("", "light") else variant
    with light, sampled_kernel(kernel):
        for _ in range(3):  # warm-up: lazy initializations, caches
            setup.step(module_name)
        walls = []
        for _ in range(steps):  # timed outside the profiler, which adds a cost per call (more for more calls)
            synchronize(device)
            start = time.perf_counter()
            setup.step(module_name)
            synchronize(device)
            walls.append(time.perf_counter() - start)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                setup.step(module_name)
            synchronize(device)
    events = prof.key_averages()
    operators = sum(e.count for e in events if e.key.startswith("aten::"))  # nested calls too (linear → mm)
    if device == "cuda":
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        busy = sum(e.device_time for e in kernels) / 1e3 / steps  # µs → ms
        top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:6]
        top = {e.key[:60]: round(e.self_device_time_total / 1e3 / steps, 4) for e in top if e.self_device_time_total}
    else:
        kernels, busy, top = [], float("nan"), {}
    return {
        "wall_ms": round(statistics.median(walls) * 1e3, 3),
        "device_busy_ms": round(busy, 3),
        "aten_calls": round(operators / steps, 1),
        "kernels": round(len(kernels) / steps, 1),
        "top_device_ms": top,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="profiled steps per method and shape")
    parser.add_argument("--n-frequency", type=int, default=2592)
    parser.add_argument("--family", default="db1")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and inputs under bf16 autocast (always "
                        "on cuda): what the GPU runs, counted on the CPU")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    add_json_argument(parser, "profile")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"machine": machine(args.device), "command": command_line("benchmarks.profile", argv), "shapes": {}}
    precision = "bf16 autocast" if args.bf16 or args.device == "cuda" else "fp32"
    results["precision"] = precision
    print(f"# {results['machine']}; n_frequency={args.n_frequency}, {args.family}, {precision}, {args.steps} steps",
          flush=True)
    modules = sorted({"ours" if m.startswith("ours") else m for m in args.methods})
    for name, shape in layer.SHAPES.items():
        setup = layer.build(shape, modules, args.device, args)
        rows = {method: measure(setup, method, args.steps, args.device) for method in args.methods}
        results["shapes"][name] = rows
        print(f"## {name}")
        for method, row in rows.items():
            print(f"  {method:12s} wall {row['wall_ms']:8.3f} ms  device busy {row['device_busy_ms']:7.3f} ms  "
                  f"aten calls {row['aten_calls']:6.1f}  kernels {row['kernels']:6.1f}", flush=True)
        if "ours" in rows and rows["ours"]["top_device_ms"]:
            print(f"  ours, most device time (ms per step): {rows['ours']['top_device_ms']}")
    write_results(results, args.json, "profile")
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
