"""`waveft-train params`: per-layer n_frequency and totals, from the UNet's architecture on the meta device."""

from __future__ import annotations

from waveft_train.config import ModelSection, WaveFTSection
from waveft_train.preflight import adapter_on_meta_unet


def describe_parameters(model: ModelSection, waveft: WaveFTSection) -> str:
    """Per-layer n_frequency, the trainable total and the LoRA rank with the same budget (no weights are loaded)."""
    from waveft_train import waveft as tuner

    unet = adapter_on_meta_unet(model, waveft)
    rows, total, lora_unit = [], 0, 0
    for name, module in unet.named_modules():
        if isinstance(module, tuner.WaveFTLayer):
            n = module.waveft_n_frequency["default"]
            rows.append(f"{name:<72} {module.out_features:>5}x{module.in_features:<5} {n:>8}")
            base_bias = module.get_base_layer().bias  # waveft_only trains it, as peft's <method>_only does
            total += n + (base_bias.numel() if waveft.bias == "waveft_only" and base_bias is not None else 0)
            lora_unit += module.in_features + module.out_features
    lines = [f"{'layer':<72} {'d_out x d_in':>11} {'n_freq':>8}", *rows, "",
             f"adapted layers: {len(rows)}", f"trainable parameters: {total:,}",
             f"LoRA with the same budget: rank {total / lora_unit:.2f} (one LoRA rank costs {lora_unit:,} parameters here)"]
    return "\n".join(lines)
