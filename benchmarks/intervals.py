"""Bootstrap 95 % intervals for benchmark means over subjects and training seeds.

Why: a toy bench's cells are subjects × training seeds, and the two kinds of luck differ (a subject is easier or
harder for every method; a seed moves one run). The two-level bootstrap resamples subjects with replacement, then
each drawn subject's seeds with replacement, so an interval is as wide as both kinds of spread make it. A paired
difference (method A − method B) is taken per (subject, seed) before resampling, so what the two share cancels.
"""

from __future__ import annotations

import numpy as np

Groups = dict[str, list[float]]  # subject -> one value per training seed


def _resampled_means(groups: Groups, draws: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    subjects = [np.asarray(values, dtype=float) for values in groups.values() if values]
    means = np.empty(draws)
    for draw in range(draws):
        picked = rng.integers(len(subjects), size=len(subjects))
        means[draw] = np.mean([rng.choice(subjects[i], size=len(subjects[i])).mean() for i in picked])
    return means


def bootstrap_interval(groups: Groups, draws: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean over subjects of each subject's mean over seeds, with its 95 % two-level
    bootstrap interval. One subject with one seed gives a zero-width interval (nothing to resample)."""
    subjects = [values for values in groups.values() if values]
    if not subjects:
        raise ValueError("no values to summarize")
    mean = float(np.mean([np.mean(values) for values in subjects]))
    means = _resampled_means(groups, draws, seed)
    low, high = np.percentile(means, [2.5, 97.5])
    return mean, float(low), float(high)


def paired_differences(first: dict[tuple[str, int], float], second: dict[tuple[str, int], float]) -> Groups:
    """first − second per (subject, seed) present in both, grouped by subject."""
    groups: Groups = {}
    for key in sorted(set(first) & set(second)):
        groups.setdefault(key[0], []).append(first[key] - second[key])
    return groups


def format_interval(mean: float, low: float, high: float, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{mean:{sign}.2f} [{low:{sign}.2f}, {high:{sign}.2f}]"
