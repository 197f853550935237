"""Helpers shared by test files (pytest puts tests/ on sys.path, so test modules import this as `helpers`)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from waveft_train.cli.main import main
from waveft_train.train import run


def run_cli(args: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`waveft-train ARGS` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        main([str(arg) for arg in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fast_overrides(output_dir: Path, class_dir: Path, **extra) -> list[str]:
    """tests/data/tiny.yaml's `--set` overrides that shrink its run to seconds: 32 px, 4 steps, tiny validation."""
    values = {
        "output.dir": output_dir,
        "prior.class_dir": class_dir,
        "prior.num_class_images": 2,
        "prior.generation_steps": 2,
        "prior.generation_batch_size": 2,
        "data.resolution": 32,
        "train.max_steps": 4,
        "train.gradient_accumulation": 1,
        "train.checkpoint_every": 2,
        "train.checkpoints_keep": 2,
        "validation.every": 2,
        "validation.num_images": 1,
        "validation.steps": 2,
        "validation.prompts": "[a photo of sks toy]",
        "waveft.n_frequency": 128,
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


# --------------------------------------------------------------------------------------------- the docs' code blocks
REPO = Path(__file__).resolve().parents[1]
DOC_FILES = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))


class Interrupted(Exception):
    """A crash the tests inject into a run (see `crash_after_checkpoint`)."""


def crash_after_checkpoint(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make every run raise `Interrupted` right after it writes the checkpoint of `step` (undo: monkeypatch.undo())."""
    real_save = run.DreamBoothRun.save_checkpoint

    def save_then_crash(self, saved_step):
        real_save(self, saved_step)
        if saved_step == step:
            raise Interrupted

    monkeypatch.setattr(run.DreamBoothRun, "save_checkpoint", save_then_crash)


def doc_code_blocks(language: str) -> list[tuple[Path, str]]:
    """Every fenced code block of `language` in README.md and docs/*.md, as (file, code). Tests find the blocks they
    run by what the code says, never by the prose or headings around them."""
    return [(path, code) for path in DOC_FILES
            for info, code in re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)
            if info == language]


def doc_commands() -> list[tuple[Path, str]]:
    """Every shell command of the docs' bash blocks: continuation lines joined, comments dropped, `a && b` split."""
    commands = []
    for path, code in doc_code_blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands += [(path, part.strip()) for part in line.split("&&")]
    return commands


def doc_command(*fragments: str) -> str:
    """The one documented command holding every fragment."""
    found = {command for _, command in doc_commands() if all(fragment in command for fragment in fragments)}
    assert len(found) == 1, f"expected one documented command with {fragments}, found {sorted(found)}"
    return found.pop()


# --------------------------------------------------------------------------------------------- captioned subjects
SUBJECT = REPO / "tests" / "data" / "subject"
SUBJECT_PHOTOS = tuple(sorted(path.name for path in SUBJECT.glob("*.png")))


def captioned_subject(folder: Path, captions: dict[str, str] | None = None, metadata: dict[str, str] | None = None,
                      photos: tuple[str, ...] = SUBJECT_PHOTOS) -> Path:
    """A copy of the tests' subject photos (and their LICENSE.txt, which captions nothing) in a new `folder`: a `.txt`
    caption beside each photo named in `captions`, and a metadata.jsonl with a `text` per photo named in `metadata`."""
    folder.mkdir(parents=True)
    for name in (*photos, "LICENSE.txt"):
        shutil.copy(SUBJECT / name, folder / name)
    for name, caption in (captions or {}).items():
        (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
    if metadata is not None:
        (folder / "metadata.jsonl").write_text(
            "".join(json.dumps({"file_name": name, "text": text}) + "\n" for name, text in metadata.items()))
    return folder
