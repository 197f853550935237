"""benchmarks/intervals.py: the two-level bootstrap's mean and 95 % interval, and paired differences."""

from __future__ import annotations

import pytest

from benchmarks.intervals import bootstrap_interval, format_interval, paired_differences


def test_nothing_to_resample_gives_a_point():
    assert bootstrap_interval({"ball": [0.4]}) == pytest.approx((0.4, 0.4, 0.4))
    assert bootstrap_interval({"ball": [0.2, 0.2], "box": [0.2]}) == pytest.approx((0.2, 0.2, 0.2))


def test_the_mean_is_over_subjects_of_their_seed_means():
    mean, low, high = bootstrap_interval({"ball": [0.0, 1.0, 1.0, 1.0], "box": [0.0]})
    assert mean == pytest.approx((0.75 + 0.0) / 2)  # not the mean of the five runs (0.6)
    assert 0.0 <= low < mean < high <= 1.0


def test_subjects_that_disagree_widen_the_interval_more_than_seeds_that_agree():
    apart = bootstrap_interval({name: [value] * 3 for name, value in zip("abcd", (0.1, 0.9, 0.1, 0.9))})
    together = bootstrap_interval({name: [0.45, 0.5, 0.55] for name in "abcd"})
    assert apart[2] - apart[1] > 0.5 > together[2] - together[1]
    assert bootstrap_interval({"a": [0.1, 0.9]}, seed=1) == bootstrap_interval({"a": [0.1, 0.9]}, seed=1)


def test_paired_differences_keep_only_shared_cells_and_cancel_what_they_share():
    first = {("ball", 0): 0.9, ("ball", 1): 0.5, ("box", 0): 0.7, ("cone", 0): 0.1}
    second = {("ball", 0): 0.8, ("ball", 1): 0.4, ("box", 0): 0.6, ("dots", 0): 0.3}
    groups = paired_differences(first, second)
    assert groups.keys() == {"ball", "box"} and groups["ball"] == pytest.approx([0.1, 0.1])
    mean, low, high = bootstrap_interval(groups)
    assert (mean, low, high) == pytest.approx((0.1, 0.1, 0.1))  # a steady lead: a tight interval away from 0
    assert format_interval(mean, low, high, signed=True) == "+0.10 [+0.10, +0.10]"
    with pytest.raises(ValueError):
        bootstrap_interval({})
