"""Reading a run config: YAML file + `--set` overrides → a validated `TrainConfig` with absolute paths.

Relative paths written in the file resolve against the file's folder (a config travels with its data); paths
given with `--set` resolve against the working folder, where the user typed them. Duplicate YAML keys, which YAML
would silently merge, are refused. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_origin

import yaml
from pydantic import ValidationError

from waveft_train.common.errors import UserError
from waveft_train.common.paths import resolve_local_or_hub
from waveft_train.config.errors import format_validation_error, is_section, problems_text, shown, without_none, yaml_error_text
from waveft_train.config.schema import SECTIONS, TrainConfig
from waveft_train.models.builtin import BUILTIN_MODELS


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


def _as_path(value: str, base: Path) -> str:
    return os.path.normpath(base / Path(value).expanduser())


def _resolve_paths(config: TrainConfig, file_dir: Path, overridden: set[str]) -> TrainConfig:
    def base(key: str) -> Path:
        return Path.cwd() if key in overridden else file_dir

    model = config.model.model_copy(update={
        "pretrained": resolve_local_or_hub(config.model.pretrained, base("model.pretrained"), BUILTIN_MODELS),
        "config": resolve_local_or_hub(config.model.config, base("model.config"), BUILTIN_MODELS),
        "vae": resolve_local_or_hub(config.model.vae, base("model.vae"))})
    data = config.data.model_copy(update={
        "instance_dir": resolve_local_or_hub(config.data.instance_dir, base("data.instance_dir"))})
    class_dir = config.prior.class_dir
    prior = config.prior.model_copy(update={
        "class_dir": None if class_dir is None else _as_path(class_dir, base("prior.class_dir"))})
    output = config.output.model_copy(update={"dir": _as_path(config.output.dir, base("output.dir"))})
    concepts = [concept.model_copy(update={  # a list cannot be --set, so its paths are the file's
        "instance_dir": resolve_local_or_hub(concept.instance_dir, file_dir),
        "class_dir": None if concept.class_dir is None else _as_path(concept.class_dir, file_dir)})
        for concept in config.concepts]
    return config.model_copy(update={"model": model, "data": data, "prior": prior, "output": output,
                                     "concepts": concepts})


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
    folders = {"data.instance_dir": config.data.instance_dir} if os.path.isabs(config.data.instance_dir or "") else {}
    if config.prior.enabled and config.prior.class_dir:
        folders["prior.class_dir"] = config.prior.class_dir
    folders["output.dir"] = config.output.dir
    pairs = []
    for index, concept in enumerate(config.concepts):  # each concept's photos apart from every class folder and output
        key = f"concepts[{index}].instance_dir"
        if os.path.isabs(concept.instance_dir):
            folders[key] = concept.instance_dir
            pairs += [("prior.class_dir", key, _MIXED_IMAGES), ("output.dir", key, _RUN_WRITES)]
        if config.prior.enabled and concept.class_dir:
            folders[f"concepts[{index}].class_dir"] = concept.class_dir
            pairs += [(f"concepts[{index}].class_dir", f"concepts[{other}].instance_dir", _MIXED_IMAGES)
                      for other in range(len(config.concepts))]
            pairs.append(("output.dir", f"concepts[{index}].class_dir", _RUN_WRITES))
    pairs += [("prior.class_dir", "data.instance_dir", _MIXED_IMAGES),
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
    `model.pretrained: tiny` / `toy` are the built-in models, never folders. Raises `UserError`."""
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
    # max_steps is left out so that raising it extends a finished run instead of refusing it. batch_size and
    # gradient_accumulation are left out because only their product with the number of processes, the global
    # batch, shapes the run: checkpoints record it, and a resume on another layout must keep it (train/run.py checks).
    "train": ("max_steps", "checkpoint_every", "checkpoints_keep", "log_every", "report_to", "tracker_project",
              "tracker_run_name", "gradient_checkpointing", "batch_size", "gradient_accumulation", "cpu_threads",
              "compile")})


# Keys added after runs were made: left out while at their default, so that a run started before them (whose
# checkpoints hold the fingerprint without them) still resumes; set to anything else, they count like any other key.
LEFT_OUT_AT_DEFAULT: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    "model": ("config",), "data": ("caption_dropout", "shuffle_tags", "keep_tags"),
    "train": ("prodigy_d_coef", "prodigy_beta3", "prodigy_use_bias_correction", "prodigy_safeguard_warmup", "ema_decay",
              "text_encoder_lr", "text_encoder_stop_step")})


def fingerprint_fields(config: TrainConfig) -> dict[str, Any]:
    """What `config_fingerprint` hashes: the config without validation, output, NOT_IN_FINGERPRINT and the keys of
    LEFT_OUT_AT_DEFAULT at their defaults."""
    dumped = config.model_dump(mode="json", exclude={"validation", "output"})
    for section, keys in NOT_IN_FINGERPRINT.items():
        for key in keys:
            dumped[section].pop(key)
    for section, keys in LEFT_OUT_AT_DEFAULT.items():
        fields = type(getattr(config, section)).model_fields
        for key in keys:
            if dumped[section][key] == fields[key].default:
                dumped[section].pop(key)
    dumped["waveft"] = config.waveft.peft_kwargs()
    if config.waveft.text_encoders:  # off (the default, and every run before the key) leaves the hash as it was
        dumped["waveft"].update(text_encoders=True, text_encoder_n_frequency=config.waveft.text_encoder_n_frequency)
    if isinstance(dumped["waveft"]["target_modules"], list):
        dumped["waveft"]["target_modules"] = sorted(dumped["waveft"]["target_modules"])
    if not config.prior.enabled:
        dumped["prior"] = {"enabled": False}
    if not dumped["concepts"]:  # added after runs were made: absent, as in their fingerprints
        dumped.pop("concepts")
    for concept in dumped.get("concepts", []):  # grid rows shape no weights
        concept.pop("validation_prompts")
    return dumped


def config_fingerprint(config: TrainConfig) -> str:
    """Stable hash of what shapes the trained weights; resuming into an output dir whose fingerprint
    differs would mix two runs. Validation, output and checkpoint/logging cadence are left out."""
    text = json.dumps(fingerprint_fields(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
