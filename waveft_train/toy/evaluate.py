"""Quality metrics of a personalization on the toy world, read by the judge.

Why: "the grid looks right" is not a measurement. On `toy` the judge says exactly what each sample shows, so a run
can be scored the way DreamBooth papers score real photos, without their proxies:

- `subject_fidelity`: share of samples for "a photo of sks <class> <context>" that show the subject (same class,
  pattern and colours);
- `context_fidelity`: share of those samples in the asked context;
- `prior_preservation`: share of samples for the class prompt "a photo of a <class>" that do NOT show the subject
  (the language drift prior preservation is meant to stop), with `prior_agreement`, the share of class-prompt seeds
  where the adapted model draws what the base model draws (same shape, colour and context);
- `subject_similarity`: DreamBooth's DINO score with the judge as the feature extractor: the mean cosine similarity
  (in [0, 1]) between each subject-prompt sample and renders of the subject in the asked context;
  `class_subject_similarity` is the same for the class-prompt samples against the subject in every context (it rises
  when the class drifts toward the subject). These read the samples without the judge's class decisions, which are
  exact on renders but miss on grainy samples (docs/toy-world.md).
- `class_colour_similarity`: the palette overlap (evaluation/colour.py: chroma-weighted hue histograms, intersected)
  of the class-prompt samples with the subject's instance photos. It rises when the class slides toward the
  subject's colours, which the judge's exact reading and its shape-weighted embedding both miss.
- `diversity`: how much the subject's position and size vary across seeds, relative to how much they vary in the
  world (1 = as varied as the world, 0 = the same layout every time); `pixel_diversity` is the mean pixel distance
  between samples of one prompt.
- `subject_fidelity_ceiling`: share of the subject's own renders (every asked context) that the judge still reads as
  the subject after a round trip through the model's VAE. Every sample leaves through that decoder, so this is what
  a denoiser reproducing true photos of the subject would score: read `subject_fidelity` against it.
- `described_subject_fidelity`: share of the base model's samples for the subject's look asked in words ("a photo of
  a striped red and yellow ball on the beach", every context, the same seeds) that show the subject: how exactly the
  model draws the look when told it. An adapter that only taught the model that `sks ball` means that look would
  read about this; above it, the adapter also draws the look better than the base model does.

Every value is in [0, 1]. The same numbers are computed for the base model on the same prompts and seeds (`base`).
`evaluate_adapter` (the CLI, tests) and `evaluate_unet` (the bench, which also scores LoRA and full fine-tuning)
share everything below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
import yaml

from waveft_train.adapter.load import adapters_disabled, load_adapter_unet
from waveft_train.evaluation.colour import colour_histogram, palette_overlap
from waveft_train.evaluation.sampling import Samples, sample, to_pil
from waveft_train.models.loading import build_pipeline
from waveft_train.toy.judge import embed_images, judge_images, load_judge, round_trip
from waveft_train.toy.subjects import SUBJECT_FILE, Subject, get_subject
from waveft_train.toy.world import CONTEXTS, caption, render, render_image, sample_scene


@dataclass(frozen=True)
class EvalSettings:
    """What gets sampled: every context × `seeds` for the subject prompt, `class_seeds` for the class prompt."""

    contexts: tuple[str, ...] = tuple(CONTEXTS)
    seeds: int = 4
    class_seeds: int = 8
    first_seed: int = 1000  # apart from validation's seeds, so a grid's look does not leak into the score
    steps: int = 25
    guidance: float = 5.0
    batch_size: int = 16


def prompt_accuracy(pipeline, judge, combinations: Sequence[tuple[str, str, str]], seeds: int,
                    first_seed: int, settings: EvalSettings = EvalSettings()) -> tuple[dict, Samples]:
    """Does the model follow "a photo of a <colour> <shape> <context>"? Samples each (shape, colour, context)
    combination with seeds first_seed .. first_seed + seeds - 1 (steps, guidance and batch from `settings`) and
    returns the share the judge reads as the asked shape, colour, context, all three, and as solid (no pattern
    asked), with the samples."""
    prompts, asked = [], []
    for shape, colour, context in combinations:  # the caption of any such scene (its layout is not in the words)
        scene = sample_scene(np.random.default_rng(0), shape=shape, colours=(colour,), pattern="solid", context=context)
        prompts += [caption(scene)] * seeds
        asked += [(shape, colour, context)] * seeds
    seed_list = [first_seed + i % seeds for i in range(len(prompts))]
    samples = sample(pipeline, prompts, seed_list, steps=settings.steps, guidance=settings.guidance,
                     batch_size=settings.batch_size)
    rows = list(zip(judge_images(judge, samples.images), asked))

    def share(hit) -> float:
        return round(float(np.mean([hit(verdict, want) for verdict, want in rows])), 4)

    return {"samples": len(rows), "shape": share(lambda v, a: v.shape == a[0]),
            "colour": share(lambda v, a: v.colour == a[1]), "context": share(lambda v, a: v.context == a[2]),
            "all_three": share(lambda v, a: (v.shape, v.colour, v.context) == a),
            "solid": share(lambda v, a: v.pattern == "solid")}, samples


def sample_plan(subject: Subject, settings: EvalSettings) -> tuple[list[str], list[int], list[str], list[int]]:
    """(subject prompts, their seeds, class prompts, their seeds)."""
    seeds = [settings.first_seed + i for i in range(settings.seeds)]
    subject_prompts = [subject.prompt(context) for context in settings.contexts for _ in seeds]
    subject_seeds = [seed for _ in settings.contexts for seed in seeds]
    class_seeds = [settings.first_seed + i for i in range(settings.class_seeds)]
    return subject_prompts, subject_seeds, [subject.class_prompt] * len(class_seeds), class_seeds


def sample_both(pipeline, subject: Subject, settings: EvalSettings) -> tuple[Samples, Samples]:
    subject_prompts, subject_seeds, class_prompts, class_seeds = sample_plan(subject, settings)
    options = dict(steps=settings.steps, guidance=settings.guidance, batch_size=settings.batch_size)
    return sample(pipeline, subject_prompts, subject_seeds, **options), sample(pipeline, class_prompts, class_seeds,
                                                                              **options)


def world_layout_spread(count: int = 400) -> float:
    """Mean distance between the (x, centre y, size) of two independent scenes of the world (the diversity unit)."""
    rng = np.random.default_rng(0)
    layouts = np.array([[s.x, s.centre_y, s.size] for s in (sample_scene(rng) for _ in range(count))])
    half = count // 2
    return float(np.linalg.norm(layouts[:half] - layouts[half:2 * half], axis=1).mean())


REFERENCES_PER_CONTEXT = 8
CEILING_RENDERS_PER_CONTEXT = 16


def subject_renders(subject: Subject, context: str, count: int, stream: tuple[int, ...]) -> list:
    """`count` uint8 renders of the subject in `context`, layout i seeded by [subject.seed, *stream, i]."""
    return [render(sample_scene(np.random.default_rng([subject.seed, *stream, i]), shape=subject.shape,
                                colours=subject.colours, pattern=subject.pattern, context=context))
            for i in range(count)]


def subject_references(subject: Subject, judge, contexts: Sequence[str]) -> dict[str, object]:
    """Judge embeddings of the subject rendered in each context (seeded layouts), per context."""
    return {context: embed_images(judge, subject_renders(subject, context, REFERENCES_PER_CONTEXT, (7, index)))
            for index, context in enumerate(contexts)}


def codec_ceiling(vae, subject: Subject, judge, contexts: Sequence[str]) -> float:
    """`subject_fidelity_ceiling`: the judge's subject reading of the subject's renders after decode(encode(·))."""
    renders = [image for index, context in enumerate(contexts)
               for image in subject_renders(subject, context, CEILING_RENDERS_PER_CONTEXT, (11, index))]
    round_trips = round_trip(vae, np.stack(renders), progress=False)
    return float(np.mean(shows_subject(subject, judge_images(judge, round_trips))))


def described_fidelity(pipeline, subject: Subject, judge, settings: EvalSettings) -> float:
    """`described_subject_fidelity` of `pipeline` (the base model): its samples for the look asked in words."""
    _, seeds, _, _ = sample_plan(subject, settings)  # the subject prompt's seeds, context by context
    prompts = [subject.described_prompt(context) for context in settings.contexts for _ in range(settings.seeds)]
    samples = sample(pipeline, prompts, seeds, steps=settings.steps, guidance=settings.guidance,
                     batch_size=settings.batch_size)
    return float(sum(shows_subject(subject, judge_images(judge, samples.images))) / len(prompts))


def subject_palette(subject: Subject):
    """The colours of the subject's instance photos, rendered as `write_instance_photos` renders them."""
    return colour_histogram([render_image(scene) for scene in subject.scenes()])


def shows_subject(subject: Subject, verdicts) -> list[bool]:
    """Per verdict: whether the judge saw exactly the subject (its class, pattern and colours)."""
    look = {"shape": subject.shape, "pattern": subject.pattern, "colours": subject.colours}
    return [verdict.shows(**look) for verdict in verdicts]


def similarity(judge, images, references) -> list[float]:
    """Per image: mean cosine similarity of its judge embedding to `references` (one tensor, or one per image)."""
    features = embed_images(judge, images)
    if not isinstance(references, list):
        references = [references] * len(features)
    return [float((feature @ reference.T).mean()) for feature, reference in zip(features, references)]


def scores(subject: Subject, judge, subject_samples: Samples, class_samples: Samples, settings: EvalSettings,
           references: dict[str, object], base_class_samples: Samples | None = None) -> dict:
    """The metrics of one model's samples. `references` are `subject_references` for settings.contexts;
    `base_class_samples` (the base model's class-prompt samples) add prior_agreement."""
    verdicts = judge_images(judge, subject_samples.images)
    asked = [context for context in settings.contexts for _ in range(settings.seeds)]
    shows = shows_subject(subject, verdicts)
    in_context = [verdict.context == context for verdict, context in zip(verdicts, asked)]
    class_verdicts = judge_images(judge, class_samples.images)
    class_shows = shows_subject(subject, class_verdicts)

    subject_similarity = similarity(judge, subject_samples.images, [references[context] for context in asked])
    class_similarity = similarity(judge, class_samples.images, torch.cat(list(references.values())))

    unit = world_layout_spread()
    layout_spread, pixel_spread = [], []
    images = subject_samples.images
    for group in range(len(settings.contexts)):
        rows = list(range(group * settings.seeds, (group + 1) * settings.seeds))
        pairs = list(combinations(rows, 2))
        if not pairs:
            continue
        layouts = np.array([[verdicts[i].x, verdicts[i].y, verdicts[i].size] for i in rows])
        layout_spread += [float(np.linalg.norm(layouts[a - rows[0]] - layouts[b - rows[0]])) / unit for a, b in pairs]
        pixel_spread += [float((images[a] - images[b]).abs().mean()) for a, b in pairs]
    result = {
        "subject_fidelity": sum(shows) / len(shows),
        "context_fidelity": sum(in_context) / len(in_context),
        "prior_preservation": 1.0 - sum(class_shows) / len(class_shows),
        "subject_similarity": float(np.mean(subject_similarity)),
        "class_subject_similarity": float(np.mean(class_similarity)),
        "class_prompt_subject_rate": sum(class_shows) / len(class_shows),
        "class_colour_similarity": palette_overlap(colour_histogram(to_pil(class_samples.images)),
                                                   subject_palette(subject)),
        "diversity": min(1.0, float(np.mean(layout_spread))) if layout_spread else 0.0,
        "pixel_diversity": min(1.0, float(np.mean(pixel_spread))) if pixel_spread else 0.0,
        "class_shape_fidelity": sum(v.shape == subject.shape for v in class_verdicts) / len(class_verdicts),
    }
    if base_class_samples is not None:
        base_verdicts = judge_images(judge, base_class_samples.images)
        same = [(a.shape, a.colour, a.context) == (b.shape, b.colour, b.context)
                for a, b in zip(class_verdicts, base_verdicts)]
        result["prior_agreement"] = sum(same) / len(same)
    result["judgements"] = [
        {"prompt": prompt, "seed": seed, "shape": v.shape, "pattern": v.pattern, "colours": list(v.colours),
         "context": v.context, "shows_subject": hit, "subject_similarity": round(sim, 4)}
        for prompt, seed, v, hit, sim in zip(subject_samples.prompts, subject_samples.seeds, verdicts, shows,
                                             subject_similarity)
    ]
    return result


def evaluate_samples(subject: Subject, judge, adapted: tuple[Samples, Samples], base: tuple[Samples, Samples],
                     settings: EvalSettings) -> dict:
    """The metrics JSON: the adapted model's scores at the top level, the base model's under `base`."""
    references = subject_references(subject, judge, settings.contexts)  # rendered and embedded once for both
    result = scores(subject, judge, *adapted, settings, references, base_class_samples=base[1])
    base_scores = scores(subject, judge, *base, settings, references)
    base_scores.pop("judgements")
    result["base"] = base_scores
    subject_prompts, subject_seeds, class_prompts, class_seeds = sample_plan(subject, settings)
    result["subject"] = {"name": subject.name, "description": subject.description, "shape": subject.shape,
                         "pattern": subject.pattern, "colours": list(subject.colours)}
    result["sampled"] = {"subject_prompts": sorted(set(subject_prompts), key=subject_prompts.index),
                         "class_prompt": class_prompts[0], "seeds": sorted(set(subject_seeds)),
                         "class_seeds": class_seeds, "images": len(subject_prompts) + len(class_prompts),
                         **{key: value for key, value in asdict(settings).items()
                            if key not in ("batch_size", "seeds", "class_seeds")}}  # the seed lists, not counts
    return result


def evaluate_unet(components, unet, subject: Subject, *, judge, settings: EvalSettings = EvalSettings(),
                  base_samples: tuple[Samples, Samples] | None = None,
                  described: float | None = None) -> tuple[dict, tuple[Samples, Samples]]:
    """Score a UNet (adapted in any way) against the base model; returns (metrics, the base samples for reuse).

    Without `base_samples`, the base model's samples (and `described`, its described_subject_fidelity) come from
    `unet` with its peft adapters disabled; with them, `described` is reported only when given.
    """
    pipeline = build_pipeline(components, unet=unet)
    unet.eval()
    adapted = sample_both(pipeline, subject, settings)
    if base_samples is None:
        with adapters_disabled(unet, pipeline.text_encoder, pipeline.text_encoder_2):
            base_samples = sample_both(pipeline, subject, settings)
            if described is None:
                described = described_fidelity(pipeline, subject, judge, settings)
    metrics = evaluate_samples(subject, judge, adapted, base_samples, settings)
    metrics["subject_fidelity_ceiling"] = codec_ceiling(components.vae, subject, judge, settings.contexts)
    if described is not None:
        metrics["described_subject_fidelity"] = described
    return metrics, base_samples


def subject_of_adapter(adapter_dir: Path) -> Subject:
    """The subject an adapter was trained on: its run's config.yaml names data.instance_dir, whose subject.json
    (written by the toy renderer) describes it. Raises LookupError when that chain is broken."""
    config_file = Path(adapter_dir).resolve().parent / "config.yaml"
    if not config_file.is_file():  # a checkpoint: <run>/checkpoints/step-N/
        config_file = Path(adapter_dir).resolve().parent.parent / "config.yaml"
    try:
        instance_dir = yaml.safe_load(config_file.read_text(encoding="utf-8"))["data"]["instance_dir"]
        return get_subject(Path(instance_dir) / SUBJECT_FILE)
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise LookupError(f"{config_file} does not lead to a toy subject ({type(error).__name__}: {error})") from None


def evaluate_adapter(adapter_dir: Path | str, *, subject: Subject | None = None, base: str | None = None,
                     settings: EvalSettings = EvalSettings(), judge=None, device: str = "cpu") -> dict:
    """Score a saved adapter trained on `toy` (see the module docstring for the keys)."""
    adapter_dir = Path(adapter_dir)
    subject = subject or subject_of_adapter(adapter_dir)
    components, unet = load_adapter_unet(adapter_dir, base, dtype=torch.float32)
    for module in (components.unet, components.vae, components.text_encoder, components.text_encoder_2):
        module.to(device)
    metrics, _ = evaluate_unet(components, unet, subject, judge=judge or load_judge(), settings=settings)
    metrics["adapter"] = str(adapter_dir.resolve())
    return metrics
