"""Saved WaveFT adapters at work: load one onto its base UNet, switch adapters off.

Reading and checking adapter folders is files.py's job; this module puts a checked adapter onto a model (the
exports in export.py build on it).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from waveft_train.adapter.files import ADAPTER_CONFIG, AdapterFiles, check_fit, read_adapter
from waveft_train.adapter.text_encoders import has_text_encoder_adapters
from waveft_train.common.errors import UserError
from waveft_train.common.paths import is_single_file
from waveft_train.models.loading import SDXLComponents, load_components, load_unet
from waveft_train.models.single_file import SingleFileBase, file_sha256
from waveft_train.models.sources import ALLOWED_MODELS
from waveft_train.waveft import register

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

logger = logging.getLogger(__name__)


@contextmanager
def adapters_disabled(unet: torch.nn.Module, *more: torch.nn.Module | None) -> Iterator[None]:
    """Run `unet` (and `more`: the text encoders, adapted or not; None is skipped) as the plain base model inside the
    block (every peft adapter layer calls its base layer)."""
    models = [unet, *(model for model in more if model is not None)]
    layers = [module for model in models for module in model.modules()
              if isinstance(module, BaseTunerLayer) and not module.disable_adapters]
    # enable_adapters(True) marks the adapter weights trainable: put every flag back as it was (frozen or training).
    trainable = [(parameter, parameter.requires_grad) for model in models for parameter in model.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for parameter, requires_grad in trainable:
            parameter.requires_grad_(requires_grad)


@dataclass(frozen=True)
class BaseModel:
    """The base model an adapter goes onto, as `load_components` takes it."""

    name: str  # model.pretrained: a built-in name, a hub id, a folder or a single-file checkpoint
    config: str | None = None  # model.config of a single-file checkpoint


def base_model_of(adapter: AdapterFiles, base: str | None, base_config: str | None = None) -> BaseModel:
    """`base` (--base) if given, else the base the adapter names. A single-file base must be the very file the adapter
    was trained on (its recorded size and sha256); a `base` given by hand is used as given (with a warning when it is
    another file). `base_config` (--base-config) replaces the recorded model.config of a single-file base."""
    recorded = SingleFileBase.from_metadata(adapter.metadata, adapter.config.base_model_name_or_path or "")
    if base is not None and str(base).strip():
        name = str(base).strip()
        if recorded is not None and is_single_file(name) and Path(name).expanduser().is_file() and \
                file_sha256(Path(name).expanduser()) != recorded.sha256:
            logger.warning("--base %s is not the checkpoint the adapter %s was trained on, %s; it is applied to "
                           "--base as asked.", name, adapter.folder, recorded.describe())
        config = base_config or (recorded.config if recorded is not None and is_single_file(name) else None)
    else:
        name = adapter.config.base_model_name_or_path
        if not name:
            raise UserError(
                f"{adapter.folder / ADAPTER_CONFIG} does not name its base model (base_model_name_or_path is empty). "
                f"Pass the base model with --base: {ALLOWED_MODELS}."
            )
        if recorded is not None:
            check_recorded_file(adapter, recorded)
        config = base_config or (recorded.config if recorded is not None else None)
    if base_config is not None and not is_single_file(name):
        raise UserError(f"--base-config is read only for a single-file base (a .safetensors checkpoint); the base "
                        f"{name} carries its own configs. Leave --base-config out.")
    return BaseModel(str(name), config)


def check_recorded_file(adapter: AdapterFiles, recorded: SingleFileBase) -> None:
    """The single-file base is where the adapter recorded it, with the same size and sha256; else which file is
    needed, by name and hash, and how to pass it."""
    trained_on = f"The adapter {adapter.folder} was trained on the single-file checkpoint {recorded.describe()}"
    pass_it = (f"Pass that file with --base /path/to/{recorded.path.name}; civitai shows its hash as AutoV2 "
               f"{recorded.autov2}.")
    if not recorded.path.is_file():
        raise UserError(f"{trained_on}, which is no longer at {recorded.path}. {pass_it}")
    size = recorded.path.stat().st_size
    if size != recorded.size or file_sha256(recorded.path) != recorded.sha256:
        raise UserError(f"{trained_on}, but {recorded.path} now holds another file ({size:,} bytes, sha256 "
                        f"{file_sha256(recorded.path)}). Put the original back, or {pass_it[0].lower()}{pass_it[1:]} "
                        f"To apply the adapter to the file now there on purpose, pass --base {recorded.path}.")


def inject(unet: torch.nn.Module, adapter: AdapterFiles, base_name: str, scale: float) -> PeftModel:
    """Wrap `unet` (modified in place) with the adapter's layers, check the saved tensors fit, load them."""
    register()
    config = copy.deepcopy(adapter.config)
    config.inference_mode = True
    config.init_weights = True  # zeros, no RNG use: the saved spectra replace them below
    misfit = f"The adapter {adapter.folder} does not fit the base model '{base_name}'"
    try:
        model = PeftModel(unet, config)
    except (ValueError, TypeError) as error:  # no target module matched, n_frequency too large for a layer, ...
        raise UserError(f"{misfit}: {error} Pass the model it was trained on with --base.") from None

    expected = {key: tuple(value.shape) for key, value in
                get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    check_fit(expected, adapter.shapes, misfit=misfit, remedy=f"Pass the model it was trained on with --base, or fix "
              f"the adapter config (n_frequency {adapter.config.n_frequency}, target_modules).")

    set_peft_model_state_dict(model, adapter.load_tensors())
    if scale != 1.0:
        _scale_adapters(unet, scale)
    model.eval()
    model.requires_grad_(False)
    return model


def _scale_adapters(unet: torch.nn.Module, scale: float) -> None:
    """Multiply every WaveFT adapter's ΔW by `scale`, through each layer's `waveft_scaling` factor.

    ΔW is linear in that factor, so 1 is the adapter as trained and 0 makes ΔW zero. At 0 the layers are also
    switched off, so the output is the base model's bit for bit, whichever arithmetic path the layer's forward
    takes (W + 0 in one matmul, or x·Wᵀ plus a zero correction, can round differently from the plain layer).
    """
    for module in unet.modules():
        scaling = getattr(module, "waveft_scaling", None)
        if isinstance(scaling, dict):
            for name in scaling:
                scaling[name] = scaling[name] * float(scale)
            if scale == 0 and isinstance(module, BaseTunerLayer):
                module.enable_adapters(False)


def load_adapter_unet(
    adapter_dir: Path | str, base: str | None, *, scale: float = 1.0, dtype: torch.dtype = torch.float32,
    base_config: str | None = None,
) -> tuple[SDXLComponents, UNet2DConditionModel]:
    """Load the base model's components and apply a saved WaveFT adapter to its UNet.

    `base=None` uses the adapter's own `base_model_name_or_path` (`base_model_of`). `scale` multiplies every layer's ΔW through
    its `waveft_scaling` (0 = the base model exactly, 1 = as trained; other values interpolate/extrapolate). The adapter is
    injected into `components.unet` in place, so the returned UNet *is* `components.unet` (text-encoder adapters saved
    with it go into `components.text_encoder*` the same way); use `adapters_disabled(unet, *encoders)` for base-model
    outputs. Everything that does not fit raises `UserError`.
    """
    if not math.isfinite(scale):
        raise UserError(f"The adapter scale {scale} is not a finite number; 0 = base model, 1 = as trained.")
    adapter = read_adapter(adapter_dir)
    chosen = base_model_of(adapter, base, base_config)
    components = load_components(chosen.name, weight_dtype=dtype, config=chosen.config)
    model = inject(components.unet, adapter, chosen.name, scale)
    load_text_encoder_adapters(adapter.folder, components, chosen.name, scale)
    components.scheduler = scheduler_for(adapter, components.scheduler)
    return components, model.base_model.model


def load_text_encoder_adapters(adapter_dir: Path, components, base_name: str, scale: float = 1.0) -> list[str]:
    """Put the text encoders' adapters saved beside the UNet's (`<adapter>/text_encoder*/`, waveft.text_encoders)
    into `components`' encoders, in place, at the same `scale`; returns the names of the encoders adapted."""
    names = has_text_encoder_adapters(adapter_dir)
    for name in names:
        inject(getattr(components, name), read_adapter(Path(adapter_dir) / name), base_name, scale)
    return names


def scheduler_for(adapter: AdapterFiles, scheduler):
    """The base model's scheduler, set to the prediction type the adapter was trained for (when it records one)."""
    if adapter.prediction_type is None:
        return scheduler
    return type(scheduler).from_config(scheduler.config, prediction_type=adapter.prediction_type)


def load_adapted_unet(
    adapter_dir: Path | str, base: str | None = None, base_config: str | None = None
) -> tuple[AdapterFiles, str, dict[str, torch.Tensor], PeftModel]:
    """The base UNet (fp32, frozen) with the adapter loaded and checked as `export` checks it, for exports of the
    update itself rather than of the merged model (export_files.py).

    Returns (adapter, base model name, base values, model). Loading overwrites in place the base tensors the adapter
    file holds (e.g. `<module>.base_layer.bias` of `bias: waveft_only`), so their base values, keyed by the plain
    UNet's parameter names, are copied first: an update is the loaded value minus them.
    """
    adapter = read_adapter(adapter_dir)
    chosen = base_model_of(adapter, base, base_config)
    unet = load_unet(chosen.name, dtype=torch.float32, config=chosen.config)
    base_values = replaced_base_values(unet, adapter)
    return adapter, chosen.name, base_values, inject(unet, adapter, chosen.name, 1.0)


def replaced_base_values(unet: torch.nn.Module, adapter: AdapterFiles) -> dict[str, torch.Tensor]:
    """Copies of the base tensors that loading `adapter` will overwrite in place (e.g. `<module>.base_layer.bias` of
    `bias: waveft_only`), keyed by the plain UNet's parameter names: take them before `inject`."""
    plain = unet.state_dict()
    names = {key.removeprefix("base_model.model.").replace(".base_layer.", ".") for key in adapter.shapes}
    return {name: plain[name].detach().clone() for name in names if name in plain}
