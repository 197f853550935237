"""Adapter folders and training checkpoints: peft-format files, pickle-free training state, atomic writes.

Why this shape:
- An adapter folder is byte-for-byte what `PeftModel.save_pretrained` writes, so stock peft
  (`PeftModel.from_pretrained(unet, folder)`) and anything built on it load our adapters.
- Training state (optimizer, LR scheduler, grad scaler, step, config fingerprint) is stored without pickle:
  tensors in `training_state.safetensors`, everything else as JSON. Loading a checkpoint never runs code.
- Every folder is written next to its final place and renamed into it, so a crash or a full disk leaves the
  previous checkpoints intact and never a half-written one that resume would pick up.

Writing is the caller's decision: call `save_adapter` / `save_checkpoint` on the main process only (e.g.
under `accelerator.is_main_process`), with the unwrapped UNet (`accelerator.unwrap_model(unet)`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import numbers
import os
import re
import shutil
import struct
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from waveft_train.errors import UserError

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before every module path
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CARD = "README.md"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
CHECKPOINT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, STATE_TENSORS, STATE_JSON)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
STATE_FORMAT = "waveft-train-state"
STATE_VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"step-(\d{6,})")
TEMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
# Placeholders in the JSON skeleton. Plain dicts holding one of these keys are written in the `__dict__` form,
# so a JSON object with a marker key is always a placeholder.
TENSOR, NDARRAY, TUPLE, DICT = "__tensor__", "__ndarray__", "__tuple__", "__dict__"
MARKERS = frozenset({TENSOR, NDARRAY, TUPLE, DICT})

# ------------------------------------------------------------------------------------ adapter weights


def adapter_state_dict(unet: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as `PeftModel.save_pretrained` keys them; detached CPU copies, contiguous."""
    from peft import PeftModel, get_peft_model_state_dict

    if adapter_name not in getattr(unet, "peft_config", {}):
        raise ValueError(f"the model has no adapter named {adapter_name!r}; inject one before saving")
    prefix = "" if isinstance(unet, PeftModel) else PEFT_PREFIX
    # save_embedding_layers=False: "auto" may ask the hub about the base model; WaveFT never adapts embeddings.
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name, save_embedding_layers=False)
    return {prefix + key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}


def load_adapter_weights_into(unet: torch.nn.Module, adapter_tensors: Mapping[str, torch.Tensor],
                              adapter_name: str = ADAPTER_NAME) -> None:
    """Set the injected adapter's weights; every adapter key must be given and fit, so a resume never silently
    starts from zero."""
    from peft import PeftModel, set_peft_model_state_dict

    prefix = "" if isinstance(unet, PeftModel) else PEFT_PREFIX
    expected = adapter_state_dict(unet, adapter_name)
    given = {key if key.startswith(prefix) else prefix + key: value for key, value in adapter_tensors.items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong_shape = sorted(f"{key} {tuple(given[key].shape)} vs {tuple(expected[key].shape)}"
                         for key in set(given) & set(expected) if given[key].shape != expected[key].shape)
    if missing or unexpected or wrong_shape:
        raise UserError(
            f"The adapter weights do not fit the model's {adapter_name!r} adapter ({len(expected)} tensors): "
            f"{_some('missing', missing)}{_some('unexpected', unexpected)}{_some('wrong shape', wrong_shape)}"
            "Was the adapter trained with other waveft settings (target_modules, n_frequency, n_frequency_pattern) "
            "or for another model? Use the same settings, or another output.dir.")
    result = set_peft_model_state_dict(unet, dict(given), adapter_name=adapter_name)
    if result.unexpected_keys:  # cannot happen after the checks above; guard against peft changing key rules
        raise RuntimeError(f"peft did not load adapter keys {result.unexpected_keys[:5]}")


def _some(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return f"{len(keys)} {what} ({shown}); "


def _adapter_config_json(unet: torch.nn.Module, adapter_name: str, base_model_name_or_path: str) -> str:
    """adapter_config.json as PeftModel.save_pretrained writes it (inference_mode true, auto_mapping)."""
    from peft import PeftModel

    config = unet.peft_config[adapter_name]
    data = config.to_dict()  # a deep copy: the live config is not touched
    data.update(base_model_name_or_path=base_model_name_or_path, inference_mode=True)
    data = {key: sorted(value, key=str) if isinstance(value, set) else value for key, value in data.items()}
    if config.task_type is None:
        model = unet.get_base_model() if isinstance(unet, PeftModel) else unet
        data["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return json.dumps(data, indent=2, sort_keys=True)


def _write_adapter_files(folder: Path, unet: torch.nn.Module, adapter_name: str, base_model_name_or_path: str,
                         model_card: str | None) -> None:
    tensors = adapter_state_dict(unet, adapter_name)
    _write_bytes(folder / ADAPTER_WEIGHTS, save_safetensors_bytes(tensors, metadata={"format": "pt"}))
    config_text = _adapter_config_json(unet, adapter_name, base_model_name_or_path)
    _write_bytes(folder / ADAPTER_CONFIG, config_text.encode("utf-8"))
    if model_card is not None:
        _write_bytes(folder / MODEL_CARD, model_card.encode("utf-8"))


def save_adapter(directory: Path, unet: torch.nn.Module, *, base_model_name_or_path: str,
                 adapter_name: str = ADAPTER_NAME, model_card: str | None = None) -> Path:
    """Write a peft adapter folder (config, weights, optional README.md model card) atomically; an existing
    folder is replaced only once the new one is complete. Main process only."""
    directory = Path(directory)
    with _atomic_folder(directory) as scratch:
        _write_adapter_files(scratch, unet, adapter_name, base_model_name_or_path, model_card)
    return directory


# ------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(output_dir: Path, step: int, *, unet: torch.nn.Module, base_model_name_or_path: str,
                    training_state: Mapping[str, Any], keep: int | None, adapter_name: str = ADAPTER_NAME) -> Path:
    """Write `checkpoints/step-NNNNNN/` (adapter + training state) atomically, then keep only the newest `keep`
    complete checkpoints (None keeps all). On failure the previous checkpoints are untouched. Main process only."""
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be None or at least 1, got {keep}")
    folder = checkpoints_dir(output_dir) / f"step-{step:06d}"
    tensors, skeleton = flatten_state(training_state)
    state_json = json.dumps({"format": STATE_FORMAT, "version": STATE_VERSION, "step": step, "state": skeleton},
                            indent=1)
    with _atomic_folder(folder) as scratch:
        _write_adapter_files(scratch, unet, adapter_name, base_model_name_or_path, None)
        _write_bytes(scratch / STATE_TENSORS, save_safetensors_bytes(tensors, metadata={"format": "pt"}))
        _write_bytes(scratch / STATE_JSON, state_json.encode("utf-8"))
    _prune(output_dir, keep, just_written=folder)
    return folder


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest step first; temp folders and incomplete ones are left out."""
    return [folder for _, folder in _numbered_folders(output_dir) if _incomplete_reason(folder) is None]


def find_latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step (what a rerun resumes from), or None."""
    for _, folder in reversed(_numbered_folders(output_dir)):
        reason = _incomplete_reason(folder)
        if reason is None:
            return folder
        logger.warning("Skipping incomplete checkpoint %s: %s", folder, reason)
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter tensors keyed as saved, training state) of one checkpoint folder; safetensors and JSON only."""
    path = Path(path)
    adapter_tensors = _load_tensors(path, ADAPTER_WEIGHTS)
    state_tensors = _load_tensors(path, STATE_TENSORS)
    document = _read_json(path / STATE_JSON)
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


def load_adapter(directory: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(peft config, tensors keyed as saved) of an adapter folder, refusing pickle-only folders."""
    from peft import PeftConfig

    directory = Path(directory)
    tensors = _load_tensors(directory, ADAPTER_WEIGHTS)
    _read_json(directory / ADAPTER_CONFIG)  # a readable UserError for a missing or broken config
    try:
        config = PeftConfig.from_pretrained(str(directory))
    except Exception as error:  # noqa: BLE001 - any problem here is the file's, shown to the user
        raise UserError(f"{directory / ADAPTER_CONFIG} is not a valid peft adapter config: {error}") from None
    return config, tensors


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
    for name in (ADAPTER_CONFIG, STATE_JSON):
        try:
            json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            return f"{name} is not readable JSON ({error})"
    for name in (ADAPTER_WEIGHTS, STATE_TENSORS):
        problem = _safetensors_problem(folder / name)
        if problem:
            return f"{name} {problem}"
    return None


def _prune(output_dir: Path, keep: int | None, just_written: Path) -> None:
    """Delete complete checkpoints beyond the newest `keep`, and temp folders left by crashed writes."""
    root = checkpoints_dir(output_dir)
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith((TEMP_PREFIX, OLD_PREFIX)):
            shutil.rmtree(entry, ignore_errors=True)
    if keep is None:
        return
    complete = list_checkpoints(output_dir)
    for folder in complete[:-keep]:
        if folder != just_written:
            shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------ safe reading


def _load_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    path = folder / name
    if not path.is_file():
        if not folder.is_dir():
            raise UserError(f"{folder} does not exist or is not a folder; expected an adapter or checkpoint folder "
                            f"containing {name}.")
        pickles = sorted(entry.name for entry in folder.iterdir() if entry.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UserError(f"{folder} has {', '.join(pickles)} but no {name}. Pickle files are refused for safety "
                            "(loading them can run arbitrary code); a safetensors file is needed. Convert the "
                            f"weights to {name} with safetensors in a trusted environment, or re-save the adapter.")
        raise UserError(f"{path} is missing; an adapter or checkpoint folder needs {name}.")
    problem = _safetensors_problem(path)
    if problem is None:
        try:
            return load_safetensors_bytes(path.read_bytes())
        except Exception as error:  # noqa: BLE001 - SafetensorError and friends: the file is broken
            problem = f"cannot be read ({error})"
    raise UserError(f"{path} {problem}; it is truncated or corrupt (an interrupted copy or a full disk?). "
                    "Copy it again, or delete this folder to use an earlier checkpoint.")


def _safetensors_problem(path: Path) -> str | None:
    """Cheap structural check (header + size) that catches truncated and garbage files without loading them."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                return "is too short to be a safetensors file"
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > size - 8:
                return "has a header longer than the file"
            header = json.loads(file.read(header_size))
    except (OSError, ValueError) as error:
        return f"has no valid safetensors header ({error})"
    if not isinstance(header, dict):
        return "has no valid safetensors header"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    expected = 8 + header_size + max(ends, default=0)
    if size != expected:
        return f"has {size} bytes but its header describes {expected}"
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing.") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path} is not readable JSON ({error}); the file is corrupt.") from None


# ------------------------------------------------------------------------------------ atomic writing


def _write_bytes(path: Path, data: bytes) -> None:
    """Write and fsync, so a rename after this never publishes a file whose bytes are still in flight."""
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _fsync_folder(folder: Path) -> None:
    """Persist renames in `folder` (best effort: some filesystems refuse fsync on folders)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def _atomic_folder(target: Path):
    """Yield an empty temp sibling of `target`; on success it replaces `target` (old one renamed away, new one
    renamed in, old one deleted). On any error the temp folder is removed and `target` is untouched."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} exists and is not a folder; cannot write an adapter there. Remove it or choose "
                        "another output folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    scratch = target.parent / f"{TEMP_PREFIX}{target.name}-{token}"
    scratch.mkdir()
    try:
        yield scratch
        _fsync_folder(scratch)
        old = target.parent / f"{OLD_PREFIX}{target.name}-{token}"
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(scratch, target)
        except BaseException:
            if old.exists():
                os.replace(old, target)
            raise
        _fsync_folder(target.parent)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


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
        child = (lambda key: f"{path}/{key}" if path else str(key))
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
