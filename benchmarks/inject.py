"""Time WaveFT injection into the SDXL-base UNet architecture on the meta device (what `params` and the
training preflight do before any weights load). Usage: python -m benchmarks.inject [--n-frequency 2592]"""

from __future__ import annotations

import argparse
import time

from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from peft import WaveFTConfig, inject_adapter_in_model

from benchmarks.common import add_json_argument, command_line, machine, write_results
from waveft_train import waveft
from waveft_train.models.architecture import SDXL_BASE, TARGETS


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-frequency", type=int, default=2592)
    add_json_argument(parser, "inject")
    args = parser.parse_args(argv)
    waveft.register()
    started = time.perf_counter()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(dict(SDXL_BASE.unet))
        built = time.perf_counter()
        inject_adapter_in_model(WaveFTConfig(n_frequency=args.n_frequency, target_modules=list(TARGETS)), unet)
    done = time.perf_counter()
    layers = sum(isinstance(module, waveft.WaveFTLayer) for module in unet.modules())
    print(f"SDXL UNet on meta: build {built - started:.2f} s, inject {layers} WaveFT layers {done - built:.2f} s")
    results = {
        "machine": machine("cpu"), "command": command_line("benchmarks.inject", argv),
        "n_frequency": args.n_frequency, "adapted_layers": layers,
        "build_seconds": round(built - started, 2), "inject_seconds": round(done - built, 2),
    }  # fmt: skip
    write_results(results, args.json, "inject")
    return results


if __name__ == "__main__":
    main()
