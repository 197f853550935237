"""WaveFT tuner: peft-compatible layers, faster and covering every PyWavelets family.

Call `register()` once (it is idempotent) to make peft's own entry points — `get_peft_model`,
`inject_adapter_in_model`, `PeftModel.from_pretrained`, diffusers' `unet.add_adapter` — build these layers for a
`peft.WaveFTConfig`. Nothing happens at import time.
"""

from peft import WaveFTConfig
from peft.utils import PeftType

from .layer import WaveFTLayer, WaveFTLinear
from .model import WaveFTModel
from .transform import (
    ALLOWED_FAMILIES_TEXT,
    STOCK_PEFT_FAMILIES_TEXT,
    SparseIDWT,
    coefficient_locations,
    is_supported_family,
    stock_peft_reproduces_family,
)

__all__ = [
    "ALLOWED_FAMILIES_TEXT",
    "STOCK_PEFT_FAMILIES_TEXT",
    "SparseIDWT",
    "WaveFTConfig",
    "WaveFTLayer",
    "WaveFTLinear",
    "WaveFTModel",
    "coefficient_locations",
    "is_registered",
    "is_supported_family",
    "register",
    "stock_peft_reproduces_family",
    "unregister",
]


def register() -> None:
    """Route peft's WAVEFT type to this package's tuner (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    PEFT_TYPE_TO_TUNER_MAPPING[PeftType.WAVEFT] = WaveFTModel


def unregister() -> None:
    """Give peft's WAVEFT type back to peft's own reference tuner (used by tests and comparisons)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.waveft import WaveFTModel as StockWaveFTModel

    PEFT_TYPE_TO_TUNER_MAPPING[PeftType.WAVEFT] = StockWaveFTModel


def is_registered() -> bool:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    return PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.WAVEFT) is WaveFTModel
