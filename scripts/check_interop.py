"""Check an adapter's one-file exports with the apps' own loaders, and measure what the LoRA export loses.

1. `--format comfyui --dtype fp32`, applied by LyCORIS (lycoris.kohya.create_network_from_weights) onto the base
   diffusers UNet, against the merged export (`--format diffusers --dtype fp32`): relative difference of the UNet
   outputs on random inputs (should be <= 1e-5; the adapter's own effect is printed next to it).
2. `--format lora` at several ranks: the worst, median and overall relative Frobenius errors the export records, and
   the same file read by diffusers' `load_lora_weights`: its UNet output's error relative to the adapter's effect.

Usage (the figures of docs/export.md: `waveft-train --config tests/data/tiny.yaml` first):
    python -m scripts.check_interop --adapter outputs/tiny/adapter --ranks 1 2 4 8 16 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open


def unet_inputs(config, batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    size = config.sample_size // 2
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return torch.randn(batch, config.in_channels, size, size, generator=generator), dict(
        timestep=torch.tensor([10, 700][:batch]),
        encoder_hidden_states=torch.randn(batch, 77, config.cross_attention_dim, generator=generator),
        added_cond_kwargs={"text_embeds": torch.randn(batch, text_dim, generator=generator),
                           "time_ids": torch.tensor([[size * 8.0, size * 8, 0, 0, size * 8, size * 8]] * batch)},
    )


def run(unet, inputs) -> torch.Tensor:
    sample, kwargs = inputs
    with torch.no_grad():
        return unet(sample, **kwargs).sample


def main() -> None:
    from diffusers import UNet2DConditionModel
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    from waveft_train.adapter.export import export
    from waveft_train.adapter.load import read_adapter
    from waveft_train.models.loading import build_pipeline, load_components, load_unet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--base", default=None, help="default: the adapter's base_model_name_or_path")
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32])
    args = parser.parse_args()
    base = args.base or read_adapter(args.adapter).config.base_model_name_or_path

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        merged_unet = UNet2DConditionModel.from_pretrained(export(args.adapter, scratch / "merged", base=base,
                                                                  dtype="fp32").path)
        inputs = unet_inputs(merged_unet.config)
        merged, plain = run(merged_unet, inputs), run(load_unet(base), inputs)
        effect = (merged - plain).norm().item()
        print(f"adapter effect on the UNet output: {effect / merged.norm().item():.4g} (relative)")

        diff_file = export(args.adapter, scratch / "full.safetensors", format="comfyui", base=base, dtype="fp32")
        unet = load_unet(base)
        LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME = []  # LyCORIS 4.1.3 asserts on diffusers UNets otherwise
        network, _ = create_network_from_weights(1.0, str(diff_file.path), None, None, unet, for_inference=True)
        network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
        print(f"comfyui file via LyCORIS ({len(network.unet_loras)}/{diff_file.layers} modules) vs merged export: "
              f"{((run(unet, inputs) - merged).norm() / merged.norm()).item():.3g} relative")

        pipeline = build_pipeline(load_components(base))
        print(f"{'rank':>5} {'worst':>8} {'median':>8} {'overall':>8} {'diffusers output / effect':>26}")
        for rank in args.ranks:
            result = export(args.adapter, scratch / f"lora{rank}.safetensors", format="lora", base=base,
                            rank=rank, force=True)
            with safe_open(str(result.path), framework="pt") as handle:
                overall = float(handle.metadata()["waveft.lora_overall_error"])
                assert json.loads(handle.metadata()["waveft.lora_ranks"])
            pipeline.load_lora_weights(str(result.path))
            output = run(pipeline.unet, inputs)
            pipeline.unload_lora_weights()
            errors = list(result.errors.values())
            print(f"{rank:>5} {max(errors):>8.4f} {statistics.median(errors):>8.4f} {overall:>8.4f} "
                  f"{(output - merged).norm().item() / effect:>26.4f}")


if __name__ == "__main__":
    main()
