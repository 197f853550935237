"""Adapter folders on disk: the one place that writes, reads and checks them (final adapters and checkpoints alike).

Why this shape:
- A folder is what `PeftModel.save_pretrained` writes (`adapter_config.json` + `adapter_model.safetensors`, keys
  `base_model.model.<module>.waveft_spectrum`), so stock peft and diffusers load it. What peft's config has no
  field for (the prediction type the adapter was trained for) goes into the safetensors metadata, which peft
  ignores: an extra key in adapter_config.json would make stock peft warn on every load.
- Weights are read from safetensors only; a folder holding only pickles is refused, naming the file.
- Saved tensors are checked against the model *before* they are loaded (`check_fit`), because peft's own
  loader skips keys it cannot place: an adapter for another model would silently change nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel, WaveFTConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from waveft_train.common.errors import UserError
from waveft_train.common.files import atomic_folder, read_safetensors_header, write_bytes_synced

if TYPE_CHECKING:
    from peft import WaveFTConfig

ADAPTER_NAME = "default"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before every module path
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CARD = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PREDICTION_TYPE_KEY = "waveft_train.prediction_type"  # safetensors metadata: what the adapter was trained to predict


# ------------------------------------------------------------------------------------------------ writing


def adapter_state_dict(unet: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as `PeftModel.save_pretrained` keys them; detached CPU copies, contiguous."""
    if adapter_name not in getattr(unet, "peft_config", {}):
        raise ValueError(f"the model has no adapter named {adapter_name!r}; inject one before saving")
    prefix = "" if isinstance(unet, PeftModel) else PEFT_PREFIX
    # save_embedding_layers=False: "auto" may ask the hub about the base model; WaveFT never adapts embeddings.
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name, save_embedding_layers=False)
    return {prefix + key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}


def _adapter_config_json(unet: torch.nn.Module, adapter_name: str, base_model_name_or_path: str) -> str:
    """adapter_config.json as PeftModel.save_pretrained writes it (inference_mode true, auto_mapping)."""
    config = unet.peft_config[adapter_name]
    data = config.to_dict()  # a deep copy: the live config is not touched
    data.update(base_model_name_or_path=base_model_name_or_path, inference_mode=True)
    data = {key: sorted(value, key=str) if isinstance(value, set) else value for key, value in data.items()}
    if config.task_type is None:
        model = unet.get_base_model() if isinstance(unet, PeftModel) else unet
        data["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return json.dumps(data, indent=2, sort_keys=True)


def write_adapter_files(folder: Path, unet: torch.nn.Module, *, base_model_name_or_path: str,
                        prediction_type: str | None = None, model_card: str | None = None,
                        adapter_name: str = ADAPTER_NAME, base_metadata: Mapping[str, str] | None = None) -> None:
    """Write the adapter's files into an existing (scratch) folder; each file is fsynced. `base_metadata`: what the
    weights' metadata records about a single-file base (`SDXLComponents.base_metadata`: its name, sha256, ...)."""
    metadata = {"format": "pt", **(base_metadata or {}),
                **({PREDICTION_TYPE_KEY: prediction_type} if prediction_type else {})}
    tensors = adapter_state_dict(unet, adapter_name)
    write_bytes_synced(folder / ADAPTER_WEIGHTS, save_safetensors_bytes(tensors, metadata=metadata))
    config_text = _adapter_config_json(unet, adapter_name, base_model_name_or_path)
    write_bytes_synced(folder / ADAPTER_CONFIG, config_text.encode("utf-8"))
    if model_card is not None:
        write_bytes_synced(folder / MODEL_CARD, model_card.encode("utf-8"))


def save_adapter(directory: Path, unet: torch.nn.Module, *, base_model_name_or_path: str,
                 prediction_type: str | None = None, model_card: str | None = None,
                 adapter_name: str = ADAPTER_NAME, before_landing: Callable[[Path], None] | None = None,
                 base_metadata: Mapping[str, str] | None = None) -> Path:
    """Write a peft adapter folder atomically: an existing folder is replaced only once the new one is complete.
    `before_landing(staging)` adds what must appear together with it (written into the staging folder, or beside it)
    before the folder is renamed into place. Main process only, with the unwrapped model."""
    directory = Path(directory)
    with atomic_folder(directory) as scratch:
        write_adapter_files(scratch, unet, base_model_name_or_path=base_model_name_or_path,
                            prediction_type=prediction_type, model_card=model_card, adapter_name=adapter_name,
                            base_metadata=base_metadata)
        if before_landing is not None:
            before_landing(scratch)
    return directory


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class AdapterFiles:
    """A checked adapter folder: its parsed config, the names and shapes of its tensors, and its metadata."""

    folder: Path
    config: WaveFTConfig
    weights_path: Path
    shapes: dict[str, tuple[int, ...]]  # in the file's key order
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str | None:
        return self.metadata.get(PREDICTION_TYPE_KEY)

    def load_tensors(self) -> dict[str, torch.Tensor]:
        return load_tensors(self.folder, ADAPTER_WEIGHTS)


def read_adapter(adapter_dir: Path | str) -> AdapterFiles:
    """Check that `adapter_dir` is a loadable WaveFT adapter (peft format) without loading its weights."""
    folder = Path(adapter_dir).expanduser()
    what = f"A WaveFT adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, as waveft-train saves it"
    if not folder.is_dir():
        reason = "it is a file, not a folder" if folder.exists() else "no such folder"
        raise UserError(f"Cannot use the adapter '{adapter_dir}': {reason} ({folder.absolute()}). {what}.")
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise UserError(f"The adapter folder {folder} has no {ADAPTER_CONFIG}. {what}.")
    if not weights_path.is_file():
        _refuse_pickles(folder, ADAPTER_WEIGHTS)
        raise UserError(f"The adapter folder {folder} has no {ADAPTER_WEIGHTS}. {what}.")
    raw_config = read_json(config_path)
    peft_type = raw_config.get("peft_type") if isinstance(raw_config, dict) else None
    if peft_type != "WAVEFT":
        raise UserError(
            f"{config_path} has peft_type {peft_type!r}; only WaveFT adapters (peft_type \"WAVEFT\") can be used here."
        )
    config = _parse_config(folder, config_path)
    try:
        with safe_open(str(weights_path), framework="pt") as weights:
            shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
            metadata = dict(weights.metadata() or {})
    except Exception as error:  # safetensors raises its own SafetensorError (an Exception) for any damage
        raise UserError(
            f"{weights_path} is not a valid safetensors file ({str(error).strip() or type(error).__name__}); it may be "
            "truncated by an interrupted copy or download. Copy the adapter folder again."
        ) from None
    if not shapes:
        raise UserError(f"{weights_path} holds no tensors; it is not a trained adapter.")
    return AdapterFiles(folder=folder, config=config, weights_path=weights_path, shapes=shapes, metadata=metadata)


def _parse_config(folder: Path, config_path: Path) -> WaveFTConfig:
    try:
        return WaveFTConfig.from_pretrained(str(folder))
    except (TypeError, ValueError) as error:
        raise UserError(f"{config_path} is not a valid WaveFT config: {error}") from None


def _refuse_pickles(folder: Path, wanted: str) -> None:
    pickles = sorted(entry.name for entry in folder.iterdir() if entry.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"{folder} has {', '.join(pickles)} but no {wanted}: pickle files are refused for safety "
                        "(loading them can run arbitrary code); a safetensors file is needed. Re-save the weights "
                        f"with safetensors (save_pretrained(..., safe_serialization=True)) to get {wanted}.")


def load_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of `folder / name`, a safetensors file, checked for truncation first."""
    path = folder / name
    if not path.is_file():
        if not folder.is_dir():
            raise UserError(f"{folder} does not exist or is not a folder; expected an adapter or checkpoint folder "
                            f"containing {name}.")
        _refuse_pickles(folder, name)
        raise UserError(f"{path} is missing; an adapter or checkpoint folder needs {name}.")
    problem = safetensors_problem(path)
    if problem is None:
        try:
            return load_safetensors_bytes(path.read_bytes())
        except Exception as error:  # noqa: BLE001 - SafetensorError and friends: the file is broken
            problem = f"cannot be read ({error})"
    raise UserError(f"{path} {problem}; it is truncated or corrupt (an interrupted copy or a full disk?). "
                    "Copy it again, or delete this folder to use an earlier checkpoint.")


def safetensors_problem(path: Path) -> str | None:
    """Cheap structural check (header + size) that catches truncated and garbage files without loading them."""
    try:
        read_safetensors_header(path)
    except ValueError as error:
        return str(error)
    return None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing.") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path} is not readable JSON ({error}); the file is corrupt.") from None


# ------------------------------------------------------------------------------------------------ fitting


def layer_name(key: str) -> str:
    """`base_model.model.down_blocks.1…to_q.waveft_spectrum` → `down_blocks.1…to_q`."""
    return key.removeprefix(PEFT_PREFIX).rsplit(".", 1)[0]


def check_fit(expected: Mapping[str, tuple[int, ...]], saved: Mapping[str, tuple[int, ...]], *, misfit: str,
              remedy: str) -> None:
    """Refuse saved tensors that do not match the model's adapter key for key and shape, naming the layers.

    `misfit` opens the message ("The adapter X does not fit the base model Y"), `remedy` closes it.
    """
    missing = [key for key in expected if key not in saved]
    unexpected = [key for key in saved if key not in expected]
    wrong = [key for key in saved if key in expected and tuple(saved[key]) != tuple(expected[key])]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (the file has no weights for layer {_names(missing)}, which the "
                     "adapter config targets)")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (layer {_names(unexpected)} is not a WaveFT layer of this model: "
                     "the module does not exist or is not targeted by the adapter's target_modules)")
    if wrong:
        shown = "; ".join(f"layer '{layer_name(key)}' has a saved {key.rsplit('.', 1)[-1]} of shape "
                          f"{list(saved[key])}, but the model's layer takes {list(expected[key])}" for key in wrong[:3])
        parts.append(f"{len(wrong)} wrong shape ({shown}{' …' if len(wrong) > 3 else ''})")
    raise UserError(f"{misfit}: {'; '.join(parts)}. {remedy}")


def _names(keys: list[str]) -> str:
    shown = ", ".join(f"'{layer_name(key)}' ({key})" for key in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def load_adapter_weights_into(unet: torch.nn.Module, adapter_tensors: Mapping[str, torch.Tensor], *,
                              misfit: str = "The adapter weights do not fit the model's adapter",
                              remedy: str = "Load them into a model with the adapter config they were saved with.",
                              adapter_name: str = ADAPTER_NAME) -> None:
    """Set the injected adapter's weights; every key must be given and fit (`check_fit`), so nothing half-loads."""
    prefix = "" if isinstance(unet, PeftModel) else PEFT_PREFIX
    expected = {key: tuple(value.shape) for key, value in adapter_state_dict(unet, adapter_name).items()}
    given = {key if key.startswith(prefix) else prefix + key: value for key, value in adapter_tensors.items()}
    check_fit(expected, {key: tuple(value.shape) for key, value in given.items()}, misfit=misfit, remedy=remedy)
    # set_peft_model_state_dict takes the model's own module paths (a plain injected model has no PeftModel prefix)
    result = set_peft_model_state_dict(unet, {key.removeprefix(prefix): value for key, value in given.items()},
                                       adapter_name=adapter_name)
    if result.unexpected_keys:  # cannot happen after the check above; guards against peft changing key rules
        raise RuntimeError(f"peft did not load adapter keys {result.unexpected_keys[:5]}")
