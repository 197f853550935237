"""A colour measure of class drift: how much a set of images shares the instance photos' palette.

Why: feature similarities (DINO, CLIP-I, the toy judge's embedding) weigh shape over colour, and counting exact
copies of the subject misses a class that only slides toward the subject's colours (the demo's "a photo of a ball"
turning red, orange and yellow where the base model draws purple, green and patterned balls too). Comparing colour
histograms sees that slide directly.

The palette of a set of images is a histogram over 12 hue bins of 30° (red centred on 0°), in HSV: every pixel adds
its chroma squared (chroma = saturation × value: 0 for greys, black and white), so vivid colours, which objects
have, count far more than the pale or dark ones of skies, sand, walls and floors. The pixels of all images of the set
are pooled (at most 128 px a side each) and the histogram is normalised. Two palettes are compared by histogram
intersection, Σ min(p, q) in [0, 1] (1 = the same palette, 0 = no hue in common; a set without any colour shares
nothing). Drift is the intersection of a model's class-prompt samples with the instance photos, adapter minus base
model, on the same seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

HUE_BINS = 12
MAX_SIDE = 128  # colour statistics need no more pixels than this per side


def hue_weights(image: Image.Image) -> np.ndarray:
    """(HUE_BINS,) unnormalised: the chroma² of the image's pixels summed per hue bin."""
    small = image.convert("RGB")
    if max(small.size) > MAX_SIDE:
        small = small.copy()
        small.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BOX)
    hsv = np.asarray(small.convert("HSV"), dtype=np.float64) / 255.0
    hue, chroma = hsv[..., 0].ravel(), (hsv[..., 1] * hsv[..., 2]).ravel()
    bins = np.floor(hue * HUE_BINS + 0.5).astype(int) % HUE_BINS  # red (0° and 360°) is one bin
    return np.bincount(bins, weights=chroma**2, minlength=HUE_BINS)


def colour_histogram(images: Sequence[Image.Image]) -> np.ndarray:
    """The palette of a set of images (see the module docstring); all zeros when no pixel has any colour."""
    if not images:
        raise ValueError("colour_histogram needs at least one image")
    total = np.sum([hue_weights(image) for image in images], axis=0)
    return total / total.sum() if total.sum() > 0 else total


def palette_overlap(first: np.ndarray, second: np.ndarray) -> float:
    """Histogram intersection of two palettes, in [0, 1]."""
    return float(np.minimum(first, second).sum())
