"""WaveFT on SDXL's two CLIP text encoders (`waveft.text_encoders`): their adapter config, and where they are saved.

Layout: an adapter folder (final or checkpoint) holds the UNet's adapter as always, plus one stock peft adapter folder
per trained encoder, named as the pipeline names the encoder:

    adapter/                  adapter_config.json + adapter_model.safetensors  (UNet, unchanged)
    adapter/text_encoder/     adapter_config.json + adapter_model.safetensors  (CLIPTextModel)
    adapter/text_encoder_2/   adapter_config.json + adapter_model.safetensors  (CLIPTextModelWithProjection)

so `PeftModel.from_pretrained(pipe.text_encoder, "adapter/text_encoder")` loads one (after `waveft_train.waveft.register()`,
or with stock peft's own WaveFT). Apps that read kohya files name the encoders `lora_te1_` and `lora_te2_`
(`KOHYA_PREFIXES`; export_files.py).

The encoders' layers take the waveft section's transform settings (scaling, wavelet_family, use_idwt,
random_loc_seed: locations derived exactly as peft derives them) with their own `n_frequency`; the UNet-only settings
(target_modules, patterns, bias, modules_to_save) do not apply to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from peft import WaveFTConfig

from waveft_train.adapter.files import ADAPTER_CONFIG, ADAPTER_NAME, ADAPTER_WEIGHTS, load_tensors, write_adapter_files
from waveft_train.config import WaveFTSection

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the pipeline's attribute names, and the subfolders' names
KOHYA_PREFIXES = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}  # kohya / ComfyUI / A1111 names for SDXL
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP's attention linears


def text_encoder_config(waveft: WaveFTSection) -> WaveFTConfig:
    """The peft WaveFTConfig of each text encoder's adapter."""
    kwargs = waveft.peft_kwargs()
    kwargs.update(target_modules=list(TARGET_MODULES), n_frequency=waveft.text_encoder_n_frequency or waveft.n_frequency,
                  n_frequency_pattern={}, exclude_modules=None, layers_to_transform=None, layers_pattern=None,
                  bias="none", modules_to_save=None, fan_in_fan_out=False)
    return WaveFTConfig(**kwargs)


def adapted_text_encoders(components) -> dict[str, torch.nn.Module]:
    """The components' text encoders that carry a WaveFT adapter, by pipeline name (none when they are frozen)."""
    encoders = {name: getattr(components, name, None) for name in TEXT_ENCODERS}
    return {name: encoder for name, encoder in encoders.items() if ADAPTER_NAME in (getattr(encoder, "peft_config", None)
                                                                                     or {})}


def has_text_encoder_adapters(folder: Path | str) -> list[str]:
    """The encoder subfolders of an adapter folder that hold an adapter."""
    return [name for name in TEXT_ENCODERS if (Path(folder) / name / ADAPTER_CONFIG).is_file()]


def write_text_encoder_adapters(folder: Path, encoders: Mapping[str, torch.nn.Module], *, base_model_name_or_path: str,
                                base_metadata: Mapping[str, str] | None = None) -> None:
    """One peft adapter folder per adapted encoder inside `folder` (an adapter folder being written)."""
    for name, encoder in encoders.items():
        (folder / name).mkdir(exist_ok=True)
        write_adapter_files(folder / name, encoder, base_model_name_or_path=base_model_name_or_path,
                            base_metadata=base_metadata)


def read_text_encoder_tensors(folder: Path, names: list[str] | tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """The saved tensors of each named encoder's adapter in `folder` (a checkpoint); UserError when one is missing."""
    return {name: load_tensors(Path(folder) / name, ADAPTER_WEIGHTS) for name in names}
