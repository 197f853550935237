"""What an SDXL WaveFT adapter weighs in each export format (BENCHMARKS.md §8), at the paper's settings.

    python -m benchmarks.file_sizes [--n-frequency 2592]

The SDXL-base UNet's attention linears (shapes from its real config, on the meta device: nothing is downloaded or
allocated), with waveft-train's default targets. Sizes are of the safetensors bytes each format writes (header
included); the full-update `.diff` file is counted from its tensors' sizes.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors.torch import save

from waveft_train.adapter.export_files import waveft_layer_tensors
from waveft_train.models.architecture import SDXL_BASE, TARGETS
from waveft_train.models.unet_names import kohya_key
from waveft_train.waveft import coefficient_locations

ADAPTER = "adapter_model.safetensors (peft, fp32 spectra)"


def sdxl_sizes(n_frequency: int = 2592, seed: int = 777) -> tuple[int, dict[str, int]]:
    """(number of adapted layers, bytes of each file) for SDXL-base with waveft-train's default targets."""
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(dict(SDXL_BASE.unet))
    layers = {name: module for name, module in unet.named_modules()
              if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS) and ".attn" in name}
    n = n_frequency
    sizes = {ADAPTER: len(save({f"base_model.model.{name}.waveft_spectrum": torch.zeros(n) for name in layers}))}
    for dtype in ("fp16", "fp32"):
        tensors = {}
        for name, layer in layers.items():
            locations = coefficient_locations(layer.out_features, layer.in_features, n, seed)
            tensors.update(waveft_layer_tensors(kohya_key(name), torch.zeros(n), locations, "db1", 25.0, dtype))
        sizes[f"--format waveft --dtype {dtype}"] = len(save(tensors))
    sizes["--format comfyui --dtype fp16 (full updates)"] = sum(2 * layer.weight.numel() for layer in layers.values())
    return len(layers), sizes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.file_sizes", description=__doc__.splitlines()[0])
    parser.add_argument("--n-frequency", type=int, default=2592)
    parser.add_argument("--seed", type=int, default=777, help="random_loc_seed")
    args = parser.parse_args(argv)
    layers, sizes = sdxl_sizes(args.n_frequency, args.seed)
    adapter = sizes[ADAPTER]
    print(f"{layers} attention linears, n_frequency {args.n_frequency}: {layers * args.n_frequency:,} coefficients")
    print("| file | MB | x adapter |\n|---|---|---|")
    for name, size in sizes.items():
        print(f"| {name} | {size / 1e6:.2f} | {size / adapter:.2f} |")


if __name__ == "__main__":
    main()
