"""UNet module names in the two schemes SDXL files use: diffusers (`down_blocks.1.attentions.0…`) and ldm, the
original Stability layout (`input_blocks.4.1…`), and the kohya keys (`lora_unet_<name with _>`) built from either.

Why both: ComfyUI, A1111/Forge and kohya-style tools key SDXL weights by ldm names; diffusers, peft and LyCORIS
working on a diffusers UNet key them by diffusers names. A file meant for those apps must use names their key
mappers find (adapter/export_files.py says which naming it writes and why).

The map is computed from the diffusers UNet config, not typed in for SDXL, the way ComfyUI's
`comfy.utils.unet_to_diffusers` builds it: walk the blocks in order and count ldm's flat `input_blocks` /
`output_blocks` indices. So it also holds for other UNet2DConditionModel layouts, such as the embedded tiny
model's (two levels, one layer per block). Inside a transformer (`attentions.N`) both schemes use the same names;
inside a ResNet block they differ part by part (`norm1` is `in_layers.0`, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KOHYA_UNET_PREFIX = "lora_unet_"
NAMINGS = ("diffusers", "ldm")

# ResNet block parts: diffusers name -> ldm name (ldm's ResBlock has Sequential in_layers/emb_layers/out_layers).
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Modules outside the down/mid/up blocks.
TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def kohya_key(module_name: str) -> str:
    """`lora_unet_<name>` with dots as underscores: the module key of kohya/LyCORIS files."""
    return KOHYA_UNET_PREFIX + module_name.replace(".", "_")


def _per_level(value: int | list[int] | tuple[int, ...], levels: int) -> list[int]:
    return [int(value)] * levels if isinstance(value, int) else [int(item) for item in value]


def block_prefixes(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers block path -> ldm block path for a UNet2DConditionModel config (e.g. `unet.config`).

    Keys are whole blocks ('down_blocks.1.attentions.0' -> 'input_blocks.4.1', 'down_blocks.0.resnets.1' ->
    'input_blocks.2.0', 'up_blocks.0.upsamplers.0.conv' -> 'output_blocks.2.2.conv'). Raises ValueError for a
    mid block other than SDXL's cross-attention one.
    """
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    levels = len(down_types)
    layers = _per_level(config["layers_per_block"], levels)
    prefixes: dict[str, str] = {}

    index = 1  # input_blocks.0 is conv_in
    for level, block_type in enumerate(down_types):
        for layer in range(layers[level]):
            prefixes[f"down_blocks.{level}.resnets.{layer}"] = f"input_blocks.{index}.0"
            if "CrossAttn" in block_type:
                prefixes[f"down_blocks.{level}.attentions.{layer}"] = f"input_blocks.{index}.1"
            index += 1
        if level < levels - 1:  # diffusers: add_downsample = not is_final_block
            prefixes[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type == "UNetMidBlock2DCrossAttn":
        prefixes.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                         "mid_block.resnets.1": "middle_block.2"})
    elif mid_type is not None:
        raise ValueError(f"mid_block_type {mid_type!r} has no ldm name map here (SDXL's is UNetMidBlock2DCrossAttn).")

    index = 0
    up_layers = list(reversed(layers))
    for level, block_type in enumerate(up_types):
        attention = "CrossAttn" in block_type
        for layer in range(up_layers[level] + 1):
            prefixes[f"up_blocks.{level}.resnets.{layer}"] = f"output_blocks.{index}.0"
            if attention:
                prefixes[f"up_blocks.{level}.attentions.{layer}"] = f"output_blocks.{index}.1"
            if layer == up_layers[level] and level < len(up_types) - 1:  # the upsampler closes the block
                prefixes[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{index}.{2 if attention else 1}.conv"
            index += 1
    return prefixes


class UNetNames:
    """Module-name conversion for one UNet config; build once, convert many names."""

    def __init__(self, config: Mapping[str, Any]):
        self._blocks = block_prefixes(config)
        # Longest first, so 'down_blocks.1.attentions.1' is never matched by a shorter key's prefix test.
        self._ordered = sorted(self._blocks, key=len, reverse=True)

    def to_ldm(self, name: str) -> str:
        """The ldm path of the diffusers module path `name`; KeyError if `name` is outside the map."""
        if name in TOP_LEVEL:
            return TOP_LEVEL[name]
        for prefix in self._ordered:
            if name == prefix or name.startswith(prefix + "."):
                rest = name[len(prefix) + 1:]
                if ".resnets." in prefix and rest:
                    part, _, tail = rest.partition(".")
                    rest = RESNET_PARTS.get(part, part) + (f".{tail}" if tail else "")
                return self._blocks[prefix] + (f".{rest}" if rest else "")
        raise KeyError(f"{name!r} is not a module of this UNet's block layout")

    def name(self, diffusers_name: str, naming: str) -> str:
        """`diffusers_name` in the chosen naming ('diffusers' keeps it)."""
        if naming == "diffusers":
            return diffusers_name
        if naming == "ldm":
            return self.to_ldm(diffusers_name)
        raise ValueError(f"naming must be one of {', '.join(NAMINGS)}, got {naming!r}")

    def kohya_key(self, diffusers_name: str, naming: str) -> str:
        """The kohya key of `diffusers_name` in the chosen naming."""
        return kohya_key(self.name(diffusers_name, naming))
