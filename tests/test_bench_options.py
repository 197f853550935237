"""benchmarks.options: the arms are one-key changes of the demo that the config accepts, and the table's spreads
and paired differences are computed from the right runs."""

from __future__ import annotations

import pytest

from benchmarks.options import ARMS, DEMO, KEYS, paired_differences, render_table, summarize
from waveft_train.config import load_config


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_arm_changes_only_its_own_keys_of_the_demo(arm):
    def flat(config) -> dict:
        return {f"{section}.{key}": value for section, fields in config.model_dump().items()
                if isinstance(fields, dict) for key, value in fields.items()}

    demo, changed = flat(load_config(DEMO)), flat(load_config(DEMO, [*ARMS[arm], "train.seed=3"]))
    differing = {key for key in demo if demo[key] != changed[key]}
    assert differing == {"train.seed", *(override.split("=")[0] for override in ARMS[arm])}


def _run(arm, seed, values, base=0.5):
    evals = [{**{key: value for key in KEYS}, "base": {key: base for key in KEYS}} for value in values]
    return {"arm": arm, "seed": seed, "evals": evals, "final_loss": 0.1, "train_seconds": 10.0, "eval_seconds": 5.0}


def test_spreads_are_over_training_seeds_and_evaluation_sets():
    runs = [_run("adamw", 0, [0.2, 0.4]), _run("adamw", 1, [0.6, 0.8])]
    mean, sd, low, high, within = summarize(runs, "subject_fidelity")
    assert (mean, low, high) == pytest.approx((0.5, 0.3, 0.7))
    assert sd == pytest.approx(0.2828, abs=1e-4)  # stdev of the per-seed means 0.3 and 0.7
    assert within == pytest.approx(0.1414, abs=1e-4)  # stdev within each seed's two evaluation sets


def test_paired_differences_pair_by_seed_and_skip_unpaired_seeds():
    runs = [_run("adamw", 0, [0.5]), _run("adamw", 1, [0.7]), _run("ema", 0, [0.6]), _run("ema", 1, [0.6]),
            _run("ema", 2, [0.9])]  # seed 2 has no adamw run: left out
    row = next(line for line in paired_differences(runs, ["adamw", "ema"]) if line.startswith("| ema"))
    assert row.startswith("| ema | 2 | +0.00 [-0.10 to +0.10] |")
    table = render_table({"runs": {str(i): run for i, run in enumerate(runs)}}, ["adamw", "ema"], ["--seeds", "0"])
    assert "Command: `python -m benchmarks.options --seeds 0`" in table
    assert "| ema | 3 | 0.70 ± 0.17" in table
