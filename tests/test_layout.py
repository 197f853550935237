"""The house rules of design.md, checked: small modules, no import cycles, a torch-free config, and only the run
(and the CLI) see the whole config; every other stage takes its own section."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "waveft_train"
MAX_LINES = 420  # "a file past ~400 lines holds two ideas"
WHOLE_CONFIG_ALLOWED = {"run.py", "cli.py"}


def modules() -> dict[str, Path]:
    return {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
            for path in PACKAGE.rglob("*.py")}


def top_level_imports(name: str, path: Path) -> set[str]:
    """waveft_train modules imported at module level (imports inside functions are lazy and cannot cycle at import)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {module for module in found if module.startswith("waveft_train")}


def test_no_module_is_too_long():
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


def test_there_are_no_import_cycles():
    known = modules()
    graph = {name: {dep for dep in top_level_imports(name, path) if dep in known and dep != name}
             for name, path in known.items()}
    visiting, done = set(), set()

    def visit(node: str, trail: list[str]) -> None:
        if node in done:
            return
        if node in visiting:
            pytest.fail("import cycle: " + " -> ".join(trail[trail.index(node):] + [node]))
        visiting.add(node)
        for dep in sorted(graph[node]):
            visit(dep, trail + [node])
        visiting.discard(node)
        done.add(node)

    for name in sorted(graph):
        visit(name, [])


def test_the_config_imports_no_torch():
    code = ("import sys, waveft_train.config, waveft_train.config.docs, waveft_train.paths; "
            "print(sorted(m for m in ('torch', 'peft', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_only_the_run_and_the_cli_see_the_whole_config():
    readers = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                     if "TrainConfig" in path.read_text(encoding="utf-8") and path.parent.name != "config")
    assert set(readers) <= WHOLE_CONFIG_ALLOWED, readers
