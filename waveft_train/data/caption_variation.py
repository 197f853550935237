"""Caption dropout and tag shuffling: how a subject photo's caption varies from one training example to the next.

Every decision is drawn from a generator of its own, keyed by `train.seed` and the example's position in the run (the
k-th example drawn: the key of its noise and timestep in train/loop.py), never from a global RNG. So a resumed run
and any process layout vary the same examples the same way, and cached latents (which keep the first epoch's crops)
change nothing about it: the caption is chosen when the example is trained, not when its image is prepared.

- Dropout (`data.caption_dropout`): that share of the subject's examples trains with no caption, on the
  unconditional input SDXL samples guidance against: zero text embeddings, which the stock SDXL pipeline uses for a
  missing negative prompt (`force_zeros_for_empty_prompt`, on in SDXL-base and in waveft-train's sampling). So the
  unconditional branch that classifier-free guidance subtracts keeps being trained, as in kohya's
  `caption_dropout_rate` (which encodes "") or finetrainers' zeroed embeddings.
- Tag shuffling (`data.shuffle_tags`, `data.keep_tags`; kohya's `shuffle_caption` and `keep_tokens`) for tag-style
  captions ("sks dog, sitting, grass, sunny"): split on commas, strip, drop empty tags, keep the first `keep_tags` in
  place, shuffle the rest, re-join with ", ".

Only the subject's captions vary: class images keep their prompt, so prior preservation still teaches what the base
model made for it. Two draws are taken per example whatever the settings (dropout, then the order), so turning one
option on does not change the other's decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from waveft_train.config import DataSection

CAPTION_STREAM = 0xCA9_7105  # keys the caption draws apart from the other seeded streams (noise, crops, data order)
TAG_SEPARATOR = ","
TAG_JOINER = ", "


def caption_rng(seed: int, position: int) -> np.random.Generator:
    """The generator of one example's caption decisions: example `position` of the run under `seed`."""
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFF_FFFF_FFFF_FFFF, CAPTION_STREAM, position]))


def tags_of(caption: str) -> list[str]:
    """A tag-style caption's tags: split on commas, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(TAG_SEPARATOR) if tag.strip()]


def shuffled_tags(caption: str, keep: int, rng: np.random.Generator) -> str:
    """The caption with its tags after the first `keep` in a random order (from `rng`), joined with ", "."""
    tags = tags_of(caption)
    kept, rest = tags[:keep], tags[keep:]
    order = rng.permutation(len(rest)) if len(rest) > 1 else range(len(rest))
    return TAG_JOINER.join(kept + [rest[int(index)] for index in order])


@dataclass(frozen=True)
class CaptionVariation:
    """What varies a subject caption per example; `caption_for` gives example `position`'s caption (None: dropped)."""

    seed: int
    dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tags: int = 0

    @classmethod
    def of(cls, data: DataSection, seed: int) -> CaptionVariation:
        """From the data section (`caption_dropout`, `shuffle_tags`, `keep_tags`) and `train.seed`."""
        return cls(seed, data.caption_dropout, data.shuffle_tags, data.keep_tags)

    @property
    def varies(self) -> bool:
        return self.dropout > 0 or self.shuffle_tags

    def caption_for(self, caption: str, position: int) -> str | None:
        """Example `position`'s caption: None when dropped (train on the unconditional input), else `caption`,
        its tags shuffled when `shuffle_tags` is on."""
        if not self.varies:
            return caption
        rng = caption_rng(self.seed, position)
        if rng.random() < self.dropout:
            return None
        return shuffled_tags(caption, self.keep_tags, rng) if self.shuffle_tags else caption
