"""Several concepts on the toy world: each subject on its own prompt, and how much the concepts bleed.

Why: a run that teaches two subjects at once can fail in ways one subject cannot. A rare token may draw the other
concept's subject (bleed), and a class prompt may draw either subject (the class drifts). The judge reads every
sample, so each is a share of samples:

- `subject_fidelity` of a concept: its prompts ("a photo of sks ball <context>", every context × seeds) that show its
  own subject; `context_fidelity`: those in the asked context;
- `shows_other_subjects` of a concept: per other concept, the share of this concept's samples that show *that*
  concept's subject (`bleed`, per concept, is the largest share of its subject on any other concept's prompts);
- per class prompt, the share of its samples that show each concept's subject, and `any_subject`.

`bleed_table` computes all of it from the judge's verdicts (no model needed: the bench can call it on its own
samples); `evaluate_concepts` samples an adapter and its base model on the same prompts and seeds and calls it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from waveft_train.adapter.load import adapters_disabled, load_adapter_unet
from waveft_train.evaluation.sampling import sample
from waveft_train.models.loading import build_pipeline
from waveft_train.toy.evaluate import EvalSettings, shows_subject
from waveft_train.toy.judge import judge_images, load_judge
from waveft_train.toy.subjects import SUBJECT_FILE, Subject, get_subject
from waveft_train.toy.world import CONTEXTS


@dataclass(frozen=True)
class ToyConcept:
    """One concept of a run on the toy world: its subject (subject.json beside its photos) and prompts."""

    name: str
    subject: Subject
    instance_prompt: str  # "a photo of sks ball": contexts are appended
    class_prompt: str


def concepts_of_run(config: Mapping) -> list[ToyConcept]:
    """The toy concepts of a run's config.yaml (a mapping). Raises LookupError when one is not a toy subject."""
    prior = config.get("prior") or {}
    found = []
    for index, entry in enumerate(config.get("concepts") or []):
        try:
            subject = get_subject(Path(entry["instance_dir"]) / SUBJECT_FILE)
        except (OSError, KeyError, TypeError, ValueError) as error:
            raise LookupError(f"concepts[{index}] is not a toy subject ({type(error).__name__}: {error})") from None
        found.append(ToyConcept(f"concepts[{index}]", subject, entry.get("instance_prompt") or subject.instance_prompt,
                                entry.get("class_prompt") or prior.get("class_prompt") or subject.class_prompt))
    return found


def concept_prompts(concept: ToyConcept, contexts: Sequence[str]) -> list[str]:
    return [f"{concept.instance_prompt} {CONTEXTS[context]}" for context in contexts]


def _share(values: Sequence[bool]) -> float:
    return round(float(np.mean(values)), 4) if len(values) else 0.0


def bleed_table(concepts: Sequence[ToyConcept], verdicts: Mapping[str, Sequence], contexts: Sequence[str],
                seeds: int) -> dict:
    """The per-concept metrics (module docstring) from the judge's verdicts: `verdicts[concept.name]` of its prompts,
    context by context, `seeds` each (`concept_prompts` order); `verdicts[class_prompt]` of each class prompt."""
    asked = [context for context in contexts for _ in range(seeds)]
    result: dict = {"concepts": [], "class_prompts": []}
    for concept in concepts:
        own = verdicts[concept.name]
        result["concepts"].append({
            "name": concept.name, "subject": concept.subject.name, "instance_prompt": concept.instance_prompt,
            "subject_fidelity": _share(shows_subject(concept.subject, own)),
            "context_fidelity": _share([verdict.context == context for verdict, context in zip(own, asked)]),
            "shows_other_subjects": {other.name: _share(shows_subject(other.subject, own))
                                     for other in concepts if other.name != concept.name}})
    for concept in result["concepts"]:
        concept["bleed"] = max((other["shows_other_subjects"][concept["name"]] for other in result["concepts"]
                                if other["name"] != concept["name"]), default=0.0)
    for class_prompt in dict.fromkeys(concept.class_prompt for concept in concepts):
        drawn = verdicts[class_prompt]
        shows = {concept.name: shows_subject(concept.subject, drawn) for concept in concepts}
        result["class_prompts"].append({
            "prompt": class_prompt, "shows": {name: _share(hits) for name, hits in shows.items()},
            "any_subject": _share([any(hits) for hits in zip(*shows.values())])})
    result["worst"] = {"subject_fidelity": min(c["subject_fidelity"] for c in result["concepts"]),
                       "bleed": max(c["bleed"] for c in result["concepts"]),
                       "class_any_subject": max(c["any_subject"] for c in result["class_prompts"])}
    return result


def _sample_and_judge(pipeline, judge, concepts: Sequence[ToyConcept], settings: EvalSettings) -> dict[str, list]:
    seeds = [settings.first_seed + i for i in range(settings.seeds)]
    class_seeds = [settings.first_seed + i for i in range(settings.class_seeds)]
    groups = [(concept.name, [prompt for prompt in concept_prompts(concept, settings.contexts) for _ in seeds],
               seeds * len(settings.contexts)) for concept in concepts]
    groups += [(prompt, [prompt] * len(class_seeds), class_seeds)
               for prompt in dict.fromkeys(concept.class_prompt for concept in concepts)]
    prompts = [prompt for _, group, _ in groups for prompt in group]
    samples = sample(pipeline, prompts, [seed for *_, group in groups for seed in group], steps=settings.steps,
                     guidance=settings.guidance, batch_size=settings.batch_size)
    verdicts, start = {}, 0
    all_verdicts = judge_images(judge, samples.images)
    for key, group, _ in groups:
        verdicts[key], start = all_verdicts[start:start + len(group)], start + len(group)
    return verdicts


def evaluate_concepts(adapter_dir: Path | str, concepts: Sequence[ToyConcept], *, base: str | None = None,
                      settings: EvalSettings = EvalSettings(), judge=None, device: str = "cpu") -> dict:
    """Per-concept scores of a saved adapter of the toy model (module docstring), the base model's under `base`."""
    judge = judge or load_judge()
    components, unet = load_adapter_unet(Path(adapter_dir), base, dtype=torch.float32)
    for module in (components.unet, components.vae, components.text_encoder, components.text_encoder_2):
        module.to(device)
    pipeline = build_pipeline(components, unet=unet)
    unet.eval()
    result = bleed_table(concepts, _sample_and_judge(pipeline, judge, concepts, settings), settings.contexts,
                         settings.seeds)
    with adapters_disabled(unet):
        result["base"] = bleed_table(concepts, _sample_and_judge(pipeline, judge, concepts, settings),
                                     settings.contexts, settings.seeds)
    result["adapter"] = str(Path(adapter_dir).resolve())
    result["sampled"] = {"contexts": list(settings.contexts), "seeds": settings.seeds,
                         "class_seeds": settings.class_seeds, "first_seed": settings.first_seed,
                         "steps": settings.steps, "guidance": settings.guidance}
    return result


def summary_line(result: dict) -> str:
    """One line per concept and class prompt, the base model's figures in brackets."""
    base = {concept["name"]: concept for concept in result["base"]["concepts"]}
    lines = [f"{c['name']} ({c['subject']}, {c['instance_prompt']!r}): subject_fidelity {c['subject_fidelity']:.2f} "
             f"(base {base[c['name']]['subject_fidelity']:.2f}), context_fidelity {c['context_fidelity']:.2f}, bleed "
             f"(its subject on other concepts' prompts) {c['bleed']:.2f}" for c in result["concepts"]]
    base_classes = {entry["prompt"]: entry for entry in result["base"]["class_prompts"]}
    lines += [f"class prompt {entry['prompt']!r}: shows a concept's subject {entry['any_subject']:.2f} (base "
              f"{base_classes[entry['prompt']]['any_subject']:.2f})" for entry in result["class_prompts"]]
    return "\n".join(lines)
