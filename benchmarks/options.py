"""Training options on the toy world: AdamW vs Prodigy, with and without EMA, UNet only vs UNet + text encoders.

    python -m benchmarks.options                                    # every arm, 3 training seeds x 3 evaluation sets
    python -m benchmarks.options --arms adamw ema --seeds 0         # a quick look

Why: issue 33 asks whether the options DreamBooth users reach for help WaveFT, measured rather than assumed. Every
arm is configs/demo.yaml (the demo's subject, recipe and prompts) with one change, trained with `--seeds` training
seeds (`train.seed`) and each adapter scored by the toy judge on `--eval-sets` disjoint evaluation seed sets (the
subject prompt in every context and the class prompt; the base model scored on the same seeds). Nothing is tuned per
arm: an option that does not help on the toy shows as such.

Results are kept in `--out`/results.json (a rerun skips finished runs and evaluations) and the table goes to
`--out`/table.md: per arm, the mean over training seeds of each metric (each seed's value averaged over the
evaluation sets), the spread across training seeds (standard deviation, and min-max), and the spread across
evaluation sets within a seed (mean standard deviation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from waveft_train.adapter.load import load_adapter_unet
from waveft_train.config import load_config
from waveft_train.models.loading import build_pipeline, load_components
from waveft_train.toy.evaluate import EvalSettings, described_fidelity, evaluate_unet, sample_both, subject_of_adapter
from waveft_train.toy.judge import load_judge
from waveft_train.train.run import DreamBoothRun

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo.yaml"
ARMS = {  # the one change from configs/demo.yaml, as --set overrides
    "adamw": [],
    "prodigy": ["train.optimizer=prodigy", "train.learning_rate=1.0"],
    "ema": ["train.ema_decay=0.999"],
    "prodigy+ema": ["train.optimizer=prodigy", "train.learning_rate=1.0", "train.ema_decay=0.999"],
    "text_encoders": ["waveft.text_encoders=true"],
}
KEYS = ("subject_fidelity", "subject_similarity", "context_fidelity", "prior_preservation", "class_subject_similarity",
        "class_colour_similarity", "diversity")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.options", description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (train.seed)")
    parser.add_argument("--eval-sets", type=int, default=3, help="disjoint evaluation seed sets per adapter")
    parser.add_argument("--steps", type=int, default=None, help="default: the demo's train.max_steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench-options")
    return parser.parse_args(argv)


def eval_settings(index: int) -> EvalSettings:
    """Evaluation set `index`: seeds 1000 + 100·index onward (4 per context, 8 for the class prompt: disjoint sets)."""
    return EvalSettings(first_seed=1000 + 100 * index)


class Results:
    """results.json: {"runs": {arm-seed: {train facts, "evals": [metrics per evaluation set]}}}, written as it goes."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"runs": {}}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def train(arm: str, seed: int, out: Path, steps: int | None) -> dict:
    overrides = [*ARMS[arm], *([f"train.max_steps={steps}"] if steps else []), f"train.seed={seed}",
                 f"output.dir={out / 'runs' / f'{arm}-seed{seed}'}",
                 f"prior.class_dir={out / 'class-images'}", "train.checkpoint_every=0", "validation.prompts=[]"]
    started = time.perf_counter()
    run = DreamBoothRun(load_config(DEMO, overrides), force=True, progress=False)
    run.run()
    return {"arm": arm, "seed": seed, "overrides": overrides, "final_loss": run.final_loss,
            "train_seconds": round(time.perf_counter() - started, 1), "adapter": str(run.output_dir / "adapter")}


class Scorer:
    """The judge and the base model's samples per evaluation set, computed once and shared by every adapter."""

    def __init__(self):
        self.judge = load_judge()
        self.base = load_components("toy", weight_dtype=torch.float32)
        self.cache: dict[int, tuple] = {}

    def score(self, adapter: Path, index: int) -> dict:
        subject, settings = subject_of_adapter(adapter), eval_settings(index)
        if index not in self.cache:
            pipeline = build_pipeline(self.base)
            self.cache[index] = (sample_both(pipeline, subject, settings),
                                 described_fidelity(pipeline, subject, self.judge, settings))
        base_samples, described = self.cache[index]
        components, unet = load_adapter_unet(adapter, None, dtype=torch.float32)
        metrics, _ = evaluate_unet(components, unet, subject, judge=self.judge, settings=settings,
                                   base_samples=base_samples, described=described)
        metrics.pop("judgements", None)
        return metrics


def summarize(runs: list[dict], key: str, base: bool = False) -> tuple[float, float, float, float, float]:
    """(mean over seeds, sd over seeds, min, max, mean sd over evaluation sets) of one metric."""
    per_seed, within = [], []
    for run in runs:
        values = [(m["base"] if base else m)[key] for m in run["evals"]]
        per_seed.append(statistics.fmean(values))
        within.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    spread = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
    return statistics.fmean(per_seed), spread, min(per_seed), max(per_seed), statistics.fmean(within)


def render_table(data: dict, arms: list[str], argv: list[str]) -> str:
    runs = list(data["runs"].values())
    hours = sum(run["train_seconds"] + run.get("eval_seconds", 0) for run in runs) / 3600
    lines = [f"Command: `{' '.join(['python -m benchmarks.options', *argv])}`",
             f"{len(runs)} runs, {hours:.2f} h of training and scoring in all.", "",
             "Each cell: mean over training seeds ± their standard deviation (ε: the mean standard deviation "
             "across the evaluation sets of one adapter).", "",
             "| arm | seeds | " + " | ".join(KEYS) + " | final loss | train s |",
             "|---|---|" + "---|" * (len(KEYS) + 2)]
    for arm in arms:
        group = [run for run in runs if run["arm"] == arm and run.get("evals")]
        if not group:
            continue
        cells = []
        for key in KEYS:
            mean, sd, low, high, within = summarize(group, key)
            cells.append(f"{mean:.2f} ± {sd:.2f} (ε {within:.2f})")
        loss = statistics.fmean(run["final_loss"] for run in group)
        seconds = statistics.fmean(run["train_seconds"] for run in group)
        lines.append(f"| {arm} | {len(group)} | " + " | ".join(cells) + f" | {loss:.4f} | {seconds:.0f} |")
    first = next((run for run in runs if run.get("evals")), None)
    if first:
        base = []
        for key in KEYS:
            if key in first["evals"][0]["base"]:
                mean, _, _, _, within = summarize([first], key, base=True)
                base.append(f"{mean:.2f} (ε {within:.2f})")
            else:
                base.append("-")
        lines.append("| base model | - | " + " | ".join(base) + " | - | - |")
    lines += paired_differences(runs, arms)
    return "\n".join(lines) + "\n"


def paired_differences(runs: list[dict], arms: list[str], reference: str = "adamw") -> list[str]:
    """Each arm minus `reference` on the same training seed and evaluation seeds (so the seeds' own luck cancels):
    the mean over training seeds and its min-max."""
    by_key = {(run["arm"], run["seed"]): run for run in runs if run.get("evals")}
    lines = ["", f"Paired differences from `{reference}` (same training seed, same evaluation seeds): mean over "
             "training seeds [min-max].", "", "| arm | seeds | " + " | ".join(KEYS) + " |",
             "|---|---|" + "---|" * len(KEYS)]
    for arm in arms:
        seeds = sorted(seed for name, seed in by_key if name == arm and (reference, seed) in by_key)
        if arm == reference or not seeds:
            continue
        cells = []
        for key in KEYS:
            deltas = [statistics.fmean(m[key] for m in by_key[(arm, seed)]["evals"])
                      - statistics.fmean(m[key] for m in by_key[(reference, seed)]["evals"]) for seed in seeds]
            cells.append(f"{statistics.fmean(deltas):+.2f} [{min(deltas):+.2f} to {max(deltas):+.2f}]")
        lines.append(f"| {arm} | {len(seeds)} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = Results(args.out / "results.json")
    scorer = None
    for seed in args.seeds:  # seed-major: every arm has a first seed before any has a third
        for arm in args.arms:
            key = f"{arm}-seed{seed}"
            run = results.data["runs"].get(key)
            if run is None:
                run = results.data["runs"][key] = train(arm, seed, args.out, args.steps)
                results.save()
            evals = run.setdefault("evals", [])
            started = time.perf_counter()
            scorer = scorer or Scorer()
            for index in range(len(evals), args.eval_sets):
                evals.append(scorer.score(Path(run["adapter"]), index))
            run["eval_seconds"] = run.get("eval_seconds", 0) + round(time.perf_counter() - started, 1)
            results.save()
            means = {name: statistics.fmean(m[name] for m in evals) for name in KEYS}
            print(f"{key}: " + " ".join(f"{name} {value:.2f}" for name, value in means.items())
                  + f" ({run['train_seconds']:.0f} s training)", flush=True)
    table = render_table(results.data, args.arms, sys.argv[1:] if argv is None else list(argv))
    (args.out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
