"""Which wavelet families WaveFT accepts, and which of them stock peft reproduces: one torch-free table.

The config (which imports no torch) validates `waveft.wavelet_family` against it, the tuner checks it again when a
layer is built, and the start-of-training warning and model card use the stock-peft subset.
"""

from __future__ import annotations

import re

# PyWavelets' documented ranges; "haar" is db1's other name.
FAMILY_RANGES: dict[str, tuple[int, int]] = {"db": (1, 38), "sym": (2, 20), "coif": (1, 17)}
ALLOWED_FAMILIES_TEXT = "db1-db38, sym2-sym20, coif1-coif17, and haar (= db1)"
# peft's own WaveFT (0.18-0.21) reproduces adapters of these families only: it has no filters for db11+ and
# sym11+, its coif4 table is off (its low-pass filter sums to 1.024, not 1: outputs ~3 % off PyWavelets'), and its
# coif5 builds a 9×9 ΔW whatever the layer. (Its config refuses the name "haar"; waveft-train writes db1.)
STOCK_PEFT_RANGES: dict[str, tuple[int, int]] = {"db": (1, 10), "sym": (2, 10), "coif": (1, 3)}
STOCK_PEFT_FAMILIES_TEXT = "db1-db10, sym2-sym10 and coif1-coif3"


def _family_in(family: str, ranges: dict[str, tuple[int, int]]) -> bool:
    if family == "haar":
        return True
    match = re.fullmatch(r"(db|sym|coif)(\d+)", str(family))
    if not match:
        return False
    low, high = ranges[match.group(1)]
    return low <= int(match.group(2)) <= high


def is_supported_family(family: str) -> bool:
    return _family_in(family, FAMILY_RANGES)


def stock_peft_reproduces_family(family: str) -> bool:
    """Whether peft's own WaveFT gives this package's outputs for an adapter of this family (ours covers them all)."""
    return _family_in(family, STOCK_PEFT_RANGES)


def check_family(family: str) -> None:
    if not is_supported_family(family):
        raise ValueError(
            f"Unknown wavelet_family {family!r}. WaveFT supports the PyWavelets families {ALLOWED_FAMILIES_TEXT}."
        )
