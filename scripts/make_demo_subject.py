"""Render a toy-world DreamBooth subject's instance photos (default: the demo's striped ball).

Why procedural: the demo and the tests need a tiny, license-clean subject whose ground truth is known, so that a
run's samples can be checked by the toy world's judge. The photos come from the same renderer the toy model was
pretrained on (waveft_train/toy/world.py), with a pattern the model never saw; subject.json beside them says what
they show. Deterministic: the subject's seed fixes every layout and colour jitter.

Usage: python -m scripts.make_demo_subject [--subject striped_ball] [--identifier sks] [--out configs/demo_subject]
(configs/two-concepts.yaml's second subject: --subject checked_box --identifier zwx --out configs/box_subject)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from waveft_train.toy.subjects import DEMO_SUBJECT, SUBJECTS, write_instance_photos
from waveft_train.toy.world import IDENTIFIER

REPO = Path(__file__).resolve().parent.parent


def write_demo_subject(out_dir: Path, subject: str = DEMO_SUBJECT, identifier: str = IDENTIFIER) -> list[Path]:
    """Write the subject's PNGs, subject.json, metadata.jsonl and LICENSE.txt to out_dir; return the image paths."""
    return write_instance_photos(SUBJECTS[subject], Path(out_dir), identifier=identifier)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subject", choices=sorted(SUBJECTS), default=DEMO_SUBJECT)
    parser.add_argument("--identifier", default=IDENTIFIER, help="the rare token of the captions (default: %(default)s; "
                        "a second concept of one run needs its own)")
    parser.add_argument("--out", type=Path, default=REPO / "configs" / "demo_subject",
                        help="output folder (default: %(default)s)")
    args = parser.parse_args()
    paths = write_demo_subject(args.out, args.subject, args.identifier)
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} images ({total / 1024:.1f} KiB), subject.json, metadata.jsonl and LICENSE.txt "
          f"to {args.out}")


if __name__ == "__main__":
    main()
