"""The docs a user copies from: README.md (a five-minute read) and docs/*.md. Every command in their bash blocks is
checked here against the real command line; the snippets and commands that need an adapter run on the tiny model in
test_sampling.py (diffusers / peft snippets, `sample`, the merged export) and test_interop.py (the app exports)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
import typer
from helpers import DOC_FILES, REPO, doc_commands

from waveft_train.cli import main as cli

README_MAX_LINES = 250


def test_the_readme_is_a_five_minute_read():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    commands = [command for path, command in doc_commands() if path.name == "README.md"]
    assert commands[:3] == ['pip install -e ".[test]"', "waveft-train --config configs/demo.yaml",
                            "python -m pytest -q"], "the two commands come first: run the demo, run the tests"


def test_every_relative_link_in_the_docs_leads_somewhere():
    broken = []
    for path in DOC_FILES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if not re.match(r"[a-z]+:", target) and not (path.parent / target).exists():
                broken.append(f"{path.relative_to(REPO)} -> {target}")
    assert not broken, broken


def parse_waveft_train(args: list[str]) -> None:
    """Parse `waveft-train ARGS` with the real command line (every option name, value type and choice checked), without
    running anything."""
    cli._register_adapter_commands()
    group = typer.main.get_command(cli.app)
    if args and args[0] in group.commands:
        group.commands[args[0]].make_context(args[0], list(args[1:]))
    else:
        group.make_context("waveft-train", list(args))


def click_error(error: BaseException) -> str | None:
    """The message of a command-line error (click's own, or the copy typer bundles), else None."""
    if any(cls.__name__ == "ClickException" for cls in type(error).__mro__):
        return error.format_message()
    return None


WAVEFT_TRAIN = sorted({command for _, command in doc_commands() if command.startswith("waveft-train")})


@pytest.mark.parametrize("command", WAVEFT_TRAIN)
def test_every_documented_waveft_train_command_parses(command):
    try:
        parse_waveft_train(shlex.split(command)[1:])
    except Exception as error:
        pytest.fail(f"{command}: {click_error(error) or repr(error)}")


@pytest.mark.parametrize("args, message", [
    (["export", "--adapter", "a", "--out", "b", "--rnak", "4"], "No such option: --rnak"),
    (["sample", "--adapter", "a", "--out", "b.png", "--num-images", "many"], "Invalid value for '--num-images'"),
    (["--config", "a.yaml", "--sett", "x=1"], "No such option: --sett"),
])
def test_the_parser_check_catches_a_wrong_option(args, message):
    with pytest.raises(Exception) as caught:
        parse_waveft_train(args)
    assert message in (click_error(caught.value) or "")


def documented_modules() -> list[str]:
    """Every module the docs run with `python -m` or `accelerate launch ... -m`."""
    modules = set()
    for _, command in doc_commands():
        words = shlex.split(command)
        if (words[:2] == ["python", "-m"] or "accelerate" in words) and "-m" in words:
            modules.add(words[words.index("-m") + 1])
    return sorted(modules)


def test_the_docs_run_the_project_s_own_modules():
    assert {"waveft_train", "pytest", "scripts.pretrain_toy"} <= set(documented_modules())


@pytest.mark.parametrize("module", [m for m in documented_modules() if m != "pytest"])
def test_every_documented_module_runs(module):
    """`python -m MODULE --help` from the repo root, as the docs run them (no sys.path edits needed)."""
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()
