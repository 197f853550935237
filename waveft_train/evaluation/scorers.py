"""Scoring one adapted UNet after another against its base model, on the same prompts and seeds.

A scorer samples the adapter (the UNet as it is) and, once, the base model (the same UNet with its adapters switched
off), and returns flat scores: each metric for the adapter, and as `base_<metric>` for the base model, including
the four the ranking reads (evaluation/ranking.py). The base model's samples do not change from one checkpoint to
the next, so a run's checkpoints pay for them once. `DreamBoothScorer` (real SDXL, DINO and CLIP) is here; the toy
world's `ToyScorer` (the judge) is in toy/scoring.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

from PIL import Image

from waveft_train.adapter.load import adapters_disabled
from waveft_train.common.errors import UserError
from waveft_train.data.images import load_images
from waveft_train.evaluation.dreambooth import DEFAULT_CONTEXTS, DreamBoothPrompts, References, dreambooth_scores
from waveft_train.evaluation.metric_models import DEFAULT_CLIP, DEFAULT_DINO, MetricModels, load_metric_models
from waveft_train.evaluation.sampling import sample, to_pil


@dataclass(frozen=True)
class EvalPlan:
    """How much is sampled: `seeds` per context for the subject prompt, `class_seeds` for the class prompt, seeds
    first_seed, first_seed + 1, ... (apart from validation's, so a grid's look does not leak into the score)."""

    seeds: int = 4
    class_seeds: int = 8
    first_seed: int = 1000
    steps: int = 25
    guidance: float = 5.0
    batch_size: int = 4
    contexts: tuple[str, ...] | None = None  # None: DreamBooth's DEFAULT_CONTEXTS, or the toy world's four

    def described(self) -> dict:
        """The plan as evaluation.json's settings record it (contexts are recorded by the scorer)."""
        return {key: value for key, value in asdict(self).items() if key != "contexts"}


class Scorer(Protocol):
    def score(self, pipeline, unet) -> dict[str, float]: ...

    def describe(self) -> dict: ...


def with_base(adapter: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    return {**adapter, **{f"base_{name}": value for name, value in base.items()}}


@dataclass(frozen=True)
class RunSubject:
    """What a run personalized, as its config says: the photos, the prompt bound to the subject, the class prompt."""

    instance_dir: str
    instance_prompt: str
    class_prompt: str | None
    config_key: str = "data.instance_dir"  # where the photos were named, for error messages


class DreamBoothScorer:
    """Real SDXL: the DreamBooth metrics (evaluation/dreambooth.py) against the instance photos."""

    kind = "dreambooth"

    def __init__(self, models: MetricModels, photos: list[Image.Image], prompts: DreamBoothPrompts, plan: EvalPlan):
        self.models, self.prompts, self.plan = models, prompts, plan
        with models.on_device():
            self.references = References.of(models, photos)
        self.photos = len(photos)
        self.base: dict[str, float] | None = None

    def score(self, pipeline, unet) -> dict[str, float]:
        adapter = self._scores(pipeline)
        if self.base is None:
            with adapters_disabled(unet, pipeline.text_encoder, pipeline.text_encoder_2):
                self.base = self._scores(pipeline)
        return with_base(adapter, self.base)

    def _scores(self, pipeline) -> dict[str, float]:
        plan, prompts = self.plan, self.prompts
        seeds = [plan.first_seed + i for i in range(plan.seeds)]
        subject_prompts = [text for text in prompts.subject_prompts() for _ in seeds]
        class_seeds = [plan.first_seed + i for i in range(plan.class_seeds)]
        options = {"steps": plan.steps, "guidance": plan.guidance, "batch_size": plan.batch_size}
        subject = sample(pipeline, subject_prompts, seeds * len(prompts.contexts), **options)
        klass = sample(pipeline, [prompts.class_prompt] * len(class_seeds), class_seeds, **options)
        with self.models.on_device():  # after sampling: the metric models never share the device with the pipeline
            return dreambooth_scores(self.models, self.references, prompts, to_pil(subject.images),
                                     to_pil(klass.images), plan.seeds)

    def describe(self) -> dict:
        return {"metrics": self.kind, "models": dict(self.models.names), "instance_photos": self.photos,
                "instance_prompt": self.prompts.instance_prompt, "class_prompt": self.prompts.class_prompt,
                "contexts": list(self.prompts.contexts), **self.plan.described()}


def dreambooth_scorer(run: RunSubject, plan: EvalPlan, *, dino: str = DEFAULT_DINO, clip: str = DEFAULT_CLIP,
                      device: str = "cpu") -> DreamBoothScorer:
    """The instance photos and both metric models loaded; a clear error when the class prompt is missing."""
    if not (run.class_prompt or "").strip():
        raise UserError(
            "Scoring needs the class prompt (e.g. \"a photo of dog\") to measure how far the class drifts toward the "
            "subject, and this run has none (prior.class_prompt is empty). Pass --class-prompt to `waveft-train "
            "evaluate`, or set prior.class_prompt in the config (it is read even when prior.enabled is false)."
        )
    images = load_images(run.instance_dir, caption_column=None, default_prompt=run.instance_prompt,
                         config_key=run.config_key, report=False)
    photos = [images.image(index) for index in range(len(images))]
    prompts = DreamBoothPrompts(run.instance_prompt, run.class_prompt,
                                plan.contexts if plan.contexts is not None else DEFAULT_CONTEXTS)
    return DreamBoothScorer(load_metric_models(dino, clip, device=device), photos, prompts, plan)
