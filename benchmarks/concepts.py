"""Two concepts in one run on the toy world, over several training seeds: fidelity, bleed, class prompts (issue 32).

    python -m benchmarks.concepts --seeds 0 1 2                 # configs/two-concepts.yaml, each seed trained and scored
    python -m benchmarks.concepts --seeds 0 --set train.max_steps=300 --eval-seeds 2   # a quick look

Each seed trains configs/two-concepts.yaml (with `--set train.seed=S`, its own output folder, the class images
shared) through the trainer's own `DreamBoothRun` and scores the final adapter per concept with
`waveft_train.toy.concepts.evaluate_concepts` (each subject on its own prompts, bleed onto the other concept's
prompts, the class prompts). A finished seed is not retrained or rescored. The JSON holds every seed's figures and,
per figure, the mean over seeds with its range and the 95 % Wilson interval of the pooled samples (every figure is a
share of judged samples).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks.common import add_json_argument, command_line, write_results
from waveft_train.config import load_config
from waveft_train.toy.concepts import concepts_of_run, evaluate_concepts
from waveft_train.toy.evaluate import EvalSettings
from waveft_train.train.run import train_from_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "two-concepts.yaml"


def wilson(share: float, count: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a share of `count` samples."""
    if count == 0:
        return 0.0, 1.0
    centre = (share + z * z / (2 * count)) / (1 + z * z / count)
    half = z * math.sqrt(share * (1 - share) / count + z * z / (4 * count * count)) / (1 + z * z / count)
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)


def figures(result: dict) -> dict[str, tuple[float, int]]:
    """(share, samples) of every figure of one seed's per-concept result."""
    sampled = result["sampled"]
    per_concept = len(sampled["contexts"]) * sampled["seeds"]
    found = {}
    for concept in result["concepts"]:
        found[f"{concept['name']} subject_fidelity"] = (concept["subject_fidelity"], per_concept)
        found[f"{concept['name']} context_fidelity"] = (concept["context_fidelity"], per_concept)
        for other, share in concept["shows_other_subjects"].items():
            found[f"{other}'s subject on {concept['name']}'s prompts"] = (share, per_concept)
    for entry in result["class_prompts"]:
        found[f"class prompt {entry['prompt']!r} shows either subject"] = (entry["any_subject"], sampled["class_seeds"])
    return found


def summarize(per_seed: dict[str, dict]) -> dict[str, dict]:
    table: dict[str, dict] = {}
    for result in per_seed.values():
        for name, (share, count) in figures(result).items():
            entry = table.setdefault(name, {"shares": [], "samples": 0})
            entry["shares"].append(share)
            entry["samples"] += count
    for entry in table.values():
        mean = sum(entry["shares"]) / len(entry["shares"])
        entry.update(mean=round(mean, 4), range=[min(entry["shares"]), max(entry["shares"])],
                     wilson_95=wilson(mean, entry["samples"]))
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the run (default: configs/two-concepts.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "concepts",
                        help="one run folder per seed, and the shared class images (default: %(default)s)")
    parser.add_argument("--eval-seeds", type=int, default=4, help="samples per context and concept (default: 4)")
    parser.add_argument("--class-seeds", type=int, default=8, help="samples per class prompt (default: 8)")
    parser.add_argument("--device", default="cpu", help="where the evaluation samples (default: cpu)")
    add_json_argument(parser, "concepts")
    args = parser.parse_args(argv)
    settings = EvalSettings(seeds=args.eval_seeds, class_seeds=args.class_seeds)
    per_seed = {}
    for seed in args.seeds:
        run_dir = args.out / f"seed-{seed}"
        scored = run_dir / "concepts-evaluation.json"
        if not scored.is_file():
            config = load_config(args.config, [*args.set, f"train.seed={seed}", f"output.dir={run_dir}",
                                               f"prior.class_dir={args.out / 'class-images'}"])
            train_from_config(config, progress=False)
            mapping = json.loads(json.dumps(config.model_dump(mode="json")))
            result = evaluate_concepts(run_dir / "adapter", concepts_of_run(mapping), settings=settings,
                                       device=args.device)
            scored.write_text(json.dumps(result, indent=2) + "\n")
        per_seed[str(seed)] = json.loads(scored.read_text())
        print(f"seed {seed}: worst {per_seed[str(seed)]['worst']}", flush=True)
    table = summarize(per_seed)
    for name, entry in table.items():
        print(f"{name}: {entry['mean']:.2f} (seeds {entry['range'][0]:.2f}-{entry['range'][1]:.2f}, "
              f"95 % {entry['wilson_95'][0]:.2f}-{entry['wilson_95'][1]:.2f})")
    write_results({"command": command_line("benchmarks.concepts", argv), "seeds": per_seed, "table": table},
                  args.json, "concepts")


if __name__ == "__main__":
    main()
