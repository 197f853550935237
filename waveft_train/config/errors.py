"""Config problems in words a YAML writer understands: one line per problem, naming the dotted key.

pydantic reports errors by location tuples and type codes; these helpers turn them into lines such as
"`train.max_steps`: got True (bool), expected a valid integer" or "unknown key `train.max_step` (did you mean
`train.max_steps`?)", and YAML syntax errors into file:line:column messages.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError


def is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def without_none(annotation: Any) -> Any:
    """`X | None` -> X, so list indexes and dict keys in error locations can be followed."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def field_at(root: type[BaseModel], loc: Sequence[Any]) -> tuple[str, Any]:
    """Dotted path (`train.max_steps`, `validation.prompts[1]`) and annotation of a pydantic error location below
    the model `root`; stops at union-member tags, which pydantic adds to locations but users never wrote."""
    annotation: Any = root
    path = ""
    for part in loc:
        inner = without_none(annotation)
        if is_section(inner) and part in inner.model_fields:
            annotation = inner.model_fields[part].annotation
            path = f"{path}.{part}" if path else str(part)
        elif isinstance(part, int) and get_origin(inner) is list:
            annotation, path = get_args(inner)[0], f"{path}[{part}]"
        elif get_origin(inner) is dict and part != "[key]":
            annotation, path = get_args(inner)[1], f"{path}[{part!r}]"
        else:
            break
    return path, annotation


def describe(annotation: Any) -> str:
    """What a type accepts, in words a YAML writer understands."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return describe(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin is list:
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return f"a mapping of {describe(args[0])} to {describe(args[1])}"
    if is_section(annotation):
        return "a mapping with keys " + ", ".join(annotation.model_fields)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def shown(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


# Keys users carry over from diffusers' DreamBooth scripts and kohya's sd-scripts, and what waveft-train calls them.
PEER_NAMES = {
    "pretrained_model_name_or_path": "model.pretrained", "pretrained_vae_model_name_or_path": "model.vae",
    "instance_data_dir": "data.instance_dir", "train_data_dir": "data.instance_dir",
    "dataset_name": "data.instance_dir", "image_column": "data.caption_column",
    "flip_aug": "data.random_flip", "enable_bucket": "data.bucketing", "caption_extension": "data.caption_column",
    "caption_ext": "data.caption_column", "caption_dropout_rate": "data.caption_dropout",
    "caption_dropout_probability": "data.caption_dropout", "shuffle_caption": "data.shuffle_tags",
    "shuffle_tokens": "data.shuffle_tags", "keep_tokens": "data.keep_tags",
    "dataloader_num_workers": "data.dataloader_workers", "max_data_loader_n_workers": "data.dataloader_workers",
    "with_prior_preservation": "prior.enabled", "class_data_dir": "prior.class_dir", "reg_data_dir": "prior.class_dir",
    "prior_loss_weight": "prior.loss_weight", "num_class_images": "prior.num_class_images",
    "max_train_steps": "train.max_steps", "train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation", "unet_lr": "train.learning_rate",
    "optimizer_type": "train.optimizer", "use_8bit_adam": "train.optimizer (adamw8bit)",
    "use_ema": "train.ema_decay", "ema_power": "train.ema_decay", "ema_max_decay": "train.ema_decay",
    "d_coef": "train.prodigy_d_coef", "use_bias_correction": "train.prodigy_use_bias_correction",
    "safeguard_warmup": "train.prodigy_safeguard_warmup",
    "checkpointing_steps": "train.checkpoint_every", "save_every_n_steps": "train.checkpoint_every",
    "checkpoints_total_limit": "train.checkpoints_keep", "min_snr_gamma": "train.snr_gamma",
    "v_parameterization": "train.prediction_type (v_prediction)", "log_with": "train.report_to",
    "torch_compile": "train.compile", "enable_torch_compile": "train.compile",
    "tracker_project_name": "train.tracker_project",
    "validation_prompt": "validation.prompts", "sample_prompts": "validation.prompts",
    "validation_epochs": "validation.every", "validation_steps": "validation.every",
    "sample_every_n_steps": "validation.every", "num_validation_images": "validation.num_images",
    "output_dir": "output.dir", "rank": "waveft.n_frequency", "network_dim": "waveft.n_frequency",
    **{name: f"{section}.{name}" for section, names in {
        "data": ("instance_prompt", "caption_column", "resolution", "center_crop", "random_flip", "repeats",
                 "caption_dropout", "shuffle_tags", "keep_tags"),
        "prior": ("class_prompt",),
        "train": ("learning_rate", "lr_scheduler", "lr_warmup_steps", "optimizer", "adam_beta1", "adam_beta2",
                  "adam_weight_decay", "adam_epsilon", "max_grad_norm", "mixed_precision", "gradient_checkpointing",
                  "seed", "cache_latents", "prediction_type", "snr_gamma", "noise_offset", "report_to",
                  "tracker_run_name", "ema_decay", "prodigy_d_coef", "prodigy_beta3", "prodigy_use_bias_correction",
                  "prodigy_safeguard_warmup"),
    }.items() for name in names},
}


def unknown_key_line(root: type[BaseModel], loc: Sequence[Any]) -> str:
    """`unknown key train.learning_rat (did you mean train.learning_rate?)` plus the allowed keys; a key named as the
    diffusers or kohya scripts name it gets waveft-train's name for it."""
    *parent_loc, key = loc
    parent_path, parent = field_at(root, parent_loc)
    allowed = list(without_none(parent).model_fields) if is_section(without_none(parent)) else []
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    prefix = f"{parent_path}." if parent_path else ""
    what = f"key `{prefix}{key}`" if parent_path else f"section `{key}`"
    hint = f" (did you mean `{prefix}{close[0]}`?)" if close else ""
    if str(key) in PEER_NAMES and PEER_NAMES[str(key)] != f"{prefix}{key}":
        budget = " (WaveFT's budget; `waveft-train params` shows the LoRA rank it equals)" if "n_frequency" in \
            PEER_NAMES[str(key)] else ""
        hint = f" (waveft-train calls it `{PEER_NAMES[str(key)]}`{budget})"
    where = f"in `{parent_path}`" if parent_path else "sections"
    return f"unknown {what}{hint}; allowed {where}: {', '.join(allowed)}"


def _problem_line(path: str, errors: list[dict[str, Any]], annotation: Any) -> str:
    first = errors[0]
    if first["type"] == "missing":
        return f"`{path}` is required"
    if first["type"] in ("value_error", "assertion_error"):
        message = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        return message if is_section(annotation) else f"`{path}`: {message}"
    if len(errors) > 1 or is_section(annotation):
        expected = describe(annotation)
    else:
        expected = first["msg"].removeprefix("Input should be ")
        expected = f"a value {expected}" if expected.startswith(("greater", "less")) else expected
    return f"`{path}`: got {shown(first['input'])}, expected {expected}"


def format_validation_error(error: ValidationError, source: str, root: type[BaseModel]) -> str:
    """All problems of one validation of `root`, one line each, starting with the config file's name."""
    lines: list[str] = []
    by_path: dict[str, tuple[Any, list[dict[str, Any]]]] = {}
    for item in error.errors(include_url=False):
        if item["type"] == "extra_forbidden":
            lines.append(unknown_key_line(root, item["loc"]))
        else:
            path, annotation = field_at(root, item["loc"])
            by_path.setdefault(path, (annotation, []))[1].append(item)
    lines += [_problem_line(path, items, annotation) for path, (annotation, items) in by_path.items()]
    return problems_text(source, lines)


def problems_text(source: str, lines: list[str]) -> str:
    lines = list(dict.fromkeys(lines))
    plural = "s" if len(lines) > 1 else ""
    return f"{source}: invalid config ({len(lines)} problem{plural}):\n" + "\n".join(f"  - {x}" for x in lines)


def yaml_error_text(error: yaml.YAMLError, path: Path) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    detail = f"{problem} ({context})" if context else problem
    kind = "YAML problem" if isinstance(error, yaml.constructor.ConstructorError) else "YAML syntax error"
    if mark is None:
        return f"{path}: {kind}: {detail}"
    line, column = mark.line + 1, mark.column + 1
    return f"{path}:{line}:{column}: {kind} at line {line}, column {column}: {detail}"
