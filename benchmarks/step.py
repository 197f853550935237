"""Benchmark one full UNet training step (forward, backward, AdamW step): ours vs peft's reference WaveFT vs LoRA.

The adapted layers are SDXL's attention linears (to_q, to_k, to_v, to_out.0). LoRA gets one rank for all layers,
the one whose total parameter count is closest to WaveFT's (n_frequency per layer). All three methods wrap the same
frozen base layers of one UNet; every round swaps each method in and times one step, in shuffled order.

Models:
- tiny: the embedded tiny SDXL UNet (waveft_train.models.tiny), 32x32 latents.
- sdxl: the SDXL-base UNet *architecture* (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json values written
  in waveft_train/models/architecture.py; nothing is downloaded) with random weights; 2.57 B parameters.
  `--transformer-layers` can reduce its
  transformer depth; the output then says so.

Reported per method: median step time, its ratio to LoRA's and to the reference's (medians over rounds of per-round
ratios), and memory: resident adapter state (parameters, buffers, optimizer state: counted tensor by tensor) plus the
peak a step adds over what was resident before it (CPU: VmHWM reset through /proc/self/clear_refs, with glibc told to
return every block of 64 KiB or more to the system on free, so the resident size follows live memory; CUDA:
torch.cuda.max_memory_allocated).

Usage (from the repository root; results also go to outputs/bench/step-<date>-<time>.json, or --json PATH):
    python -m benchmarks.step --model sdxl                          # CPU fp32, 32x32 latents, batch 1
    python -m benchmarks.step --model tiny
    python -m benchmarks.step --model sdxl --device cuda --latent 128 --batch 2   # bf16 autocast, bf16 weights
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from contextlib import nullcontext

import torch
from torch import nn

from benchmarks.common import (
    add_json_argument,
    command_line,
    cpu_peak_step_bytes,
    machine,
    return_freed_memory_to_system,
    round_order,
    sampled_kernel,
    synchronize,
    wait_until_quiet,
    waveft_config,
    write_results,
)
from waveft_train.models.architecture import SDXL_BASE, TARGETS

METHODS = ("ours", "reference", "lora")
TEXT_TOKENS = 77


def build_unet(args) -> tuple[nn.Module, str]:
    """(frozen UNet, description) on args.device in args.dtype."""
    from diffusers import UNet2DConditionModel

    if args.model == "tiny":
        from waveft_train.models.tiny import tiny_model_dir

        unet = UNet2DConditionModel.from_pretrained(tiny_model_dir() / "unet")
        description = "tiny SDXL UNet (waveft_train.models.tiny)"
    else:
        config = dict(SDXL_BASE.unet)
        description = "SDXL-base UNet architecture, random weights"
        if args.transformer_layers:
            config["transformer_layers_per_block"] = tuple(args.transformer_layers)
            description += f", REDUCED transformer depth {tuple(args.transformer_layers)} (SDXL: (1, 2, 10))"
        with torch.random.fork_rng(devices=[]), torch.device(args.device):  # initialize where it will run
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**config)
    if args.dtype != torch.float32:
        unet = unet.to(dtype=args.dtype)
    return unet.to(args.device).requires_grad_(False).train(), description


def target_linears(unet: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, base Linear) of every targeted attention linear."""
    found = []
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS):
            parent_name, _, attribute = name.rpartition(".")
            found.append((unet.get_submodule(parent_name), attribute, module))
    return found


def make_wrapper(method: str, base: nn.Linear, args, lora_rank: int) -> nn.Module:
    if method == "ours":
        from waveft_train.waveft import WaveFTLinear

        return WaveFTLinear(base, "default", waveft_config(args.n_frequency, args.family), n_frequency=args.n_frequency)
    if method == "reference":
        from peft.tuners.waveft.layer import WaveFTLinear as Reference

        return Reference(base, "default", waveft_config(args.n_frequency, args.family), n_frequency=args.n_frequency)
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    layer = LoraLinear(base, "default", config=LoraConfig(r=lora_rank, lora_alpha=lora_rank), r=lora_rank, lora_alpha=lora_rank)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
    return layer


class Methods:
    """Wrappers of every method around the same base layers; `install` swaps one method's wrappers in."""

    def __init__(self, unet: nn.Module, methods, args):
        self.targets = target_linears(unet)
        sizes = sum(base.in_features + base.out_features for _, _, base in self.targets)
        self.lora_rank = max(1, round(args.n_frequency * len(self.targets) / sizes))
        self.wrappers = {m: [make_wrapper(m, base, args, self.lora_rank).to(args.device) for _, _, base in self.targets]
                         for m in methods}
        self.optimizers = {m: torch.optim.AdamW(self.parameters(m), lr=1e-4) for m in methods}

    def parameters(self, method: str) -> list[nn.Parameter]:
        return [p for wrapper in self.wrappers[method] for p in wrapper.parameters() if p.requires_grad]

    def install(self, method: str) -> None:
        for (parent, attribute, _), wrapper in zip(self.targets, self.wrappers[method]):
            setattr(parent, attribute, wrapper)

    def resident_bytes(self, method: str) -> int:
        """Parameters, buffers and optimizer state of a method's adapters (the shared base layers excluded)."""
        tensors = []
        for wrapper in self.wrappers[method]:
            tensors += [t for name, t in wrapper.named_parameters() if not name.startswith("base_layer")]
            tensors += [t for name, t in wrapper.named_buffers() if not name.startswith("base_layer")]
            tensors += [t for t in getattr(wrapper, "waveft_indices", {}).values() if isinstance(t, torch.Tensor)]
        for state in self.optimizers[method].state.values():
            tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
        seen, total = set(), 0
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total


def make_batch(unet: nn.Module, args) -> dict:
    config = unet.config
    generator = torch.Generator().manual_seed(0)
    text_embeds = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(args.device, args.dtype)

    return {
        "sample": randn(args.batch, config.in_channels, args.latent, args.latent),
        "timestep": torch.randint(0, 1000, (args.batch,), generator=generator).to(args.device),
        "encoder_hidden_states": randn(args.batch, TEXT_TOKENS, config.cross_attention_dim),
        "added_cond_kwargs": {"text_embeds": randn(args.batch, text_embeds), "time_ids": randn(args.batch, 6)},
        "target": randn(args.batch, config.out_channels, args.latent, args.latent),
    }


def train_step(unet: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, autocast: bool) -> float:
    inputs = {k: v for k, v in batch.items() if k != "target"}
    context = torch.autocast(batch["sample"].device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    with context:
        prediction = unet(**inputs).sample
    loss = torch.nn.functional.mse_loss(prediction.float(), batch["target"].float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def time_steps(unet, methods: Methods, names, batch, args) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per method, the step times of interleaved rounds, and the first warm-up step's seconds (with --compile, the
    step that compiles; none without warm-up)."""
    times, first_step_seconds = {m: [] for m in names}, {}
    for method in names:
        methods.install(method)
        for warmup in range(args.warmup):
            start = time.perf_counter()
            train_step(unet, batch, methods.optimizers[method], args.autocast)
            if warmup == 0:
                first_step_seconds[method] = round(time.perf_counter() - start, 1)
    for round_index in range(args.rounds):
        wait_until_quiet(args.quiet_wait)
        for method in round_order(names, round_index):
            methods.install(method)
            synchronize(args.device)
            start = time.perf_counter()
            train_step(unet, batch, methods.optimizers[method], args.autocast)
            synchronize(args.device)
            times[method].append(time.perf_counter() - start)
            print(f"    round {round_index}: {method:10s} {times[method][-1]:8.3f} s", flush=True)
    return times, first_step_seconds


def step_peak_bytes(unet, methods: Methods, method: str, batch, args) -> int:
    """Peak memory one step adds over what was resident right before it."""
    methods.install(method)
    gc.collect()
    if args.device == "cuda":
        train_step(unet, batch, methods.optimizers[method], args.autocast)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(unet, batch, methods.optimizers[method], args.autocast)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return cpu_peak_step_bytes(lambda: train_step(unet, batch, methods.optimizers[method], args.autocast))


def ratios(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    return round(statistics.median(a / b for a, b in zip(times[numerator], times[denominator])), 3)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "sdxl"], default="sdxl")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latent", type=int, help="latent side (default: 32 on CPU, 128 on CUDA)")
    parser.add_argument("--batch", type=int, help="batch size (default: 1 on CPU, 2 on CUDA)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--n-frequency", type=int, help="per layer (default: 2592 for sdxl, 256 for tiny)")
    parser.add_argument("--family", default="db1")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--transformer-layers", type=int, nargs=3, metavar="N", help="reduce SDXL's (1, 2, 10)")
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS", help="see benchmarks/layer.py")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (as train.compile does); "
                        "warm-up needs 2 steps or more (the first one compiles)")
    parser.add_argument("--sampled-kernel", default="auto", choices=["auto", "gather", "csr", "dense"],
                        help="force ours' spectrum-gradient kernel (benchmarks.profile compares them per layer)")
    add_json_argument(parser, "step")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.latent = args.latent or (128 if cuda else 32)
    args.batch = args.batch or (2 if cuda else 1)
    args.n_frequency = args.n_frequency or (2592 if args.model == "sdxl" else 256)
    args.dtype = torch.bfloat16 if cuda else torch.float32
    args.autocast = cuda
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    with sampled_kernel(args.sampled_kernel):  # "auto": the layer's own choice
        return measure(args, argv)


def measure(args, argv) -> dict:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    started = time.perf_counter()
    unet, description = build_unet(args)
    methods = Methods(unet, args.methods, args)
    batch = make_batch(unet, args)
    results = {
        "machine": machine(args.device),
        "command": command_line("benchmarks.step", argv),
        "model": description,
        "setup": f"{args.latent}x{args.latent} latents, batch {args.batch}, "
        + ("bf16 weights under bf16 autocast" if args.autocast else "fp32")
        + f", {len(methods.targets)} adapted linears, WaveFT n_frequency={args.n_frequency} ({args.family}), "
        f"LoRA rank {methods.lora_rank}"
        + (f", ours' spectrum gradient by the {args.sampled_kernel} kernel" if args.sampled_kernel != "auto" else "")
        + (", torch.compile (inductor)" if args.compile else ", eager"),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    print(f"# {results['machine']}\n# {description}; {results['setup']}", flush=True)
    runner = unet
    if args.compile:  # one compiled UNet; swapping a method's layers in recompiles once, in its first warm-up step
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(args.methods))
        runner = torch.compile(unet)
    times, first_step_seconds = time_steps(runner, methods, list(args.methods), batch, args)
    summary = {m: {"median_s": round(statistics.median(times[m]), 3),
                   "first_step_s": first_step_seconds.get(m)} for m in args.methods}
    for method in args.methods:
        for other in ("lora", "reference"):
            if other in times and other != method:
                summary[method][f"time_vs_{other}"] = ratios(times, method, other)
    if not args.no_memory:
        if args.device == "cpu":
            return_freed_memory_to_system()
        for method in args.methods:
            peak = step_peak_bytes(runner, methods, method, batch, args)
            resident = methods.resident_bytes(method)
            summary[method].update(
                adapter_resident_MiB=round(resident / 2**20, 1),
                step_peak_MiB=round(peak / 2**20, 1),
                training_memory_MiB=round((resident + peak) / 2**20, 1),
            )
        base = sum(t.untyped_storage().nbytes() for t in unet.parameters()) / 2**20
        results["base_weights_MiB"] = round(base, 1)
        if "lora" in summary:
            lora = summary["lora"]["training_memory_MiB"]
            for method in args.methods:
                own = summary[method]["training_memory_MiB"]
                summary[method]["memory_vs_lora"] = round(own / lora, 3)
                summary[method]["memory_with_weights_vs_lora"] = round((own + base) / (lora + base), 3)
    results["methods"] = summary
    print(json.dumps(results, indent=2))
    write_results(results, args.json, "step")
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
