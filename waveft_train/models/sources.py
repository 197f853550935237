"""Where a model comes from: `model.pretrained` (a built-in name, a hub id, a local diffusers folder or a single-file
checkpoint), `model.config` (a single file's configs and tokenizers) and `model.vae`, resolved without loading any
weights, and the one-paragraph errors for names that lead nowhere.

The rules: `tiny` and `toy` are the built-in models; an existing path is local (a folder must hold a diffusers model,
a file must be a `.safetensors` checkpoint; pickles are refused); a name written as a path that does not exist is
"no such folder/file"; anything else must be a valid hub id. A single file's configs are fetched once from the hub
(JSON and text, no weights) or read from a local folder, so a single-file run works offline once they are local.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id

from waveft_train.common.errors import UserError
from waveft_train.common.paths import is_pickle_checkpoint, is_single_file, written_as_path
from waveft_train.models import single_file
from waveft_train.models.builtin import BUILTIN_MODELS, TINY_MODEL_NAME, TOY_MODEL_NAME, toy_model_dir
from waveft_train.models.tiny import tiny_model_dir

ALLOWED_MODELS = (
    "`tiny` (the embedded test model), `toy` (the pretrained toy-world model), a Hugging Face hub id such as "
    "stabilityai/stable-diffusion-xl-base-1.0, "
    "a local diffusers folder containing model_index.json, "
    "or an SDXL checkpoint file in the A1111/ComfyUI layout (.safetensors, with model.config)"
)
ALLOWED_CONFIGS = (
    "null (stabilityai/stable-diffusion-xl-base-1.0, right for SDXL base and its fine-tunes), `tiny`, `toy`, the hub "
    "id or the local diffusers folder of the model family the checkpoint belongs to"
)
# What a single file lacks and model.config supplies: the parts' configs, the scheduler's, the tokenizers.
CONFIG_FILES = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
                "scheduler/scheduler_config.json", "tokenizer", "tokenizer_2")
CONFIG_PATTERNS = ["*.json", "*/*.json", "*/*.txt", "*/*.model"]  # what diffusers' from_single_file fetches: no weights
ALLOWED_VAES = (
    "a Hugging Face hub id of an AutoencoderKL such as madebyollin/sdxl-vae-fp16-fix, or a local folder with its "
    "config.json and diffusion_pytorch_model.safetensors (at the top or under vae/)"
)

def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _meant_as_folder(name: str) -> bool:
    """A name that cannot be a hub id and has a path's structure (a name like 'my model!' is neither: it gets the
    hub-id validator's explanation instead of "no such folder")."""
    return written_as_path(name) and ("/" in name or "\\" in name or name.startswith(("~", ".")))


def offline_note(hub_id: bool = True) -> str:
    """The sentence a not-found error about a hub id adds when the hub is switched off ('' otherwise)."""
    if hub_id and _hub_offline():
        return " Offline mode is on (HF_HUB_OFFLINE=1), so a hub id only works if it is already in the local cache."
    return ""


def not_found(what: str, name: str, reason: str, *, hub_id: bool = True, allowed: str = ALLOWED_MODELS) -> UserError:
    return UserError(f"Could not load {what} '{name}': {reason.rstrip('. ')}.{offline_note(hub_id)} Allowed: {allowed}.")


def first_line(error: BaseException) -> str:
    """The first line of an error's message (at most 300 characters), for one-paragraph user errors."""
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _validate_hub_id(what: str, name: str, allowed: str) -> None:
    try:
        validate_repo_id(name)
    except HFValidationError as error:
        reason = f"it is neither an existing folder nor a valid hub id ({first_line(error)})"
        raise not_found(what, name, reason, hub_id=False, allowed=allowed) from None


def resolve_pretrained(pretrained: str, cache_dir: Path | None = None) -> str:
    """Turn `model.pretrained` into what `from_pretrained` accepts: an absolute folder or a hub id.

    `tiny` builds (once) and returns the embedded model's cached folder; `cache_dir` overrides its cache root.
    `toy` is the pretrained toy-world pipeline committed inside the package (waveft_train/assets/toy).
    """
    name = str(pretrained).strip()
    if name == TINY_MODEL_NAME:
        return str(tiny_model_dir(cache_dir))
    if name == TOY_MODEL_NAME:
        return str(toy_model_dir())
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise not_found("the model", name, "it is a file, not a folder", hub_id=False)
        if not ((local / "model_index.json").is_file() or (local / "unet").is_dir()):
            reason = f"the folder {local.resolve()} has neither model_index.json nor a unet/ subfolder"
            raise not_found("the model", name, reason, hub_id=False)
        return str(local.resolve())
    if _meant_as_folder(name):
        raise not_found("the model", name, f"no such folder ({local.absolute()})", hub_id=False)
    _validate_hub_id("the model", name, ALLOWED_MODELS)
    return name


def resolve_vae(vae: str) -> tuple[str, str | None]:
    """A separate VAE as (path or hub id, subfolder): an AutoencoderKL folder, a pipeline folder's vae/, or a hub id."""
    name = str(vae).strip()
    local = Path(name).expanduser()
    if local.exists():
        if (local / "config.json").is_file():
            return str(local.resolve()), None
        if (local / "vae" / "config.json").is_file():
            return str(local.resolve()), "vae"
        reason = f"the folder {local.resolve()} has neither config.json nor vae/config.json"
        raise not_found("the VAE", name, reason, hub_id=False, allowed=ALLOWED_VAES)
    if _meant_as_folder(name):
        reason = f"no such folder ({local.absolute()})"
        raise not_found("the VAE", name, reason, hub_id=False, allowed=ALLOWED_VAES)
    _validate_hub_id("the VAE", name, ALLOWED_VAES)
    return name, None


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's parts come from: `configs` holds the configs, the scheduler and the tokenizers (a folder or hub
    id); the weights sit beside them, or in `weights_file`, a single-file checkpoint whose configs came from
    `config_name` (model.config as given: a hub id, a built-in name or an absolute folder)."""

    configs: str
    weights_file: Path | None = None
    config_name: str | None = None


def locate_model(pretrained: str, config: str | None = None, revision: str | None = None) -> ModelFiles:
    """Resolve `model.pretrained` (and, for a single-file checkpoint, `model.config`) without loading weights."""
    name = str(pretrained).strip()
    if is_single_file(name) or is_pickle_checkpoint(name) or Path(name).expanduser().is_file():
        path = single_file.checked_file(name)
        if revision is not None:
            raise UserError(f"model.revision {revision!r} names a hub revision, but model.pretrained {name} is a "
                            "local file, which has none. Remove model.revision.")
        config_name = str(config).strip() if config is not None and str(config).strip() else single_file.DEFAULT_CONFIG
        folder = resolve_single_file_config(config_name)
        recorded = config_name if config_name in BUILTIN_MODELS or not Path(config_name).expanduser().exists() else folder
        return ModelFiles(configs=folder, weights_file=path, config_name=recorded)
    if config is not None:
        raise UserError(f"model.config {config!r} is read only for a single-file model.pretrained (a .safetensors "
                        f"checkpoint); {name} carries its own configs. Remove model.config.")
    return ModelFiles(configs=resolve_pretrained(name))


def resolve_single_file_config(name: str) -> str:
    """`model.config` as a local folder with every file of CONFIG_FILES. A hub id's are fetched once (a few hundred
    kilobytes of JSON and text, no weights) and taken from the cache afterwards, also offline."""
    what = "the configs of the single-file model (model.config)"
    local = Path(name).expanduser()
    if name in BUILTIN_MODELS or local.exists():
        folder = resolve_pretrained(name) if name in BUILTIN_MODELS else str(local.resolve())
        if not local.is_dir() and name not in BUILTIN_MODELS:
            raise not_found(what, name, "it is a file, not a folder", hub_id=False, allowed=ALLOWED_CONFIGS)
    elif _meant_as_folder(name):
        raise not_found(what, name, f"no such folder ({local.absolute()})", hub_id=False, allowed=ALLOWED_CONFIGS)
    else:
        _validate_hub_id(what, name, ALLOWED_CONFIGS)
        try:
            folder = snapshot_download(name, allow_patterns=CONFIG_PATTERNS, local_files_only=_hub_offline())
        except (OSError, ValueError) as error:  # the hub client's errors are OSErrors
            raise UserError(
                f"Could not fetch model.config '{name}', where a single-file checkpoint's component configs and "
                f"tokenizers come from: {first_line(error).rstrip('.')}.{offline_note()} Fetch them once where the hub "
                f"is reachable (`hf download {name} --include \"*.json\" \"*.txt\"`: a few hundred kilobytes, no "
                "weights; later runs read the cache, also offline), or set model.config to a local diffusers folder "
                "of the same architecture."
            ) from None
    missing = [item for item in CONFIG_FILES if not (Path(folder) / item).exists()]
    if missing:
        raise not_found(what, name, f"{folder} lacks {', '.join(missing)}", hub_id=False, allowed=ALLOWED_CONFIGS)
    return folder
