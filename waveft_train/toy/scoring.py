"""The toy world's scorer for a run's checkpoints: the judge's metrics (evaluate.py), flattened for the ranking.

The ranking (evaluation/ranking.py) reads `subject_similarity`, `class_subject_similarity`, `class_colour_similarity`
and `prompt_fidelity`; on the toy world the last is the judge's `context_fidelity` (the share of samples in the
asked context).
"""

from __future__ import annotations

from waveft_train.adapter.load import adapters_disabled
from waveft_train.evaluation.sampling import Samples
from waveft_train.evaluation.scorers import EvalPlan, with_base
from waveft_train.toy.evaluate import EvalSettings, evaluate_samples, sample_both
from waveft_train.toy.subjects import Subject


def numbers(metrics: dict) -> dict[str, float]:
    """The metrics that are numbers (the judgements, the subject and what was sampled are left out)."""
    return {name: float(value) for name, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def flat_scores(metrics: dict) -> dict[str, float]:
    """`evaluate_samples`' metrics as the ranking reads them: the adapter's numbers, the base model's as
    base_<name>, and prompt_fidelity (= context_fidelity) for both."""
    adapter, base = numbers(metrics), numbers(metrics["base"])
    adapter["prompt_fidelity"], base["prompt_fidelity"] = adapter["context_fidelity"], base["context_fidelity"]
    return with_base(adapter, base)


class ToyScorer:
    """The judge's metrics of the adapter and of the base model (sampled once) on the same prompts and seeds."""

    kind = "toy judge"

    def __init__(self, subject: Subject, judge, plan: EvalPlan):
        contexts = {"contexts": plan.contexts} if plan.contexts is not None else {}
        self.settings = EvalSettings(seeds=plan.seeds, class_seeds=plan.class_seeds, first_seed=plan.first_seed,
                                     steps=plan.steps, guidance=plan.guidance, batch_size=plan.batch_size, **contexts)
        self.subject, self.judge, self.plan = subject, judge, plan
        self.base_samples: tuple[Samples, Samples] | None = None

    def score(self, pipeline, unet) -> dict[str, float]:
        adapted = sample_both(pipeline, self.subject, self.settings)
        if self.base_samples is None:
            with adapters_disabled(unet, pipeline.text_encoder, pipeline.text_encoder_2):
                self.base_samples = sample_both(pipeline, self.subject, self.settings)
        return flat_scores(evaluate_samples(self.subject, self.judge, adapted, self.base_samples, self.settings))

    def describe(self) -> dict:
        return {"metrics": self.kind, "subject": self.subject.name, "contexts": list(self.settings.contexts),
                **self.plan.described()}
