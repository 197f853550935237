"""benchmarks/quality.py: the three methods get the budgets its table claims, the rate sweep's score, and the bench
itself end to end for a few steps (the full bench takes half an hour, BENCHMARKS.md §7).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from benchmarks.quality import Method, World, adapted_layers, attach, demo_recipe, main, parse_args, sweep_score
from waveft_train.toy.subjects import SUBJECTS
from waveft_train.train.run import DreamBoothRun


@pytest.fixture(scope="module")
def toy_unet():
    from waveft_train.models.loading import load_unet

    return load_unet("toy")


def test_each_method_trains_what_its_budget_says(toy_unet):
    layers = adapted_layers(toy_unet)
    assert len(layers) == 56 and {name.split(".")[-2] for name in layers} >= {"attn1", "attn2"}
    rank1 = sum(layer.in_features + layer.out_features for layer in layers.values())

    facts = {}
    for method, budget in (("waveft", 0.5), ("waveft", 1.0), ("waveft", 4.0), ("lora", 1.0), ("lora", 4.0),
                           ("full", 0.0)):
        unet = copy.deepcopy(toy_unet)
        facts[method, budget] = attach(method, unet, budget, scaling=25.0)
        parameters = dict(unet.named_parameters())
        trainable = {name for name, p in parameters.items() if p.requires_grad}
        assert trainable and all(".attn" in name for name in trainable)  # only the attention linears learn
        if method == "waveft":  # peft's per-layer pattern was honoured: n_frequency = budget x (d_in + d_out)
            for name, layer in layers.items():  # the names of the unadapted copy: peft's wrappers are no nn.Linear
                spectrum = parameters[f"{name}.waveft_spectrum.default"]
                assert spectrum.numel() == max(1, round(budget * (layer.in_features + layer.out_features)))

    assert facts["waveft", 1.0]["trainable_params"] == rank1 == facts["lora", 1.0]["trainable_params"]
    assert facts["waveft", 4.0]["trainable_params"] == 4 * rank1 == facts["lora", 4.0]["trainable_params"]
    assert facts["waveft", 0.5]["trainable_params"] == rank1 // 2
    assert facts["full", 0.0]["trainable_params"] == sum(
        p.numel() for layer in layers.values() for p in layer.parameters())
    assert all(p.requires_grad is False for p in toy_unet.parameters())  # attach worked on copies


def test_sweep_score_is_the_subject_gain_minus_class_drift_and_lost_contexts():
    base = {"subject_similarity": 0.5, "class_subject_similarity": 0.4, "context_fidelity": 0.9}

    def score(subject, drifted, contexts):
        return sweep_score({"subject_similarity": subject, "class_subject_similarity": drifted,
                            "context_fidelity": contexts, "base": base})

    assert score(0.7, 0.5, 0.9) == pytest.approx(0.1)
    assert score(0.7, 0.3, 1.0) == pytest.approx(0.2)  # moving away from the subject or gaining contexts: no bonus
    assert score(0.8, 0.4, 0.2) < score(0.6, 0.4, 0.9)  # a rate that loses the prompt's contexts does not win


def test_the_bench_trains_lora_and_full_fine_tuning_through_the_run(tmp_path):
    """`python -m benchmarks.quality` end to end for LoRA and full fine-tuning, two steps each: the run's declared
    `method` swaps what is trained, the trainer does the rest, and nothing is saved as a WaveFT adapter."""
    out = tmp_path / "bench"
    main(["--subjects", "striped_ball", "--sweep-subjects", "striped_ball", "--methods", "lora", "full",
          "--budgets", "1", "--prior", "on", "--lrs", '{"lora": [0.01], "full": [0.001]}', "--steps", "2",
          "--batch-size", "1", "--class-images", "2", "--eval-seeds", "2", "--eval-class-seeds", "1", "--out", str(out)])
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(runs) == ["striped_ball|full|full|lr=0.001|prior=on|seed=0",
                            "striped_ball|lora|1x|lr=0.01|prior=on|seed=0"]
    lora, full = runs["striped_ball|lora|1x|lr=0.01|prior=on|seed=0"], runs["striped_ball|full|full|lr=0.001|prior=on|seed=0"]
    assert lora["rank1_units"] == 1.0 and lora["note"] == "rank 1"
    assert full["trainable_params"] > 50 * lora["trainable_params"]  # every weight and bias of the same linears
    for result in (lora, full):
        assert math.isfinite(result["final_loss"])
        assert 0 <= result["metrics"]["subject_similarity"] <= 1 and "base" in result["metrics"]
    folders = sorted((out / "runs").iterdir())
    assert len(folders) == 2 and not [f for f in folders if (f / "adapter").exists() or (f / "checkpoints").exists()]
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in folders]
    assert {s["trainable_params"] for s in summaries} == {lora["trainable_params"], full["trainable_params"]}
    assert all(s["steps"] == 2 and s["adapter_bytes"] is None for s in summaries)
    table = (out / "table.md").read_text()
    assert "| on | lora | 1x rank-1 | 11,648 | 0.01 |" in table and "| on | full | all weights |" in table
    assert "- lora|1x: 0.01: " in table and "(one rate: not swept); chosen 0.01" in table


def test_a_method_that_trains_the_linears_changes_them_and_only_them(tmp_path, toy_unet):
    """The run's extension point: `Method('full', ...)` trains the attention linears through `DreamBoothRun`."""
    args = parse_args(["--out", str(tmp_path), "--steps", "2", "--batch-size", "1", "--class-images", "2"])
    world = World.__new__(World)  # only its config(): no judge or base samples needed
    world.args, world.recipe = args, demo_recipe(args)
    method = Method("full", 0.0, world.recipe["scaling"])
    run = DreamBoothRun(world.config(SUBJECTS["striped_ball"], "full", 1e-3, True, 0), force=True, progress=False,
                        method=method)
    run.run()
    trained = dict(run.accelerator.unwrap_model(run.unet).named_parameters())
    base = dict(toy_unet.named_parameters())
    changed = {name for name, parameter in trained.items() if not torch.equal(parameter.detach().cpu(), base[name])}
    assert changed and changed == {name for name in base if name.rpartition(".")[0] in adapted_layers(toy_unet)}
    assert not (tmp_path / "runs" / "full" / "checkpoints").exists()


def test_rates_are_chosen_per_method_and_budget_and_cells_repeat_per_seed(tmp_path, monkeypatch):
    """The sweep runs at every budget (prior on, first seed) and each budget keeps its own best rate; the grid then
    trains every subject at every seed with it. World.run is replaced by a scorer that prefers a budget-dependent
    rate, so the test checks the bookkeeping, not the toy."""
    calls = []

    def fake_run(self, subject, method, budget, lr, prior, seed, key):
        calls.append((method, budget, lr, prior, seed, subject.name))
        best = {0.5: 0.003, 1.0: 0.001, 4.0: 0.0003}[budget]  # a smaller rate suits more coefficients
        gain = 0.3 - abs(math.log10(lr) - math.log10(best))
        base = {"subject_similarity": 0.5, "class_subject_similarity": 0.5, "context_fidelity": 0.9}
        metrics = {key_: 0.5 for key_ in ("subject_fidelity", "prior_preservation", "diversity")}
        metrics |= {"subject_similarity": 0.5 + gain + 0.01 * seed, "class_subject_similarity": 0.5,
                    "context_fidelity": 0.9, "base": base}
        return {"subject": subject.name, "method": method, "budget": budget, "lr": lr, "prior": prior, "seed": seed,
                "trainable_params": 1, "rank1_units": budget, "note": "", "final_loss": 0.1, "train_seconds": 1.0,
                "seconds": 1.0, "metrics": metrics}

    monkeypatch.setattr(World, "__init__", lambda self, args, recipe: None)
    monkeypatch.setattr(World, "run", fake_run)
    out = tmp_path / "bench"
    main(["--subjects", "striped_ball", "checked_box", "--sweep-subjects", "striped_ball", "--methods", "waveft",
          "--prior", "on", "--train-seeds", "0", "1", "--out", str(out)])
    chosen = json.loads((out / "results.json").read_text())["last_invocation"]["chosen_lr"]
    assert chosen == {"waveft|0.5x": 0.003, "waveft|1x": 0.001, "waveft|4x": 0.0003}
    sweep = [call for call in calls if call[-1] == "striped_ball" and call[4] == 0]
    assert {(budget, lr) for _, budget, lr, *_ in sweep} == {(b, lr) for b in (0.5, 1.0, 4.0)
                                                              for lr in (3e-4, 1e-3, 3e-3)}
    grid = {(budget, lr, seed, name) for _, budget, lr, _, seed, name in calls if lr == chosen[f"waveft|{budget:g}x"]}
    assert len(grid) == 3 * 2 * 2  # budgets x seeds x subjects, each once at its rate
    assert len(calls) == 9 + 3 * 2 * 2 - 3  # the sweep's chosen runs on striped_ball at seed 0 are reused
    table = (out / "table.md").read_text()
    assert "training seeds [0, 1]" in table and "| on | waveft | 4x rank-1 | 1 | 0.0003 |" in table
