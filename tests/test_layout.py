"""The house rules of docs/architecture.md, checked: one folder per concern, imports only downward (every import,
those inside functions included), no cycles, small modules, no sys.path edits, a torch-free config, and only the
run and the CLI see the whole config."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "waveft_train"
MAX_LINES = 400  # "a file past ~400 lines holds two ideas"
# The package's folders from the ground up: a module may import its own folder and the folders below it, never one
# above.
# evaluation/ (the scores of adapters) sits above adapter/ (it loads and samples them) and below toy/ (the toy judge's
# evaluation shares its sampling and its colour measure of class drift).
LAYERS = ("common", "waveft", "models", "config", "data", "adapter", "evaluation", "toy", "train", "cli")
WHOLE_CONFIG_ALLOWED = {"train/run.py", "cli/main.py"}
# Imports that stay inside functions: the CLI keeps `--help` and config errors fast; the package's and the tuner's
# facades keep `import waveft_train` and the torch-free `families` table (which the config validates against)
# importable without torch and peft.
LAZY_ALLOWED = ("cli/", "waveft/__init__.py", "__init__.py")
# imported only when a config asks, or (matplotlib) where a report draws its charts
OPTIONAL_EXTRAS = ("bitsandbytes", "prodigyopt", "tensorboard", "torch.utils.tensorboard", "wandb", "matplotlib")


def modules() -> dict[str, Path]:
    return {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
            for path in PACKAGE.rglob("*.py")}


KNOWN = set(modules())


def imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, inside a function) for every import statement of the module, resolved to absolute names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(function)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in inside) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):  # `from A import b`: module A.b if there is one, else A itself
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in KNOWN else base for alias in node.names}
            found += [(target, id(node) in inside) for target in sorted(targets)]
    return found


def internal_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {module for module, _ in imports(name, path) if module in known and module != name}
            for name, path in known.items()}


def layer(module: str) -> int:
    """The package's face (`waveft_train/__init__.py`: the version and the pipeline functions) and `__main__` sit on
    top, like the CLI."""
    parts = module.split(".")
    if module == "waveft_train" or parts[1] == "__main__":
        return len(LAYERS)
    return LAYERS.index(parts[1])


def test_every_module_lives_in_a_layer_folder():
    loose = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.glob("*.py")
                   if path.name not in ("__init__.py", "__main__.py"))
    assert not loose, f"put these modules in the folder of their concern: {loose}"
    folders = sorted(path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file())
    assert folders == sorted(LAYERS), folders


def test_imports_only_go_down():
    upward = sorted(f"{name} -> {dep}" for name, deps in internal_graph().items() for dep in deps
                    if layer(dep) > layer(name))
    assert not upward, "imports from a lower layer to a higher one: " + ", ".join(upward)


def test_there_are_no_import_cycles():
    graph = internal_graph()
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


def test_imports_sit_at_the_top_of_modules():
    hidden = sorted(f"{path.relative_to(PACKAGE)}: {module}" for name, path in modules().items()
                    if not str(path.relative_to(PACKAGE)).startswith(LAZY_ALLOWED)
                    for module, in_function in imports(name, path)
                    if in_function and not module.startswith(OPTIONAL_EXTRAS))
    assert not hidden, "import these at the top of the module: " + ", ".join(hidden)


def test_no_module_is_too_long():
    long = {str(path.relative_to(REPO)): n for folder in ("waveft_train", "benchmarks", "scripts")
            for path in (REPO / folder).rglob("*.py")
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


def test_nothing_edits_sys_path():
    editing = sorted(str(path.relative_to(REPO)) for folder in ("waveft_train", "benchmarks", "scripts")
                     for path in (REPO / folder).rglob("*.py") if "sys.path.insert" in path.read_text(encoding="utf-8")
                     or "sys.path.append" in path.read_text(encoding="utf-8"))
    assert not editing, f"run these as python -m ... instead of editing sys.path: {editing}"


def test_the_config_imports_no_torch():
    code = ("import sys, waveft_train.config, waveft_train.config.docs, waveft_train.common.paths; "
            "print(sorted(m for m in ('torch', 'peft', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_only_the_run_and_the_cli_see_the_whole_config():
    readers = sorted(path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
                     if "TrainConfig" in path.read_text(encoding="utf-8") and path.parent.name != "config")
    assert set(readers) <= WHOLE_CONFIG_ALLOWED, readers
