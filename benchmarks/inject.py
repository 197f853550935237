"""Time WaveFT injection into the SDXL-base UNet architecture on the meta device (what `params` and the
training preflight do before any weights load). Usage: python scripts/bench_inject.py [--n-frequency 2592]"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accelerate import init_empty_weights  # noqa: E402
from bench_step import SDXL_UNET_CONFIG  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from peft import WaveFTConfig, inject_adapter_in_model  # noqa: E402

from waveft_train import waveft  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-frequency", type=int, default=2592)
    args = parser.parse_args()
    waveft.register()
    started = time.perf_counter()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(dict(SDXL_UNET_CONFIG))
        built = time.perf_counter()
        inject_adapter_in_model(
            WaveFTConfig(n_frequency=args.n_frequency, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), unet
        )
    done = time.perf_counter()
    layers = sum(isinstance(module, waveft.WaveFTLayer) for module in unet.modules())
    print(f"SDXL UNet on meta: build {built - started:.2f} s, inject {layers} WaveFT layers {done - built:.2f} s")


if __name__ == "__main__":
    main()
