"""Helpers shared by test files (pytest puts tests/ on sys.path, so test modules import this as `helpers`)."""

from __future__ import annotations

import pytest

from waveft_train.cli.main import main


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
