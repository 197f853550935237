"""`WaveFTModel`: peft's tuner plumbing (injection, merge_and_unload, several adapters) around our layers.

It is registered under peft's own `WAVEFT` type by `register()`, so configs and saved adapters stay
interchangeable with stock peft.
"""

from __future__ import annotations

import warnings

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_WAVEFT_TARGET_MODULES_MAPPING
from peft.utils.error import NoMatchingPeftModuleError
from peft.utils.other import get_pattern_key
from torch import nn

from .families import check_family
from .layer import Conv1D, WaveFTLayer, WaveFTLinear

ALLOWED_BIAS = ("none", "all", "waveft_only")


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear/Conv1D (or the base of an adapted one), else None."""
    if isinstance(module, WaveFTLayer):
        module = module.get_base_layer()
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


class WaveFTModel(BaseTuner):
    prefix: str = "waveft_"
    tuner_layer_cls = WaveFTLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_WAVEFT_TARGET_MODULES_MAPPING

    def _check_new_adapter_config(self, config) -> None:
        super()._check_new_adapter_config(config)
        check_family(config.wavelet_family)
        if config.bias not in ALLOWED_BIAS:
            raise ValueError(f"Invalid WaveFT bias {config.bias!r}; allowed values are {', '.join(ALLOWED_BIAS)}.")
        if config.n_frequency <= 0:
            raise ValueError(f"n_frequency must be a positive integer, got {config.n_frequency}.")
        for pattern, value in (config.n_frequency_pattern or {}).items():
            if value <= 0:
                raise ValueError(f"n_frequency_pattern[{pattern!r}] must be a positive integer, got {value}.")

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as error:
            config = self.peft_config[adapter_name]
            linear_names = [name for name, module in model.named_modules() if _linear_dims(module) is not None]
            endings = sorted({_short_name(name) for name in linear_names})
            shown = ", ".join(endings[:16]) + (", ..." if len(endings) > 16 else "")
            rule = (
                "A string is a regular expression that must match a whole module path (e.g. '.*attn1.to_q')"
                if isinstance(config.target_modules, str)
                else "Names in a list match the end of a module path"
            )
            raise NoMatchingPeftModuleError(
                f"WaveFT target_modules {_pattern_text(config.target_modules)} matched no module of the model "
                f"(exclude_modules={_pattern_text(config.exclude_modules)}, "
                f"layers_to_transform={config.layers_to_transform}). {rule}; "
                f"the model's {len(linear_names)} Linear modules end in: {shown or 'none'} "
                f"(e.g. {linear_names[0] if linear_names else 'none'})."
            ) from error

    def _proportional_n_frequency(self, model: nn.Module, config) -> dict[str, int]:
        """peft's allocation: the budget n_frequency·layers split by d_in·d_out, at least 1 per layer."""
        dims = {}
        for name, module in model.named_modules():
            if check_target_module_exists(config, name) and _linear_dims(module) is not None:
                dims[name] = _linear_dims(module)
        if not dims:
            raise NoMatchingPeftModuleError("No target modules found for proportional parameter allocation.")
        total = sum(d_in * d_out for d_in, d_out in dims.values())
        budget = config.n_frequency * len(dims)
        return {name: max(1, round(d_in * d_out / total * budget)) for name, (d_in, d_out) in dims.items()}

    def _n_frequency_for(self, config, adapter_name: str, key: str, kwargs: dict) -> int:
        if config.proportional_parameters:
            cache = self.__dict__.setdefault("_proportional_params_cache", {})
            if adapter_name not in cache:
                cache[adapter_name] = self._proportional_n_frequency(self.model, config)
            if key in cache[adapter_name]:
                return cache[adapter_name][key]
        if "n_frequency" in kwargs:
            return kwargs["n_frequency"]
        pattern_key = get_pattern_key(list(config.n_frequency_pattern or {}), key)
        return (config.n_frequency_pattern or {}).get(pattern_key, config.n_frequency)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        dims = _linear_dims(target)
        if dims is None:
            raise TypeError(
                f"WaveFT target module {current_key!r} is a {type(target).__name__}; only torch.nn.Linear layers "
                "can be adapted. Narrow target_modules (or add it to exclude_modules)."
            )
        n_frequency = self._n_frequency_for(config, adapter_name, current_key, kwargs)
        d_in, d_out = dims
        if not 0 < n_frequency <= d_in * d_out:
            raise ValueError(
                f"n_frequency={n_frequency} does not fit layer {current_key!r} of size {d_out}x{d_in} "
                f"(allowed: 1 to {d_out * d_in}). Lower waveft.n_frequency, or set a smaller value for this layer "
                "in n_frequency_pattern."
            )
        if isinstance(target, WaveFTLayer):
            target.update_layer(adapter_name, n_frequency, config=config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Linear) and config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting it to False.",
                          stacklevel=2)
            config.fan_in_fan_out = False
        elif isinstance(base, Conv1D) and not config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting it to True.", stacklevel=2)
            config.fan_in_fan_out = True
        new_module = WaveFTLinear(target, adapter_name, config=config, n_frequency=n_frequency)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.__dict__.get("_proportional_params_cache", {}).pop(adapter_name, None)


def _short_name(module_name: str) -> str:
    """The last path component, or the last two when the last is an index (to_out.0)."""
    parts = module_name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _pattern_text(pattern) -> str:
    if pattern is None:
        return "None"
    if isinstance(pattern, str):
        return repr(pattern)
    return "[" + ", ".join(repr(str(item)) for item in sorted(pattern)) + "]"

