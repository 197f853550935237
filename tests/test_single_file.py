"""Single-file base checkpoints (one .safetensors in the A1111/ComfyUI layout): files written from diffusers folders
and read back by diffusers' own loaders; the toy model trained from its file as from its folder, bit for bit; sample
and export from that adapter; the file's recorded hash; and every refusal as one paragraph."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from helpers import run_cli
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from waveft_train.common.errors import UserError
from waveft_train.common.files import read_safetensors_header
from waveft_train.config import config_fingerprint, load_config
from waveft_train.models import architecture, ldm_layout, single_file
from waveft_train.models.loading import load_components, load_unet
from waveft_train.models.tiny import PROMPT_WORDS
from waveft_train.models.to_single_file import diffusers_to_single_file
from waveft_train.models.tokenizer import build_tokenizer
from waveft_train.train import checkpoint, run

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def assert_same_weights(loaded, reference, what: str) -> None:
    """Every tensor equal bit for bit, dtype included."""
    ours, theirs = loaded.state_dict(), reference.state_dict()
    assert sorted(ours) == sorted(theirs), what
    different = [key for key in theirs if ours[key].dtype != theirs[key].dtype or not torch.equal(ours[key], theirs[key])]
    assert not different, (what, different[:5])


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """The tiny and toy models written as single files."""
    folder = tmp_path_factory.mktemp("single-files")
    return {name: diffusers_to_single_file(name, folder / f"{name}.safetensors") for name in ("tiny", "toy")}


# ------------------------------------------------------------------------------------------------ the writer
def sdxl_shaped_pipeline(folder: Path) -> Path:
    """A small pipeline wired like real SDXL down to its two text encoders' different widths (32 and 48, as SDXL's 768
    and 1280), which diffusers' stock pipeline loader relies on to tell them apart."""
    second = {**architecture.TINY.text_encoder_2, "hidden_size": 48, "projection_dim": 40}
    unet = {**architecture.TINY.unet, "cross_attention_dim": 32 + 48, "projection_class_embeddings_input_dim": 6 * 8 + 40}
    size = dataclasses.replace(architecture.TINY, text_encoder_2=second, unet=unet)
    tokenizer = build_tokenizer(PROMPT_WORDS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipeline = architecture.assemble_pipeline(
            vae=architecture.build_vae(size), unet=architecture.build_unet(size), tokenizer=tokenizer,
            text_encoder=architecture.build_text_encoder(size, tokenizer, second=False),
            text_encoder_2=architecture.build_text_encoder(size, tokenizer, second=True),
            tokenizer_2=copy.deepcopy(tokenizer), scheduler=architecture.build_scheduler())
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def test_a_written_file_loads_with_diffusers_stock_pipeline_loader(tmp_path):
    folder = sdxl_shaped_pipeline(tmp_path / "diffusers")
    path = diffusers_to_single_file(str(folder), tmp_path / "model.safetensors")
    with safe_open(str(path), framework="pt") as written:
        keys = set(written.keys())
        assert written.get_slice(f"{ldm_layout.VAE_PREFIX}encoder.mid.attn_1.q.weight").get_shape()[2:] == [1, 1]
    assert {key.split(".")[0] for key in keys} == {"model", "first_stage_model", "conditioner"}
    assert ldm_layout.family_problem(keys) is None
    # The oracle: diffusers' own single-file pipeline loader, untouched, against the folder it came from.
    from_file = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    from_folder = StableDiffusionXLPipeline.from_pretrained(folder)
    for part in PARTS:
        assert_same_weights(getattr(from_file, part), getattr(from_folder, part), part)


@pytest.mark.parametrize("name", ["tiny", "toy"])
def test_tiny_and_toy_files_load_exactly_as_their_folders(files, name):
    folder = load_components(name)
    from_file = load_components(str(files[name]), config=name)
    for part in PARTS:
        assert_same_weights(getattr(from_file, part), getattr(folder, part), f"{name} {part}")
    assert from_file.scheduler.config == folder.scheduler.config
    assert from_file.vae_scaling_factor == folder.vae_scaling_factor
    assert from_file.tokenizer("a photo of sks dog").input_ids == folder.tokenizer("a photo of sks dog").input_ids
    # diffusers' model loaders read the whole file themselves (not only the part we hand them) to the same weights.
    stock_unet = UNet2DConditionModel.from_single_file(str(files[name]), config=folder.model_path, subfolder="unet")
    stock_vae = AutoencoderKL.from_single_file(str(files[name]), config=folder.model_path, subfolder="vae")
    assert_same_weights(stock_unet.to(torch.float32), folder.unet, "stock unet loader")
    assert_same_weights(stock_vae.to(folder.vae.dtype), folder.vae, "stock vae loader")
    # What adapters record: the file's name, size, sha256 (of the whole file) and model.config.
    sha256 = hashlib.sha256(files[name].read_bytes()).hexdigest()
    assert from_file.base_metadata == {"waveft_train.base_file": f"{name}.safetensors", "waveft_train.base_sha256": sha256,
                                       "waveft_train.base_bytes": str(files[name].stat().st_size),
                                       "waveft_train.base_config": name}
    assert from_file.base_model_name == from_file.model_path == str(files[name])


def test_the_hash_is_kept_per_file_and_follows_its_content(tmp_path, files, waveft_cache_dir):
    path = tmp_path / "model.safetensors"
    shutil.copy(files["tiny"], path)
    assert single_file.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert any((waveft_cache_dir / "sha256").glob("*.txt"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the same size, another last byte (and a new mtime)
    path.write_bytes(bytes(data))
    assert single_file.file_sha256(path) == hashlib.sha256(bytes(data)).hexdigest()


# ------------------------------------------------------------------------------------------------ training
def train(output_dir: Path, **extra) -> Path:
    overrides = {"output.dir": output_dir, "prior.enabled": False, "validation.every": 0, "validation.prompts": "[]",
                 "train.max_steps": 2, "train.batch_size": 1, "train.checkpoint_every": 1, **extra}
    return run.train_from_config(load_config(DEMO, [f"{key}={value}" for key, value in overrides.items()]),
                                 progress=False)


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory, files) -> dict[str, Path]:
    """The toy model trained two steps in fp32 on the CPU from its folder and from its single file."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "true")  # trains_on_the_cpu, for a module-scoped fixture
        root = tmp_path_factory.mktemp("toy-runs")
        return {"folder": train(root / "folder"),
                "file": train(root / "file", **{"model.pretrained": files["toy"], "model.config": "toy"})}


def test_the_toy_trains_from_its_single_file_to_the_same_adapter_bit_for_bit(toy_runs, files):
    folder, single = (load_file(str(toy_runs[run] / "adapter" / "adapter_model.safetensors")) for run in ("folder", "file"))
    assert sorted(single) == sorted(folder) and len(folder) == 56
    assert all(torch.equal(single[key], folder[key]) for key in folder)
    assert any(tensor.abs().sum() > 0 for tensor in single.values())  # it trained
    config = json.loads((toy_runs["file"] / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(files["toy"])
    card = (toy_runs["file"] / "adapter" / "README.md").read_text()  # stock diffusers loads such a base from_single_file
    assert f'StableDiffusionXLPipeline.from_single_file("{files["toy"]}", config="toy", torch_dtype=' in card
    sha256 = hashlib.sha256(files["toy"].read_bytes()).hexdigest()
    for folder_name in ("adapter", "checkpoints/step-000001"):  # final adapter and checkpoints alike
        with safe_open(str(toy_runs["file"] / folder_name / "adapter_model.safetensors"), framework="pt") as weights:
            assert weights.metadata()["waveft_train.base_sha256"] == sha256, folder_name
            assert weights.metadata()["waveft_train.base_config"] == "toy"


def test_a_resume_refuses_another_file_at_the_same_path(toy_runs, files):
    latest = checkpoint.find_latest_checkpoint(toy_runs["file"])
    record = checkpoint.checkpoint_record(latest)
    sha256 = hashlib.sha256(files["toy"].read_bytes()).hexdigest()

    def why(now: str) -> str | None:
        return checkpoint.why_not_continue(toy_runs["file"], image_manifest=record["instance_images"], layout="",
                                           global_batch=record["global_batch"], base_sha256=lambda: now)

    assert why(sha256) is None
    assert f"trained on a single-file model.pretrained with sha256 {sha256}" in why("0" * 64)
    assert checkpoint.why_not_continue(toy_runs["folder"], image_manifest=record["instance_images"], layout="",
                                       global_batch=record["global_batch"], base_sha256=lambda: "0" * 64) is None


def test_sample_and_export_work_from_the_single_file_adapter(toy_runs, files, tmp_path, capsys):
    adapter, grid, small = toy_runs["file"] / "adapter", tmp_path / "grid.png", tmp_path / "small.safetensors"
    for args in (["sample", "--adapter", adapter, "--prompt", "a photo of sks ball", "-n", "1", "--steps", "2",
                  "--out", grid],
                 ["export", "--adapter", adapter, "--format", "waveft", "--out", small],
                 *(["export", "--adapter", toy_runs[name] / "adapter", "--dtype", "fp32", "--out", tmp_path / name]
                   for name in ("file", "folder"))):
        code, _, err = run_cli(args, capsys)
        assert code == 0, err
    assert Image.open(grid).size == (64, 64)  # the toy's size, from the configs model.config gave
    merged_file, merged_folder = (load_file(str(tmp_path / name / "diffusion_pytorch_model.safetensors"))
                                  for name in ("file", "folder"))
    assert sorted(merged_file) == sorted(merged_folder)
    assert all(torch.equal(merged_file[key], merged_folder[key]) for key in merged_folder)  # the same merged UNet
    with safe_open(str(small), framework="pt") as exported:
        metadata = exported.metadata()
    sha256 = hashlib.sha256(files["toy"].read_bytes()).hexdigest()
    assert metadata["waveft.base_model"] == "toy.safetensors" and metadata["waveft.base_model_sha256"] == sha256
    assert metadata["ss_new_sd_model_hash"] == sha256 and str(files["toy"].parent) not in json.dumps(metadata)


def test_sample_and_export_name_the_file_they_need(toy_runs, files, tmp_path, capsys):
    base = tmp_path / "moved" / "toy.safetensors"
    base.parent.mkdir()
    shutil.copy(files["toy"], base)
    adapter = tmp_path / "adapter"
    shutil.copytree(toy_runs["file"] / "adapter", adapter)
    config_path = adapter / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": str(base)}))
    sha256 = hashlib.sha256(base.read_bytes()).hexdigest()
    export = ["export", "--adapter", adapter, "--format", "waveft", "--out", tmp_path / "out.safetensors", "--force"]

    assert run_cli(export, capsys)[0] == 0  # where it was recorded, with its recorded hash
    base.rename(tmp_path / "elsewhere.safetensors")
    code, _, err = run_cli(export, capsys)
    assert code == 2 and "Traceback" not in err
    assert all(part in err for part in ("toy.safetensors", sha256, sha256[:10].upper(), "no longer at", "--base")), err
    shutil.copy(files["tiny"], base)  # another file under the recorded name
    code, _, err = run_cli(export, capsys)
    assert code == 2 and "now holds another file" in err and sha256 in err, err
    assert run_cli([*export, "--base", tmp_path / "elsewhere.safetensors"], capsys)[0] == 0  # found again by hand
    # evaluate takes it for a toy-model adapter (its recorded model.config is the toy's) and gets to the subject
    code, _, err = run_cli(["evaluate", "--adapter", toy_runs["file"] / "adapter", "--subject", "no_such_subject"], capsys)
    assert code == 2 and "neither a built-in subject" in err, err


# ------------------------------------------------------------------------------------------------ refusals
def fake_checkpoint(path: Path, keys: list[str]) -> Path:
    save_file({key: torch.zeros(1) for key in keys}, str(path))
    return path


SD15 = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"]


@pytest.mark.parametrize(("keys", "fragment"), [
    (SD15, "Stable Diffusion 1.x"),
    (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.token_embedding.weight"],
     "Stable Diffusion 2.x"),
    (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.model.text_projection"], "SDXL refiner"),
    (["lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"], "LoRA"),
    (["down_blocks.0.resnets.0.conv1.weight"], "diffusers folder"),
    (["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight"],
     "no text_encoder (conditioner.embedders.0.transformer.*) and no text_encoder_2"),
])
def test_files_of_other_families_are_named(tmp_path, keys, fragment):
    path = fake_checkpoint(tmp_path / "model.safetensors", keys)
    with pytest.raises(UserError, match="is not an SDXL-family checkpoint") as error:
        load_components(str(path), config="tiny")
    assert fragment in str(error.value)


def test_model_mistakes_with_single_files_fail_before_weights_load(tmp_path, files, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  instance_dir: {REPO / 'tests' / 'data' / 'subject'}\n  instance_prompt: a photo\n"
                      f"prior:\n  enabled: false\nvalidation:\n  every: 0\n  prompts: []\noutput:\n  dir: {tmp_path / 'out'}\n"
                      "model:\n  dtype: fp32\nwaveft:\n  n_frequency: 64\n")
    fake_checkpoint(tmp_path / "sd15.safetensors", SD15)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(files["tiny"].read_bytes()[:-100])
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    for overrides, fragments in (
        ([f"model.pretrained={tmp_path / 'model.ckpt'}"], ("pickle checkpoint", "arbitrary code", ".safetensors")),
        ([f"model.pretrained={tmp_path / 'none.safetensors'}", "model.config=tiny"], ("no such file",)),
        ([f"model.pretrained={truncated}", "model.config=tiny"], ("truncated",)),
        ([f"model.pretrained={tmp_path / 'sd15.safetensors'}", "model.config=tiny"], ("Stable Diffusion 1.x",)),
        ([f"model.pretrained={files['tiny']}", "model.config=toy"],  # another architecture's configs
         ("does not match model.config toy", "input_blocks", "fine-tuned from")),
        ([f"model.pretrained={files['tiny']}", f"model.config={tmp_path / 'no-configs'}"], ("no such folder",)),
        ([f"model.pretrained={files['tiny']}", "model.config=someone/sdxl-configs"],  # offline, not in the cache
         ("someone/sdxl-configs", "Offline mode is on", "hf download", "local diffusers folder")),
        ([f"model.pretrained={files['tiny']}"], ("stabilityai/stable-diffusion-xl-base-1.0", "Offline mode is on")),
        (["model.pretrained=tiny", "model.config=toy"], ("model.config is read only for a single-file",)),
        ([f"model.pretrained={files['tiny']}", "model.config=tiny", "model.revision=main"], ("model.revision",)),
    ):
        args = ["params", "--config", config, *[item for text in overrides for item in ("--set", text)]]
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "Traceback" not in err, err
        assert all(fragment in err for fragment in fragments), (overrides, err)
    with pytest.raises(UserError, match="pickle checkpoint"):  # also where weights load, for API users
        load_unet(str(tmp_path / "model.ckpt"))


def test_params_and_the_config_take_a_single_file(tmp_path, files, capsys):
    folder = tmp_path / "configs"
    folder.mkdir()
    shutil.copy(files["tiny"], folder / "base.safetensors")
    (folder / "run.yaml").write_text(  # relative paths resolve against the config file's folder
        f"data:\n  instance_dir: {REPO / 'tests' / 'data' / 'subject'}\n  instance_prompt: a photo\n"
        "model:\n  pretrained: base.safetensors\n  config: tiny\n  dtype: fp32\nwaveft:\n  n_frequency: 64\n"
        "prior:\n  enabled: false\n")
    config = load_config(folder / "run.yaml")
    assert config.model.pretrained == str(folder / "base.safetensors") and config.model.config == "tiny"
    other = load_config(folder / "run.yaml", ["model.config=toy"])
    assert config_fingerprint(config) != config_fingerprint(other)  # the configs shape the run
    code, out, err = run_cli(["params", "--config", folder / "run.yaml"], capsys)
    assert code == 0 and "trainable parameters: 4,096" in out, err


def test_the_writer_refuses_to_overwrite_and_takes_a_dtype(tmp_path, files):
    with pytest.raises(UserError, match="pass --force"):
        diffusers_to_single_file("tiny", files["tiny"])
    half = diffusers_to_single_file("tiny", tmp_path / "half.safetensors", dtype=torch.float16)
    header = read_safetensors_header(half)
    assert {entry["dtype"] for key, entry in header.items() if key != "__metadata__"} == {"F16"}
