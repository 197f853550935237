"""Images from saved adapters: grids, determinism, --compare-base, --scale, merged export, README snippet, errors.

Everything runs on the tiny SDXL model at 64x64 with 2 denoising steps. Adapters are made with a random
nonzero spectrum (init_weights=False), so they visibly change every image.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import doc_code_blocks, doc_command, run_cli
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from waveft_train.adapter.export import export
from waveft_train.adapter.load import adapters_disabled, load_adapter_unet
from waveft_train.adapter.sampling import generate_grid_images, label_height, make_grid
from waveft_train.cli.adapters import COMPARE_GROUP_GAP
from waveft_train.models.loading import build_pipeline, load_components
from waveft_train.waveft import WaveFTLayer, register, unregister

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPTS = ["a photo of sks dog", "a red car in the snow"]
SEEDS = [5, 6, 7]
SIZE = 64  # the tiny model's own size: sample_size 32 x VAE scale factor 2
STEPS = 2
GUIDANCE = 5.0


def make_adapter(model_dir: Path, out: Path, *, seed: int = 0) -> Path:
    """A WaveFT adapter for `model_dir` with a random nonzero spectrum, saved the way the trainer saves it."""
    from diffusers import UNet2DConditionModel
    from peft import WaveFTConfig, get_peft_model

    register()
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(unet, WaveFTConfig(n_frequency=64, target_modules=TARGETS, init_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(model_dir)
    model.save_pretrained(out, save_embedding_layers=False)
    return out


def sample_args(adapter: Path, out: Path, *extra: object) -> list[str]:
    return ["sample", "--adapter", str(adapter), "--out", str(out), "--steps", str(STEPS), *map(str, extra)]


def tiles(grid: Image.Image, rows: int, columns: int, *, x0=0, gap_after: int | None = None, gap: int = 0):
    """Cut a grid into SIZE x SIZE tiles (pixel arrays) along make_grid's documented geometry."""
    out = []
    for row in range(rows):
        line = []
        for column in range(columns):
            x = x0 + column * SIZE + (column // gap_after * gap if gap_after else 0)
            line.append(np.asarray(grid.crop((x, row * SIZE, x + SIZE, (row + 1) * SIZE)).convert("RGB")))
        out.append(line)
    return out


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="module")
def adapted(adapter_dir: Path):
    """(pipeline, unet) of the tiny model with the adapter applied, as `sample` builds them."""
    components, unet = load_adapter_unet(adapter_dir, None)
    return build_pipeline(components, unet), unet


@pytest.fixture(scope="module")
def adapter_images(adapted) -> list[list[Image.Image]]:
    pipeline, _ = adapted
    options = {"steps": STEPS, "guidance": GUIDANCE, "height": SIZE, "width": SIZE, "progress": False}
    return generate_grid_images(pipeline, PROMPTS, SEEDS, **options)


@pytest.fixture(scope="module")
def base_images(tiny_model_dir: Path) -> list[Image.Image]:
    """The plain base model's images for PROMPTS[0] and SEEDS[:2], from a pipeline that never saw peft."""
    pipeline = build_pipeline(load_components(str(tiny_model_dir)))
    options = {"steps": STEPS, "guidance": GUIDANCE, "height": SIZE, "width": SIZE, "progress": False}
    return generate_grid_images(pipeline, PROMPTS[:1], SEEDS[:2], **options)[0]


# ------------------------------------------------------------------------------------------------ make_grid


def solid(color: tuple[int, int, int], size=(8, 6)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_make_grid_has_no_padding_by_default_and_puts_rows_and_columns_in_order():
    colors = [[(10 * r + c, 100 + c, 200 - r) for c in range(3)] for r in range(2)]
    grid = make_grid([[solid(color) for color in row] for row in colors])
    assert grid.size == (3 * 8, 2 * 6)
    array = np.asarray(grid)
    for r, row in enumerate(colors):
        for c, color in enumerate(row):
            assert (array[r * 6 : (r + 1) * 6, c * 8 : (c + 1) * 8] == color).all()


def test_make_grid_groups_columns_with_a_white_gap():
    grid = make_grid([[solid((0, 0, 0))] * 2 + [solid((255, 0, 0))] * 2], group_size=2, group_gap=5)
    assert grid.size == (4 * 8 + 5, 6)
    array = np.asarray(grid)
    assert (array[:, :16] == (0, 0, 0)).all()
    assert (array[:, 16:21] == 255).all()
    assert (array[:, 21:] == (255, 0, 0)).all()


def test_make_grid_labels_add_documented_bands_and_draw_text():
    rows = [[solid((0, 0, 255), (40, 30)), solid((0, 255, 0), (40, 30))] for _ in range(2)]
    grid = make_grid(rows, row_labels=["first prompt", "second prompt " * 20], col_labels=["seed 0", "seed 1"])
    band = label_height(40)
    assert grid.size == (2 * 40, band + 2 * (band + 30))
    array = np.asarray(grid)
    for r in range(2):
        y = band + r * (band + 30) + band
        assert (array[y : y + 30, 0:40] == (0, 0, 255)).all()
        assert (array[y : y + 30, 40:80] == (0, 255, 0)).all()
        assert array[y - band : y].min() < 128, "row label text is drawn in its band"
    assert array[0:band, 0:40].min() < 128 and array[0:band, 40:80].min() < 128, "column labels are drawn"


def test_make_grid_rejects_mixed_sizes():
    with pytest.raises(ValueError, match="8x6"):
        make_grid([[solid((0, 0, 0)), solid((0, 0, 0), (9, 6))]])


# ------------------------------------------------------------------------------------------- sample command


def test_sample_grid_rows_are_prompts_and_columns_are_seeds(adapter_dir, adapter_images, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = sample_args(adapter_dir, out, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "-n", 3, "--seed", SEEDS[0])
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert str(out) in stdout
    grid = Image.open(out)
    assert grid.size == (3 * SIZE, 2 * SIZE)
    cut = tiles(grid, 2, 3)
    for r in range(2):
        for c in range(3):
            assert np.array_equal(cut[r][c], pixels(adapter_images[r][c])), f"tile ({r}, {c})"
    flat = [tile.tobytes() for row in cut for tile in row]
    assert len(set(flat)) == 6, "every prompt x seed gives a different image"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"], "no temporary file is left behind"


def test_same_seed_gives_identical_pixels_whatever_the_other_seeds(adapter_dir, adapter_images, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"# comment\n\n  {PROMPTS[1]}  \n", encoding="utf-8")
    out = tmp_path / "one.png"
    args = sample_args(adapter_dir, out, "--prompts-file", prompts_file, "-n", 1, "--seed", 6)
    code, _, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert Image.open(out).size == (SIZE, SIZE)
    assert np.array_equal(pixels(Image.open(out)), pixels(adapter_images[1][1]))


def test_compare_base_puts_base_images_left_of_the_adapter_images(
    adapter_dir, adapter_images, base_images, tmp_path, capsys
):
    out = tmp_path / "compare.png"
    args = sample_args(adapter_dir, out, "-p", PROMPTS[0], "-n", 2, "--seed", SEEDS[0], "--compare-base")
    code, _, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    grid = Image.open(out)
    assert grid.size == (4 * SIZE + COMPARE_GROUP_GAP, SIZE)
    cut = tiles(grid, 1, 4, gap_after=2, gap=COMPARE_GROUP_GAP)[0]
    for column in range(2):
        assert np.array_equal(cut[column], pixels(base_images[column])), f"base image {column}"
        assert np.array_equal(cut[2 + column], pixels(adapter_images[0][column])), f"adapter image {column}"
        assert not np.array_equal(cut[column], cut[2 + column]), "the adapter changes the image"
    assert (np.asarray(grid)[:, 2 * SIZE : 2 * SIZE + COMPARE_GROUP_GAP] == 255).all()


def test_scale_zero_gives_exactly_the_base_model(adapter_dir, base_images, tmp_path, capsys):
    out = tmp_path / "scale0.png"
    args = sample_args(adapter_dir, out, "-p", PROMPTS[0], "-n", 1, "--seed", SEEDS[0], "--scale", 0)
    code, _, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert np.array_equal(pixels(Image.open(out)), pixels(base_images[0]))
    _, unet = load_adapter_unet(adapter_dir, None, scale=0)
    layers = [module for module in unet.modules() if isinstance(module, WaveFTLayer)]
    assert layers and all(layer.waveft_scaling == {"default": 0.0} for layer in layers)


def test_scale_multiplies_every_layer_delta(adapter_dir, adapted):
    _, unet = adapted
    _, half = load_adapter_unet(adapter_dir, None, scale=0.5)
    full_layers = {name: m for name, m in unet.named_modules() if isinstance(m, WaveFTLayer)}
    half_layers = {name: m for name, m in half.named_modules() if isinstance(m, WaveFTLayer)}
    assert len(full_layers) == len(half_layers) > 0
    for name, layer in half_layers.items():
        assert layer.waveft_scaling["default"] == pytest.approx(25.0 * 0.5)
        expected = full_layers[name].get_delta_weight("default") * 0.5
        torch.testing.assert_close(layer.get_delta_weight("default"), expected, rtol=0, atol=1e-7)


def test_adapters_disabled_restores_adapters_and_trainable_flags(adapted):
    _, unet = adapted
    layer = next(m for m in unet.modules() if isinstance(m, WaveFTLayer))
    with adapters_disabled(unet):
        assert layer.disable_adapters
    assert not layer.disable_adapters
    assert not any(parameter.requires_grad for parameter in unet.parameters())


# --------------------------------------------------------------------------------------------------- export


UNET_FORWARD = """
import sys
sys.modules["peft"] = None  # importing peft now fails: the export must not need it
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

unet = UNet2DConditionModel.from_pretrained(sys.argv[1])
inputs = load_file(sys.argv[2])
with torch.no_grad():
    output = unet(
        inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
        added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]},
    ).sample
save_file({"output": output.contiguous()}, sys.argv[3])
"""


def unet_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "sample": torch.randn(1, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 77, 64, generator=generator),
        "text_embeds": torch.randn(1, 32, generator=generator),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
    }


def unet_output(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        return unet(
            inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
            added_cond_kwargs=added,
        ).sample


def test_exported_unet_matches_the_adapter_and_loads_without_peft(adapter_dir, adapted, tmp_path, capsys):
    _, unet = adapted
    out = tmp_path / "merged"
    code, stdout, stderr = run_cli(["export", "--adapter", adapter_dir, "--out", out, "--dtype", "fp32"], capsys)
    assert code == 0, stderr
    assert str(out) in stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                   "scheduler_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"], "the staging folder is gone"
    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), framework="pt") as weights:
        keys = list(weights.keys())
        assert {weights.get_slice(key).get_dtype() for key in keys} == {"F32"}
    assert not [key for key in keys if "waveft" in key or "base_layer" in key]

    inputs = unet_inputs()
    save_file(inputs, tmp_path / "inputs.safetensors")
    result = subprocess.run(
        [sys.executable, "-c", UNET_FORWARD, out, tmp_path / "inputs.safetensors", tmp_path / "output.safetensors"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    exported = load_file(tmp_path / "output.safetensors")["output"]
    expected = unet_output(unet, inputs)
    torch.testing.assert_close(exported, expected, rtol=0, atol=1e-4)
    with adapters_disabled(unet):
        assert (unet_output(unet, inputs) - expected).abs().max() > 1e-3, "the merge changed the UNet"


def test_export_writes_half_precision_and_replaces_only_an_earlier_export_with_force(adapter_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()  # an empty folder is fine without --force
    code, _, stderr = run_cli(["export", "--adapter", adapter_dir, "--out", out, "--dtype", "fp32"], capsys)
    assert code == 0, stderr
    code, _, stderr = run_cli(["export", "--adapter", adapter_dir, "--out", out], capsys)
    assert code == 2 and "already holds a merged UNet" in stderr and "--force" in stderr

    assert export(adapter_dir, out, force=True).path == out.absolute()
    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), framework="pt") as weights:
        assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"F16"}
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def foreign_file(folder: Path) -> str:
    folder.mkdir()
    (folder / "precious.txt").write_text("mine")
    return "precious.txt"


def export_plus_notes(folder: Path) -> str:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (folder / "notes").mkdir()
    return "notes"


def other_model_config(folder: Path) -> str:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return "AutoencoderKL"


@pytest.mark.parametrize("fill", [foreign_file, export_plus_notes, other_model_config])
def test_export_force_never_deletes_a_folder_that_is_not_an_earlier_export(fill, adapter_dir, tmp_path, capsys):
    out = tmp_path / "keepme"
    culprit = fill(out)
    before = sorted(p.name for p in out.rglob("*"))
    for force in ([], ["--force"]):
        code, _, stderr = run_cli(["export", "--adapter", adapter_dir, "--out", out, *force], capsys)
        message = " ".join(stderr.split())
        assert code == 2 and "Traceback" not in stderr
        assert str(out) in message and "not an earlier UNet export" in message and culprit in message
    assert sorted(p.name for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keepme"], "no staging folder left"


@pytest.mark.parametrize(
    ("out_of", "expected"),
    [
        (lambda adapter: adapter, "is the adapter folder"),
        (lambda adapter: adapter / "merged", "lies inside the adapter folder"),
        (lambda adapter: adapter.parent, "contains the adapter folder"),
    ],
    ids=["same", "inside", "containing"],
)
def test_export_refuses_an_out_folder_overlapping_the_adapter(out_of, expected, adapter_dir, tmp_path, capsys):
    adapter = copy_adapter(adapter_dir, tmp_path)
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    code, _, stderr = run_cli(["export", "--adapter", adapter, "--out", out_of(adapter), "--force"], capsys)
    message = " ".join(stderr.split())
    assert code == 2 and expected in message and "--out" in message and "Traceback" not in stderr
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_and_sample_outputs_get_the_modes_of_normal_files(umask, adapter_dir, tmp_path, capsys):
    import logging
    import stat

    notices: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notices.append(record.getMessage())

    handler = Collect()
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    diffusers_logger.addHandler(handler)
    previous = os.umask(umask)
    try:
        code, _, stderr = run_cli(["export", "--adapter", adapter_dir, "--out", tmp_path / "merged"], capsys)
        assert code == 0, stderr
        code, _, stderr = run_cli(sample_args(adapter_dir, tmp_path / "grid.png", "-p", "a dog", "-n", 1), capsys)
        assert code == 0, stderr
    finally:
        os.umask(previous)
        diffusers_logger.removeHandler(handler)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(tmp_path / "merged") == 0o777 & ~umask
    for path in [*(tmp_path / "merged").iterdir(), tmp_path / "grid.png"]:
        assert mode(path) == 0o666 & ~umask, path
    assert not [notice for notice in notices if "should be kept in float32" in notice], notices
    assert "should be kept in float32" not in stderr


# --------------------------------------------------------------------------------------------------- README


def test_readme_snippet_runs_with_stock_peft_and_diffusers(adapter_dir, adapted, tiny_model_dir, tmp_path, capsys):
    blocks = [(path, code) for path, code in doc_code_blocks("python") if '"outputs/dog/' in code]
    assert len(blocks) == 3, "one block with peft, one with the merged export, one with waveft_train.load_adapter"
    merged_dir = tmp_path / "unet-merged"
    substitutions = {
        '"stabilityai/stable-diffusion-xl-base-1.0"': repr(str(tiny_model_dir)),
        '"outputs/dog/adapter"': repr(str(adapter_dir)),
        '"outputs/dog/unet-merged"': repr(str(merged_dir)),
        "torch.float16": "torch.float32",  # CPUs have no fast half precision
        '.to("cuda")': '.to("cpu")',
        "num_inference_steps=25": f"num_inference_steps={STEPS}",
        '"dog.png"': repr(str(tmp_path / "dog.png")),
        '"dog-merged.png"': repr(str(tmp_path / "dog-merged.png")),
        '"dog-loaded.png"': repr(str(tmp_path / "dog-loaded.png")),
    }
    code_text = "".join(code for _, code in blocks)
    for old in substitutions:
        assert old in code_text, f"the documented snippets changed: update this test ({old} is gone)"

    # The merged export the docs show, with the test's paths.
    command = doc_command("waveft-train export", "outputs/dog/unet-merged")
    command = command.replace("outputs/dog/adapter", str(adapter_dir)).replace("outputs/dog/unet-merged", str(merged_dir))
    code, _, stderr = run_cli(shlex.split(command)[1:], capsys)
    assert code == 0, stderr

    # The sample command the docs show runs (fewer steps).
    sample_command = doc_command("waveft-train sample", "dog-grid.png")
    sample_command = sample_command.replace("outputs/dog/adapter", str(adapter_dir))
    sample_command = sample_command.replace("dog-grid.png", str(tmp_path / "dog-grid.png"))
    code, _, stderr = run_cli([*shlex.split(sample_command)[1:], "--steps", str(STEPS)], capsys)
    assert code == 0, stderr
    assert Image.open(tmp_path / "dog-grid.png").size == (8 * SIZE + COMPARE_GROUP_GAP, SIZE)

    unregister()  # the snippet is for users without waveft-train: peft's own WaveFT tuner loads the adapter
    try:
        for path, block in blocks:
            code = block
            for old, new in substitutions.items():
                code = code.replace(old, new)
            assert "stabilityai" not in code and "cuda" not in code
            exec(compile(code, str(path), "exec"), {"__name__": "readme_snippet"})
    finally:
        register()

    pipeline, unet = adapted
    options = {"steps": STEPS, "guidance": GUIDANCE, "height": SIZE, "width": SIZE, "progress": False}
    ours = pixels(generate_grid_images(pipeline, ["a photo of sks dog in the snow"], [0], **options)[0][0])
    with adapters_disabled(unet):
        base = pixels(generate_grid_images(pipeline, ["a photo of sks dog in the snow"], [0], **options)[0][0])
    snippet = pixels(Image.open(tmp_path / "dog.png"))
    difference = np.abs(snippet.astype(int) - ours.astype(int))
    merged = pixels(Image.open(tmp_path / "dog-merged.png"))
    assert np.abs(merged.astype(int) - ours.astype(int)).max() <= 2, "the fp16 merged export gives the same image"
    assert difference.max() <= 2, "stock peft + merge gives the image waveft-train samples"
    assert np.abs(base.astype(int) - ours.astype(int)).max() > 10, "the adapter is really applied"
    assert Image.open(tmp_path / "dog-merged.png").size == (SIZE, SIZE)


# --------------------------------------------------------------------------------------------------- errors


def copy_adapter(adapter_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(adapter_dir, tmp_path / "broken"))


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def rename_key(folder: Path, old_suffix: str, new_key: str) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    old = next(key for key in sorted(tensors) if key.endswith(old_suffix))
    tensors[new_key] = tensors.pop(old)
    save_file(tensors, path)


def first_saved_layer(folder: Path) -> str:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as weights:
        key = next(iter(weights.keys()))
    return key.removeprefix("base_model.model.").rsplit(".", 1)[0]


def break_missing_folder(folder: Path) -> list[str]:
    shutil.rmtree(folder)
    return ["no such folder", str(folder.name)]


def break_missing_config(folder: Path) -> list[str]:
    (folder / "adapter_config.json").unlink()
    return ["adapter_config.json"]


def break_missing_weights(folder: Path) -> list[str]:
    (folder / "adapter_model.safetensors").unlink()
    return ["adapter_model.safetensors"]


def break_pickle_only(folder: Path) -> list[str]:
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    return ["adapter_model.bin", "pickle", "safety"]


def break_truncated_weights(folder: Path) -> list[str]:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return ["adapter_model.safetensors", "not a valid safetensors file"]


def break_not_waveft(folder: Path) -> list[str]:
    edit_config(folder, peft_type="LORA")
    return ["'LORA'", "WAVEFT", "adapter_config.json"]


def break_unreadable_config(folder: Path) -> list[str]:
    (folder / "adapter_config.json").write_text("{not json")
    return ["adapter_config.json", "JSON"]


def break_missing_base(folder: Path) -> list[str]:
    edit_config(folder, base_model_name_or_path=str(folder.parent / "no-such-model"))
    return ["Could not load the model", "no-such-model"]


def break_spectrum_length(folder: Path) -> list[str]:
    edit_config(folder, n_frequency=32)
    return ["does not fit the base model", first_saved_layer(folder), "[64]", "[32]"]


def break_unknown_layer(folder: Path) -> list[str]:
    rename_key(folder, "to_k.waveft_spectrum", "base_model.model.up_blocks.7.attentions.0.to_k.waveft_spectrum")
    return ["does not fit the base model", "'up_blocks.7.attentions.0.to_k'"]


def break_missing_layer(folder: Path) -> list[str]:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    dropped = sorted(tensors)[-1]
    del tensors[dropped]
    save_file(tensors, path)
    return ["has no weights for layer", dropped.removeprefix("base_model.model.").rsplit(".", 1)[0]]


def break_targets_nothing(folder: Path) -> list[str]:
    edit_config(folder, target_modules=["q_proj"])
    return ["does not fit the base model", "'q_proj'"]


def break_too_many_coefficients(folder: Path) -> list[str]:
    edit_config(folder, n_frequency=5000)
    return ["does not fit the base model", "n_frequency=5000"]


BROKEN_ADAPTERS = [
    break_missing_folder,
    break_missing_config,
    break_missing_weights,
    break_pickle_only,
    break_truncated_weights,
    break_not_waveft,
    break_unreadable_config,
    break_missing_base,
    break_spectrum_length,
    break_unknown_layer,
    break_missing_layer,
    break_targets_nothing,
    break_too_many_coefficients,
]


# Both commands share one loader: `sample` meets every case, `export` a few (it loads only the UNet).
BROKEN_ADAPTER_CASES = [("sample", damage) for damage in BROKEN_ADAPTERS] + [
    ("export", damage) for damage in (break_pickle_only, break_missing_base, break_unknown_layer, break_spectrum_length)
]


@pytest.mark.parametrize(
    ("command", "damage"),
    BROKEN_ADAPTER_CASES,
    ids=[f"{command}-{damage.__name__.removeprefix('break_')}" for command, damage in BROKEN_ADAPTER_CASES],
)
def test_broken_adapters_are_user_errors_naming_the_culprit(command, damage, adapter_dir, tmp_path, capsys):
    folder = copy_adapter(adapter_dir, tmp_path)
    expected = damage(folder)
    args = (
        sample_args(folder, tmp_path / "grid.png", "-p", "a dog", "-n", 1)
        if command == "sample"
        else ["export", "--adapter", folder, "--out", tmp_path / "merged"]
    )
    code, _, stderr = run_cli(args, capsys)
    assert code == 2, stderr
    message = " ".join(stderr.split())
    assert "Traceback" not in stderr
    for fragment in expected:
        assert fragment in message
    assert not (tmp_path / "grid.png").exists() and not (tmp_path / "merged").exists()


def test_explicit_base_that_does_not_exist_is_a_user_error(adapter_dir, tmp_path, capsys):
    args = sample_args(adapter_dir, tmp_path / "grid.png", "-p", "a dog", "--base", tmp_path / "nowhere")
    code, _, stderr = run_cli(args, capsys)
    assert code == 2 and "Could not load the model" in stderr and "nowhere" in stderr


@pytest.mark.parametrize(
    ("extra", "out_name", "expected"),
    [
        ([], "grid.png", "No prompt given"),
        (["-p", "a dog", "-p", "  "], "grid.png", "is blank: an empty prompt makes an unconditioned image"),
        (["--prompts-file", "{tmp}/missing.txt"], "grid.png", "missing.txt"),
        (["--prompts-file", "{tmp}/empty.txt"], "grid.png", "empty.txt has only blank lines and # comments"),
        (["--prompts-file", "{tmp}/zero.txt"], "grid.png", "zero.txt is empty, so it gives no prompts"),
        (["-p", "a dog", "--scale", "nan"], "grid.png", "--scale nan is not a finite number"),
        (["-p", "a dog", "--scale", "inf"], "grid.png", "--scale inf is not a finite number"),
        (["-p", "a dog", "--scale", "-inf"], "grid.png", "--scale -inf is not a finite number"),
        (["-p", "a dog", "--device", "banana"], "grid.png", "--device 'banana' is not a device"),
        (["-p", "a dog", "--device", "cuda:x"], "grid.png", "allowed: cpu, cuda, cuda:N"),
        (["-p", "a dog"], "grid.jpg", "must end with .png"),
        (["-p", "a dog", "--height", "60"], "grid.png", "--height 60 is not a multiple of 8"),
        (["-p", "a dog", "--dtype", "fp8"], "grid.png", "Unknown --dtype 'fp8'"),
        pytest.param(
            ["-p", "a dog", "--device", "cuda"], "grid.png", "torch sees no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
    ],
)
def test_sample_argument_errors(extra, out_name, expected, adapter_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("# only a comment\n\n   \n")
    (tmp_path / "zero.txt").write_text("")
    args = sample_args(adapter_dir, tmp_path / out_name, *[arg.format(tmp=tmp_path) for arg in extra])
    code, _, stderr = run_cli(args, capsys)
    assert code == 2 and "Traceback" not in stderr
    assert expected in " ".join(stderr.split())
    assert not (tmp_path / out_name).exists()


def test_export_rejects_unknown_dtype(adapter_dir, tmp_path, capsys):
    code, _, stderr = run_cli(["export", "-a", adapter_dir, "-o", tmp_path / "m", "--dtype", "int8"], capsys)
    assert code == 2 and "Unknown --dtype 'int8'" in stderr
