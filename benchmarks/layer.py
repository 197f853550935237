"""Benchmark one adapted attention linear: a training step (forward + backward) of four layers, interleaved.

The four: the frozen base layer; peft's reference WaveFT; LoRA with about WaveFT's parameter count (rank
round(n / (d_in + d_out)), at least 1); and ours (waveft_train's WaveFT). All wrap the same base weight and run on
the same input; every round times each of them once, in shuffled order, so machine noise hits all of them alike.
Reported: median step time, the median over rounds of each method's time divided by the frozen layer's time in the
same round, and the peak memory a step adds over what was resident before it.

Shapes are SDXL's attention linears in a 1024×1024 training run (batch 2): self-attention at 640 channels on the
64×64 level (8192 tokens), at 1280 channels on the 32×32 level (2048 tokens), and cross-attention to_k/to_v
reading the 2048-wide text states (2 × 77 tokens).

Memory: the peak a step adds over what was resident before it (on CUDA, torch.cuda.max_memory_allocated; on CPU, the
peak resident set size VmHWM, reset through /proc/self/clear_refs, measured after all timing with glibc told to
return every block of 64 KiB or more to the system on free, so the resident size follows the live tensors), and the
adapter's resident parameters and buffers, counted tensor by tensor.

Usage (from the repository root; results also go to outputs/bench/layer-<date>-<time>.json, or --json PATH):
    python -m benchmarks.layer                            # CPU, fp32, 2 threads
    python -m benchmarks.layer --device cuda              # bf16 weights and inputs under bf16 autocast
    python -m benchmarks.layer --paths                    # also time our two paths forced at the three shapes
    python -m benchmarks.layer --calibrate --cold         # where merged vs factorized should switch (choose_path)
    python -m benchmarks.layer --device cuda --check      # first: ours vs the reference on the device, and the
                                                          # sampled-product kernels timed there
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.common import (
    add_json_argument,
    command_line,
    cpu_peak_step_bytes,
    lora_rank,
    machine,
    median_ratio,
    return_freed_memory_to_system,
    synchronize,
    time_interleaved,
    waveft_config,
    write_results,
)
from waveft_train.train.optim import trainable_parameters_in_float32
from waveft_train.waveft.functional import choose_path, sampled_products, waveft_linear

SHAPES = {
    "self-attn 640, 64x64 latents (8192 tok)": (8192, 640, 640),
    "self-attn 1280, 32x32 latents (2048 tok)": (2048, 1280, 1280),
    "cross-attn to_k 2048->1280 (154 tok)": (154, 2048, 1280),
}
METHODS = ("frozen", "reference", "lora", "ours")


def wrap(method: str, base: nn.Linear, n_frequency: int, family: str) -> nn.Module:
    """`method` around the (shared, frozen) base layer; adapter parameters trainable and non-zero."""
    if method == "frozen":
        return base
    if method == "reference":
        from peft.tuners.waveft.layer import WaveFTLinear as Reference

        return Reference(base, "default", waveft_config(n_frequency, family), n_frequency=n_frequency)
    if method in ("ours", "ours-merged", "ours-factorized"):
        from waveft_train.waveft import WaveFTLinear

        layer = WaveFTLinear(base, "default", waveft_config(n_frequency, family), n_frequency=n_frequency)
        return layer if method == "ours" else ForcedPath(layer, method.split("-")[1])
    if method == "lora":
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as LoraLinear

        rank = lora_rank(n_frequency, base.in_features, base.out_features)
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0)
        layer = LoraLinear(base, "default", config=config, r=rank, lora_alpha=rank)
        nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
        return layer
    raise ValueError(f"unknown method {method!r}")


class ForcedPath(nn.Module):
    """Our layer with the merged or factorized path forced (to measure where `choose_path` should switch)."""

    def __init__(self, layer: nn.Module, path: str):
        super().__init__()
        self.layer, self.path = layer, path

    def forward(self, x):
        layer = self.layer
        adapters = [(layer.waveft_spectrum["default"], layer.waveft_transform["default"], layer.waveft_scaling["default"])]
        return waveft_linear(x, layer.base_layer.weight, layer.base_layer.bias, adapters, path=self.path)


@dataclass
class Setup:
    """Everything one shape needs: a shared base weight, inputs, and the methods around it."""

    x: torch.Tensor
    grad: torch.Tensor
    modules: dict[str, nn.Module]
    autocast: bool

    def clear_grads(self, method: str) -> None:
        self.x.grad = None
        for parameter in self.modules[method].parameters():
            parameter.grad = None

    def step(self, method: str) -> None:
        module = self.modules[method]
        self.clear_grads(method)
        context = torch.autocast(self.x.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
        with context:
            out = module(self.x)
        out.backward(self.grad.to(out.dtype))


def build(shape: tuple[int, int, int], methods, device: str, args) -> Setup:
    tokens, in_features, out_features = shape
    bf16 = getattr(args, "bf16", False) or device == "cuda"  # bf16 weights and inputs under bf16 autocast
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features, bias=False).to(device, dtype).requires_grad_(False)
    modules = {method: wrap(method, base, args.n_frequency, args.family).to(device) for method in methods}
    for module in modules.values():  # as the trainer keeps them (train/optim.py): autocast runs them in bf16
        trainable_parameters_in_float32(module)
    x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, out_features, device=device, dtype=dtype)
    return Setup(x=x, grad=grad, modules=modules, autocast=bf16)


def summarize(times: dict[str, list[float]], reference_method: str = "frozen") -> dict[str, dict]:
    return {
        method: {
            "median_ms": round(statistics.median(values) * 1e3, 3),
            "ratio_to_frozen": round(median_ratio(times, method, reference_method), 3),
        }
        for method, values in times.items()
    }


def peak_memory(setup: Setup, method: str, device: str) -> int:
    """Peak memory one step adds over what is resident before it (gradients of the previous step dropped)."""
    if device == "cuda":
        setup.step(method)
        setup.clear_grads(method)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        setup.step(method)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return cpu_peak_step_bytes(lambda: setup.step(method), lambda: setup.clear_grads(method))


CALIBRATION_LAYERS = [(640, 640, "db1"), (2048, 1280, "db1"), (640, 640, "db4"), (2048, 1280, "db8")]
CALIBRATION_TOKENS = [1, 4, 8, 32, 64, 154, 512, 2048]


def calibrate(args) -> dict:
    """Time our two paths forced against choose_path's pick, over token counts and layers (both ΔW builders)."""
    rows = []
    for in_features, out_features, family in CALIBRATION_LAYERS:
        for tokens in CALIBRATION_TOKENS:
            args.family = family
            setup = build((tokens, in_features, out_features), ["ours-merged", "ours-factorized"], args.device, args)
            times = time_interleaved(setup.step, ["ours-merged", "ours-factorized"], args.rounds, args.device,
                                     args.quiet_wait, args.cold)
            summary = summarize(times, "ours-merged")
            transform = setup.modules["ours-merged"].layer.waveft_transform["default"]
            merged, factorized = summary["ours-merged"]["median_ms"], summary["ours-factorized"]["median_ms"]
            row = {
                "layer": f"{in_features}->{out_features} {family} ({'patches' if transform.use_patches else 'separable'})",
                "tokens": tokens, "merged_ms": merged, "factorized_ms": factorized,
                "faster": "merged" if merged <= factorized else "factorized",
                "choose_path": choose_path(tokens, out_features, in_features, [transform]),
            }  # fmt: skip
            rows.append(row)
            print(f"  {row['layer']:34s} T={tokens:5d}  merged {merged:8.3f} ms  factorized {factorized:8.3f} ms  "
                  f"faster: {row['faster']:10s} choose_path: {row['choose_path']}")  # fmt: skip
            sys.stdout.flush()
    return {"calibration": rows}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def check(args) -> dict:
    """On the device: ours vs the reference (fp32; and ours under bf16 autocast), and the sampled-product kernels."""
    torch.backends.cudnn.allow_tf32 = False  # the reference's IDWT is a convolution: keep it in true fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    report, worst = {}, 0.0
    for name, (tokens, in_features, out_features) in SHAPES.items():
        torch.manual_seed(0)
        base = nn.Linear(in_features, out_features, bias=False).to(args.device).requires_grad_(False)
        reference, ours = (wrap(m, base, args.n_frequency, args.family).to(args.device) for m in ("reference", "ours"))
        with torch.no_grad():
            ours.waveft_spectrum["default"].copy_(reference.waveft_spectrum["default"])
        x = torch.randn(tokens, in_features, device=args.device, requires_grad=True)
        grad = torch.randn(tokens, out_features, device=args.device)
        outputs = {}
        for label, module, autocast in (("reference", reference, False), ("ours", ours, False), ("ours-bf16", ours, True)):
            x.grad = None
            module.waveft_spectrum["default"].grad = None
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=autocast):
                y = module(x)
            y.backward(grad.to(y.dtype))
            outputs[label] = (y.detach(), x.grad.clone(), module.waveft_spectrum["default"].grad.clone())
        row = {}
        for label in ("ours", "ours-bf16"):
            errors = [relative_error(a, e) for a, e in zip(outputs[label], outputs["reference"])]
            row[label] = dict(zip(("y", "dx", "d_spectrum"), (f"{e:.1e}" for e in errors)))
            if label == "ours":
                worst = max(worst, *errors)
        transform = ours.waveft_transform["default"]
        rows_t = torch.randn(transform.rows.width, tokens, device=args.device)
        cols_t = torch.randn(transform.cols.width, tokens, device=args.device)
        expected = sampled_products(rows_t, cols_t, transform, kernel="gather")
        for kernel in ("gather", "csr", "dense"):
            try:
                result = sampled_products(rows_t, cols_t, transform, kernel=kernel)
                error = relative_error(result, expected)
                times = []
                for _ in range(args.rounds):
                    synchronize(args.device)
                    start = time.perf_counter()
                    sampled_products(rows_t, cols_t, transform, kernel=kernel)
                    synchronize(args.device)
                    times.append(time.perf_counter() - start)
                row[f"sampled_{kernel}"] = f"{statistics.median(times) * 1e3:.3f} ms (rel. error {error:.1e})"
            except (RuntimeError, NotImplementedError) as error:
                row[f"sampled_{kernel}"] = f"unsupported: {str(error).splitlines()[0][:120]}"
        report[name] = row
        print(f"## {name}: {json.dumps(row)}", flush=True)
    print(f"worst fp32 relative error of ours vs the reference: {worst:.1e}")
    if worst > 1e-4:
        raise SystemExit(f"FAILED: ours differs from the reference by {worst:.1e} (relative) in fp32")
    return {"check": report, "worst_fp32_relative_error": worst}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--quiet-wait", type=float, default=0.0, metavar="SECONDS",
        help="shared machines: before each round wait up to this long for other processes to go idle",
    )  # fmt: skip
    parser.add_argument("--n-frequency", type=int, default=2592)
    parser.add_argument("--family", default="db1")
    parser.add_argument("--paths", action="store_true", help="also time our merged and factorized paths forced")
    parser.add_argument("--calibrate", action="store_true", help="time both paths over token counts (choose_path)")
    parser.add_argument("--cold", action="store_true", help="CPU: evict the caches before every timed step, as "
                        "inside a UNet step (see CacheFlusher)")
    parser.add_argument("--check", action="store_true", help="first compare ours with the reference on the device")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--shapes", nargs="*", type=int, help="indices into the shape table (default: all)")
    add_json_argument(parser, "layer")
    return parser.parse_args(argv)


def resident_bytes(module: nn.Module) -> int:
    """Adapter parameters and buffers of a wrapper (its base layer excluded; 0 for the frozen layer itself)."""
    if not hasattr(module, "base_layer") and not hasattr(module, "layer"):
        return 0
    tensors = [t for n, t in module.named_parameters() if "base_layer" not in n]
    tensors += [t for n, t in module.named_buffers() if "base_layer" not in n]
    for owner in (module, getattr(module, "layer", None)):  # peft keeps the reference's indices in a plain dict
        tensors += [t for t in getattr(owner, "waveft_indices", {}).values() if isinstance(t, torch.Tensor)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shape_names = list(SHAPES)
    results = {"machine": machine(args.device), "command": command_line("benchmarks.layer", argv), "shapes": {}}
    if args.calibrate:
        print(f"# {results['machine']}; n_frequency={args.n_frequency}, rounds={args.rounds}")
        results.update(calibrate(args))
        write_results(results, args.json, "layer-calibrate")
        return results
    methods = list(METHODS) + (["ours-merged", "ours-factorized"] if args.paths else [])
    print(f"# {results['machine']}; n_frequency={args.n_frequency}, family={args.family}, rounds={args.rounds}")
    if args.check:
        results.update(check(args))
    chosen = [shape_names[i] for i in (args.shapes if args.shapes is not None else range(len(shape_names)))]
    setups = {}
    for name in chosen:  # all timing first: the memory phase changes how malloc behaves
        setups[name] = build(SHAPES[name], methods, args.device, args)
        summary = summarize(time_interleaved(setups[name].step, methods, args.rounds, args.device, args.quiet_wait, args.cold))
        summary["ours_vs_reference_speedup"] = round(summary["reference"]["median_ms"] / summary["ours"]["median_ms"], 2)
        summary["ours_vs_lora_time"] = round(summary["ours"]["median_ms"] / summary["lora"]["median_ms"], 3)
        results["shapes"][name] = summary
    if not args.no_memory:
        if args.device == "cpu":
            return_freed_memory_to_system()
        for name in chosen:
            for method in methods:
                row = results["shapes"][name][method]
                row["adapter_resident_KiB"] = round(resident_bytes(setups[name].modules[method]) / 1024, 1)
                row["peak_step_MiB"] = round(peak_memory(setups[name], method, args.device) / 2**20, 2)
    for name in chosen:
        summary = results["shapes"][name]
        tokens, in_features, out_features = SHAPES[name]
        rank = lora_rank(args.n_frequency, in_features, out_features)
        print(f"\n## {name}  (T, d_in, d_out) = {SHAPES[name]}, LoRA rank {rank}")
        for method in methods:
            row = summary[method]
            memory = ""
            if "peak_step_MiB" in row:
                memory = f"  step peak {row['peak_step_MiB']:8.2f} MiB  adapter {row['adapter_resident_KiB']:8.1f} KiB"
            print(f"  {method:16s} {row['median_ms']:9.3f} ms  x{row['ratio_to_frozen']:.3f} frozen{memory}")
        print(f"  ours vs reference: {summary['ours_vs_reference_speedup']}x faster; "
              f"ours/lora time {summary['ours_vs_lora_time']}")
    speedups = [results["shapes"][n]["ours_vs_reference_speedup"] for n in chosen]
    results["geomean_speedup_vs_reference"] = round(statistics.geometric_mean(speedups), 2)
    print(f"\ngeometric mean speed-up of ours over the reference: {results['geomean_speedup_vs_reference']}x")
    write_results(results, args.json, "layer")
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
