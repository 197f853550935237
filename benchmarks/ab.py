"""A/B one adapted layer's training step: this working tree's WaveFT against another commit's, interleaved.

Small changes (a few µs per call) drown in this machine's noise when two runs of benchmarks.layer are compared;
here both versions run in one process, round by round, on the same base weight and inputs, and what is reported is
the median over rounds of the per-round time ratio new/old (and each against the frozen layer).

The other commit's waveft_train/waveft/ is written to a temporary folder and imported from there as the package
`waveft_old` (importlib, by file location: sys.path stays as it is). Its modules import each other relatively, as
this tree's do; an absolute `waveft_train` import in the old code would get this tree's module instead.

Usage (from the repository root; results also go to outputs/bench/ab-<date>-<time>.json, or --json PATH):
    python -m benchmarks.ab HEAD~1                    # the three SDXL shapes of benchmarks.layer
    python -m benchmarks.ab main --shapes 2 --rounds 41
    python -m benchmarks.ab main --shapes 2 --cold     # caches evicted before every step, as inside a UNet step
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import (
    ROOT,
    add_json_argument,
    command_line,
    machine,
    median_ratio,
    time_interleaved,
    waveft_config,
    write_results,
)
from benchmarks.layer import SHAPES

OLD_PACKAGE = "waveft_old"


def import_old(ref: str, into: Path):
    """waveft_train/waveft as of `ref`, imported as the package `waveft_old`; returns its layer module."""
    package = into / OLD_PACKAGE
    package.mkdir()
    names = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{ref}:waveft_train/waveft"],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    for name in names:
        if name.endswith(".py"):
            source = subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{ref}:waveft_train/waveft/{name}"],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            (package / name).write_text(source)
    spec = importlib.util.spec_from_file_location(
        OLD_PACKAGE, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[OLD_PACKAGE] = module  # its relative imports resolve through this entry
    spec.loader.exec_module(module)
    return importlib.import_module(f"{OLD_PACKAGE}.layer")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="the git commit (or branch) to compare against")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-frequency", type=int, default=2592)
    parser.add_argument("--family", default="db1")
    parser.add_argument("--shapes", nargs="*", type=int, help="indices into benchmarks.layer's shape table")
    parser.add_argument("--cold", action="store_true", help="evict the CPU caches before every timed step")
    add_json_argument(parser, "ab")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from waveft_train.waveft.layer import WaveFTLinear as New

    results = {"machine": machine("cpu"), "command": command_line("benchmarks.ab", argv), "ref": args.ref, "shapes": {}}
    with tempfile.TemporaryDirectory() as folder:
        Old = import_old(args.ref, Path(folder)).WaveFTLinear
        names = list(SHAPES)
        for index in args.shapes if args.shapes is not None else range(len(names)):
            tokens, in_features, out_features = SHAPES[names[index]]
            torch.manual_seed(0)
            base = torch.nn.Linear(in_features, out_features, bias=False).requires_grad_(False)
            config = waveft_config(args.n_frequency, args.family)
            modules = {"frozen": base}
            for label, cls in (("old", Old), ("new", New)):
                modules[label] = cls(base, "default", config, n_frequency=args.n_frequency)
                torch.nn.init.normal_(modules[label].waveft_spectrum["default"], std=0.01)
            x = torch.randn(tokens, in_features, requires_grad=True)
            grad = torch.randn(tokens, out_features)

            def step(module, x=x, grad=grad):
                x.grad = None
                for parameter in module.parameters():
                    parameter.grad = None
                module(x).backward(grad)

            times = time_interleaved(lambda label, modules=modules: step(modules[label]), list(modules), args.rounds,
                                     cold=args.cold)

            old, new = median_ratio(times, "old", "frozen"), median_ratio(times, "new", "frozen")
            new_vs_old = median_ratio(times, "new", "old")
            frozen_ms = statistics.median(times["frozen"]) * 1e3
            print(f"{names[index]}: frozen {frozen_ms:.3f} ms, old x{old:.3f}, new x{new:.3f} frozen; new/old {new_vs_old:.3f}")
            results["shapes"][names[index]] = {
                "frozen_ms": round(frozen_ms, 3), "old_vs_frozen": round(old, 3), "new_vs_frozen": round(new, 3),
                "new_vs_old": round(new_vs_old, 3),
            }  # fmt: skip
    write_results(results, args.json, "ab")
    return results


if __name__ == "__main__":
    main()
