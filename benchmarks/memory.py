"""Peak GPU memory of one waveft-train training step on SDXL-base, and which GPU sizes it fits.

The step is the trainer's: the SDXL-base UNet architecture (random weights, from its published config) with the
attention linears adapted, frozen weights in bf16 under bf16 autocast, a micro-batch of `--batch` latents (batch 1
plus its class image under prior preservation: 2), forward, MSE loss, backward, twice (gradient accumulation: the
adapter's gradients stay between micro-steps), with AdamW's two float32 moments resident. Methods: waveft-train's
WaveFT ("ours"), LoRA at the same parameter budget (rank 1 for SDXL), and peft's reference WaveFT.

Reported per setting, in bytes of live tensors (what torch.cuda.max_memory_allocated counts): the resident part
(UNet weights, the adapter's parameters and buffers, optimizer state) and the peak the step adds over it. On this
CPU-only machine the counts come from fake tensors (benchmarks/memory_tracking.py): no memory is allocated, and
`--validate` checks them against real CPU runs at sizes that fit. `--device cuda` runs the same steps for real on a
GPU. The trainer parks both text encoders (and the VAE, with cached latents) on the CPU during training and brings
them back for validation sampling; their sizes and the sampling phases are measured too.

Usage (from the repository root; results also go to outputs/bench/memory-<date>-<time>.json, or --json PATH):
    python -m benchmarks.memory                     # the table: 1024 px, ours/lora/reference, checkpointing on/off
    python -m benchmarks.memory --validate          # fake counts against real CPU runs (small sizes, ~10 min)
    python -m benchmarks.memory --sweep             # the measurements waveft_train/train/memory.py is fitted to, and the fit
    python -m benchmarks.memory --fit-from FILE     # the fit again, from an earlier --sweep's JSON
    python -m benchmarks.memory --device cuda       # real runs on a GPU (torch.cuda.max_memory_allocated)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from benchmarks.common import add_json_argument, command_line, machine, return_freed_memory_to_system, write_results
from benchmarks.memory_runs import DTYPES, METHODS, GiB, Session, Step, other_components, unet_config
from waveft_train.train.memory import device_need  # the allowance `waveft-train params` uses: slack + CUDA context

# ---- the table ----------------------------------------------------------------------------------------------------

GPU_TIERS = (8, 12, 16, 24)  # GB as sold, i.e. GiB of device memory


def smallest_gpu(allocated: int) -> str:
    fitting = [tier for tier in GPU_TIERS if device_need(allocated) <= tier * GiB]
    return f"{fitting[0]} GB" if fitting else f"> {GPU_TIERS[-1]} GB"


def gib(value: int) -> str:
    return f"{value / GiB:.2f}"


def measure_table(args, mode: str) -> dict:
    """Training step per method × checkpointing, the other components, and the sampling phases (ours)."""
    components = other_components(mode, args.dtype, args.latent)  # first: quick, and it fails early if it fails
    rows, sampling = [], {}
    for method in args.methods:
        step = Step(latent=args.latent, batch=args.batch, method=method, dtype=args.dtype, micro_steps=args.micro_steps)
        started = time.perf_counter()
        session = Session(step, mode)
        parts = session.parts()
        for checkpointing in args.checkpointing:
            measured = session.train_step(checkpointing, warm_up=mode == "cuda")
            rows.append({"method": method, "checkpointing": checkpointing, "lora_rank": session.lora_rank,
                         **parts, **measured, "total": measured["resident"] + measured["step_peak"]})  # fmt: skip
            reserve = (f"; the allocator's reserved peak {gib(measured['reserved_peak'])} GiB, CUDA context "
                       f"{gib(measured['context'])} GiB" if mode == "cuda" else "")  # fmt: skip
            print(f"  {method:9s} checkpointing {'on ' if checkpointing else 'off'}: resident {gib(measured['resident'])}"
                  f" GiB + step {gib(measured['step_peak'])} GiB{reserve}  ({time.perf_counter() - started:.0f} s)",
                  flush=True)
        if method == "ours":  # sampling: one image with guidance (validation), two (class images, generation_batch_size)
            sampling = {"unet_inference_2": session.inference_peak(2), "unet_inference_4": session.inference_peak(4)}
        session.close()
        del session  # before the next method's UNet is built: on a GPU both would count
        gc.collect()
    return {"rows": rows, "sampling": sampling, "components": components}


def phases(result: dict) -> list[dict]:
    """Device memory of each phase of a run with ours, with SDXL's own VAE (fp32: force_upcast) and with an fp16-fix
    VAE (in the weight dtype, as configs/subject.yaml has it)."""
    c, s = result["components"], result["sampling"]
    ours = {row["checkpointing"]: row for row in result["rows"] if row["method"] == "ours"}
    out = []
    for vae_dtype in ("fp32", result["settings"]["dtype"]):
        vae, decode_1 = (c[f"vae_{vae_dtype}{part}"] for part in ("", "_decode_1"))
        encode_1, encode_2 = c[f"vae_{vae_dtype}_encode_1"], c[f"vae_{vae_dtype}_encode_2"]
        entries = []
        for checkpointing, row in sorted(ours.items(), reverse=True):
            name = f"training step, checkpointing {'on' if checkpointing else 'off'}"
            entries.append((f"{name}: encoders and VAE on the CPU (cached latents, the default)", row["total"]))
            entries.append((f"{name}, train.cache_latents false: the VAE stays and encodes each batch (2 images)",
                            row["resident"] + vae + max(row["step_peak"], encode_2)))
        row = ours.get(True, next(iter(ours.values())))
        state = row["unet_weights"] + row["adapter"] + row["optimizer_state"]
        entries.append(("validation sampling: UNet, adapter and optimizer state + encoders + VAE; one image with "
                        "guidance, then its decode", state + c["text_encoders"] + vae + max(s["unet_inference_2"], decode_1)))
        entries.append(("class-image generation (first run): UNet + encoders + VAE; 2 images with guidance, then their "
                        "decode one at a time (VAE slicing)",
                        row["unet_weights"] + c["text_encoders"] + vae + max(s["unet_inference_4"], decode_1)))
        entries.append(("latent caching: the VAE alone, one image at a time", vae + encode_1))
        for index, (phase, value) in enumerate(entries):
            if len(out) <= index:
                out.append({"phase": phase})
            out[index][f"vae_{vae_dtype}"] = value
            out[index][f"vae_{vae_dtype}_fits"] = smallest_gpu(value)
    return out


def print_tables(result: dict) -> None:
    c, half = result["components"], result["settings"]["dtype"]
    extra = c["text_encoders"] + c["vae_fp32"]
    print("\n| method | gradient checkpointing | UNet weights | adapter + AdamW state | step peak (activations, "
          "grads) | training, GiB | fits | + text encoders and VAE on the GPU, GiB | fits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        name = {"ours": "**waveft-train**", "lora": f"LoRA r{row['lora_rank']}", "reference": "peft reference WaveFT"}
        print(f"| {name[row['method']]} | {'on' if row['checkpointing'] else 'off'} | {gib(row['unet_weights'])} | "
              f"{gib(row['adapter'] + row['optimizer_state'])} | {gib(row['step_peak'])} | **{gib(row['total'])}** | "
              f"{smallest_gpu(row['total'])} | {gib(row['total'] + extra)} | {smallest_gpu(row['total'] + extra)} |")
    print(f"\ntext encoders ({c['text_encoder_params'] / 1e6:.0f} M + {c['text_encoder_2_params'] / 1e6:.0f} M params,"
          f" {half}): {gib(c['text_encoders'])} GiB; VAE ({c['vae_params'] / 1e6:.1f} M): {gib(c['vae_fp32'])} GiB in "
          f"fp32, {gib(c[f'vae_{half}'])} GiB in {half}. VAE peaks over its weights (fp32 / {half}): encode 1 image "
          f"{gib(c['vae_fp32_encode_1'])} / {gib(c[f'vae_{half}_encode_1'])} GiB, decode 1 image "
          f"{gib(c['vae_fp32_decode_1'])} / {gib(c[f'vae_{half}_decode_1'])} GiB, 2 images {gib(c['vae_fp32_decode_2'])}"
          f" / {gib(c[f'vae_{half}_decode_2'])} GiB; UNet inference with guidance, 1 / 2 images: "
          f"{gib(result['sampling']['unet_inference_2'])} / {gib(result['sampling']['unet_inference_4'])} GiB")
    print(f"\n| phase (waveft-train) | SDXL's VAE (fp32), GiB | fits | fp16-fix VAE ({half}), GiB | fits |")
    print("|---|---|---|---|---|")
    for entry in phases(result):
        print(f"| {entry['phase']} | {gib(entry['vae_fp32'])} | {entry['vae_fp32_fits']} | {gib(entry[f'vae_{half}'])} | "
              f"{entry[f'vae_{half}_fits']} |")
    for row in result["rows"]:
        if row["checkpointing"] and row["method"] in ("ours", "lora"):
            params = row["optimizer_state"] // 8
            eight_bit = 2 * params + 2 * 4 * -(-params // 2048)  # two uint8 moments + an fp32 absmax per 2048-block each
            print(f"AdamW state, {row['method']}: {row['optimizer_state'] / 2**20:.1f} MiB in fp32, "
                  f"~{eight_bit / 2**20:.1f} MiB with 8-bit Adam (saves {(row['optimizer_state'] - eight_bit) / 2**20:.1f} MiB)")


# ---- validation against real runs, and the sweep the estimate is fitted to ------------------------------------------

VALIDATION = (  # real CPU runs that fit this machine's memory and time: (setting, methods). SDXL runs in fp32 here:
    # bf16 on a CPU without bf16 instructions takes ~30 min a step and hides fp32 workspaces inside oneDNN's kernels
    (Step(model="tiny", latent=32, batch=2, dtype="fp32"), METHODS),
    (Step(model="tiny", latent=64, batch=2, dtype="bf16"), ("ours",)),
    (Step(model="sdxl", latent=32, batch=2, dtype="fp32", micro_steps=1, transformer_layers=(1, 1, 1)), METHODS),
    (Step(model="sdxl", latent=64, batch=1, dtype="fp32", micro_steps=1, transformer_layers=(1, 1, 1)), ("ours",)),
)
REAL_RUN_LIMIT = 5 * GiB  # a real run whose fake count is above this is skipped (the machine is shared)


def validate() -> list[dict]:
    """Each setting: the fake count, then the same run for real in a child process (live bytes and RSS)."""
    rows = []
    for setting, methods in VALIDATION:
        for method in methods:
            step = replace(setting, method=method)
            session = Session(step, "fake")
            fake = {checkpointing: session.train_step(checkpointing) for checkpointing in (False, True)}
            session.close()
            if max(f["resident"] + f["step_peak"] for f in fake.values()) > REAL_RUN_LIMIT:
                print(f"  skipped (over {gib(REAL_RUN_LIMIT)} GiB): {step}", flush=True)
                continue
            worker = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--worker", json.dumps(asdict(step))],
                                    capture_output=True, text=True, check=True)  # fmt: skip
            real = json.loads(worker.stdout.strip().splitlines()[-1])
            for checkpointing in (False, True):
                f, r = fake[checkpointing], real[str(checkpointing).lower()]
                row = {**asdict(step), "checkpointing": checkpointing, "fake_resident": f["resident"],
                       "real_resident": r["resident"], "fake_step_peak": f["step_peak"],
                       "real_step_peak": r["step_peak"], "rss_step_peak": r["rss_step_peak"]}  # fmt: skip
                rows.append(row)
                print(f"  {step.model} {step.latent}x{step.latent} b{step.batch} {step.dtype} {method:9s} "
                      f"checkpointing {'on ' if checkpointing else 'off'}: step peak fake {row['fake_step_peak'] / 2**20:8.1f}"
                      f" MiB, real {row['real_step_peak'] / 2**20:8.1f} MiB, real RSS {row['rss_step_peak'] / 2**20:8.1f} MiB"
                      f" ({row['rss_step_peak'] / row['fake_step_peak']:.3f}x fake)", flush=True)
    return rows


def step_from(row: dict) -> Step:
    """The Step of a results row (JSON turns its tuple into a list)."""
    names = {field.name for field in fields(Step)}
    return Step(**{k: tuple(v) if isinstance(v, list) else v for k, v in row.items() if k in names})


def validation_worker(spec: str) -> dict:
    """One real CPU run of a --validate setting; prints its counts as the last line (JSON)."""
    return_freed_memory_to_system()
    step = step_from(json.loads(spec))
    session = Session(step, "cpu")
    result = {str(c).lower(): session.train_step(c, warm_up=True) for c in (False, True)}
    print(json.dumps(result), flush=True)
    return result


SWEEP = (  # ours, fake tensors: what waveft_train/train/memory.py's activation coefficients are fitted to
    *(Step(latent=side, batch=batch, micro_steps=1) for side, batch in ((128, 2), (128, 1), (96, 2), (64, 2), (64, 4))),
    *(Step(latent=side, batch=2, micro_steps=1, transformer_layers=(1, 1, 1)) for side in (128, 64)),
    *(Step(latent=side, batch=2, dtype="fp32", micro_steps=1) for side in (128, 64)),
    Step(latent=64, batch=2, dtype="fp32", micro_steps=1, transformer_layers=(1, 1, 1)),
    *(Step(model="tiny", latent=side, batch=batch, dtype=dtype) for side in (32, 64, 128) for batch in (1, 2)
      for dtype in ("fp32", "bf16")),
)


def sweep() -> dict:
    rows = []
    for step in SWEEP:
        session = Session(step, "fake")
        for checkpointing in (False, True):
            measured = session.train_step(checkpointing)
            rows.append({**asdict(step), "checkpointing": checkpointing, **session.parts(), **measured})
            print(f"  {json.dumps(rows[-1])}", flush=True)
        rows[-1]["inference_peak"] = rows[-2]["inference_peak"] = session.inference_peak(step.batch)
        session.close()
    return {"rows": rows, **fit(rows)}


def fit(rows: list[dict]) -> dict:
    """Least-squares fit (relative errors) of waveft_train/train/memory.py's COEFFICIENTS to the sweep's step peaks."""
    import numpy as np

    from waveft_train.train.memory import activation_features

    def features(row):
        config = unet_config(step_from(row))
        return activation_features(config, row["latent"], row["latent"])

    coefficients, errors = {}, []
    for precision, dtypes in (("half", ("bf16", "fp16")), ("fp32", ("fp32",))):
        for checkpointing in (False, True):
            chosen = [r for r in rows if r["dtype"] in dtypes and r["checkpointing"] == checkpointing]
            names = ["res", "block", "other", "unit"] if checkpointing else ["res", "block", "other", "text"]
            matrix, target = [], []
            for row in chosen:
                f = features(row)
                if checkpointing:
                    off = coefficients[(precision, False)]
                    f = {**f, "res": f["res_in"], "unit": max(off["res"] * f["unit_res"], off["block"] * f["unit_block"])}
                y = (row["step_peak"] - row["grads"]) / row["batch"]
                matrix.append([f[name] / y for name in names])
                target.append(1.0)
            solution = np.linalg.lstsq(np.array(matrix), np.array(target), rcond=None)[0]
            coefficients[(precision, checkpointing)] = {n: round(float(v), 3) for n, v in zip(names, solution)}
            for row, line in zip(chosen, matrix):
                errors.append({"model": row["model"], "latent": row["latent"], "batch": row["batch"],
                               "dtype": row["dtype"], "checkpointing": checkpointing,
                               "transformer_layers": row["transformer_layers"],
                               "relative_error": round(float(np.dot(line, solution)) - 1.0, 4)})  # fmt: skip
    print("\nCOEFFICIENTS = {")
    for key, values in coefficients.items():
        print(f"    {key!r}: {values!r},")
    print("}")
    for error in errors:
        print(f"  {error}")
    return {"coefficients": {f"{k[0]}, checkpointing {k[1]}": v for k, v in coefficients.items()}, "fit_errors": errors}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: fake tensors (no memory allocated); cuda: real runs on the GPU")  # fmt: skip
    parser.add_argument("--latent", type=int, default=128, help="latent side (1024 px / 8)")
    parser.add_argument("--batch", type=int, default=2, help="latents per micro-batch (1 + its class image)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--micro-steps", type=int, default=2)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--checkpointing", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--validate", action="store_true", help="fake counts against real CPU runs (small sizes)")
    parser.add_argument("--sweep", action="store_true", help="the settings waveft_train/train/memory.py is fitted to")
    parser.add_argument("--fit-from", type=Path, metavar="JSON", help="refit to the rows of an earlier --sweep")
    parser.add_argument("--render", type=Path, metavar="JSON", help="print the tables of an earlier run again")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a real CPU run for --validate, in its own process
    add_json_argument(parser, "memory")
    args = parser.parse_args(argv)
    args.checkpointing = [value == "on" for value in args.checkpointing]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        return validation_worker(args.worker)
    if args.render:
        results = json.loads(args.render.read_text())
        print(f"# {results['command']}\n# {results['machine']}; {results['method']}")
        print_tables(results)
        return results
    mode = "cuda" if args.device == "cuda" else "fake"
    results = {"machine": machine(args.device), "command": command_line("benchmarks.memory", argv),
               "method": "torch.cuda.max_memory_allocated" if mode == "cuda" else "fake tensors, live storage bytes"}
    print(f"# {results['machine']}; {results['method']}", flush=True)
    if args.validate:
        results["validation"] = validate()
    elif args.sweep:
        results["sweep"] = sweep()
    elif args.fit_from:
        earlier = json.loads(args.fit_from.read_text())["sweep"]
        results["sweep"] = {"rows": earlier["rows"] if isinstance(earlier, dict) else earlier}
        results["sweep"].update(fit(results["sweep"]["rows"]))
    else:
        results["settings"] = {"latent": args.latent, "batch": args.batch, "dtype": args.dtype,
                               "micro_steps": args.micro_steps, "model": "sdxl"}  # fmt: skip
        results.update(measure_table(args, mode))
        print_tables(results)
        results["phases"] = phases(results)
    write_results(results, args.json, "memory")
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
