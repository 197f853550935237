"""A run's checkpoints scored and the best one named: evaluation.jsonl and evaluation.json in the run folder.

- `evaluation.jsonl`: one line per scored adapter, oldest step first: {"step", "checkpoint" (its folder relative to
  the run: "checkpoints/step-000100", or "adapter" for the final one), "scores" (every metric, the base model's as
  base_<metric>, and the ranking's subject_gain, class_drift, prompt_loss), "score" (the ranking score; higher is
  better)}.
- `evaluation.json`: {"best": {"step", "checkpoint", "score"}, "rule" (the ranking rule in words), "settings" (what
  was sampled and with which metric models), "ranking" (every record's step, checkpoint and score, best first)}.

`score_run` (`waveft-train evaluate --run`) rescores every checkpoint still on disk and rewrites both files and the
run's report.html; `ValidationScores` (`validation.evaluate: true`) adds one line at each validation step of a
training run (the run rewrites report.html next). Both write on the main process only, atomically. `best_adapter` is
what `--checkpoint best` reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from waveft_train.adapter.files import ADAPTER_WEIGHTS, load_adapter_weights_into, read_adapter
from waveft_train.adapter.load import load_adapter_unet
from waveft_train.common.errors import UserError
from waveft_train.common.files import atomic_write_text, writing
from waveft_train.common.lock import FolderLock
from waveft_train.common.paths import is_single_file
from waveft_train.config import DataSection, PriorSection, TrainSection, ValidationSection
from waveft_train.evaluation.metric_models import DEFAULT_CLIP, DEFAULT_DINO
from waveft_train.evaluation.ranking import RULE, best_record, ranking_parts
from waveft_train.evaluation.scorers import EvalPlan, RunSubject, Scorer, dreambooth_scorer
from waveft_train.models.builtin import is_toy_model
from waveft_train.models.loading import build_pipeline
from waveft_train.models.single_file import SingleFileBase
from waveft_train.toy.judge import load_judge
from waveft_train.toy.scoring import ToyScorer
from waveft_train.toy.subjects import SUBJECT_FILE, Subject, get_subject
from waveft_train.train.checkpoint import EVALUATION_SUMMARY, checkpoint_record, list_checkpoints
from waveft_train.train.report_html import write_report

EVALUATION_LOG = "evaluation.jsonl"
FINAL_ADAPTER = "adapter"
SCORE_COMMAND = "waveft-train evaluate --run {run}"


def checkpoint_label(step: int) -> str:
    return f"checkpoints/step-{step:06d}"


def run_adapters(output_dir: Path) -> list[tuple[int, str, Path]]:
    """(step, label, folder) of every complete checkpoint, oldest first; the final adapter replaces the checkpoint of
    its step (the same weights) under the label "adapter"."""
    found = {int(checkpoint_record(folder)["step"]): (f"checkpoints/{folder.name}", folder)
             for folder in list_checkpoints(output_dir)}
    final, summary = output_dir / FINAL_ADAPTER, output_dir / "summary.json"
    if (final / ADAPTER_WEIGHTS).is_file() and summary.is_file():
        step = json.loads(summary.read_text(encoding="utf-8")).get("steps")
        if isinstance(step, int):
            found[step] = (FINAL_ADAPTER, final)
    return [(step, label, folder) for step, (label, folder) in sorted(found.items())]


def toy_subject(instance_dir: str) -> Subject | None:
    """The toy subject whose photos `instance_dir` holds (its subject.json), or None for other photos."""
    try:
        return get_subject(Path(instance_dir) / SUBJECT_FILE)
    except (OSError, KeyError, TypeError, ValueError):
        return None


def is_toy_base(name: str, metadata: Mapping[str, str]) -> bool:
    """Whether an adapter's base (its name, and the metadata that records a single-file base) is the toy model:
    `toy`, a copy of its folder, or a single file made from it (its recorded model.config)."""
    recorded = SingleFileBase.from_metadata(metadata, name) if is_single_file(name) else None
    return is_toy_model(name) or (recorded is not None and is_toy_model(recorded.config))


def make_scorer(toy_base: bool, run: RunSubject, plan: EvalPlan, *, dino: str = DEFAULT_DINO,
                clip: str = DEFAULT_CLIP, device: str = "cpu", subject: Subject | None = None) -> Scorer:
    """The toy judge for a run of the toy model on a toy subject (given, or named by the photos' subject.json);
    DINO and CLIP for everything else."""
    subject = subject or (toy_subject(run.instance_dir) if toy_base else None)
    if subject is not None:
        return ToyScorer(subject, load_judge(), plan)
    return dreambooth_scorer(run, plan, dino=dino, clip=clip, device=device)


def scorable_adapters(output_dir: Path) -> list[tuple[int, str, Path]]:
    """`run_adapters`, or a UserError when there is none."""
    adapters = run_adapters(output_dir)
    if not adapters:
        raise UserError(f"{output_dir} holds no checkpoints/step-* folder and no final adapter/ to score. Is it a "
                        "waveft-train output folder (output.dir)? A run writes a checkpoint every "
                        "train.checkpoint_every steps.")
    return adapters


class EvaluationLog:
    """evaluation.jsonl and evaluation.json of one run folder. Records of earlier scoring are kept only when they
    were made with the same settings (and `fresh` is false), so one table never mixes two ways of scoring."""

    def __init__(self, output_dir: Path, settings: dict, *, fresh: bool):
        self.output_dir, self.settings = Path(output_dir), json.loads(json.dumps(settings))
        self.records: list[dict] = [] if fresh else self._earlier_records()

    @property
    def log_path(self) -> Path:
        return self.output_dir / EVALUATION_LOG

    @property
    def summary_path(self) -> Path:
        return self.output_dir / EVALUATION_SUMMARY

    def _earlier_records(self) -> list[dict]:
        try:
            summary = json.loads(self.summary_path.read_text(encoding="utf-8"))
            lines = self.log_path.read_text(encoding="utf-8").splitlines()
            if summary.get("settings") != self.settings:
                return []
            return [json.loads(line) for line in lines if line.strip()]
        except (OSError, ValueError, AttributeError):
            return []

    def add(self, step: int, checkpoint: str, scores: dict[str, float]) -> dict:
        """Record one scored adapter (replacing an earlier record of its step) and rewrite both files."""
        parts = ranking_parts(scores)
        score = parts.pop("score")
        record = {"step": step, "checkpoint": checkpoint, "scores": {**scores, **parts}, "score": score}
        self.records = sorted([*(r for r in self.records if r["step"] != step), record], key=lambda r: r["step"])
        lines = "".join(json.dumps(r) + "\n" for r in self.records)
        with writing(self.log_path, "the evaluation log"):
            atomic_write_text(self.log_path, lines)
            atomic_write_text(self.summary_path, json.dumps(self.summary(), indent=2) + "\n")
        return record

    def summary(self) -> dict:
        best = best_record(self.records)
        ranking = sorted(self.records, key=lambda r: (-r["score"], r["step"]))
        return {"best": {key: best[key] for key in ("step", "checkpoint", "score")}, "rule": RULE,
                "settings": self.settings,
                "ranking": [{key: r[key] for key in ("step", "checkpoint", "score")} for r in ranking]}


def record_line(record: dict, *, best: bool = False) -> str:
    """One row of the table `evaluate --run` prints."""
    scores = record["scores"]
    return (f"{record['step']:>7} {record['checkpoint']:<26} {scores['subject_gain']:>+8.3f} {scores['class_drift']:>8.3f} "
            f"{scores['prompt_loss']:>8.3f} {record['score']:>+8.3f}{'  <- best' if best else ''}")


TABLE_HEADER = f"{'step':>7} {'checkpoint':<26} {'gain':>8} {'drift':>8} {'p.loss':>8} {'score':>8}"


def _loaded(adapter: Path, base: str | None, dtype: torch.dtype, device: str):
    """The base model with the adapter on its UNet, on `device`, and a pipeline over them."""
    components, unet = load_adapter_unet(adapter, base, dtype=dtype)
    for module in (components.unet, components.vae, components.text_encoder, components.text_encoder_2):
        module.to(device)
    return unet, build_pipeline(components, unet=unet)


def score_adapter(adapter: Path, scorer: Scorer, *, base: str | None, dtype: torch.dtype, device: str) -> dict:
    """One adapter's metrics: the adapter's at the top, the base model's under "base", the ranking's parts under
    "ranking", what was sampled under "settings"."""
    unet, pipeline = _loaded(adapter, base, dtype, device)
    scores = scorer.score(pipeline, unet)
    metrics = {name: value for name, value in scores.items() if not name.startswith("base_")}
    metrics["base"] = {name.removeprefix("base_"): value for name, value in scores.items() if name.startswith("base_")}
    return {**metrics, "ranking": ranking_parts(scores), "settings": scorer.describe(),
            "adapter": str(Path(adapter).resolve())}


def score_run(output_dir: Path, scorer: Scorer, *, base: str | None, dtype: torch.dtype, device: str,
              echo: Callable[[str], None] = print) -> dict:
    """Score every adapter of the run folder (the base model loaded once, each checkpoint's weights swapped in),
    rewrite evaluation.jsonl, evaluation.json and report.html, and return the summary. Holds the folder's lock: a
    training run writing there meanwhile would mix two tables."""
    output_dir = Path(output_dir)
    adapters = scorable_adapters(output_dir)
    with FolderLock(output_dir, what="waveft-train run or evaluation"):
        unet, pipeline = _loaded(adapters[-1][2], base, dtype, device)
        log = EvaluationLog(output_dir, scorer.describe(), fresh=True)
        for index, (step, label, folder) in enumerate(adapters, start=1):
            files = read_adapter(folder)
            load_adapter_weights_into(unet, files.load_tensors(), misfit=f"The checkpoint {folder} does not fit the "
                                      f"run's adapter ({adapters[-1][2]})", remedy="Do all checkpoints come from one run?")
            record = log.add(step, label, scorer.score(pipeline, unet))
            echo(f"[{index}/{len(adapters)}] {label}: score {record['score']:+.3f}")
        report = write_report(output_dir)
    summary = log.summary()
    best = summary["best"]
    echo(TABLE_HEADER)
    for record in log.records:
        echo(record_line(record, best=record["step"] == best["step"]))
    echo(f"Best: {best['checkpoint']} (step {best['step']}, score {best['score']:+.3f}); wrote {log.log_path}, "
         f"{log.summary_path} and {report}.")
    return summary


def best_adapter(output_dir: Path) -> Path:
    """The adapter folder evaluation.json names best (`--checkpoint best`)."""
    output_dir = Path(output_dir)
    summary_path = output_dir / EVALUATION_SUMMARY
    score_it = SCORE_COMMAND.format(run=output_dir)
    if not summary_path.is_file():
        raise UserError(f"--checkpoint best needs the run's scores, but {output_dir} has no {EVALUATION_SUMMARY}: the "
                        f"run was not scored. Score it with `{score_it}` (or train with validation.evaluate: true), "
                        "or pass --checkpoint with a step number.")
    try:
        best = json.loads(summary_path.read_text(encoding="utf-8"))["best"]["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{summary_path} cannot be read ({type(error).__name__}: {error}); score the run again with "
                        f"`{score_it}`.") from None
    folder = output_dir / best
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{summary_path} names {best} as the best checkpoint, but {folder} is gone (deleted by hand, "
                        f"or by an older waveft-train's train.checkpoints_keep). Score the checkpoints still there "
                        f"with `{score_it}`.")
    return folder


def run_adapter(output_dir: Path, checkpoint: str) -> Path:
    """`--run DIR --checkpoint X`: best (evaluation.json's), final (adapter/), or a step number."""
    output_dir = Path(output_dir)
    if checkpoint == "best":
        return best_adapter(output_dir)
    if checkpoint == "final":
        folder = output_dir / FINAL_ADAPTER
    elif checkpoint.removeprefix("step-").isdigit():
        folder = output_dir / checkpoint_label(int(checkpoint.removeprefix("step-")))
    else:
        raise UserError(f"--checkpoint {checkpoint} is not one of: best (the one `{SCORE_COMMAND.format(run=output_dir)}`"
                        " names), final (the run's adapter/), or a step number such as 400.")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        steps = ", ".join(str(step) for step, _, _ in run_adapters(output_dir)) or "none"
        raise UserError(f"--checkpoint {checkpoint}: {folder} holds no adapter. Steps with one in {output_dir}: {steps}.")
    return folder


class ValidationScores:
    """`validation.evaluate: true`: score the adapter at each validation step of a training run (main process). The
    config has checked that each scored step has its checkpoint and that the class prompt is set."""

    def __init__(self, validation: ValidationSection, data: DataSection, prior: PriorSection, train: TrainSection,
                 output_dir: Path):
        self.run = RunSubject(data.instance_dir, data.instance_prompt, prior.class_prompt)
        self.plan = EvalPlan(steps=validation.steps, guidance=validation.guidance)
        self.models = {"dino": validation.dino_model, "clip": validation.clip_model}
        self.output_dir, self.max_steps = output_dir, train.max_steps
        self.scorer: Scorer | None = None
        self.log: EvaluationLog | None = None

    def score(self, step: int, components, unet: torch.nn.Module, conditioning, prediction_type: str) -> dict:
        if self.scorer is None:  # the metric models load at the first validation, not before training starts
            device = str(next(unet.parameters()).device)
            toy = is_toy_base(components.base_model_name, components.base_metadata)
            self.scorer = make_scorer(toy, self.run, self.plan, device=device, **self.models)
            self.log = EvaluationLog(self.output_dir, self.scorer.describe(), fresh=False)
        unet.eval()
        try:
            with conditioning.lent_to_pipeline(), torch.no_grad():
                pipeline = build_pipeline(components, unet=unet, prediction_type=prediction_type)
                scores = self.scorer.score(pipeline, unet)
        finally:
            unet.train()
        label = FINAL_ADAPTER if step >= self.max_steps else checkpoint_label(step)
        record = self.log.add(step, label, scores)
        best = self.log.summary()["best"]
        print(f"Scored step {step}: {record['score']:+.3f} (best so far: {best['checkpoint']}, {best['score']:+.3f}).",
              flush=True)
        return record
