"""`waveft-train evaluate`: score one adapter against its base model, or every checkpoint of a run and name the best.

Adapters of the toy model on a toy subject are read by the toy world's judge (toy/evaluate.py); every other adapter
by the DreamBooth paper's metrics with DINO and CLIP (evaluation/). `--run` writes evaluation.jsonl and
evaluation.json into the run folder (train/scoring.py) by the ranking rule of evaluation/ranking.py. cli/main.py
registers the command; its docstring is the help text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
import yaml

from waveft_train.cli.adapters import _run_device, _sample_dtype
from waveft_train.common.errors import UserError
from waveft_train.common.files import atomic_write_text, make_folder

SUMMARY_KEYS = {  # what the one-line summary shows, per kind of metrics
    "toy": ("subject_similarity", "subject_fidelity", "context_fidelity", "prior_preservation",
            "class_subject_similarity", "class_colour_similarity", "diversity"),
    "dreambooth": ("dino", "clip_i", "clip_t", "diversity", "class_dino", "class_clip_i", "class_colour_similarity"),
}


def evaluate(
    adapter: Path | None = typer.Option(None, "--adapter", "-a", help="The adapter folder to score, e.g. "
                                        "outputs/dog/adapter (or use --run).", show_default=False),
    run: Path | None = typer.Option(None, "--run", help="A run's output folder: score every checkpoint still there "
                                    "and the final adapter, print the ranking, write evaluation.jsonl and "
                                    "evaluation.json there.", show_default=False),
    out: Path | None = typer.Option(None, "--out", "-o", help="Also write the metrics here (.json).",
                                    show_default=False),
    subject: str | None = typer.Option(
        None, "--subject", help="Toy model: the subject, a built-in name (striped_ball, ...) or a folder with "
        "subject.json. Default: the one whose photos the run trained on (its config.yaml's data.instance_dir).",
        show_default=False),
    instance_dir: Path | None = typer.Option(None, "--instance-dir", help="The subject's photos the samples are "
                                             "compared with. Default: the run config's data.instance_dir.",
                                             show_default=False),
    instance_prompt: str | None = typer.Option(None, "--instance-prompt", help="The prompt bound to the subject, "
                                               "e.g. \"a photo of sks dog\". Default: the run config's.",
                                               show_default=False),
    class_prompt: str | None = typer.Option(None, "--class-prompt", help="The bare class prompt, e.g. \"a photo of "
                                            "dog\". Default: the run config's prior.class_prompt.", show_default=False),
    context: list[str] | None = typer.Option(None, "--context", help="A context appended to the instance prompt "
                                             "(\"on the beach\"). Repeatable. Default: six from the DreamBooth paper.",
                                             show_default=False),
    dino: str | None = typer.Option(None, "--dino", help="DINO ViT: a hub id[@revision] or a local folder with "
                                    "model.safetensors. Default: the run config's validation.dino_model "
                                    "(facebook/dino-vits16@refs/pr/1).", show_default=False),
    clip: str | None = typer.Option(None, "--clip", help="CLIP model, named like --dino. Default: the run config's "
                                    "validation.clip_model (openai/clip-vit-large-patch14).", show_default=False),
    seeds: int = typer.Option(4, "--seeds", min=2, help="Samples per context for the subject prompt."),
    class_seeds: int = typer.Option(8, "--class-seeds", min=1, help="Samples of the class prompt."),
    first_seed: int = typer.Option(1000, "--first-seed", min=0, help="Seeds are first_seed, first_seed + 1, ...: "
                                   "another value draws another set of samples (one set's reading varies a lot)."),
    steps: int = typer.Option(25, "--steps", min=1, help="Denoising steps per sample."),
    guidance: float = typer.Option(5.0, "--guidance", help="Classifier-free guidance scale."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images sampled at once."),
    base: str | None = typer.Option(None, "--base", help="The base model: default the one named in the adapter's "
                                    "config (`toy`, `tiny`, a hub id, a folder or a single .safetensors file).",
                                    show_default=False),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps. Default: cuda if available.",
                                      show_default=False),
    dtype: str = typer.Option("auto", "--dtype", help="Precision of the base model: auto (fp16 on GPU, fp32 on CPU), "
                              "fp16, bf16 or fp32. The toy model always runs in fp32."),
    as_json: bool = typer.Option(False, "--json/--no-json", help="Print the metrics as JSON instead of a summary."),
) -> None:
    """Score an adapter against its base model on the same prompts and seeds, or rank every checkpoint of a run.

    On the toy model (`model.pretrained: toy`, a toy subject) the toy world's judge reads the samples:
    subject_fidelity, context_fidelity, prior_preservation, subject and class similarity, diversity, and
    class_colour_similarity (the class prompt's palette against the subject's photos). Elsewhere the DreamBooth
    paper's metrics: DINO and CLIP-I similarity to the instance photos, CLIP-T prompt fidelity, diversity across
    seeds, and the class prompt's drift toward the subject (features and colours). Each is reported for the base
    model too.

    With --run every checkpoint is scored and ranked (docs/evaluation.md gives the rule): the table is printed and
    written to the run folder as evaluation.jsonl and evaluation.json; `sample` and `export` then take --run DIR
    --checkpoint best.
    """
    from waveft_train.evaluation.scorers import EvalPlan

    if (adapter is None) == (run is None):
        raise UserError("Pass --adapter FOLDER (score one adapter) or --run OUTPUT_DIR (rank every checkpoint of a "
                        "run), not both and not neither.")
    if out is not None and out.suffix.lower() != ".json":
        raise UserError(f"--out {out} must end with .json (the metrics are written as JSON).")
    if not math.isfinite(guidance):
        raise UserError(f"--guidance {guidance} is not a finite number; give a real number, e.g. --guidance 5.0.")
    if any(not text.strip() for text in context or []):
        raise UserError("--context \"\" is blank; give a place or situation, e.g. --context \"on the beach\".")
    if out is not None:
        make_folder(out.absolute().parent, "The folder of --out")
    plan = EvalPlan(seeds=seeds, class_seeds=class_seeds, first_seed=first_seed, steps=steps, guidance=guidance,
                    batch_size=batch_size, contexts=tuple(context) if context else None)
    chosen = {"subject": subject, "instance_dir": instance_dir, "instance_prompt": instance_prompt,
              "class_prompt": class_prompt, "dino": dino, "clip": clip}
    if run is not None:
        metrics = _score_run(run, plan, chosen, base=base, device=device, dtype=dtype, as_json=as_json)
    else:
        metrics = _score_adapter(adapter, plan, chosen, base=base, device=device, dtype=dtype, as_json=as_json)
    text = json.dumps(metrics, indent=2) + "\n"
    if out is not None:
        atomic_write_text(out, text)
    if as_json:
        typer.echo(text.rstrip("\n"))


def run_config_of(folder: Path) -> tuple[Path | None, dict]:
    """(config.yaml, its mapping) of the run that a run folder, its adapter/ or a checkpoints/step-N/ belongs to."""
    folder = Path(folder).resolve()
    for candidate in (folder, folder.parent, folder.parent.parent):
        path = candidate / "config.yaml"
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                return path, {}
            return path, data if isinstance(data, dict) else {}
    return None, {}


def _configured(config: dict, section: str, key: str) -> str | None:
    value = config.get(section)
    value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) and value.strip() else None


class Choices:
    """The command's options, completed from the run's config.yaml where an option was left out."""

    def __init__(self, folder: Path, options: dict):
        self.folder, self.options = folder, options
        self.config_file, self.config = run_config_of(folder)

    def get(self, option: str, section: str, key: str) -> str | None:
        given = self.options[option]
        return str(given) if given is not None else _configured(self.config, section, key)

    def toy_subject(self, toy_base: bool):
        """The toy subject to judge by: --subject, else the subject.json beside the run's photos; None when the
        adapter is not of the toy model or its photos are not a toy subject's (DINO and CLIP score it then)."""
        from waveft_train.train.scoring import toy_subject

        if not toy_base:
            return None
        if self.options["subject"] is not None:
            return _named_subject(self.options["subject"])
        instance_dir = self.get("instance_dir", "data", "instance_dir")
        found = toy_subject(instance_dir) if instance_dir else None
        if found is None and instance_dir is None:
            from waveft_train.toy.subjects import SUBJECTS

            where = self.config_file or "no config.yaml beside it (a copied adapter?)"
            raise UserError(f"Cannot tell which subject {self.folder} was trained on ({where}). Pass --subject with a "
                            f"built-in subject ({', '.join(SUBJECTS)}) or a folder of toy subject photos holding "
                            "subject.json, or --instance-dir PHOTOS --instance-prompt TEXT to score it with DINO/CLIP.")
        return found

    def run_subject(self):
        """What the run personalized, for the DINO/CLIP metrics."""
        from waveft_train.evaluation.scorers import RunSubject

        instance_dir = self.get("instance_dir", "data", "instance_dir")
        instance_prompt = self.get("instance_prompt", "data", "instance_prompt")
        if not instance_dir or not instance_prompt:
            where = (f"its run config {self.config_file} does not name them" if self.config_file else
                     "no run config.yaml lies beside it (a copied adapter?)")
            raise UserError(f"Scoring {self.folder} compares its samples with the subject's photos, prompted with the "
                            f"instance prompt, but {where}. Pass --instance-dir PHOTOS and --instance-prompt \"a "
                            "photo of sks dog\" (and --class-prompt \"a photo of dog\").")
        key = "--instance-dir" if self.options["instance_dir"] is not None else f"data.instance_dir of {self.config_file}"
        return RunSubject(instance_dir, instance_prompt, self.get("class_prompt", "prior", "class_prompt"), key)

    def scorer(self, toy_base: bool, plan, device: str):
        """The toy judge's scorer or the DINO/CLIP one; built before the base model loads, so that a missing photo
        folder or metric model fails in seconds."""
        from waveft_train.evaluation.metric_models import DEFAULT_CLIP, DEFAULT_DINO
        from waveft_train.evaluation.scorers import dreambooth_scorer
        from waveft_train.toy.judge import load_judge
        from waveft_train.toy.scoring import ToyScorer

        subject = self.toy_subject(toy_base)
        if subject is not None:
            return ToyScorer(subject, load_judge(), plan)
        return dreambooth_scorer(self.run_subject(), plan, device=device,
                                 dino=self.get("dino", "validation", "dino_model") or DEFAULT_DINO,
                                 clip=self.get("clip", "validation", "clip_model") or DEFAULT_CLIP)


def _named_subject(subject: str):
    from waveft_train.toy.subjects import SUBJECTS, get_subject

    try:
        return get_subject(subject)
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise UserError(f"--subject {subject} is neither a built-in subject ({', '.join(SUBJECTS)}) nor a folder (or "
                        f"file) with a readable subject.json ({type(error).__name__}: {error}).") from None


def _toy_base(adapter: Path, base: str | None) -> bool:
    """Whether the adapter's base (or --base) is the toy model, also as a single file made from it."""
    from waveft_train.adapter.load import read_adapter
    from waveft_train.train.scoring import is_toy_base

    files = read_adapter(adapter)
    return is_toy_base(base or files.config.base_model_name_or_path or "", files.metadata)


def _weights(scorer, dtype: str, device: str):
    """The toy model always samples in fp32 (it is small, and its judge was measured so); others as --dtype says."""
    import torch

    return torch.float32 if scorer.kind == "toy judge" else _sample_dtype(dtype, device)


def _score_run(run: Path, plan, options: dict, *, base: str | None, device: str | None, dtype: str,
               as_json: bool) -> dict:
    from waveft_train.train.scoring import scorable_adapters, score_run

    if _per_concept(Choices(run, options)):
        raise UserError(f"{run} trained several concepts, and --run ranks checkpoints by one subject's scores. Score "
                        f"its adapter per concept with --adapter {run / 'adapter'}, or rank by one concept with "
                        "--subject (toy) or --instance-dir and --instance-prompt.")
    adapters = scorable_adapters(run)
    run_device = _run_device(device)
    scorer = Choices(run, options).scorer(_toy_base(adapters[-1][2], base), plan, run_device)
    return score_run(run, scorer, base=base, dtype=_weights(scorer, dtype, run_device), device=run_device,
                     echo=(lambda line: None) if as_json else typer.echo)


def _score_adapter(adapter: Path, plan, options: dict, *, base: str | None, device: str | None, dtype: str,
                   as_json: bool) -> dict:
    from waveft_train.evaluation.ranking import ranking_parts
    from waveft_train.toy.evaluate import evaluate_adapter
    from waveft_train.toy.scoring import flat_scores
    from waveft_train.train.scoring import score_adapter

    run_device = _run_device(device)
    choices = Choices(adapter, options)
    if _per_concept(choices):
        return _score_concepts(adapter, choices, plan, base=base, device=run_device, as_json=as_json)
    scorer = choices.scorer(_toy_base(adapter, base), plan, run_device)
    if scorer.kind == "toy judge":  # the judge's full report: also what each sample shows, the VAE's ceiling, ...
        metrics = evaluate_adapter(adapter, subject=scorer.subject, base=base, settings=scorer.settings,
                                   judge=scorer.judge, device=run_device)
        metrics["ranking"] = ranking_parts(flat_scores(metrics))
    else:
        metrics = score_adapter(adapter, scorer, base=base, dtype=_sample_dtype(dtype, run_device), device=run_device)
    if not as_json:
        typer.echo(_summary_line(metrics, scorer))
    return metrics


def _per_concept(choices: Choices) -> bool:
    """A run with a concepts list, scored per concept unless an option names one subject."""
    named = any(choices.options[key] is not None for key in ("subject", "instance_dir", "instance_prompt"))
    return bool(choices.config.get("concepts")) and not named


def _score_concepts(adapter: Path, choices: Choices, plan, *, base: str | None, device: str, as_json: bool) -> dict:
    """Each concept on its own prompt, bleed between them, the class prompts (toy/concepts.py): the toy judge's."""
    from waveft_train.toy.concepts import concepts_of_run, evaluate_concepts, summary_line
    from waveft_train.toy.evaluate import EvalSettings

    one = ("Score one concept with --subject (toy) or with DINO/CLIP: --instance-dir PHOTOS --instance-prompt TEXT "
           "--class-prompt TEXT.")
    if not _toy_base(adapter, base):
        raise UserError(f"{adapter} was trained on several concepts; scores per concept need the toy model's judge. "
                        + one)
    try:
        concepts = concepts_of_run(choices.config)
    except LookupError as error:
        raise UserError(f"{adapter} was trained on several concepts, but {error}. " + one) from None
    contexts = {"contexts": plan.contexts} if plan.contexts is not None else {}
    settings = EvalSettings(seeds=plan.seeds, class_seeds=plan.class_seeds, first_seed=plan.first_seed,
                            steps=plan.steps, guidance=plan.guidance, batch_size=plan.batch_size, **contexts)
    metrics = evaluate_concepts(adapter, concepts, base=base, settings=settings, device=device)
    if not as_json:
        typer.echo(summary_line(metrics))
    return metrics


def _summary_line(metrics: dict, scorer) -> str:
    toy = scorer.kind == "toy judge"
    keys = SUMMARY_KEYS["toy" if toy else "dreambooth"]
    extra = {"subject_fidelity": f", VAE ceiling {metrics.get('subject_fidelity_ceiling', 0):.2f}, described in "
                                 f"words {metrics.get('described_subject_fidelity', 0):.2f}"} if toy else {}
    shown = ", ".join(f"{key} {metrics[key]:.2f} (base {metrics['base'][key]:.2f}{extra.get(key, '')})" for key in keys)
    who = metrics["subject"]["name"] if toy else Path(metrics["adapter"]).name
    return f"{who}: {shown}; ranking score {metrics['ranking']['score']:+.3f}"
