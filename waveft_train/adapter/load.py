"""Saved WaveFT adapters at work: load one onto its base UNet, switch adapters off, export the merged UNet.

Reading and checking adapter folders is adapter_files.py's job; this module puts a checked adapter onto a model.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from waveft_train.adapter.files import ADAPTER_CONFIG, AdapterFiles, check_fit, read_adapter
from waveft_train.common.errors import UserError
from waveft_train.common.files import atomic_folder, writing
from waveft_train.common.lock import FolderLock
from waveft_train.models.loading import ALLOWED_MODELS, DTYPES, SDXLComponents, load_components, load_scheduler, load_unet
from waveft_train.waveft import register

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from peft import PeftModel


@contextmanager
def adapters_disabled(unet: torch.nn.Module) -> Iterator[None]:
    """Run `unet` as the plain base model inside the block (every peft adapter layer calls its base layer)."""
    layers = [module for module in unet.modules() if isinstance(module, BaseTunerLayer) and not module.disable_adapters]
    # enable_adapters(True) marks the adapter weights trainable: put every flag back as it was (frozen or training).
    trainable = [(parameter, parameter.requires_grad) for parameter in unet.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for parameter, requires_grad in trainable:
            parameter.requires_grad_(requires_grad)


def _base_name(adapter: AdapterFiles, base: str | None) -> str:
    if base is not None and str(base).strip():
        return str(base)
    named = adapter.config.base_model_name_or_path
    if not named:
        raise UserError(
            f"{adapter.folder / ADAPTER_CONFIG} does not name its base model (base_model_name_or_path is empty). "
            f"Pass the base model with --base: {ALLOWED_MODELS}."
        )
    return str(named)


def _inject(unet: torch.nn.Module, adapter: AdapterFiles, base_name: str, scale: float) -> PeftModel:
    """Wrap `unet` (modified in place) with the adapter's layers, check the saved tensors fit, load them."""
    register()
    config = copy.deepcopy(adapter.config)
    config.inference_mode = True
    config.init_weights = True  # zeros, no RNG use: the saved spectra replace them below
    misfit = f"The adapter {adapter.folder} does not fit the base model '{base_name}'"
    try:
        model = PeftModel(unet, config)
    except (ValueError, TypeError) as error:  # no target module matched, n_frequency too large for a layer, ...
        raise UserError(f"{misfit}: {error} Pass the model it was trained on with --base.") from None

    expected = {key: tuple(value.shape) for key, value in
                get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    check_fit(expected, adapter.shapes, misfit=misfit, remedy=f"Pass the model it was trained on with --base, or fix "
              f"the adapter config (n_frequency {adapter.config.n_frequency}, target_modules).")

    set_peft_model_state_dict(model, adapter.load_tensors())
    if scale != 1.0:
        _scale_adapters(unet, scale)
    model.eval()
    model.requires_grad_(False)
    return model


def _scale_adapters(unet: torch.nn.Module, scale: float) -> None:
    """Multiply every WaveFT adapter's ΔW by `scale`, through each layer's `waveft_scaling` factor.

    ΔW is linear in that factor, so 1 is the adapter as trained and 0 makes ΔW zero. At 0 the layers are also
    switched off, so the output is the base model's bit for bit, whichever arithmetic path the layer's forward
    takes (W + 0 in one matmul, or x·Wᵀ plus a zero correction, can round differently from the plain layer).
    """
    for module in unet.modules():
        scaling = getattr(module, "waveft_scaling", None)
        if isinstance(scaling, dict):
            for name in scaling:
                scaling[name] = scaling[name] * float(scale)
            if scale == 0 and isinstance(module, BaseTunerLayer):
                module.enable_adapters(False)


def load_adapter_unet(
    adapter_dir: Path | str, base: str | None, *, scale: float = 1.0, dtype: torch.dtype = torch.float32
) -> tuple[SDXLComponents, UNet2DConditionModel]:
    """Load the base model's components and apply a saved WaveFT adapter to its UNet.

    `base=None` uses the adapter's own `base_model_name_or_path`. `scale` multiplies every layer's ΔW through
    its `waveft_scaling` (0 = the base model exactly, 1 = as trained; other values interpolate/extrapolate). The adapter is
    injected into `components.unet` in place, so the returned UNet *is* `components.unet`; use
    `adapters_disabled(unet)` for base-model outputs. Everything that does not fit raises `UserError`.
    """
    if not math.isfinite(scale):
        raise UserError(f"The adapter scale {scale} is not a finite number; 0 = base model, 1 = as trained.")
    adapter = read_adapter(adapter_dir)
    base_name = _base_name(adapter, base)
    components = load_components(base_name, weight_dtype=dtype)
    model = _inject(components.unet, adapter, base_name, scale)
    components.scheduler = scheduler_for(adapter, components.scheduler)
    return components, model.base_model.model


def scheduler_for(adapter: AdapterFiles, scheduler):
    """The base model's scheduler, set to the prediction type the adapter was trained for (when it records one)."""
    if adapter.prediction_type is None:
        return scheduler
    return type(scheduler).from_config(scheduler.config, prediction_type=adapter.prediction_type)


def load_adapted_unet(
    adapter_dir: Path | str, base: str | None = None
) -> tuple[AdapterFiles, str, dict[str, torch.Tensor], PeftModel]:
    """The base UNet (fp32, frozen) with the adapter loaded and checked as `export` checks it, for exports of the
    update itself rather than of the merged model (export_formats.py).

    Returns (adapter, base model name, base values, model). Loading overwrites in place the base tensors the adapter
    file holds (e.g. `<module>.base_layer.bias` of `bias: waveft_only`), so their base values, keyed by the plain
    UNet's parameter names, are copied first: an update is the loaded value minus them.
    """
    adapter = read_adapter(adapter_dir)
    base_name = _base_name(adapter, base)
    unet = load_unet(base_name, dtype=torch.float32)
    plain = unet.state_dict()
    names = {key.removeprefix("base_model.model.").replace(".base_layer.", ".") for key in adapter.shapes}
    base_values = {name: plain[name].detach().clone() for name in names if name in plain}
    return adapter, base_name, base_values, _inject(unet, adapter, base_name, 1.0)


def export_merged(
    adapter_dir: Path | str, out_dir: Path | str, *, base: str | None = None, dtype: str = "fp16", force: bool = False
) -> Path:
    """Merge the adapter into the base UNet and save it as a plain diffusers UNet (safetensors) at `out_dir`.

    The merge runs in fp32 and the result is cast to `dtype` once. Loading the folder needs no peft:
    `UNet2DConditionModel.from_pretrained(out_dir)`; beside it, `scheduler_config.json` is the base model's scheduler
    set to the prediction type the adapter was trained for (`EulerDiscreteScheduler.from_pretrained(out_dir)`).
    It is written to a temporary sibling and renamed into place, so `out_dir` is never half-written. An existing
    `out_dir` may be an empty folder, or, with `force`, an earlier export (nothing but config.json,
    scheduler_config.json and diffusion_pytorch_model*.safetensors); any other folder is refused, and so is an
    `out_dir` that is, contains or lies inside the adapter folder.
    """
    if dtype not in DTYPES:
        raise UserError(f"Unknown export dtype '{dtype}'; allowed: {', '.join(DTYPES)}.")
    out = Path(out_dir).expanduser().absolute()
    _check_export_target(out, Path(adapter_dir).expanduser(), force)
    adapter = read_adapter(adapter_dir)
    with writing(out, "the merged UNet"), export_lock(out):
        _check_export_target(out, Path(adapter_dir).expanduser(), force)  # again: another export may have finished
        base_name = _base_name(adapter, base)
        unet = load_unet(base_name, dtype=torch.float32)
        scheduler = scheduler_for(adapter, load_scheduler(base_name))
        base_keys = set(unet.state_dict())
        merged = _inject(unet, adapter, base_name, 1.0).merge_and_unload()
        extra = sorted(set(merged.state_dict()) - base_keys)
        if extra:
            raise UserError(
                f"The adapter {adapter.folder} adds weights the base UNet does not have (first: {extra[0]}); a plain "
                "diffusers UNet cannot hold them. Load the adapter with peft instead of exporting it."
            )
        with _quiet_diffusers_fp32_notice():
            merged.to(DTYPES[dtype])
        with atomic_folder(out) as staging:
            merged.save_pretrained(staging, safe_serialization=True)
            scheduler.save_config(staging)
    return out


def export_lock(out: Path) -> FolderLock:
    """One export at a time into `out`: the lock file sits beside it (`out` itself is swapped atomically)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return FolderLock(out, what="export", lock_path=out.parent / f".{out.name}.lock")


EXPORT_CONFIG_NAME = "config.json"
EXPORT_SCHEDULER_NAME = "scheduler_config.json"
EXPORT_WEIGHTS_PATTERN = "diffusion_pytorch_model*.safetensors"
EXPORT_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"  # written when diffusers shards the weights


def _check_export_target(out: Path, adapter_dir: Path, force: bool) -> None:
    """Refuse an --out that would overwrite the adapter or anything that is not an earlier export."""
    out_real, adapter_real = out.resolve(), adapter_dir.absolute().resolve()
    if out_real == adapter_real or adapter_real in out_real.parents or out_real in adapter_real.parents:
        relation = (
            "is the adapter folder" if out_real == adapter_real
            else "lies inside the adapter folder" if adapter_real in out_real.parents
            else "contains the adapter folder"
        )
        raise UserError(
            f"--out {out} {relation} ({adapter_real}); the export would replace or mix with the adapter. "
            "Choose an --out folder outside the adapter folder, e.g. a sibling such as "
            f"{adapter_real.parent / (adapter_real.name + '-merged')}."
        )
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise UserError(f"{out} is a file; --out names the folder to write the merged UNet to.")
    entries = sorted(out.iterdir())
    if not entries:
        return
    foreign = _not_an_export(out, entries)
    if foreign is not None:
        raise UserError(
            f"{out} already exists and is not an earlier UNet export: {foreign}. --out must be a new or empty "
            f"folder, or (with --force) a folder written by `waveft-train export` ({EXPORT_CONFIG_NAME}, "
            f"{EXPORT_SCHEDULER_NAME} and {EXPORT_WEIGHTS_PATTERN} only). Choose another --out folder; nothing was "
            "changed."
        )
    if not force:
        raise UserError(f"{out} already holds a merged UNet; pass --force to replace it, or choose another --out folder.")


def _not_an_export(out: Path, entries: list[Path]) -> str | None:
    """Why the non-empty folder `out` is not a UNet written by `export_merged`, or None when it is one."""
    for entry in entries:
        allowed = entry.name in (EXPORT_CONFIG_NAME, EXPORT_SCHEDULER_NAME, EXPORT_INDEX_NAME) or fnmatch.fnmatch(
            entry.name, EXPORT_WEIGHTS_PATTERN
        )
        if not allowed or entry.is_symlink() or not entry.is_file():
            kind = "folder" if entry.is_dir() and not entry.is_symlink() else "file"
            return f"it holds the {kind} {entry.name}"
    config_path = out / EXPORT_CONFIG_NAME
    if not config_path.is_file():
        return f"it has no {EXPORT_CONFIG_NAME}"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"its {EXPORT_CONFIG_NAME} is not readable JSON"
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if class_name != "UNet2DConditionModel":
        return f"its {EXPORT_CONFIG_NAME} describes {class_name!r}, not a UNet2DConditionModel"
    if not any(fnmatch.fnmatch(entry.name, EXPORT_WEIGHTS_PATTERN) for entry in entries):
        return f"it has no {EXPORT_WEIGHTS_PATTERN}"
    return None


@contextmanager
def _quiet_diffusers_fp32_notice() -> Iterator[None]:
    """Hide diffusers' "modules ... should be kept in float32: []" warning, which ModelMixin.to logs for every
    dtype cast (also when no module needs fp32, as for the SDXL UNet); other warnings still show."""
    class Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "should be kept in float32: []" not in record.getMessage()

    logger = logging.getLogger("diffusers.models.modeling_utils")
    notice_filter = Filter()
    logger.addFilter(notice_filter)
    try:
        yield
    finally:
        logger.removeFilter(notice_filter)
