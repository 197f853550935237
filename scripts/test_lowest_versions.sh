#!/usr/bin/env bash
# The test suite on the lowest versions pyproject.toml allows: every `>=` floor of the dependencies and of the test
# extra is pinned with `==`; what those pull in resolves to its newest release, as for a newcomer.
# Usage: scripts/test_lowest_versions.sh [venv folder, default .venv-lowest] [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-lowest}"
shift || true
python3 -m venv "$VENV"
python3 - > "$VENV/lowest-versions.txt" <<'PY'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement)
    if floor:
        print(f"{floor[1]}=={floor[2]}")
PY
cat "$VENV/lowest-versions.txt"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -e ".[test]" -c "$VENV/lowest-versions.txt"
"$VENV/bin/pip" list | grep -iE "^(torch|diffusers|transformers|accelerate|peft|pywavelets|typer|datasets|safetensors|pydantic|pyyaml|pillow|pytest|lycoris-lora) "
"$VENV/bin/python" -m pytest -q "$@"
