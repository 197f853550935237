"""`waveft-train params` and the adapter preflight: the UNet's architecture on the meta device, no weights."""

from __future__ import annotations

from pathlib import Path

from waveft_train.config import TrainConfig
from waveft_train.errors import UserError


def adapter_on_meta_unet(config: TrainConfig):
    """The config's UNet on the meta device (no weights) with the WaveFT adapter injected.

    Catches what only the model can tell (target_modules that match nothing, an n_frequency larger than a
    layer) in seconds, before gigabytes of weights load; the tuner's own errors become UserErrors.
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from peft import WaveFTConfig, inject_adapter_in_model

    from waveft_train import waveft
    from waveft_train.models import ALLOWED_MODELS, first_line, offline_note, resolve_pretrained

    path = resolve_pretrained(config.model.pretrained)
    try:
        unet_config = UNet2DConditionModel.load_config(path, subfolder="unet", revision=config.model.revision)
    except (OSError, ValueError) as error:
        raise UserError(
            f"Could not read the UNet config of {config.model.pretrained!r} (model.pretrained): "
            f"{first_line(error).rstrip('.')}.{offline_note(not Path(path).exists())} "
            f"model.pretrained takes {ALLOWED_MODELS}."
        ) from None
    waveft.register()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        try:
            inject_adapter_in_model(WaveFTConfig(**config.waveft.peft_kwargs()), unet)
        except (ValueError, TypeError) as error:
            raise UserError(f"The waveft section does not fit the UNet of {config.model.pretrained}: {error}") from None
    check_pattern_keys(config, [name for name, module in unet.named_modules() if isinstance(module, waveft.WaveFTLayer)])
    return unet


def check_pattern_keys(config: TrainConfig, adapted: list[str]) -> None:
    """Every n_frequency_pattern key must set some layer's n_frequency: peft skips a key that matches nothing."""
    from peft.utils.other import get_pattern_key

    keys = list(config.waveft.n_frequency_pattern)
    used = {get_pattern_key(keys, name) for name in adapted}  # peft's rule: the first key that matches a layer wins
    unused = [key for key in keys if key not in used]
    if unused:
        example = adapted[0] if adapted else "none"
        raise UserError(
            f"waveft.n_frequency_pattern key(s) {', '.join(map(repr, unused))} set no adapted layer of the UNet of "
            f"{config.model.pretrained}: they match none, or only layers an earlier key already sets (the first "
            f"matching key wins), so they would change nothing. As in peft, a key is a regular expression that must "
            f"match the end of a layer's name (e.g. {example!r}): 'attn2.to_k' sets every cross-attention to_k, "
            "'down_blocks.1.attentions.0.*' every layer of one block. `waveft-train params` lists the adapted layers."
        )


def describe_parameters(config: TrainConfig) -> str:
    """Per-layer n_frequency and totals, from the UNet's config on the meta device (no weights are loaded)."""
    from waveft_train import waveft

    unet = adapter_on_meta_unet(config)
    rows, total, lora_unit = [], 0, 0
    for name, module in unet.named_modules():
        if isinstance(module, waveft.WaveFTLayer):
            n = module.waveft_n_frequency["default"]
            rows.append(f"{name:<72} {module.out_features:>5}x{module.in_features:<5} {n:>8}")
            base_bias = module.get_base_layer().bias  # waveft_only trains it, as peft's <method>_only does
            total += n + (base_bias.numel() if config.waveft.bias == "waveft_only" and base_bias is not None else 0)
            lora_unit += module.in_features + module.out_features
    lines = [f"{'layer':<72} {'d_out x d_in':>11} {'n_freq':>8}", *rows, "",
             f"adapted layers: {len(rows)}", f"trainable parameters: {total:,}",
             f"LoRA with the same budget: rank {total / lora_unit:.2f} (one LoRA rank costs {lora_unit:,} parameters here)"]
    return "\n".join(lines)
