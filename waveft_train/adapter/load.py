"""Saved WaveFT adapters at work: load one onto its base UNet, switch adapters off.

Reading and checking adapter folders is files.py's job; this module puts a checked adapter onto a model (the
exports in export.py build on it).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from waveft_train.adapter.files import ADAPTER_CONFIG, AdapterFiles, check_fit, read_adapter
from waveft_train.common.errors import UserError
from waveft_train.models.loading import ALLOWED_MODELS, SDXLComponents, load_components, load_unet
from waveft_train.waveft import register

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from peft import PeftModel


@contextmanager
def adapters_disabled(unet: torch.nn.Module) -> Iterator[None]:
    """Run `unet` as the plain base model inside the block (every peft adapter layer calls its base layer)."""
    layers = [module for module in unet.modules() if isinstance(module, BaseTunerLayer) and not module.disable_adapters]
    # enable_adapters(True) marks the adapter weights trainable: put every flag back as it was (frozen or training).
    trainable = [(parameter, parameter.requires_grad) for parameter in unet.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for parameter, requires_grad in trainable:
            parameter.requires_grad_(requires_grad)


def base_model_of(adapter: AdapterFiles, base: str | None) -> str:
    if base is not None and str(base).strip():
        return str(base)
    named = adapter.config.base_model_name_or_path
    if not named:
        raise UserError(
            f"{adapter.folder / ADAPTER_CONFIG} does not name its base model (base_model_name_or_path is empty). "
            f"Pass the base model with --base: {ALLOWED_MODELS}."
        )
    return str(named)


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
    adapter_dir: Path | str, base: str | None, *, scale: float = 1.0, dtype: torch.dtype = torch.float32
) -> tuple[SDXLComponents, UNet2DConditionModel]:
    """Load the base model's components and apply a saved WaveFT adapter to its UNet.

    `base=None` uses the adapter's own `base_model_name_or_path`. `scale` multiplies every layer's ΔW through
    its `waveft_scaling` (0 = the base model exactly, 1 = as trained; other values interpolate/extrapolate). The adapter is
    injected into `components.unet` in place, so the returned UNet *is* `components.unet`; use
    `adapters_disabled(unet)` for base-model outputs. Everything that does not fit raises `UserError`.
    """
    if not math.isfinite(scale):
        raise UserError(f"The adapter scale {scale} is not a finite number; 0 = base model, 1 = as trained.")
    adapter = read_adapter(adapter_dir)
    base_name = base_model_of(adapter, base)
    components = load_components(base_name, weight_dtype=dtype)
    model = inject(components.unet, adapter, base_name, scale)
    components.scheduler = scheduler_for(adapter, components.scheduler)
    return components, model.base_model.model


def scheduler_for(adapter: AdapterFiles, scheduler):
    """The base model's scheduler, set to the prediction type the adapter was trained for (when it records one)."""
    if adapter.prediction_type is None:
        return scheduler
    return type(scheduler).from_config(scheduler.config, prediction_type=adapter.prediction_type)


def load_adapted_unet(
    adapter_dir: Path | str, base: str | None = None
) -> tuple[AdapterFiles, str, dict[str, torch.Tensor], PeftModel]:
    """The base UNet (fp32, frozen) with the adapter loaded and checked as `export` checks it, for exports of the
    update itself rather than of the merged model (export_files.py).

    Returns (adapter, base model name, base values, model). Loading overwrites in place the base tensors the adapter
    file holds (e.g. `<module>.base_layer.bias` of `bias: waveft_only`), so their base values, keyed by the plain
    UNet's parameter names, are copied first: an update is the loaded value minus them.
    """
    adapter = read_adapter(adapter_dir)
    base_name = base_model_of(adapter, base)
    unet = load_unet(base_name, dtype=torch.float32)
    base_values = replaced_base_values(unet, adapter)
    return adapter, base_name, base_values, inject(unet, adapter, base_name, 1.0)


def replaced_base_values(unet: torch.nn.Module, adapter: AdapterFiles) -> dict[str, torch.Tensor]:
    """Copies of the base tensors that loading `adapter` will overwrite in place (e.g. `<module>.base_layer.bias` of
    `bias: waveft_only`), keyed by the plain UNet's parameter names: take them before `inject`."""
    plain = unet.state_dict()
    names = {key.removeprefix("base_model.model.").replace(".base_layer.", ".") for key in adapter.shapes}
    return {name: plain[name].detach().clone() for name in names if name in plain}
