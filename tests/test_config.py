"""Config: defaults, every user-facing error, overrides, path resolution, dump/load, fingerprint."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from waveft_train.common.errors import UserError
from waveft_train.config import WaveFTSection, config_fingerprint, config_from_mapping, dump_config, load_config
from waveft_train.config.docs import section_models, starter_config_text

REPO = Path(__file__).resolve().parents[1]
MINIMAL = """\
data:
  instance_dir: ./photos
  instance_prompt: "a photo of sks dog"
prior:
  class_dir: ./class
  class_prompt: "a photo of dog"
"""


def write(folder: Path, text: str, name: str = "run.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(folder: Path, text: str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(UserError) as info:
        load_config(write(folder, text), overrides)
    return str(info.value)


# ------------------------------------------------------------------------------------ defaults


def test_defaults_match_design_and_peft(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert (config.model.pretrained, config.model.revision, config.model.vae, config.model.dtype) == (
        "tiny", None, None, "bf16")
    w = config.waveft
    assert (w.n_frequency, w.scaling, w.wavelet_family, w.use_idwt, w.random_loc_seed) == (
        2592, 25.0, "db1", True, 777)
    assert w.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert (w.bias, w.n_frequency_pattern, w.proportional_parameters, w.init_weights) == ("none", {}, False, True)
    d = config.data
    assert (d.resolution, d.center_crop, d.random_flip, d.repeats, d.caption_column) == (
        1024, False, True, 1, None)
    p = config.prior
    assert (p.enabled, p.num_class_images, p.loss_weight, p.generation_steps) == (True, 100, 1.0, 25)
    t = config.train
    assert (t.max_steps, t.batch_size, t.gradient_accumulation, t.learning_rate) == (500, 1, 4, 1e-4)
    assert (t.lr_scheduler, t.optimizer, t.mixed_precision, t.gradient_checkpointing) == (
        "constant", "adamw", "bf16", True)
    assert (t.seed, t.checkpoint_every, t.checkpoints_keep, t.prediction_type, t.snr_gamma) == (
        42, 100, 3, None, None)
    v = config.validation
    assert (v.every, v.num_images, v.steps, v.guidance, v.seed, v.resolution) == (100, 4, 25, 5.0, 42, None)
    assert len(v.prompts) >= 2 and config.validation_resolution() == 1024
    assert config.output.dir == str(tmp_path / "outputs" / "run")


def test_waveft_section_mirrors_every_peft_field_and_default() -> None:
    from peft import PeftConfig, WaveFTConfig

    base_fields = {field.name for field in dataclasses.fields(PeftConfig)}
    peft_fields = {f.name: f for f in dataclasses.fields(WaveFTConfig) if f.name not in base_fields}
    from waveft_train.config.cross_checks import TEXT_ENCODER_FIELDS

    assert set(WaveFTSection.model_fields) - set(TEXT_ENCODER_FIELDS) == set(peft_fields)
    peft_defaults = WaveFTConfig()
    ours = WaveFTSection()
    for name in peft_fields:
        if name != "target_modules":  # peft has no default; ours are SDXL's attention projections
            assert getattr(ours, name) == getattr(peft_defaults, name), name


def test_peft_kwargs_build_a_peft_config() -> None:
    from peft import WaveFTConfig

    section = WaveFTSection(wavelet_family="haar", n_frequency=64, n_frequency_pattern={"mid_block.x": 8},
                            layers_to_transform=[0, 1], layers_pattern="attentions")
    peft_config = WaveFTConfig(**section.peft_kwargs())
    assert peft_config.wavelet_family == "db1"  # same filter, the name peft knows
    assert peft_config.n_frequency == 64 and peft_config.n_frequency_pattern == {"mid_block.x": 8}
    assert peft_config.target_modules == {"to_q", "to_k", "to_v", "to_out.0"}


def test_config_imports_no_torch() -> None:
    import subprocess

    code = "import sys, waveft_train.config; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "False"


def test_bare_no_means_no_mixed_precision(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, MINIMAL + "train:\n  mixed_precision: no\n")).train.mixed_precision == "no"


def test_scientific_notation_without_dot_is_a_number(tmp_path: Path) -> None:
    # PyYAML reads `1e-4` as a string; the config must still treat it as the number users meant.
    config = load_config(write(tmp_path, MINIMAL + "train:\n  learning_rate: 5e-5\n"))
    assert config.train.learning_rate == 5e-5


# ------------------------------------------------------------------------------------ errors


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    message = load_error(tmp_path, "train:\n  max_steps: 5\n  lr: [1, 2\n")
    assert "run.yaml:4:1" in message and "line 4, column 1" in message


def test_duplicate_keys_are_refused_not_silently_merged(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys; a section written twice would lose the first one's keys."""
    message = load_error(tmp_path, MINIMAL + "train:\n  max_steps: 5\ntrain:\n  learning_rate: 1.0e-5\n")
    assert "duplicate key 'train' (first at line" in message and "merge them" in message
    nested = load_error(tmp_path, MINIMAL + "train:\n  max_steps: 5\n  max_steps: 6\n")
    assert "duplicate key 'max_steps'" in nested
    override = load_error(tmp_path, MINIMAL, ("waveft.n_frequency_pattern={to_q: 8, to_q: 9}",))
    assert "duplicate key 'to_q'" in override and "quote it" not in override


def test_anchors_and_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    """The duplicate check walks YAML's node graph: aliases (even one inside its own anchor) are visited once, and a
    key next to a merge key (`<<`) overrides the merged value as YAML intends."""
    (tmp_path / "run.yaml").write_text(MINIMAL + "validation:\n  prompts: &p [a photo of sks dog, *p]\n")
    with pytest.raises(UserError, match="validation.prompts"):  # a list inside itself is not a prompt, but no hang
        load_config(tmp_path / "run.yaml")
    merged = "waveft:\n  n_frequency_pattern:\n    <<: {attn2.to_k: 8, attn2.to_v: 8}\n    <<: {to_q: 4}\n    attn2.to_k: 16\n"
    (tmp_path / "run.yaml").write_text(MINIMAL + merged)  # two merge keys: YAML applies both
    pattern = load_config(tmp_path / "run.yaml").waveft.n_frequency_pattern
    assert pattern == {"attn2.to_k": 16, "attn2.to_v": 8, "to_q": 4}


def test_override_that_is_not_valid_yaml_says_quote_it(tmp_path: Path) -> None:
    assert "quote it" in load_error(tmp_path, MINIMAL, ("data.instance_prompt=!sks toy",))


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "top level must be a mapping" in load_error(tmp_path, "- train\n- data\n")
    assert "empty file" in load_error(tmp_path, "# nothing\n")


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL + "train:\n  learning_rat: 1.0e-4\n")
    assert message.startswith(str(tmp_path / "run.yaml"))
    assert "unknown key `train.learning_rat` (did you mean `train.learning_rate`?)" in message
    assert "gradient_accumulation" in message  # the allowed keys are listed


def test_unknown_key_without_close_match_lists_allowed(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL + "waveft:\n  zzz: 1\n")
    assert "unknown key `waveft.zzz`; allowed in `waveft`: n_frequency, scaling" in message


def test_unknown_section_suggests_the_close_one(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL + "trian:\n  max_steps: 3\n")
    assert "unknown section `trian` (did you mean `train`?)" in message


def test_wrong_types_name_path_value_and_expectation(tmp_path: Path) -> None:
    text = MINIMAL + "train:\n  max_steps: lots\n  batch_size: 0\nwaveft:\n  layers_to_transform: x\n"
    text += "validation:\n  prompts: [ok, 7]\n"
    message = load_error(tmp_path, text)
    assert "invalid config (4 problems)" in message
    assert "`train.max_steps`: got 'lots' (str), expected a valid integer" in message
    assert "`train.batch_size`: got 0 (int), expected a value greater than 0" in message
    assert ("`waveft.layers_to_transform`: got 'x' (str), expected an integer or a list of integers or null"
            in message)
    assert "`validation.prompts[1]`: got 7 (int), expected a valid string" in message


def test_section_of_the_wrong_type(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL + "train: 5\n")
    assert "`train`: got 5 (int), expected a mapping with keys max_steps" in message


@pytest.mark.parametrize(("snippet", "expected"), [
    ("waveft:\n  wavelet_family: db39\n",
     "unknown wavelet family 'db39'; allowed: db1-db38, sym2-sym20, coif1-coif17, and haar (= db1)"),
    ("waveft:\n  n_frequency: 0\n", "`waveft.n_frequency`: got 0 (int), expected a value greater than 0"),
    ("waveft:\n  n_frequency_pattern: {mid.x: -1}\n", "`waveft.n_frequency_pattern['mid.x']`: got -1"),
    ("waveft:\n  bias: some\n", "`waveft.bias`: got 'some' (str), expected 'none', 'all' or 'waveft_only'"),
    ("waveft:\n  target_modules: '.*to_q'\n  layers_to_transform: 1\n",
     "waveft.layers_to_transform cannot be used when waveft.target_modules is a regex"),
    ("waveft:\n  target_modules: []\n", "`waveft.target_modules`: must name at least one module"),
    ("waveft:\n  target_modules: 'to_(q'\n",
     "`waveft.target_modules`: 'to_(q' is not a valid regular expression (missing ), unterminated subpattern"),
    ("waveft:\n  n_frequency_pattern: {'to_q[': 8}\n", "`waveft.n_frequency_pattern`: 'to_q[' is not a valid regular"),
    ("waveft:\n  n_frequency_pattern: {to_q: 8}\n  proportional_parameters: true\n",
     "waveft.n_frequency_pattern has no effect when waveft.proportional_parameters is true"),
    ("train:\n  lr_scheduler: cosin\n", "`train.lr_scheduler`: got 'cosin' (str), expected 'constant'"),
    ("train:\n  snr_gamma: 0\n", "`train.snr_gamma`: got 0 (int)"),
    ("validation:\n  resolution: 1001\n", "`validation.resolution`: got 1001 (int), expected a multiple of 8"),
    ("validation:\n  prompts: []\n", "validation.prompts is empty but validation.every is 100"),
    ("validation:\n  prompts: [ok, '  ']\n", "`validation.prompts[1]`: must not be empty or only whitespace"),
    ("validation:\n  prompts: [ok, '']\n", "`validation.prompts[1]`: must not be empty or only whitespace"),
    ("waveft:\n  scaling: 0\n", "`waveft.scaling`: 0 would make the adapter do nothing"),
    ("waveft:\n  scaling: 0.0\n", "`waveft.scaling`: 0 would make the adapter do nothing"),
    ("train:\n  lr_warmup_steps: 50\n",
     "train.lr_warmup_steps is 50 but train.lr_scheduler 'constant' has no warmup (the steps would be ignored); "
     "use a scheduler with warmup (constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial), "
     "or set train.lr_warmup_steps: 0"),
    ("train:\n  report_to: wandbb\n", "`train.report_to`: unknown tracker 'wandbb'; allowed: none, tensorboard, wandb, "
     "or a list of them such as [tensorboard, wandb]"),
    ("train:\n  report_to: [tensorboard, mlflow]\n", "`train.report_to`: unknown tracker 'mlflow'"),
    ("train:\n  report_to: {wandb: true}\n", "`train.report_to`: got {'wandb': True}; allowed: none, tensorboard"),
    ("train:\n  max_steps: true\n", "`train.max_steps`: got True (bool), expected a valid integer"),
    ("train:\n  learning_rate: false\n", "`train.learning_rate`: got False (bool), expected a valid number"),
    ("train:\n  max_grad_norm: true\n", "`train.max_grad_norm`: got True (bool), expected a number or null"),
    ("waveft:\n  layers_to_transform: [0, true]\n",
     "`waveft.layers_to_transform`: got [0, True] (list), expected an integer or a list of integers or null"),
    ("waveft:\n  n_frequency_pattern: {mid.x: true}\n", "`waveft.n_frequency_pattern`: got {'mid.x': True} (dict)"),
])
def test_value_checks(tmp_path: Path, snippet: str, expected: str) -> None:
    assert expected in load_error(tmp_path, MINIMAL + snippet)


@pytest.mark.parametrize("snippet", [
    "waveft:\n  scaling: -25.0\n", "waveft:\n  scaling: 0.001\n",
    "train:\n  lr_scheduler: constant_with_warmup\n  lr_warmup_steps: 50\n",
    "train:\n  lr_scheduler: cosine\n  lr_warmup_steps: 50\n", "train:\n  lr_scheduler: constant\n  lr_warmup_steps: 0\n",
    "train:\n  cache_latents: false\n  gradient_checkpointing: true\n",  # booleans where booleans belong
    "waveft:\n  layers_to_transform: [0, 1]\n  layers_pattern: attentions\n",
])
def test_values_next_to_the_refused_ones_still_load(tmp_path: Path, snippet: str) -> None:
    load_config(write(tmp_path, MINIMAL + snippet))


def _number_fields() -> list[tuple[str, object]]:
    """Every int or float field of every section (read from the annotations' text, independent of config.py)."""
    return [(f"{section}.{name}", field.annotation)
            for section, model in section_models().items() if section != "concepts"  # a list: no --set
            for name, field in model.model_fields.items()
            if re.search(r"\b(int|float)\b", str(field.annotation))]


def test_a_boolean_is_refused_for_every_number_field(tmp_path: Path) -> None:
    fields = _number_fields()
    assert {"train.max_steps", "train.learning_rate", "waveft.scaling", "validation.resolution",
            "waveft.n_frequency_pattern", "waveft.layers_to_transform"} <= {key for key, _ in fields}
    for key, annotation in fields:
        mapping = "dict" in str(annotation)
        value = "{mid.x: true}" if mapping else "true"
        message = load_error(tmp_path, MINIMAL, (f"{key}={value}",))
        shown = "{'mid.x': True} (dict)" if mapping else "True (bool)"
        assert f"`{key}`: got {shown}, expected " in message, (key, message)
        assert "invalid config (1 problem)" in message, (key, message)


@pytest.mark.parametrize(("old", "new"), [
    ('instance_prompt: "a photo of sks dog"', 'instance_prompt: "   "'),
    ('instance_prompt: "a photo of sks dog"', 'instance_prompt: ""'),
    ('instance_prompt: "a photo of sks dog"', 'instance_prompt: "\\t\\n"'),
])
def test_blank_instance_prompt_is_refused(tmp_path: Path, old: str, new: str) -> None:
    message = load_error(tmp_path, MINIMAL.replace(old, new))
    assert "`data.instance_prompt`: must not be empty or only whitespace" in message


def test_blank_class_prompt_is_refused_like_an_empty_one(tmp_path: Path) -> None:
    for prompt in ('""', '"   "'):
        text = MINIMAL.replace('class_prompt: "a photo of dog"', f"class_prompt: {prompt}")
        assert "prior.class_prompt is required when prior.enabled is true" in load_error(tmp_path, text)
        assert load_config(write(tmp_path, text + "  enabled: false\n")).prior.enabled is False


def test_data_resolution_must_be_a_multiple_of_8(tmp_path: Path) -> None:
    text = MINIMAL.replace("data:\n", "data:\n  resolution: 1000\n", 1)
    assert load_config(write(tmp_path, text)).data.resolution == 1000
    message = load_error(tmp_path, MINIMAL.replace("data:\n", "data:\n  resolution: 1020\n", 1))
    assert "`data.resolution`: got 1020 (int), expected a multiple of 8" in message


def test_prior_enabled_needs_class_prompt_and_dir(tmp_path: Path) -> None:
    only_data = MINIMAL.split("prior:")[0]
    message = load_error(tmp_path, only_data)
    assert "prior.class_dir and prior.class_prompt are required when prior.enabled is true" in message
    message = load_error(tmp_path, only_data + "prior:\n  class_dir: ./c\n")
    assert "prior.class_prompt is required" in message and "prior.class_dir" not in message
    config = load_config(write(tmp_path, only_data + "prior:\n  enabled: false\n"))
    assert config.prior.class_dir is None


def test_missing_required_data_keys(tmp_path: Path) -> None:
    message = load_error(tmp_path, "prior:\n  enabled: false\n")
    assert "`data.instance_dir` is required" in message and "`data.instance_prompt` is required" in message


# ------------------------------------------------------------------------------------ overrides


def test_overrides_parse_yaml_values_lists_and_nested_keys(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), [
        "train.learning_rate=5e-5", "waveft.target_modules=[to_q,to_v]", "prior.enabled=false",
        "waveft.n_frequency_pattern.down_blocks.1.attentions.0=128", "data.instance_prompt=a photo of zwx cat",
        "model.vae=null"])
    assert config.train.learning_rate == 5e-5
    assert config.waveft.target_modules == ["to_q", "to_v"]
    assert config.prior.enabled is False
    assert config.waveft.n_frequency_pattern == {"down_blocks.1.attentions.0": 128}
    assert config.data.instance_prompt == "a photo of zwx cat"


def test_override_creates_missing_sections(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), ["validation.every=0"])
    assert config.validation.every == 0


@pytest.mark.parametrize("override", ["train.max_steps", "max_steps=3", "train..max_steps=3", "=3"])
def test_bad_override_syntax_shows_the_form(tmp_path: Path, override: str) -> None:
    message = load_error(tmp_path, MINIMAL, (override,))
    assert f"bad override {override!r}" in message and "section.key=value" in message


def test_override_below_a_value_and_bad_yaml(tmp_path: Path) -> None:
    assert "`train.max_steps` is a value, not a section" in load_error(tmp_path, MINIMAL, ("train.max_steps.x=1",))
    assert "not valid YAML" in load_error(tmp_path, MINIMAL, ("waveft.target_modules=[to_q",))


def test_override_typo_gets_did_you_mean_and_mentions_set(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL, ("train.max_step=3",))
    assert "(with --set train.max_step=3)" in message
    assert "did you mean `train.max_steps`?" in message


# ------------------------------------------------------------------------------------ paths


def test_relative_paths_resolve_against_the_files_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "project"
    (folder / "models" / "sdxl").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # elsewhere: the file's folder must win over the working directory
    text = MINIMAL + "model:\n  pretrained: models/sdxl\n  vae: ./vae\noutput:\n  dir: out/dog\n"
    config = load_config(write(folder, text))
    assert config.data.instance_dir == str(folder / "photos")  # ./ is a path even before it exists
    assert config.prior.class_dir == str(folder / "class")
    assert config.model.pretrained == str(folder / "models" / "sdxl")  # existing local folder
    assert config.model.vae == str(folder / "vae")
    assert config.output.dir == str(folder / "out" / "dog")


def test_hub_ids_stay_as_written_unless_such_a_local_folder_exists(tmp_path: Path) -> None:
    text = MINIMAL.replace("./photos", "user/dogs") + "model:\n  pretrained: stabilityai/sdxl\n  vae: tiny\n"
    config = load_config(write(tmp_path, text))
    assert (config.data.instance_dir, config.model.pretrained) == ("user/dogs", "stabilityai/sdxl")
    (tmp_path / "user" / "dogs").mkdir(parents=True)
    assert load_config(write(tmp_path, text)).data.instance_dir == str(tmp_path / "user" / "dogs")


def test_tiny_is_a_keyword_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "tiny").mkdir()
    assert load_config(write(tmp_path, MINIMAL)).model.pretrained == "tiny"


def test_override_paths_resolve_against_the_working_directory(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    folder, work = tmp_path / "configs", tmp_path / "work"
    folder.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    config = load_config(write(folder, MINIMAL), ["output.dir=runs/a", "prior.class_dir=../cls"])
    assert config.output.dir == str(work / "runs" / "a")
    assert config.prior.class_dir == str(tmp_path / "cls")
    assert config.data.instance_dir == str(folder / "photos")


FOLDER_OVERLAPS = [
    # (overrides, key, relation, other key): paths relative to the config file's folder
    ({"prior.class_dir": "photos"}, "prior.class_dir", "is the same folder as", "data.instance_dir"),
    ({"prior.class_dir": "photos/class"}, "prior.class_dir", "is inside", "data.instance_dir"),
    ({"prior.class_dir": ".", "output.dir": "../out"}, "prior.class_dir", "contains", "data.instance_dir"),
    ({"output.dir": "photos"}, "output.dir", "is the same folder as", "data.instance_dir"),
    ({"output.dir": "photos/run"}, "output.dir", "is inside", "data.instance_dir"),
    ({"output.dir": ".", "prior.class_dir": "../class"}, "output.dir", "contains", "data.instance_dir"),
    ({"output.dir": "class"}, "output.dir", "is the same folder as", "prior.class_dir"),
    ({"output.dir": "class/run"}, "output.dir", "is inside", "prior.class_dir"),
    ({"output.dir": "runs", "prior.class_dir": "runs/dog/class"}, "output.dir", "contains", "prior.class_dir"),
]


def _with_folders(folder: Path, values: dict[str, str]) -> str:
    text = MINIMAL.replace("./class", values.get("prior.class_dir", "./class"))
    return text + f"output:\n  dir: {values['output.dir']}\n" if "output.dir" in values else text


@pytest.mark.parametrize(("values", "key", "relation", "other"), FOLDER_OVERLAPS)
def test_overlapping_folders_are_refused(tmp_path: Path, values: dict[str, str], key: str, relation: str,
                                         other: str) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    message = load_error(folder, _with_folders(folder, values))
    paths = {"data.instance_dir": "photos", "prior.class_dir": values.get("prior.class_dir", "class"),
             "output.dir": values.get("output.dir", "outputs/run")}
    assert message.startswith(f"{folder / 'run.yaml'}: invalid config (1 problem)"), message
    expected = (f"{key} ({os.path.normpath(folder / paths[key])}) {relation} {other} "
                f"({os.path.normpath(folder / paths[other])}): ")
    assert expected in message and f"give {key} a folder of its own, apart from {other}" in message, message


def test_one_line_per_overlapping_pair(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL.replace("./class", "./photos") + "output:\n  dir: ./photos\n")
    assert "invalid config (3 problems)" in message
    assert "--force" in message and "subject photos" in message and "class images" in message


@pytest.mark.parametrize("values", [
    {"output.dir": "photos2", "prior.class_dir": "photos-class"},  # a shared name prefix is not nesting
    {"output.dir": "runs/dog", "prior.class_dir": "runs/class"},  # siblings
    {"output.dir": "class/run", "prior.enabled": "false"},  # class_dir is unused without prior preservation
])
def test_separate_folders_load(tmp_path: Path, values: dict[str, str]) -> None:
    text = _with_folders(tmp_path, values)
    if "prior.enabled" in values:
        text = text.replace("prior:\n", "prior:\n  enabled: false\n")
    load_config(write(tmp_path, text))


def test_a_hub_dataset_id_is_not_a_folder(tmp_path: Path) -> None:
    text = MINIMAL.replace("./photos", "user/dogs") + "output:\n  dir: ./user/dogs/run\n"
    assert load_config(write(tmp_path, text)).data.instance_dir == "user/dogs"


def test_overlap_is_found_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "photos", target_is_directory=True)
    message = load_error(tmp_path, MINIMAL + "output:\n  dir: ./link/run\n")
    assert f"output.dir ({tmp_path / 'link' / 'run'}) is inside data.instance_dir ({tmp_path / 'photos'})" in message


def test_overlap_compares_file_and_override_paths_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    path = write(folder, MINIMAL)
    assert load_config(path, ["output.dir=photos"]).output.dir == str(tmp_path / "photos")  # not the file's photos
    with pytest.raises(UserError, match=r"output\.dir \(\S+configs/photos/run\) is inside data\.instance_dir"):
        load_config(path, ["output.dir=configs/photos/run"])


def test_config_from_mapping_checks_folders_as_the_working_directory_reads_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(MINIMAL)
    assert config_from_mapping(data).prior.class_dir == "./class"  # no path resolution
    with pytest.raises(UserError, match=r"^<config>: invalid config .*\n.*prior\.class_dir \(\S+\) is the same"):
        config_from_mapping({**data, "prior": {**data["prior"], "class_dir": "photos"}})
    data["data"]["instance_dir"] = "user/dogs"
    assert config_from_mapping({**data, "output": {"dir": "user/dogs"}}).data.instance_dir == "user/dogs"


# ------------------------------------------------------------------------------------ dump, fingerprint


@pytest.mark.parametrize(("value", "trackers"), [
    ("none", []), ("null", []), ("tensorboard", ["tensorboard"]), ("wandb", ["wandb"]),
    ("[tensorboard, wandb]", ["tensorboard", "wandb"]), ("[wandb, wandb, none]", ["wandb"]), ("[]", []),
])
def test_report_to_takes_one_tracker_or_a_list(tmp_path: Path, value: str, trackers: list[str]) -> None:
    config = load_config(write(tmp_path, MINIMAL), [f"train.report_to={value}"])
    assert config.train.report_to == trackers
    assert load_config(write(tmp_path, dump_config(config), "config.yaml")) == config  # the resolved config reloads


def test_dump_then_load_round_trips(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), ["waveft.target_modules=.*attn.*to_(q|v)",
                                                     "train.adam_epsilon=1e-7", "validation.prompts=[ä photo]"])
    dumped = dump_config(config)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert load_config(write(elsewhere, dumped, "config.yaml")) == config
    assert yaml.safe_load(dumped)["data"]["instance_dir"] == str(tmp_path / "photos")


def test_fingerprint_tracks_training_fields_only(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    base = config_fingerprint(load_config(path))
    assert base == config_fingerprint(load_config(path)) and len(base) == 16
    for same in ("validation.every=7", "output.dir=elsewhere", "train.checkpoint_every=5", "train.log_every=9",
                 "train.max_steps=800",  # raising max_steps extends a run rather than starting another
                 "train.batch_size=2", "train.gradient_accumulation=2",  # only the global batch counts (checkpoints)
                 "train.report_to=[tensorboard, wandb]", "train.tracker_project=dogs", "train.tracker_run_name=try-2",
                 "waveft.target_modules=[to_k,to_q,to_v,to_out.0]"):
        assert config_fingerprint(load_config(path, [same])) == base, same
    for different in ("train.learning_rate=2e-4", "waveft.n_frequency=100", "train.seed=1",
                      "prior.loss_weight=0.5", "model.dtype=fp16"):
        assert config_fingerprint(load_config(path, [different])) != base, different
    assert config_fingerprint(load_config(path, ["waveft.wavelet_family=haar"])) == base  # haar is db1


def test_fingerprint_is_stable_across_processes(tmp_path: Path) -> None:
    import subprocess

    path = write(tmp_path, MINIMAL)
    code = f"from waveft_train.config import *; print(config_fingerprint(load_config({str(path)!r})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == config_fingerprint(load_config(path))


# ------------------------------------------------------------------------------------ shipped text


def test_starter_text_loads_and_documents_every_key(tmp_path: Path) -> None:
    text = starter_config_text()
    config = load_config(write(tmp_path, text))
    assert config.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert config.prior.class_dir == str(tmp_path / "class_images")
    written = yaml.safe_load(text)
    for section, model in section_models().items():
        if section != "concepts":  # commented out: a starter names one subject
            assert list(written[section]) == list(model.model_fields), section
    documented = [line for line in text.splitlines() if line.startswith("  ") and "#" in line]
    assert len(documented) >= 50  # a commented starter, not a bare dump


def test_docs_are_generated_from_the_field_descriptions() -> None:
    """Each key is documented once (its pydantic description); docs/config.md's table and starter.yaml are generated
    from it."""
    from waveft_train.config import docs

    for section, model in section_models().items():
        for name, field in model.model_fields.items():
            assert field.description and len(field.description) > 12, f"{section}.{name} is undocumented"
    reference = docs.REFERENCE_PATH.read_text(encoding="utf-8")
    assert docs.replace_between_markers(reference, docs.config_reference_markdown()) == reference, (
        "docs/config.md is stale: run python -m waveft_train.config.docs")
    assert starter_config_text() == docs.starter_yaml(), "starter.yaml is stale: run python -m waveft_train.config.docs"
    rows = [line for line in docs.config_reference_markdown().splitlines() if line.startswith("| `")]
    assert len(rows) == sum(len(model.model_fields) for model in section_models().values())


def test_subject_config_has_the_papers_settings() -> None:
    config = load_config(REPO / "configs" / "subject.yaml")
    folder = REPO / "configs"
    assert config.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert config.model.vae == "madebyollin/sdxl-vae-fp16-fix"
    assert (config.waveft.n_frequency, config.waveft.scaling, config.waveft.wavelet_family) == (2592, 25.0, "db1")
    t = config.train
    assert (t.learning_rate, t.lr_scheduler, t.max_steps, t.batch_size, t.gradient_accumulation) == (
        1e-4, "constant", 500, 1, 4)
    assert (config.model.dtype, t.mixed_precision, t.gradient_checkpointing, config.data.resolution) == (
        "bf16", "bf16", True, 1024)
    assert config.prior.enabled and config.prior.num_class_images == 200
    assert config.prior.class_prompt == "a photo of dog" and config.data.instance_prompt == "a photo of sks dog"
    assert config.prior.class_dir == str(folder.parent / "outputs" / "class-images" / "dog")
    assert config.data.instance_dir == str(folder / "subject" / "dog")
    assert config.output.dir == str(folder.parent / "outputs" / "dog")  # the repo's git-ignored outputs/


def test_prodigy_and_ema_keys_leave_existing_runs_fingerprints_alone(tmp_path: Path) -> None:
    """Issue 33's keys at their defaults are not hashed (a run from before them still resumes); set, they count."""
    from waveft_train.config.loading import fingerprint_fields

    path = write(tmp_path, MINIMAL)
    config = load_config(path)
    new_keys = {"ema_decay", "prodigy_d_coef", "prodigy_beta3", "prodigy_use_bias_correction",
                "prodigy_safeguard_warmup"}
    assert not new_keys & set(fingerprint_fields(config)["train"])
    base = config_fingerprint(config)
    for different in ("train.ema_decay=0.999", "train.prodigy_d_coef=0.5", "train.prodigy_safeguard_warmup=false"):
        assert config_fingerprint(load_config(path, [different])) != base, different


def test_peer_trainers_ema_and_prodigy_names_point_to_ours(tmp_path: Path) -> None:
    assert "(waveft-train calls it `train.ema_decay`)" in load_error(tmp_path, MINIMAL + "train:\n  use_ema: true\n")
    message = load_error(tmp_path, MINIMAL + "train:\n  d_coef: 0.5\n")
    assert "(waveft-train calls it `train.prodigy_d_coef`)" in message
    assert "(waveft-train calls it `train.ema_decay`)" in load_error(tmp_path, MINIMAL + "ema_decay: 0.9\n")
