"""A WaveFT adapter on a stock diffusers pipeline, in one line:

    waveft_train.load_adapter(pipe, "outputs/dog/adapter", scale=1.0)   # or the single file of --format waveft
    waveft_train.set_adapter_scale(pipe, 0.5)                            # between generations
    waveft_train.unload_adapter(pipe)                                    # the base model again, biases included

The adapter's layers go into `pipe.unet` in place (no wrapper around it, so the pipeline works as before), through
the same checked path `waveft-train sample` uses (load.inject): the same layers, the same outputs. A single file is
turned back into the adapter it was exported from: its metadata holds the WaveFT settings, its tensors the spectra;
the locations it stores must equal the ones peft derives from those settings, or the file is refused.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import WaveFTConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from waveft_train.adapter.export_files import FORMAT_KEY, WAVEFT_FORMAT_VERSION
from waveft_train.adapter.files import AdapterFiles, read_adapter
from waveft_train.adapter.load import inject, replaced_base_values, scheduler_for
from waveft_train.adapter.text_encoders import has_text_encoder_adapters
from waveft_train.common.errors import UserError
from waveft_train.models.unet_names import UNetNames, kohya_key
from waveft_train.waveft import WaveFTLayer

ATTRIBUTE = "_waveft_loaded"  # on the pipeline's UNet: what unload_adapter needs to put back


@dataclass(frozen=True)
class _SingleFileAdapter(AdapterFiles):
    """An exported single file, seen as the adapter folder it came from (tensors already in memory)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    locations: dict[str, torch.Tensor] = field(default_factory=dict)  # per module: the stored (2, n) locations

    def load_tensors(self) -> dict[str, torch.Tensor]:
        return self.tensors


@dataclass
class _Loaded:
    model: object  # the PeftModel that holds the injected layers
    base_scalings: dict[tuple[int, str], float]  # per layer and adapter: waveft_scaling at scale 1
    base_biases: dict[str, torch.Tensor]  # biases the adapter replaced (bias: waveft_only), to scale and restore
    trained_biases: dict[str, torch.Tensor]
    scale: float


def load_adapter(pipe, path: str | Path, *, scale: float = 1.0) -> None:
    """Put the WaveFT adapter at `path` (an adapter folder, or a `.safetensors` file from `export --format waveft`)
    into `pipe.unet`, at strength `scale` (0 = the base model, 1 = as trained). One adapter at a time."""
    _check_scale(scale)
    unet = pipe.unet
    if getattr(unet, ATTRIBUTE, None) is not None:
        raise UserError("The pipeline already holds a WaveFT adapter; waveft_train.unload_adapter(pipe) first.")
    path = Path(path).expanduser()
    adapter = _read_single_file(path, unet) if path.is_file() else read_adapter(path)
    if path.is_dir() and has_text_encoder_adapters(path):
        logging.getLogger(__name__).warning(
            "%s also holds text-encoder adapters (%s); load_adapter applies the UNet's only. Load them with "
            "PeftModel.from_pretrained(pipe.text_encoder, '<adapter>/text_encoder') (docs/training.md#text-encoders).",
            path, ", ".join(has_text_encoder_adapters(path)))
    base_biases = replaced_base_values(unet, adapter)
    model = inject(unet, adapter, "the pipeline's model", 1.0)
    scalings = {(id(layer), name): value for layer in unet.modules() if isinstance(layer, WaveFTLayer)
                for name, value in layer.waveft_scaling.items()}
    trained = {name: unet.get_parameter(name).detach().clone() for name in base_biases}
    setattr(unet, ATTRIBUTE, _Loaded(model, scalings, base_biases, trained, 1.0))
    try:
        if isinstance(adapter, _SingleFileAdapter):
            _check_locations(unet, adapter)
        set_adapter_scale(pipe, scale)
    except BaseException:  # a refused file leaves the pipeline as it was
        unload_adapter(pipe)
        raise
    pipe.scheduler = scheduler_for(adapter, pipe.scheduler)


def set_adapter_scale(pipe, scale: float) -> None:
    """The loaded adapter's strength: ΔW, and any trained bias's change, times `scale` (0 switches its layers off: the
    base model bit for bit)."""
    _check_scale(scale)
    loaded = _loaded(pipe)
    for layer in pipe.unet.modules():
        if isinstance(layer, WaveFTLayer):
            for name in layer.waveft_scaling:
                layer.waveft_scaling[name] = loaded.base_scalings[id(layer), name] * float(scale)
            layer.enable_adapters(scale != 0)
    with torch.no_grad():
        for name, base in loaded.base_biases.items():
            trained = loaded.trained_biases[name]
            pipe.unet.get_parameter(name).copy_(base if scale == 0 else base + scale * (trained - base))
    pipe.unet.requires_grad_(False)  # enable_adapters marks adapter weights trainable
    loaded.scale = float(scale)


def unload_adapter(pipe) -> None:
    """Take the adapter's layers out of `pipe.unet` and put back any bias it changed."""
    loaded = _loaded(pipe)
    unet = pipe.unet
    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name) if parent_name else unet, child, module.get_base_layer())
    with torch.no_grad():
        for name, value in loaded.base_biases.items():
            unet.get_parameter(name).copy_(value)
    for attribute in ("peft_config", "_hf_peft_config_loaded", ATTRIBUTE):
        if attribute in vars(unet):  # what loading set on this UNet (not the class's defaults)
            delattr(unet, attribute)


def _loaded(pipe) -> _Loaded:
    loaded = getattr(pipe.unet, ATTRIBUTE, None)
    if loaded is None:
        raise UserError("The pipeline holds no WaveFT adapter; waveft_train.load_adapter(pipe, path) first.")
    return loaded


def _check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise UserError(f"The adapter scale {scale} is not a finite number; 0 = base model, 1 = as trained.")


def _read_single_file(path: Path, unet: torch.nn.Module) -> _SingleFileAdapter:
    """The adapter a `--format waveft` file was exported from, its keys named for `unet`'s modules."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # not a safetensors file
        raise UserError(f"{path} is neither an adapter folder nor a readable .safetensors file ({error}).") from None
    if metadata.get(FORMAT_KEY) != "waveft":
        raise UserError(f"{path} is not a WaveFT file (`waveft-train export --format waveft`; it says format "
                        f"{metadata.get(FORMAT_KEY)!r}). Load an adapter folder or such a file.")
    version = int(metadata.get("waveft.format_version", "0"))
    if version > WAVEFT_FORMAT_VERSION:
        raise UserError(f"{path} is WaveFT format version {version}, newer than this waveft-train reads "
                        f"({WAVEFT_FORMAT_VERSION}); upgrade waveft-train.")
    settings = json.loads(metadata["waveft.settings"])
    config = WaveFTConfig(**settings, base_model_name_or_path=metadata.get("waveft.base_model"))
    names = UNetNames(unet.config) if metadata.get("waveft.naming") == "ldm" else None
    module_of = {(names.kohya_key(name, "ldm") if names else kohya_key(name)): name
                 for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear)}
    plain = unet.state_dict()
    peft_tensors, locations = {}, {}
    for key, tensor in tensors.items():
        prefix, _, suffix = key.rpartition(".")
        if prefix not in module_of:
            raise UserError(f"{path} holds {key}, which names no linear layer of this pipeline's UNet: it was made "
                            "for another model.")
        module = module_of[prefix]
        if suffix == "waveft_spectrum":
            peft_tensors[f"base_model.model.{module}.waveft_spectrum"] = tensor.float()
        elif suffix == "waveft_locations":
            locations[module] = tensor.long()
        elif suffix == "diff_b":
            bias = plain[f"{module}.bias"]
            peft_tensors[f"base_model.model.{module}.base_layer.bias"] = bias + tensor.to(bias.dtype)
    shapes = {key: tuple(tensor.shape) for key, tensor in peft_tensors.items()}
    return _SingleFileAdapter(folder=path, config=config, weights_path=path, shapes=shapes, metadata=metadata,
                              tensors=peft_tensors, locations=locations)


def _check_locations(unet: torch.nn.Module, adapter: _SingleFileAdapter) -> None:
    """The file's stored locations are the ones the injected layers derived from its settings (else: refuse)."""
    stored = adapter.locations
    for name, layer in unet.named_modules():
        if isinstance(layer, WaveFTLayer):
            module = name.removeprefix("base_model.model.")
            for derived in layer.waveft_indices.values():
                if module not in stored or not torch.equal(stored[module], derived.long().cpu()):
                    raise UserError(f"The coefficient locations of {module} in {adapter.folder} differ from those "
                                    "its settings give on this torch; the file cannot be loaded exactly.")
