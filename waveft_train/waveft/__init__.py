"""WaveFT tuner: peft-compatible layers, faster and covering every PyWavelets family.

Call `register()` once (it is idempotent) to make peft's own entry points — `get_peft_model`,
`inject_adapter_in_model`, `PeftModel.from_pretrained`, diffusers' `unet.add_adapter` — build these layers for a
`peft.WaveFTConfig`. Nothing happens at import time, and importing this package (or its torch-free `families`
table, which the config validates against) loads neither torch nor peft: the tuner's classes load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .families import (
    ALLOWED_FAMILIES_TEXT,
    STOCK_PEFT_FAMILIES_TEXT,
    check_family,
    is_supported_family,
    stock_peft_reproduces_family,
)

_LAZY = {
    "WaveFTConfig": ("peft", "WaveFTConfig"),
    "WaveFTLayer": (".layer", "WaveFTLayer"),
    "WaveFTLinear": (".layer", "WaveFTLinear"),
    "WaveFTModel": (".model", "WaveFTModel"),
    "SparseIDWT": (".transform", "SparseIDWT"),
    "coefficient_locations": (".transform", "coefficient_locations"),
}

__all__ = [
    "ALLOWED_FAMILIES_TEXT",
    "STOCK_PEFT_FAMILIES_TEXT",
    "check_family",
    "is_registered",
    "is_supported_family",
    "register",
    "stock_peft_reproduces_family",
    "unregister",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name, __name__ if module_name.startswith(".") else None)
    return getattr(module, attribute)


def register() -> None:
    """Route peft's WAVEFT type to this package's tuner (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    from .model import WaveFTModel

    PEFT_TYPE_TO_TUNER_MAPPING[PeftType.WAVEFT] = WaveFTModel


def unregister() -> None:
    """Give peft's WAVEFT type back to peft's own reference tuner (used by tests and comparisons)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.waveft import WaveFTModel as StockWaveFTModel
    from peft.utils import PeftType

    PEFT_TYPE_TO_TUNER_MAPPING[PeftType.WAVEFT] = StockWaveFTModel


def is_registered() -> bool:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    from .model import WaveFTModel

    return PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.WAVEFT) is WaveFTModel
