"""Checks that need no weights, run before any model loads, so a mistake costs seconds instead of a GPU hour.

Each check takes the config section it reads (or plain values): the output folder guard (a folder holding another
run is refused unless --force), the image folders, optional packages, and the adapter against the UNet's
architecture on the meta device (target_modules that match nothing, an n_frequency larger than a layer, pattern
keys that set no layer). Every check is read-only, so every process of a multi-process launch can run it.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from peft import WaveFTConfig, inject_adapter_in_model
from peft.utils.other import get_pattern_key
from transformers import CLIPTextConfig

from waveft_train import waveft as tuner
from waveft_train.adapter.text_encoders import TEXT_ENCODERS, text_encoder_config
from waveft_train.common.errors import UserError
from waveft_train.common.paths import is_local, is_single_file
from waveft_train.config import (
    DataSection,
    ModelSection,
    PriorSection,
    TrainSection,
    WaveFTSection,
    config_fingerprint,
    load_config,
)
from waveft_train.data.images import validate_image_folder
from waveft_train.models.architecture import SDXL_BASE
from waveft_train.models.loading import check_single_file
from waveft_train.models.single_file import TEXT_ENCODERS as ENCODER_CLASSES
from waveft_train.models.single_file import file_sha256, parts_from_file
from waveft_train.models.sources import ALLOWED_MODELS, first_line, locate_model, offline_note, resolve_vae
from waveft_train.train.checkpoint import why_not_continue

RUN_OUTPUTS = ("checkpoints", "samples", "adapter", "metrics.jsonl", "summary.json", "report.html", "evaluation.jsonl",
               "evaluation.json")  # what a run writes


def holds_other_run(output_dir: Path, fingerprint: str, *, force: bool) -> bool:
    """True when `output_dir` holds a run with a different config and --force allows replacing it.

    Without --force such a folder is refused; a folder holding this very run (same fingerprint) is resumed.
    """
    previous = output_dir / "config.yaml"
    if not previous.exists():
        return False
    if not any((output_dir / name).exists() for name in RUN_OUTPUTS):
        return True  # a config.yaml and nothing it produced (e.g. a run that failed at its start): nothing to lose
    try:
        same = config_fingerprint(load_config(previous)) == fingerprint
    except UserError as error:
        if not force:
            lines = str(error).splitlines()
            problems = " ".join(line.strip() for line in lines[1:]) or lines[0]  # past the "invalid config" heading
            raise UserError(
                f"The output folder {output_dir} (output.dir) holds a run whose {previous} does not load with this "
                f"version of waveft-train ({problems}), so that run cannot be resumed. Choose another output.dir, or "
                "pass --force to discard that run's checkpoints, samples and metrics."
            ) from None
        same = False
    if not same and not force:
        raise UserError(
            f"The output folder {output_dir} (output.dir) holds a run with a different config ({previous}). "
            "Rerunning with the same config resumes that run; to train something else, choose another output.dir, "
            "or pass --force to discard that run's checkpoints, samples and metrics."
        )
    return not same


def clear_previous_run(output_dir: Path) -> None:
    """Delete what a previous run wrote (its config.yaml is overwritten by the new run)."""
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def validate_inputs(data: DataSection, prior: PriorSection) -> None:
    """Missing, empty or corrupt image folders fail in seconds (a hub dataset id is checked when it loads)."""
    if data.instance_dir is not None and is_local(data.instance_dir):  # concepts are checked as they load
        validate_image_folder(Path(data.instance_dir), config_key="data.instance_dir", role="instance")
    if prior.enabled and prior.class_dir:
        validate_image_folder(Path(prior.class_dir), config_key="prior.class_dir", role="class", allow_empty=True)


def check_optional_dependencies(train: TrainSection) -> None:
    if train.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("train.optimizer: adamw8bit needs bitsandbytes, which is not installed. Install it with "
                        "`pip install 'waveft-train[bnb]'` (CUDA only), or use train.optimizer: adamw.")
    if train.optimizer == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        raise UserError("train.optimizer: prodigy needs prodigyopt, which is not installed. Install it with "
                        "`pip install 'waveft-train[prodigy]'`, or use train.optimizer: adamw.")
    for tracker in train.report_to:  # accelerate's tracker names are the packages' names
        if importlib.util.find_spec(tracker) is None:
            others = [name for name in train.report_to if name != tracker]
            instead = f"train.report_to: [{', '.join(others)}]" if others else "train.report_to: none"
            raise UserError(f"train.report_to: {tracker} needs the {tracker} package, which is not installed. Install "
                            f"it with `pip install 'waveft-train[{tracker}]'`, or set {instead}.")


def adapter_on_meta_unet(model: ModelSection, waveft: WaveFTSection):
    """The config's UNet on the meta device (no weights) with the WaveFT adapter injected.

    Catches what only the model can tell (target_modules that match nothing, an n_frequency larger than a
    layer) in seconds, before gigabytes of weights load; the tuner's own errors become UserErrors.
    """
    files = locate_model(model.pretrained, model.config, model.revision)
    path = files.configs  # for a single file, model.config's folder
    if files.weights_file is not None:  # its family and every part's shapes, from the header
        check_single_file(files, parts_from_file(model.vae is not None), separate_vae=model.vae is not None)
    try:
        unet_config = UNet2DConditionModel.load_config(path, subfolder="unet", revision=model.revision)
    except (OSError, ValueError) as error:
        raise UserError(
            f"Could not read the UNet config of {model.pretrained!r} (model.pretrained): "
            f"{first_line(error).rstrip('.')}.{offline_note(not Path(path).exists())} "
            f"model.pretrained takes {ALLOWED_MODELS}."
        ) from None
    tuner.register()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        try:
            inject_adapter_in_model(WaveFTConfig(**waveft.peft_kwargs()), unet)
        except (ValueError, TypeError) as error:
            raise UserError(f"The waveft section does not fit the UNet of {model.pretrained}: {error}") from None
    adapted = [name for name, module in unet.named_modules() if isinstance(module, tuner.WaveFTLayer)]
    check_pattern_keys(list(waveft.n_frequency_pattern), adapted, model.pretrained)
    if waveft.text_encoders:
        text_encoders_on_meta(model, waveft)  # waveft.text_encoder_n_frequency against their layers, too
    return unet


def text_encoders_on_meta(model: ModelSection, waveft: WaveFTSection) -> dict:
    """The config's two text encoders on the meta device with their WaveFT adapters (waveft.text_encoders), by
    pipeline name; SDXL base's when their configs cannot be read without a download (as `params` sizes the rest)."""
    files = locate_model(model.pretrained, model.config, model.revision)
    revision = None if files.weights_file else model.revision
    try:
        configs = {name: CLIPTextConfig.from_pretrained(files.configs, subfolder=name, revision=revision)
                   for name in TEXT_ENCODERS}
    except (OSError, ValueError):
        configs = {name: CLIPTextConfig(**getattr(SDXL_BASE, name)) for name in TEXT_ENCODERS}
    tuner.register()
    encoders = {}
    with init_empty_weights():
        for name, config in configs.items():
            encoders[name] = ENCODER_CLASSES[name](config)
            try:
                inject_adapter_in_model(text_encoder_config(waveft), encoders[name])
            except (ValueError, TypeError) as error:
                raise UserError(f"WaveFT does not fit the {name} of {model.pretrained} (waveft.text_encoders): "
                                f"{error} Set waveft.text_encoder_n_frequency to at most its hidden size² "
                                f"({config.hidden_size ** 2}).") from None
    return encoders


def check_pattern_keys(keys: list[str], adapted: list[str], model_name: str) -> None:
    """Every n_frequency_pattern key must set some layer's n_frequency: peft skips a key that matches nothing."""
    used = {get_pattern_key(keys, name) for name in adapted}  # peft's rule: the first key that matches a layer wins
    unused = [key for key in keys if key not in used]
    if unused:
        example = adapted[0] if adapted else "none"
        raise UserError(
            f"waveft.n_frequency_pattern key(s) {', '.join(map(repr, unused))} set no adapted layer of the UNet of "
            f"{model_name}: they match none, or only layers an earlier key already sets (the first "
            f"matching key wins), so they would change nothing. As in peft, a key is a regular expression that must "
            f"match the end of a layer's name (e.g. {example!r}): 'attn2.to_k' sets every cross-attention to_k, "
            "'down_blocks.1.attentions.0.*' every layer of one block. `waveft-train params` lists the adapted layers."
        )


def check_vae(model: ModelSection) -> None:
    """A wrong model.vae fails now, not after the base model has loaded."""
    if model.vae is not None:
        resolve_vae(model.vae)


def checkpoint_is_another_run(output_dir: Path, image_manifest: dict[str, str], global_batch: int,
                              train: TrainSection, model: ModelSection, *, force: bool) -> bool:
    """Whether the newest checkpoint belongs to a run this one cannot continue (other subject photos, another
    global batch, another file at a single-file model's path): with --force it is replaced (True); without, refused."""
    def base_sha256() -> str | None:  # hashed once per file (cached), and only when there is a checkpoint to compare
        return file_sha256(Path(model.pretrained)) if is_single_file(model.pretrained) else None

    problem = why_not_continue(output_dir, image_manifest=image_manifest, global_batch=global_batch,
                               layout=f"train.batch_size {train.batch_size} × train.gradient_accumulation "
                                      f"{train.gradient_accumulation} × processes", base_sha256=base_sha256)
    if problem and not force:
        raise UserError(f"{problem}. Restore what changed to resume it, use another output.dir, or pass --force to "
                        "start over there.")
    return problem is not None
