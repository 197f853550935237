"""Files for other apps, read by those apps' own code, never only by ours.

- `--format comfyui` (.diff/.diff_b): LyCORIS's loader of saved weights (lycoris.kohya.create_network_from_weights)
  applies it onto the base diffusers UNet; the output must equal the merged export's.
- `--format lora`: diffusers' `StableDiffusionXLPipeline.load_lora_weights` (its kohya conversion) reads it; each
  layer's applied update must be off by exactly the recorded relative error.
- The ldm names: diffusers' single-file converter (convert_ldm_unet_checkpoint, what loads original SDXL checkpoints)
  maps every parameter of a real-config SDXL UNet back; a table of keys from kohya SDXL LoRA files; diffusers' own
  sgm->diffusers LoRA conversion reads an ldm-named LoRA file as the diffusers-named one.

Adapters are made on the tiny model with random spectra (init_weights=False) and, for bias: waveft_only, changed
biases, so every update is nonzero and every key is exercised.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import pytest
import torch
from helpers import doc_commands, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from waveft_train.adapter.export import export
from waveft_train.adapter.load import load_adapter_unet
from waveft_train.models.unet_names import UNetNames
from waveft_train.waveft import register

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TINY_LAYERS = 64  # attention linears of the tiny UNet: 16 attentions x 4


def make_adapter(model_dir: Path, out: Path, *, seed: int = 0, **settings) -> Path:
    """A WaveFT adapter with random spectra (n_frequency 64 unless `settings`, WaveFTConfig fields, say otherwise);
    with a `bias` other than none, every trainable base bias is changed."""
    from diffusers import UNet2DConditionModel
    from peft import WaveFTConfig, get_peft_model

    register()
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = WaveFTConfig(**{"n_frequency": 64, "target_modules": TARGETS, "init_weights": False, **settings})
        model = get_peft_model(unet, config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.requires_grad and name.endswith(".bias"):
                    parameter.add_(torch.randn_like(parameter) * 0.1)
    model.peft_config["default"].base_model_name_or_path = str(model_dir)
    model.save_pretrained(out, save_embedding_layers=False)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interop")
    return {bias: make_adapter(tiny_model_dir, root / bias, bias=bias) for bias in ("none", "waveft_only")}


@pytest.fixture(scope="module")
def unet_inputs() -> tuple[torch.Tensor, dict]:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    kwargs = dict(
        timestep=torch.tensor([10, 700]),
        encoder_hidden_states=torch.randn(2, 77, 64, generator=generator),
        added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=generator),
                           "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)},
    )
    return sample, kwargs


def run_unet(unet, unet_inputs) -> torch.Tensor:
    sample, kwargs = unet_inputs
    with torch.no_grad():
        return unet(sample, **kwargs).sample


def base_unet(model_dir: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()


@pytest.fixture(scope="module")
def outputs(adapters, tiny_model_dir, unet_inputs, tmp_path_factory) -> dict[str, torch.Tensor]:
    """UNet outputs of the base model and of each adapter's merged fp32 export (`--format diffusers`)."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("merged")
    results = {"base": run_unet(base_unet(tiny_model_dir), unet_inputs)}
    for bias, adapter in adapters.items():
        merged = UNet2DConditionModel.from_pretrained(export(adapter, root / bias, dtype="fp32").path)
        results[bias] = run_unet(merged, unet_inputs)
    return results


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def lycoris_applied(path: Path, unet, multiplier: float, monkeypatch):
    """`unet` with the file applied by LyCORIS's loader of kohya-keyed weights, as sd-scripts-based tools load it.

    LyCORIS 4.1.3 cannot build its kohya network on any diffusers UNet: `TimestepEmbedding` is one of its target
    classes and `time_embedding.linear_1` one of its target names, so it asserts on a duplicated module name before
    reading any weight. The target names only shape the default modules that loading from weights then discards.
    """
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])
    network, _ = create_network_from_weights(multiplier, str(path), None, None, unet, for_inference=True)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    return network


# --------------------------------------------------------------------------------------- --format comfyui


@pytest.mark.parametrize("bias", ["none", "waveft_only"])
def test_comfyui_file_applied_by_lycoris_equals_the_merged_export(
    bias, adapters, outputs, tiny_model_dir, unet_inputs, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "subject.safetensors"
    code, stdout, stderr = run_cli(["export", "-a", adapters[bias], "--format", "comfyui", "--dtype", "fp32",
                                    "--out", out], capsys)
    assert code == 0, stderr
    assert f"Wrote {out}: {TINY_LAYERS} layers" in stdout
    tensors = load_file(out)
    diffs = [key for key in tensors if key.endswith(".diff")]
    bias_diffs = [key for key in tensors if key.endswith(".diff_b")]
    assert len(diffs) == TINY_LAYERS and len(tensors) == len(diffs) + len(bias_diffs)
    assert all(key.startswith("lora_unet_") and tensors[key].dtype == torch.float32 for key in tensors)
    if bias == "none":
        assert bias_diffs == []
    else:  # only to_out.0 has a bias in SDXL attention, and waveft_only trains exactly those
        assert len(bias_diffs) == TINY_LAYERS // 4 and all(key.endswith("_to_out_0.diff_b") for key in bias_diffs)

    unet = base_unet(tiny_model_dir)
    network = lycoris_applied(out, unet, 1.0, monkeypatch)
    assert len(network.unet_loras) == TINY_LAYERS  # every key found its module
    assert relative(outputs[bias], outputs["base"]) > 1e-2  # the adapter does change the output
    assert relative(run_unet(unet, unet_inputs), outputs[bias]) <= 1e-5


def test_lycoris_strength_multiplies_the_learned_update(adapters, tiny_model_dir, unet_inputs, tmp_path, monkeypatch):
    """The apps' strength slider: 0.5 in LyCORIS is the adapter at half scale in our tuner (`sample --scale 0.5`)."""
    out = export(adapters["none"], tmp_path / "half.safetensors", format="comfyui", dtype="fp32").path
    unet = base_unet(tiny_model_dir)
    lycoris_applied(out, unet, 0.5, monkeypatch)
    _, half = load_adapter_unet(adapters["none"], None, scale=0.5)
    assert relative(run_unet(unet, unet_inputs), run_unet(half, unet_inputs)) <= 1e-5


def test_comfyui_file_is_fp16_by_default_with_metadata(adapters, tiny_model_dir, tmp_path):
    fp32 = load_file(export(adapters["waveft_only"], tmp_path / "a.safetensors", format="comfyui",
                                 dtype="fp32").path)
    path = export(adapters["waveft_only"], tmp_path / "b.safetensors", format="comfyui",
                       prediction_type="v_prediction").path
    fp16 = load_file(path)
    assert sorted(fp16) == sorted(fp32)
    for key, value in fp16.items():
        assert value.dtype == torch.float16
        torch.testing.assert_close(value, fp32[key].half(), rtol=0, atol=0)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["waveft.format"] == "comfyui" and metadata["waveft.naming"] == "diffusers"
    assert metadata["waveft.dtype"] == "fp16"
    # The base model by its name and content, never by this machine's path (the file is made to be shared).
    unet_weights = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert metadata["waveft.base_model"] == metadata["ss_sd_model_name"] == tiny_model_dir.name
    assert metadata["waveft.base_model_unet_sha256"] == hashlib.sha256(unet_weights.read_bytes()).hexdigest()
    assert not [value for value in metadata.values() if str(tiny_model_dir.parent) in value]
    settings = json.loads(metadata["waveft.settings"])
    assert settings["n_frequency"] == 64 and settings["bias"] == "waveft_only" and settings["wavelet_family"] == "db1"
    assert settings["target_modules"] == sorted(TARGETS) and settings["scaling"] == 25.0
    assert metadata["waveft.prediction_type"] == "v_prediction" and metadata["ss_v_parameterization"] == "True"
    # A1111 lists a LoRA under SDXL only when ss_base_model_version starts with sdxl_ (NetworkOnDisk.detect_version).
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "full"}


# ------------------------------------------------------------------------------------------ --format lora


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir):
    """One tiny SDXL pipeline for every LoRA load here (each test unfuses and unloads what it loaded)."""
    from waveft_train.models.loading import build_pipeline, load_components

    return build_pipeline(load_components(str(tiny_model_dir)))


def lora_applied_by_diffusers(path: Path, pipeline, unet_inputs):
    """(UNet state before, UNet state after diffusers' load_lora_weights + fuse_lora, the fused UNet's output)."""
    before = {key: value.clone() for key, value in pipeline.unet.state_dict().items()}
    pipeline.load_lora_weights(str(path.parent), weight_name=path.name)  # diffusers 0.31 refuses a bare file offline
    pipeline.fuse_lora()
    try:
        after = {key.replace(".base_layer.", "."): value.clone() for key, value in pipeline.unet.state_dict().items()
                 if "lora_" not in key}
        return before, after, run_unet(pipeline.unet, unet_inputs)
    finally:
        pipeline.unfuse_lora()
        pipeline.unload_lora_weights()


@pytest.fixture(scope="module")
def updates(adapters):
    from waveft_train.adapter.export_files import adapter_updates

    return adapter_updates(adapters["none"], None)[3]


@pytest.mark.parametrize("option", [["--rank", "4"], ["--max-error", "0.3"]])
def test_lora_file_through_diffusers_matches_within_its_recorded_error(
    option, adapters, outputs, updates, pipeline, unet_inputs, tmp_path, capsys
):
    out = tmp_path / "lora.safetensors"
    code, stdout, stderr = run_cli(["export", "-a", adapters["none"], "--format", "lora", *option, "--out", out], capsys)
    assert code == 0, stderr
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    errors, ranks = json.loads(metadata["waveft.lora_errors"]), json.loads(metadata["waveft.lora_ranks"])
    worst = metadata["waveft.lora_worst_layer"]
    assert len(errors) == TINY_LAYERS and errors[worst] == max(errors.values())
    assert float(metadata["waveft.lora_worst_error"]) == pytest.approx(errors[worst], abs=1e-6)
    assert f"Worst relative Frobenius error: {errors[worst]:.4f} ({worst})" in stdout
    assert all(f"{key}" in stdout for key in errors)  # every layer is reported
    tensors = load_file(out)
    assert {key: tensors[f"{key}.lora_down.weight"].shape[0] for key in errors} == ranks
    if option[0] == "--rank":
        assert set(ranks.values()) == {4}
    else:
        assert max(errors.values()) <= 0.3 and len(set(ranks.values())) > 1  # ranks chosen per layer
    assert all(0 < error < 1 for error in errors.values())  # random sparse spectra: high-rank updates

    before, after, output = lora_applied_by_diffusers(out, pipeline, unet_inputs)
    for update in updates:
        applied = after[f"{update.name}.weight"] - before[f"{update.name}.weight"]
        error = relative(applied, update.delta)
        recorded = errors["lora_unet_" + update.name.replace(".", "_")]
        assert error == pytest.approx(recorded, abs=1e-4), update.name
    # The UNet output's error, relative to what the adapter changes, is of the size of the layers' errors.
    change = (outputs["none"] - outputs["base"]).norm()
    assert (output - outputs["none"]).norm() <= 1.5 * errors[worst] * change


def test_low_rank_errors_are_the_singular_value_tails():
    from waveft_train.adapter.export_files import low_rank

    torch.manual_seed(0)
    delta = torch.randn(48, 40)
    energy = torch.linalg.svdvals(delta).double().square()
    for rank, alpha in ((1, 1.0), (5, 5.0), (7, 3.0), (40, 40.0), (100, 100.0)):
        factors = low_rank(delta, torch.float32, rank, None, alpha)
        kept = min(rank, 40)
        assert factors.rank == kept and factors.up.shape == (48, kept) and factors.down.shape == (kept, 40)
        expected = (energy[kept:].sum() / energy.sum()).sqrt().item()
        assert factors.error == pytest.approx(expected, abs=1e-5)
        applied = (alpha / kept) * factors.up @ factors.down  # what every app computes from the file
        assert relative(applied, delta) == pytest.approx(factors.error, abs=1e-6)
    chosen = low_rank(delta, torch.float16, None, 0.3, 1.0)
    assert chosen.error <= 0.3 < low_rank(delta, torch.float16, chosen.rank - 1, None, 1.0).error
    assert low_rank(delta, torch.float16, 10, 0.01, 10.0).rank == 10  # --rank caps --max-error
    zero = low_rank(torch.zeros(8, 6), torch.float16, 4, None, 4.0)
    assert zero.rank == 1 and zero.error == 0 and not zero.up.any()


def test_lora_refuses_trained_biases_and_points_to_comfyui(adapters, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    code, _, stderr = run_cli(["export", "-a", adapters["waveft_only"], "--format", "lora", "--rank", "4", "-o", out],
                              capsys)
    assert code == 2 and "kohya LoRA files cannot hold" in stderr and "--format comfyui" in stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ naming

SDXL_BASE_UNET_CONFIG = dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], in_channels=4,
    layers_per_block=2, mid_block_type="UNetMidBlock2DCrossAttn", norm_num_groups=32, out_channels=4,
    projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
)
# Module keys as kohya's sd-scripts writes them for SDXL (its own ldm-named UNet), next to diffusers' names.
KOHYA_SDXL_KEYS = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k": "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k",
    "down_blocks.2.attentions.0.transformer_blocks.9.attn1.to_out.0":
        "lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_out_0",
    "down_blocks.2.attentions.1.transformer_blocks.3.attn2.to_v": "lora_unet_input_blocks_8_1_transformer_blocks_3_attn2_to_v",
    "mid_block.attentions.0.transformer_blocks.5.attn1.to_v": "lora_unet_middle_block_1_transformer_blocks_5_attn1_to_v",
    "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q",
    "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_out.0":
        "lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_out_0",
    "up_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k": "lora_unet_output_blocks_3_1_transformer_blocks_1_attn1_to_k",
    "up_blocks.1.attentions.2.proj_out": "lora_unet_output_blocks_5_1_proj_out",
    "down_blocks.0.resnets.1.conv1": "lora_unet_input_blocks_2_0_in_layers_2",
    "down_blocks.1.resnets.0.conv_shortcut": "lora_unet_input_blocks_4_0_skip_connection",
    "down_blocks.1.downsamplers.0.conv": "lora_unet_input_blocks_6_0_op",
    "mid_block.resnets.1.time_emb_proj": "lora_unet_middle_block_2_emb_layers_1",
    "up_blocks.0.upsamplers.0.conv": "lora_unet_output_blocks_2_2_conv",
    "up_blocks.1.upsamplers.0.conv": "lora_unet_output_blocks_5_2_conv",
    "up_blocks.2.resnets.2.conv2": "lora_unet_output_blocks_8_0_out_layers_3",
    "add_embedding.linear_1": "lora_unet_label_emb_0_0",
    "time_embedding.linear_2": "lora_unet_time_embed_2",
    "conv_out": "lora_unet_out_2",
}


@pytest.mark.parametrize("which", ["sdxl-base", "tiny"])
def test_ldm_names_agree_with_diffusers_single_file_converter(which, tiny_model_dir):
    """Every parameter of the UNet goes to ldm by our map and comes back by diffusers' own converter of original
    (ldm) checkpoints, for SDXL-base's real config (on the meta device) and for the tiny model."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = SDXL_BASE_UNET_CONFIG if which == "sdxl-base" else UNet2DConditionModel.load_config(
        tiny_model_dir, subfolder="unet")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    names = UNetNames(unet.config)
    parameters = list(unet.state_dict())
    checkpoint = {}
    for index, parameter in enumerate(parameters):
        module, leaf = parameter.rsplit(".", 1)
        checkpoint[f"model.diffusion_model.{names.to_ldm(module)}.{leaf}"] = torch.tensor([float(index)])
    converted = convert_ldm_unet_checkpoint(checkpoint, unet.config)
    assert len(converted) == len(parameters)
    assert [converted[parameter].item() for parameter in parameters] == [float(i) for i in range(len(parameters))]
    if which == "sdxl-base":
        assert len(parameters) == 1680
        attention = [name for name, _ in unet.named_modules() if name.endswith(tuple(TARGETS))]
        assert len(attention) == 560  # 70 transformer blocks x 2 attentions x 4 linears
        assert {name: names.kohya_key(name, "ldm") for name in KOHYA_SDXL_KEYS} == KOHYA_SDXL_KEYS


def test_ldm_named_files_hold_the_same_updates(adapters, tiny_model_dir, pipeline, unet_inputs, tmp_path, capsys):
    """--naming ldm: the comfyui file holds the same tensors under ldm keys; diffusers' sgm->diffusers conversion
    reads the ldm LoRA file into exactly the updates of the diffusers-named one."""
    files = {}
    for naming in ("diffusers", "ldm"):
        for fmt, extra in (("comfyui", []), ("lora", ["--rank", "4"])):
            files[naming, fmt] = tmp_path / f"{naming}-{fmt}.safetensors"
            code, _, stderr = run_cli(["export", "-a", adapters["waveft_only" if fmt == "comfyui" else "none"],
                                       "--format", fmt, *extra, "--naming", naming, "-o", files[naming, fmt]], capsys)
            assert code == 0, stderr
    names = UNetNames(base_unet(tiny_model_dir).config)
    plain, ldm = load_file(files["diffusers", "comfyui"]), load_file(files["ldm", "comfyui"])
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.diff" in ldm
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_out_0.diff_b" in ldm
    module_of = {"lora_unet_" + name.replace(".", "_"): name for name, _ in base_unet(tiny_model_dir).named_modules()}
    renamed = {}
    for key, value in plain.items():
        module, suffix = key.split(".", 1)
        renamed[f"{names.kohya_key(module_of[module], 'ldm')}.{suffix}"] = value
    assert renamed.keys() == ldm.keys() and all(torch.equal(renamed[key], ldm[key]) for key in ldm)

    _, by_diffusers_names, _ = lora_applied_by_diffusers(files["diffusers", "lora"], pipeline, unet_inputs)
    before, by_ldm_names, _ = lora_applied_by_diffusers(files["ldm", "lora"], pipeline, unet_inputs)
    changed = [key for key in before if not torch.equal(by_ldm_names[key], before[key])]
    assert len(changed) == TINY_LAYERS
    assert all(torch.allclose(by_ldm_names[key], by_diffusers_names[key], rtol=0, atol=1e-6) for key in before)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("args, expected", [
    (["--format", "lora"], "--format lora needs --rank R"),
    (["--format", "lora", "--rank", "0"], "--rank 0 is not a positive integer"),
    (["--format", "lora", "--max-error", "1.5"], "--max-error 1.5 is not between 0 and 1"),
    (["--format", "comfyui", "--rank", "4"], "apply to --format lora only"),
    (["--format", "diffusers", "--rank", "4"], "--rank apply to --format comfyui or lora"),
    (["--format", "onnx"], "Unknown --format 'onnx'; allowed: diffusers"),
    (["--format", "comfyui", "--naming", "sgm"], "Unknown --naming 'sgm'; allowed: diffusers, ldm"),
    (["--format", "comfyui", "--dtype", "int8"], "Unknown --dtype 'int8'"),
])
def test_option_errors_are_user_errors(args, expected, adapters, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    code, _, stderr = run_cli(["export", "-a", adapters["none"], "-o", out, *args], capsys)
    assert code == 2 and expected in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_out_file_checks(adapters, tmp_path, capsys):
    def export(out, *extra):
        return run_cli(["export", "-a", adapters["none"], "--format", "comfyui", "-o", out, *extra], capsys)

    code, _, stderr = export(tmp_path / "x.ckpt")
    assert code == 2 and "must end with .safetensors" in stderr
    code, _, stderr = export(adapters["none"] / "inside.safetensors")
    assert code == 2 and "lies inside the adapter folder" in stderr and not (adapters["none"] / "inside.safetensors").exists()
    code, _, stderr = export(tmp_path)
    assert code == 2 and "must end with .safetensors" in stderr
    (tmp_path / "dir.safetensors").mkdir()
    code, _, stderr = export(tmp_path / "dir.safetensors", "--force")
    assert code == 2 and "is a folder" in stderr

    foreign = tmp_path / "model.safetensors"
    save_file({"weight": torch.ones(2)}, foreign)
    before = foreign.read_bytes()
    code, _, stderr = export(foreign)
    assert code == 2 and "already exists; pass --force" in stderr
    code, _, stderr = export(foreign, "--force")
    assert code == 2 and "was not written by `waveft-train export`" in stderr and foreign.read_bytes() == before

    ours = tmp_path / "ours.safetensors"
    assert export(ours)[0] == 0
    code, _, stderr = export(ours)
    assert code == 2 and "already exists; pass --force" in stderr
    assert export(ours, "--force")[0] == 0  # an earlier export is replaced

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, stderr = export(blocker / "x.safetensors")
    assert code == 2 and "Could not write the comfyui export" in stderr and str(blocker / "x.safetensors") in stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dir.safetensors", "file", "model.safetensors",
                                                                "ours.safetensors"]  # no temporary files left


def test_tensors_outside_the_waveft_layers_are_refused(tiny_model_dir, tmp_path, capsys):
    """bias: all trains every bias of the UNet (convs, norms); those apps' 'full' keys cannot carry all of them."""
    adapter = make_adapter(tiny_model_dir, tmp_path / "all", bias="all")
    code, _, stderr = run_cli(["export", "-a", adapter, "--format", "comfyui", "-o", tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "changes tensors outside its WaveFT layers" in stderr and "--format diffusers" in stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_the_documented_app_exports_run(adapters, tmp_path, capsys):
    """The one-file export commands the docs show for ComfyUI, A1111 / Forge and diffusers, with this test's paths."""
    commands = [shlex.split(command) for _, command in doc_commands()  # (`--run … --checkpoint best`: test_evaluation)
                if command.startswith("waveft-train export") and "--format" in command and "--adapter" in command]
    assert {command[command.index("--format") + 1] for command in commands} == {"comfyui", "lora", "waveft"}
    for command in commands:
        args = command[1:]
        args[args.index("--adapter") + 1] = str(adapters["none"])
        args[args.index("--out") + 1] = str(tmp_path / Path(args[args.index("--out") + 1]).name)
        code, _, stderr = run_cli(args, capsys)
        assert code == 0, stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        Path(command[command.index("--out") + 1]).name for command in commands)
