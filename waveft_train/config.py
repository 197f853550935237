"""Typed run configuration: a YAML file plus `--set` overrides, validated into a `TrainConfig`.

Why typed and strict: a typo must fail in the first second of a GPU run, with a message that names the
key and suggests the fix, instead of being silently ignored. Every section rejects unknown keys.
This module imports no torch, so `init` and config checks stay instant.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt,
                      PositiveFloat, PositiveInt, ValidationError, ValidationInfo, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from waveft_train.config_errors import (describe, format_validation_error, is_section, problems_text, shown,
                                        without_none, yaml_error_text)
from waveft_train.errors import UserError

WAVELET_FAMILIES: frozenset[str] = frozenset(
    ["haar", *(f"db{i}" for i in range(1, 39)), *(f"sym{i}" for i in range(2, 21)),
     *(f"coif{i}" for i in range(1, 18))])
WAVELET_FAMILIES_TEXT = "db1-db38, sym2-sym20, coif1-coif17, haar"
Resolution = Annotated[int, Field(gt=0, multiple_of=8)]  # the SDXL VAE downsamples by 8
UnitInterval = Annotated[float, Field(ge=0.0, lt=1.0)]
LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
# diffusers' get_scheduler passes num_warmup_steps to every scheduler but "constant", which ignores it.
WARMUP_SCHEDULERS: tuple[str, ...] = tuple(name for name in get_args(LrScheduler) if name != "constant")


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace; write the prompt, e.g. \"a photo of sks dog\"")
    return value


Prompt = Annotated[str, AfterValidator(_not_blank)]


def _bool_for_number(value: Any, annotation: Any) -> bool:
    """True when a YAML true/false stands where `annotation` wants a number (pydantic would read true as 1),
    also inside lists and mapping values."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _bool_for_number(value, args[0])
    if origin in (Union, types.UnionType):
        return bool not in args and any(_bool_for_number(value, arg) for arg in args)
    if isinstance(value, bool):
        return annotation in (int, float)
    if origin is list and isinstance(value, list):
        return any(_bool_for_number(item, args[0]) for item in value)
    if origin is dict and isinstance(value, Mapping):
        return any(_bool_for_number(item, args[1]) for item in value.values())
    return False


class _Section(BaseModel):
    """A config section: refuses true/false for every number (int and float) field."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if _bool_for_number(value, annotation):
            expected = {int: "a valid integer", float: "a valid number"}.get(annotation) or describe(annotation)
            raise PydanticCustomError("bool_for_number", "Input should be {expected}", {"expected": expected})
        return value


class ModelSection(_Section):
    """Which SDXL to personalize: "tiny" (embedded test model), a hub id, or a local folder."""
    model_config = ConfigDict(extra="forbid")
    pretrained: str = Field("tiny", min_length=1)
    revision: str | None = None
    vae: str | None = None  # e.g. madebyollin/sdxl-vae-fp16-fix: the stock SDXL VAE overflows in fp16
    dtype: Literal["fp32", "fp16", "bf16"] = "bf16"  # weight dtype of the frozen parts


class WaveFTSection(_Section):
    """Every field of peft's `WaveFTConfig`, with peft's defaults (target modules: SDXL attention)."""
    model_config = ConfigDict(extra="forbid")
    n_frequency: PositiveInt = 2592
    scaling: float = 25.0
    wavelet_family: str = "db1"
    use_idwt: bool = True
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    target_modules: list[str] | str = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    exclude_modules: list[str] | str | None = None
    bias: Literal["none", "all", "waveft_only"] = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    n_frequency_pattern: dict[str, PositiveInt] = Field(default_factory=dict)
    proportional_parameters: bool = False
    init_weights: bool = True

    @field_validator("wavelet_family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        if value not in WAVELET_FAMILIES:
            raise ValueError(f"unknown wavelet family {value!r}; allowed: {WAVELET_FAMILIES_TEXT}")
        return value

    @field_validator("scaling")
    @classmethod
    def _nonzero_scaling(cls, value: float) -> float:
        if value == 0:
            raise ValueError("0 would make the adapter do nothing (it multiplies ΔW); use any other number, "
                             "e.g. 25.0 (the default; negative values flip ΔW)")
        return value

    @field_validator("target_modules")
    @classmethod
    def _some_target(cls, value: list[str] | str) -> list[str] | str:
        if not value:
            raise ValueError("must name at least one module (a list of names, or one regex string)")
        return value

    @field_validator("target_modules", "exclude_modules", "layers_pattern", "n_frequency_pattern")
    @classmethod
    def _valid_regexes(cls, value: Any) -> Any:
        """peft reads a string here, and every pattern key, as a regular expression."""
        for pattern in [value] if isinstance(value, str) else value if isinstance(value, dict) else []:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({error})") from None
        return value

    @model_validator(mode="after")
    def _peft_cross_checks(self) -> WaveFTSection:
        """The same combinations peft refuses, caught before any model is loaded."""
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("waveft.layers_to_transform cannot be used when waveft.target_modules is a "
                             "regex string; give target_modules as a list")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("waveft.layers_pattern cannot be used when waveft.target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("waveft.layers_pattern needs waveft.layers_to_transform as well")
        if self.proportional_parameters and self.n_frequency_pattern:
            raise ValueError("waveft.n_frequency_pattern has no effect when waveft.proportional_parameters is true "
                             "(peft then sizes every layer by its d_in·d_out); use one or the other")
        return self

    def peft_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `peft.WaveFTConfig(**kwargs)`; "haar" becomes "db1" (same filter, peft's name)."""
        kwargs = self.model_dump()
        if kwargs["wavelet_family"] == "haar":
            kwargs["wavelet_family"] = "db1"
        return kwargs


class DataSection(_Section):
    """The subject photos: a local folder or a hub dataset id, and the prompt with the rare token."""
    model_config = ConfigDict(extra="forbid")
    instance_dir: str = Field(min_length=1)
    instance_prompt: Prompt
    caption_column: str | None = None  # per-image captions from a dataset column instead of instance_prompt
    resolution: Resolution = 1024
    center_crop: bool = False
    random_flip: bool = True
    repeats: PositiveInt = 1
    dataloader_workers: NonNegativeInt = 0


class PriorSection(_Section):
    """DreamBooth prior preservation: generated class images keep the class from drifting."""
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    class_dir: str | None = None
    class_prompt: str | None = None
    num_class_images: PositiveInt = 100
    loss_weight: PositiveFloat = 1.0
    generation_steps: PositiveInt = 25
    generation_guidance: NonNegativeFloat = 5.0
    generation_batch_size: PositiveInt = 2

    @model_validator(mode="after")
    def _class_fields_when_enabled(self) -> PriorSection:
        blank = [key for key in ("class_dir", "class_prompt") if not (getattr(self, key) or "").strip()]
        missing = blank if self.enabled else []
        if missing:
            names = " and ".join(f"prior.{key}" for key in missing)
            raise ValueError(f"{names} {'is' if len(missing) == 1 else 'are'} required when prior.enabled is "
                             "true (e.g. class_dir: ./class_images, class_prompt: \"a photo of dog\"); "
                             "set them, or set prior.enabled: false")
        return self


class TrainSection(_Section):
    model_config = ConfigDict(extra="forbid")
    max_steps: PositiveInt = 500
    batch_size: PositiveInt = 1
    gradient_accumulation: PositiveInt = 4
    learning_rate: PositiveFloat = 1e-4
    lr_scheduler: LrScheduler = "constant"
    lr_warmup_steps: NonNegativeInt = 0
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    adam_beta1: UnitInterval = 0.9
    adam_beta2: UnitInterval = 0.999
    adam_weight_decay: NonNegativeFloat = 1e-2
    adam_epsilon: PositiveFloat = 1e-8
    max_grad_norm: PositiveFloat | None = 1.0  # null = no clipping
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    gradient_checkpointing: bool = True
    seed: NonNegativeInt = 42
    checkpoint_every: NonNegativeInt = 100  # 0 = only the final adapter
    checkpoints_keep: PositiveInt | None = 3  # null = keep all
    cache_latents: bool = True
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # null = the scheduler's
    snr_gamma: PositiveFloat | None = None  # Min-SNR weighting; null = plain MSE
    noise_offset: NonNegativeFloat = 0.0
    log_every: PositiveInt = 1
    report_to: Literal["none", "tensorboard"] = "none"

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _bare_no(cls, value: Any) -> Any:
        """YAML reads a bare `no` as false; that is what the user meant."""
        return "no" if value is False else value

    @model_validator(mode="after")
    def _warmup_needs_a_warmup_scheduler(self) -> TrainSection:
        if self.lr_warmup_steps > 0 and self.lr_scheduler not in WARMUP_SCHEDULERS:
            raise ValueError(f"train.lr_warmup_steps is {self.lr_warmup_steps} but train.lr_scheduler "
                             f"{self.lr_scheduler!r} has no warmup (the steps would be ignored); use a scheduler "
                             f"with warmup ({', '.join(WARMUP_SCHEDULERS)}), or set train.lr_warmup_steps: 0")
        return self


class ValidationSection(_Section):
    model_config = ConfigDict(extra="forbid")
    prompts: list[Prompt] = Field(default_factory=lambda: ["a photo of sks dog in a bucket",
                                                        "a photo of sks dog on the beach"])
    every: NonNegativeInt = 100  # 0 = off
    num_images: PositiveInt = 4
    steps: PositiveInt = 25
    guidance: NonNegativeFloat = 5.0
    seed: NonNegativeInt = 42
    resolution: Resolution | None = None  # null = data.resolution

    @model_validator(mode="after")
    def _prompts_when_on(self) -> ValidationSection:
        if self.every > 0 and not self.prompts:
            raise ValueError("validation.prompts is empty but validation.every is "
                             f"{self.every}; give prompts, or set validation.every: 0 to turn validation off")
        return self


class OutputSection(_Section):
    model_config = ConfigDict(extra="forbid")
    dir: str = Field("outputs/run", min_length=1)


class TrainConfig(BaseModel):
    """The whole run. A missing or empty section means "all defaults" and is validated like any other."""
    model_config = ConfigDict(extra="forbid")
    model: ModelSection
    waveft: WaveFTSection
    data: DataSection
    prior: PriorSection
    train: TrainSection
    validation: ValidationSection
    output: OutputSection

    @model_validator(mode="before")
    @classmethod
    def _absent_sections_are_empty(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        filled = dict(data)
        for name in cls.model_fields:
            if filled.get(name) is None:
                filled[name] = {}
        return filled

    @model_validator(mode="after")
    def _fp16_needs_loss_scaling(self) -> TrainConfig:
        if self.model.dtype == "fp16" and self.train.mixed_precision == "no":
            raise ValueError("model.dtype: fp16 with train.mixed_precision: no would train without loss scaling "
                             "(small gradients vanish); set train.mixed_precision: fp16 (or bf16), or model.dtype: bf16")
        return self

    def validation_resolution(self) -> int:
        return self.validation.resolution or self.data.resolution


SECTIONS: tuple[str, ...] = tuple(TrainConfig.model_fields)


# ------------------------------------------------------------------------------------ loading


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise UserError(f"config file {path} {state}; write one with `waveft-train init` or pass --config PATH")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        _refuse_duplicate_keys(text)
    except yaml.YAMLError as exc:
        raise UserError(yaml_error_text(exc, path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else shown(data)
        raise UserError(f"{path}: the top level must be a mapping of sections ({', '.join(SECTIONS)}), "
                        f"got {got}")
    return data


def _refuse_duplicate_keys(text: str) -> None:
    """YAML keeps the last of two equal keys without a word, so a section written twice would lose the first's keys.

    The text is composed into nodes (SafeLoader: no objects are constructed) and every mapping is checked.
    """
    pending, seen = [yaml.compose(text, Loader=yaml.SafeLoader)], set()
    while pending:
        node = pending.pop()
        if id(node) in seen:  # an alias: checked where its anchor is (and it may refer to itself)
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], yaml.Node] = {}
            for key, value in node.value:
                pending.append(value)
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue  # merge keys (`<<`) may repeat: YAML applies every one
                if (key.tag, key.value) in first:
                    line = first[(key.tag, key.value)].start_mark.line + 1
                    raise yaml.constructor.ConstructorError(
                        problem=f"duplicate key {key.value!r} (first at line {line}); YAML would silently keep only "
                                "the last one, so merge them",
                        problem_mark=key.start_mark)
                first[(key.tag, key.value)] = key
        elif isinstance(node, yaml.SequenceNode):
            pending.extend(node.value)


def _override_parts(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> key parts and the YAML-parsed value. Below a mapping-valued key (such as
    waveft.n_frequency_pattern) the rest of the dotted name is one key, since module names contain dots."""
    key, sep, raw = text.partition("=")
    parts = [part.strip() for part in key.split(".")]
    if not sep or len(parts) < 2 or not all(parts):
        raise UserError(f"bad override {text!r}: expected the form section.key=value, e.g. "
                        "--set train.learning_rate=5e-5 or --set 'waveft.target_modules=[to_q,to_v]'")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise UserError(f"bad override {text!r}: the value is not valid YAML "
                        f"({getattr(exc, 'problem', exc)}); quote it") from None
    try:
        _refuse_duplicate_keys(raw)
    except yaml.YAMLError as exc:
        raise UserError(f"bad override {text!r}: {getattr(exc, 'problem', exc)}") from None
    section: Any = TrainConfig
    for index, part in enumerate(parts):
        field = section.model_fields.get(part)
        if field is None:
            break  # unknown: validation reports it with a did-you-mean
        if is_section(field.annotation):
            section = field.annotation
            continue
        rest = parts[index + 1:]
        if rest and get_origin(without_none(field.annotation)) is dict:
            return [*parts[:index + 1], ".".join(rest)], value
        if rest:
            raise UserError(f"bad override {text!r}: `{'.'.join(parts[:index + 1])}` is a value, not a "
                            "section, so it has no sub-key; expected the form section.key=value")
        break
    return parts, value


def _apply_override(data: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    node = data
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise UserError(f"bad override {text!r}: `{'.'.join(parts[:depth + 1])}` in the file is "
                            f"{shown(node[part])}, not a mapping, so it has no key `{parts[depth + 1]}`")
        node = node[part]
    node[parts[-1]] = value


def _validated(data: Mapping[str, Any], source: str) -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, source, TrainConfig)) from None


def config_from_mapping(data: Mapping[str, Any], source: str = "<config>") -> TrainConfig:
    """Validate already-parsed data (no path resolution; relative folders are checked as the working directory
    reads them); problems become one `UserError` naming `source`."""
    config = _validated(data, source)
    _check_folders(_resolve_paths(config, Path.cwd(), set()), source)
    return config


_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?")


def _as_path(value: str, base: Path) -> str:
    return os.path.normpath(base / Path(value).expanduser())


def _local_or_hub(value: str | None, base: Path, keyword: str | None = None) -> str | None:
    """Resolve `value` when it is written as a path (./x, ../x, /x, ~/x, a/b/c) or names an existing folder
    next to `base`; otherwise it is a hub id such as "user/dogs" and stays as written."""
    if value is None or value == keyword:
        return value
    explicit = Path(value).expanduser().is_absolute() or not _HUB_ID.fullmatch(value) or ".." in value
    return _as_path(value, base) if explicit or (base / value).is_dir() else value


def _resolve_paths(config: TrainConfig, file_dir: Path, overridden: set[str]) -> TrainConfig:
    def base(key: str) -> Path:
        return Path.cwd() if key in overridden else file_dir

    model = config.model.model_copy(update={
        "pretrained": _local_or_hub(config.model.pretrained, base("model.pretrained"), keyword="tiny"),
        "vae": _local_or_hub(config.model.vae, base("model.vae"))})
    data = config.data.model_copy(update={
        "instance_dir": _local_or_hub(config.data.instance_dir, base("data.instance_dir"))})
    class_dir = config.prior.class_dir
    prior = config.prior.model_copy(update={
        "class_dir": None if class_dir is None else _as_path(class_dir, base("prior.class_dir"))})
    output = config.output.model_copy(update={"dir": _as_path(config.output.dir, base("output.dir"))})
    return config.model_copy(update={"model": model, "data": data, "prior": prior, "output": output})


def _relation(folder: str, other: str) -> str | None:
    """How `folder` lies relative to `other` (both absolute; symlinks followed), or None when apart."""
    one, two = Path(os.path.realpath(folder)), Path(os.path.realpath(other))
    if one == two:
        return "is the same folder as"
    if two in one.parents:
        return "is inside"
    return "contains" if one in two.parents else None


_MIXED_IMAGES = ("the two image sets would mix (subject photos counted as class images, or generated class images "
                 "read as subject photos)")
_RUN_WRITES = "a run writes its checkpoints and samples into output.dir (and --force deletes them)"


def folder_problems(config: TrainConfig) -> list[str]:
    """Folders that must stay apart, one line each, for a config whose local paths are absolute (as
    `_resolve_paths` leaves them); a `data.instance_dir` that is not absolute is a hub dataset id, not a folder."""
    folders = {"data.instance_dir": config.data.instance_dir} if os.path.isabs(config.data.instance_dir) else {}
    if config.prior.enabled and config.prior.class_dir:
        folders["prior.class_dir"] = config.prior.class_dir
    folders["output.dir"] = config.output.dir
    pairs = [("prior.class_dir", "data.instance_dir", _MIXED_IMAGES),
             ("output.dir", "data.instance_dir", f"{_RUN_WRITES}, so it must share no folder with the subject photos"),
             ("output.dir", "prior.class_dir", f"{_RUN_WRITES}, so it must share no folder with the class images")]
    problems = []
    for key, other, why in pairs:
        if key in folders and other in folders:
            relation = _relation(folders[key], folders[other])
            if relation:
                problems.append(f"{key} ({folders[key]}) {relation} {other} ({folders[other]}): {why}; give {key} "
                                 f"a folder of its own, apart from {other} (not inside it, not containing it)")
    return problems


def _check_folders(config: TrainConfig, source: str) -> None:
    problems = folder_problems(config)
    if problems:
        raise UserError(problems_text(source, problems))


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config, apply `section.key=value` overrides (values parsed as YAML), validate, make paths
    absolute and check that the folders stay apart. Relative paths written in the file resolve against the file's
    folder; relative paths given with --set resolve against the current working directory, where the user typed them.
    `model.pretrained: tiny` is the embedded test model, never a folder. Raises `UserError`."""
    config_path = Path(path).expanduser()
    data = _read_mapping(config_path)
    overridden: set[str] = set()
    for text in overrides:
        parts, value = _override_parts(text)
        _apply_override(data, parts, value, text)
        overridden.add(".".join(parts))
    source = f"{config_path} (with --set {' '.join(overrides)})" if overrides else str(config_path)
    config = _resolve_paths(_validated(data, source), config_path.absolute().parent, overridden)
    _check_folders(config, source)
    return config


def dump_config(config: TrainConfig) -> str:
    """YAML text of a (resolved) config; `load_config` reads it back to an equal config."""
    body = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    return "# waveft-train resolved config (absolute paths)\n" + body


NOT_IN_FINGERPRINT: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    "data": ("dataloader_workers",),
    # max_steps is left out so that raising it extends a finished run instead of refusing it.
    "train": ("max_steps", "checkpoint_every", "checkpoints_keep", "log_every", "report_to", "gradient_checkpointing")})


def config_fingerprint(config: TrainConfig) -> str:
    """Stable hash of what shapes the trained weights; resuming into an output dir whose fingerprint
    differs would mix two runs. Validation, output and checkpoint/logging cadence are left out."""
    dumped = config.model_dump(mode="json", exclude={"validation", "output"})
    for section, keys in NOT_IN_FINGERPRINT.items():
        for key in keys:
            dumped[section].pop(key)
    dumped["waveft"] = config.waveft.peft_kwargs()
    if isinstance(dumped["waveft"]["target_modules"], list):
        dumped["waveft"]["target_modules"] = sorted(dumped["waveft"]["target_modules"])
    if not config.prior.enabled:
        dumped["prior"] = {"enabled": False}
    text = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def starter_config_text() -> str:
    """A documented starter config for `waveft-train init`; it loads as is (paths are placeholders)."""
    return (Path(__file__).parent / "assets" / "starter.yaml").read_text()

