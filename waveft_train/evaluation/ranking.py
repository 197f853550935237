"""Which checkpoint is best: one number per scored adapter, from its scores and the base model's on the same samples.

Over-training shows as the subject pasted into every prompt (the class prompt drifts toward the subject, the
contexts are lost), under-training as the class (no subject similarity gained). The rule rewards the gain and
charges both failures, each measured against the base model on the same prompts and seeds, so the numbers of
different runs and metric families (the toy judge, DINO/CLIP) read the same way. `RULE` is the text written into
evaluation.json and docs/evaluation.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

RANKED = ("subject_similarity", "class_subject_similarity", "class_colour_similarity", "prompt_fidelity")
RULE = (
    "score = subject_gain - class_drift - prompt_loss, each against the base model on the same prompts and seeds. "
    "subject_gain = subject_similarity - base_subject_similarity (subject-prompt samples against the instance "
    "photos: the mean of DINO and CLIP-I on real SDXL, the judge's embedding similarity on the toy world). "
    "class_drift = max(0, class_subject_similarity - base's) + max(0, class_colour_similarity - base's) (the bare "
    "class prompt's samples against the instance photos, by features and by colour palette, so a class that slides "
    "toward the subject's colours counts, not only exact copies). prompt_loss = max(0, 1 - prompt_fidelity / "
    "base_prompt_fidelity) (the share of the base model's prompt following lost: CLIP-T on real SDXL, the judge's "
    "context fidelity on the toy world). The highest score is best; on a tie, the earlier step."
)


def ranking_parts(scores: Mapping[str, float]) -> dict[str, float]:
    """subject_gain, class_drift, prompt_loss and score of one scored adapter (see RULE)."""
    missing = [key for name in RANKED for key in (name, f"base_{name}") if key not in scores]
    if missing:
        raise KeyError(f"the scores lack {', '.join(missing)}")
    gain = scores["subject_similarity"] - scores["base_subject_similarity"]
    drift = (max(0.0, scores["class_subject_similarity"] - scores["base_class_subject_similarity"])
             + max(0.0, scores["class_colour_similarity"] - scores["base_class_colour_similarity"]))
    base_fidelity = scores["base_prompt_fidelity"]
    loss = max(0.0, 1.0 - scores["prompt_fidelity"] / base_fidelity) if base_fidelity > 0 else 0.0
    return {"subject_gain": gain, "class_drift": drift, "prompt_loss": loss, "score": gain - drift - loss}


def ranking_score(scores: Mapping[str, float]) -> float:
    return ranking_parts(scores)["score"]


def best_record(records: Sequence[Mapping]) -> Mapping:
    """The record ({"step", "checkpoint", "score", ...}) with the highest score; the earliest step on a tie."""
    if not records:
        raise ValueError("no scored checkpoints to choose from")
    return max(records, key=lambda record: (record["score"], -record["step"]))
