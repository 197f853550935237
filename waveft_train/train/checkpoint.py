"""Training checkpoints: the adapter plus pickle-free training state, written atomically, newest N kept.

Why this shape:
- A checkpoint folder is an adapter folder (adapter/files.py: stock peft loads it) plus the training state
  (optimizer, LR scheduler, grad scaler, step, config fingerprint, global batch) stored without pickle: tensors in
  `training_state.safetensors`, everything else as JSON. Loading a checkpoint never runs code.
- Every folder is written beside its final place and renamed into it (`files.atomic_folder`), so a crash or a
  full disk leaves the previous checkpoints intact and never a half-written one that resume would pick up.
- A folder that fails any check (a missing file, unreadable JSON, a truncated safetensors file, a state that
  lacks what resuming needs) is skipped with a warning, and the next older one is used.

Writing is the caller's decision: call `save_checkpoint` on the main process only, with the unwrapped UNet.
"""

from __future__ import annotations

import json
import logging
import numbers
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors_bytes

from waveft_train.adapter.files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_tensors,
    read_json,
    safetensors_problem,
    write_adapter_files,
)
from waveft_train.adapter.text_encoders import write_text_encoder_adapters
from waveft_train.common.errors import UserError
from waveft_train.common.files import atomic_folder, is_leftover, write_bytes_synced
from waveft_train.data.images import manifest_changes
from waveft_train.models.single_file import RECORD_SHA256

logger = logging.getLogger(__name__)

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
CHECKPOINT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, STATE_TENSORS, STATE_JSON)
STATE_FORMAT = "waveft-train-state"
STATE_VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"step-(\d{6,})")
# Placeholders in the JSON skeleton. Plain dicts holding one of these keys are written in the `__dict__` form,
# so a JSON object with a marker key is always a placeholder.
TENSOR, NDARRAY, TUPLE, DICT = "__tensor__", "__ndarray__", "__tuple__", "__dict__"
MARKERS = frozenset({TENSOR, NDARRAY, TUPLE, DICT})
REQUIRED_STATE = ("step", "fingerprint", "optimizer", "lr_scheduler")  # what resuming reads from every checkpoint
EVALUATION_SUMMARY = "evaluation.json"  # names the run's best checkpoint (train/scoring.py), which pruning keeps

# ------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(output_dir: Path, step: int, *, unet: torch.nn.Module, base_model_name_or_path: str,
                    training_state: Mapping[str, Any], keep: int | None, prediction_type: str | None = None,
                    base_metadata: Mapping[str, str] | None = None,
                    text_encoders: Mapping[str, torch.nn.Module] | None = None) -> Path:
    """Write `checkpoints/step-NNNNNN/` (adapter, `text_encoders`' adapters in their subfolders, training state)
    atomically, then keep only the newest `keep` complete checkpoints (None keeps all). On failure the previous
    checkpoints are untouched. Main process only."""
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be None or at least 1, got {keep}")
    folder = checkpoints_dir(output_dir) / f"step-{step:06d}"
    tensors, skeleton = flatten_state(training_state)
    state_json = json.dumps({"format": STATE_FORMAT, "version": STATE_VERSION, "step": step, "state": skeleton},
                            indent=1)
    with atomic_folder(folder) as scratch:
        write_adapter_files(scratch, unet, base_model_name_or_path=base_model_name_or_path,
                            prediction_type=prediction_type, base_metadata=base_metadata)
        write_text_encoder_adapters(scratch, text_encoders or {}, base_model_name_or_path=base_model_name_or_path,
                                    base_metadata=base_metadata)
        write_bytes_synced(scratch / STATE_TENSORS, save_safetensors_bytes(tensors, metadata={"format": "pt"}))
        write_bytes_synced(scratch / STATE_JSON, state_json.encode("utf-8"))
    _prune(output_dir, keep, just_written=folder)
    return folder


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest step first; temp folders and incomplete ones are left out."""
    return [folder for _, folder in _numbered_folders(output_dir) if _incomplete_reason(folder) is None]


def newest_checkpoints(output_dir: Path) -> Iterator[Path]:
    """Complete checkpoints, newest first (what a rerun tries to resume from); incomplete ones are named and skipped."""
    for _, folder in reversed(_numbered_folders(output_dir)):
        reason = _incomplete_reason(folder)
        if reason is None:
            yield folder
        else:
            logger.warning("Skipping incomplete checkpoint %s: %s", folder, reason)


def find_latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    return next(newest_checkpoints(output_dir), None)


def checkpoint_record(folder: Path) -> dict[str, Any]:
    """A complete checkpoint's plain-JSON state (step, fingerprint, global batch, image manifest), read without
    loading any tensor; tensor-holding entries come back as placeholders."""
    return read_json(Path(folder) / STATE_JSON)["state"]


def finished_step(output_dir: Path, max_steps: int) -> int | None:
    """The newest checkpoint's step when the run there is finished (at or past `max_steps`, with summary.json and the
    final adapter: both are written together, so one without the other is a finish to complete)."""
    latest = find_latest_checkpoint(output_dir)
    done = (Path(output_dir) / "summary.json").exists() and (Path(output_dir) / "adapter" / ADAPTER_WEIGHTS).exists()
    if latest is None or not done:
        return None
    step = checkpoint_record(latest)["step"]
    return step if step >= max_steps else None


def why_not_continue(output_dir: Path, *, image_manifest: Mapping[str, str], global_batch: int, layout: str,
                     base_sha256: Callable[[], str | None] = lambda: None) -> str | None:
    """Why this run cannot continue the newest checkpoint (other subject photos, another global batch, another
    single-file base under the same path), or None. `base_sha256`: the run's single-file base's hash (None for others),
    asked for only when there is a checkpoint."""
    latest = find_latest_checkpoint(output_dir)
    if latest is None:
        return None
    record = checkpoint_record(latest)
    problems = []
    trained_on = _recorded_base_sha256(latest)
    now = base_sha256() if trained_on else None
    if trained_on and now and now != trained_on:
        problems.append(f"it was trained on a single-file model.pretrained with sha256 {trained_on}, and the file there "
                        f"now has sha256 {now}")
    changes = manifest_changes(record.get("instance_images", image_manifest), dict(image_manifest))
    if changes:
        problems.append(f"the subject photos (data.instance_dir) changed since it was written: {changes}")
    if record.get("global_batch", global_batch) != global_batch:
        problems.append(f"it was trained with a global batch of {record['global_batch']} images per step and this "
                        f"launch has {global_batch} ({layout}); any layout with the same global batch continues the "
                        "same run")
    if not problems:
        return None
    return f"The checkpoint {latest} cannot be continued by this run: {'; and '.join(problems)}"


def _recorded_base_sha256(folder: Path) -> str | None:
    """The sha256 of the single-file base the checkpoint's adapter records (None: another base, or unreadable)."""
    try:
        with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as weights:
            return (weights.metadata() or {}).get(RECORD_SHA256)
    except Exception:  # noqa: BLE001 - a damaged file: resuming names it (load_checkpoint)
        return None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter tensors keyed as saved, training state) of one checkpoint folder; safetensors and JSON only."""
    path = Path(path)
    adapter_tensors = load_tensors(path, ADAPTER_WEIGHTS)
    state_tensors = load_tensors(path, STATE_TENSORS)
    document = read_json(path / STATE_JSON)
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT or "state" not in document:
        raise UserError(f"{path / STATE_JSON} is not a waveft-train training state file (no "
                        f"\"format\": \"{STATE_FORMAT}\"); it cannot be resumed from. Delete this checkpoint folder.")
    version = document.get("version")
    if not isinstance(version, int) or version > STATE_VERSION:
        raise UserError(f"{path / STATE_JSON} has state version {version!r}; this waveft-train reads versions up to "
                        f"{STATE_VERSION}. Upgrade waveft-train to resume it, or delete this checkpoint folder.")
    try:
        state = unflatten_state(state_tensors, document["state"])
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path / STATE_JSON} does not match {path / STATE_TENSORS} ({error}); the checkpoint is "
                        "corrupt. Delete this checkpoint folder to resume from an earlier one.") from None
    return adapter_tensors, state


def _numbered_folders(output_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), entry) for entry in root.iterdir()
             if entry.is_dir() and (match := CHECKPOINT_PATTERN.fullmatch(entry.name))]
    return sorted(found)


def _incomplete_reason(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when it is complete."""
    for name in CHECKPOINT_FILES:
        if not (folder / name).is_file():
            return f"{name} is missing"
    documents = {}
    for name in (ADAPTER_CONFIG, STATE_JSON):
        try:
            documents[name] = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            return f"{name} is not readable JSON ({error})"
    state = documents[STATE_JSON]
    if not (isinstance(state, dict) and state.get("format") == STATE_FORMAT and isinstance(state.get("state"), dict)):
        return f"{STATE_JSON} is not a waveft-train training state (no \"format\": \"{STATE_FORMAT}\" and \"state\")"
    lacking = [key for key in REQUIRED_STATE if key not in state["state"]]
    if lacking or not isinstance(state["state"].get("step"), int):
        return f"{STATE_JSON} lacks {', '.join(lacking) or 'an integer step'}"
    for name in (ADAPTER_WEIGHTS, STATE_TENSORS):
        problem = safetensors_problem(folder / name)
        if problem:
            return f"{name} {problem}"
    return None


def _prune(output_dir: Path, keep: int | None, just_written: Path) -> None:
    """Delete complete checkpoints beyond the newest `keep` (never the best one evaluation.json names, which
    `--checkpoint best` loads), and temp folders left by crashed writes."""
    root = checkpoints_dir(output_dir)
    for entry in root.iterdir():
        if entry.is_dir() and is_leftover(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
    if keep is None:
        return
    complete = list_checkpoints(output_dir)
    best = _best_checkpoint(output_dir)
    for folder in complete[:-keep]:
        if folder not in (just_written, best):
            shutil.rmtree(folder, ignore_errors=True)


def _best_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint folder the run's evaluation.json names best, if any."""
    try:
        named = json.loads((Path(output_dir) / EVALUATION_SUMMARY).read_text(encoding="utf-8"))["best"]["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Path(output_dir) / named if isinstance(named, str) else None


# ------------------------------------------------------------------------------------ training state


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split nested training state into (tensors by path-like key, JSON-able skeleton with placeholders).

    Tensors become detached, contiguous CPU copies; tuples and dicts with non-string keys (optimizer state uses
    int parameter ids) get placeholders so they come back exactly; numpy arrays are kept as tensors; objects JSON
    cannot hold (functions, modules) become null.
    """
    tensors: dict[str, torch.Tensor] = {}

    def store(path: str, tensor: torch.Tensor) -> str:
        key, counter = path or "root", 1
        while key in tensors:
            key, counter = f"{path}#{counter}", counter + 1
        tensors[key] = tensor.detach().to("cpu", copy=True).contiguous()
        return key

    def visit(value: Any, path: str) -> Any:
        def child(key) -> str:
            return f"{path}/{key}" if path else str(key)

        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, torch.Tensor):
            return {TENSOR: store(path, value)}
        if type(value).__module__ == "numpy" and getattr(value, "shape", None) == () and hasattr(value, "item"):
            return visit(value.item(), path)  # numpy scalars (np.float32, np.bool_) become Python numbers
        if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray":
            if value.dtype.kind not in "biuf":
                return None
            return {NDARRAY: store(path, torch.from_numpy(value.copy())), "dtype": str(value.dtype)}
        if isinstance(value, tuple):
            return {TUPLE: [visit(item, child(index)) for index, item in enumerate(value)]}
        if isinstance(value, list):
            return [visit(item, child(index)) for index, item in enumerate(value)]
        if isinstance(value, Mapping):
            if all(isinstance(key, str) for key in value) and not MARKERS.intersection(value):
                return {key: visit(item, child(key)) for key, item in value.items()}
            pairs = [[visit(key, child("key")), visit(item, child(key))] for key, item in value.items()
                     if key is None or isinstance(key, (str, numbers.Real, tuple))]
            return {DICT: pairs}
        return None  # functions (LambdaLR lambdas), modules, devices: not state JSON can hold

    return tensors, visit(obj, "")


def unflatten_state(tensors: Mapping[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of `flatten_state`: the nested state with tensors, tuples and int dict keys restored."""
    if isinstance(skeleton, list):
        return [unflatten_state(tensors, item) for item in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if TENSOR in skeleton:
        return tensors[skeleton[TENSOR]]
    if NDARRAY in skeleton:
        return tensors[skeleton[NDARRAY]].numpy().astype(skeleton["dtype"], copy=True)
    if TUPLE in skeleton:
        return tuple(unflatten_state(tensors, item) for item in skeleton[TUPLE])
    if DICT in skeleton:
        return {unflatten_state(tensors, key): unflatten_state(tensors, item) for key, item in skeleton[DICT]}
    return {key: unflatten_state(tensors, item) for key, item in skeleton.items()}
