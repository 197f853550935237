"""benchmarks/quality.py: the three methods get the budgets its table claims, and the rate sweep's score.

The bench itself takes half an hour (BENCHMARKS.md §7); these check the parts a wrong table would come from
without running it.
"""

from __future__ import annotations

import copy

import pytest

from benchmarks.quality import adapted_layers, attach, sweep_score


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
