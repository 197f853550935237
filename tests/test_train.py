"""The trainer end to end on the embedded tiny SDXL: output files, prior loss, conditioning cache, resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import Interrupted, crash_after_checkpoint, fast_overrides
from safetensors.torch import load_file

from waveft_train.config import load_config
from waveft_train.train import run
from waveft_train.train.model_card import model_card, stock_peft_caveats

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "tests" / "data" / "tiny.yaml"


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("class-images")  # shared: generated once, reused by every run here


def train(output_dir: Path, class_dir: Path, **extra) -> Path:
    config = load_config(DEMO, fast_overrides(output_dir, class_dir, **extra))
    return run.train_from_config(config, progress=False)


def files_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def test_demo_end_to_end_writes_exactly_the_layout(tmp_path, class_dir, tiny_model_dir):
    output_dir = train(tmp_path / "run", class_dir)
    checkpoint_files = {"adapter_config.json", "adapter_model.safetensors", "training_state.json", "training_state.safetensors"}
    assert files_under(output_dir) == {
        "config.yaml", "metrics.jsonl", "summary.json", "report.html",
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md", "adapter/samples.png",
        "samples/step-000002.png", "samples/step-000004.png",
        *{f"checkpoints/step-000002/{name}" for name in checkpoint_files},
        *{f"checkpoints/step-000004/{name}" for name in checkpoint_files},
    }  # fmt: skip
    assert len(list(class_dir.glob("*.png"))) == 2 and (class_dir / "manifest.json").exists()

    resolved = load_config(output_dir / "config.yaml")
    assert Path(resolved.data.instance_dir).is_absolute() and Path(resolved.output.dir) == output_dir
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["prior_loss"] > 0 and m["instance_loss"] > 0 for m in metrics)
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["num_processes"] == 1
    assert summary["trainable_params"] == 64 * 128  # 16 attention blocks x 4 linears x n_frequency
    assert summary["adapter_bytes"] == (output_dir / "adapter" / "adapter_model.safetensors").stat().st_size
    assert summary["final_loss"] == pytest.approx(metrics[-1]["loss"])
    assert summary["peak_memory_bytes"] > 0 and summary["seconds_per_step"] > 0

    from PIL import Image

    grid = Image.open(output_dir / "samples" / "step-000004.png")
    assert grid.size == (2 * 32, 32)  # one prompt row: base image, then the adapter's
    card = (output_dir / "adapter" / "README.md").read_text()
    assert "n_frequency | 128" in card and "PeftModel.from_pretrained" in card


def test_metrics_lines_have_the_same_keys_and_the_last_step_is_always_logged(tmp_path, class_dir):
    output_dir = train(tmp_path / "run", class_dir, **{"prior.enabled": False, "train.log_every": 2,
                                                       "train.max_steps": 3, "validation.every": 0})
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 3]  # every log_every steps, and the final one
    assert all(list(m) == ["step", "loss", "instance_loss", "prior_loss", "lr", "grad_norm", "seconds"] for m in metrics)
    assert all(m["prior_loss"] is None for m in metrics)  # no prior preservation: null, not a missing key
    assert json.loads((output_dir / "summary.json").read_text())["final_loss"] == metrics[-1]["loss"]


def test_adapter_loads_in_stock_peft_and_changes_the_unet(tmp_path, class_dir):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    from waveft_train.waveft import register, unregister

    output_dir = train(tmp_path / "run", class_dir)
    adapter_dir = output_dir / "adapter"
    from waveft_train.models.tiny import tiny_model_dir

    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == "tiny"  # not this machine's cache folder: the adapter stays usable elsewhere (`sample` resolves it)
    assert "base_model: tiny" in (adapter_dir / "README.md").read_text()
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir(), subfolder="unet")
    torch.manual_seed(0)
    inputs = (torch.randn(1, 4, 16, 16), torch.tensor([500]))
    kwargs = dict(encoder_hidden_states=torch.randn(1, 77, 64),
                  added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])})
    with torch.no_grad():
        before = unet(*inputs, **kwargs).sample
    unregister()
    try:
        model = PeftModel.from_pretrained(unet, adapter_dir)
        assert type(model.base_model).__module__.startswith("peft.")
        with torch.no_grad():
            after = model(*inputs, **kwargs).sample
    finally:
        register()
    assert (after - before).abs().max() > 1e-6


class SplitUNet(torch.nn.Module):
    """Predicts 0 for instance examples and 1 for class examples: the loss split is then known exactly."""

    def __init__(self, num_instance: int):
        super().__init__()
        self.num_instance = num_instance

    def forward(self, sample, timesteps, **kwargs):
        prediction = torch.zeros_like(sample)
        prediction[self.num_instance :] = 1.0
        return (prediction,)


def test_prior_preservation_loss_split_and_per_example_noise():
    from diffusers import DDPMScheduler

    from waveft_train.data.encode import UNetInputs
    from waveft_train.train.loop import LoopSettings, batch_generators, diffusion_loss, example_generator

    inputs = UNetInputs(latents=torch.randn(4, 4, 8, 8), prompt_embeds=torch.zeros(4, 77, 64), pooled=torch.zeros(4, 32),
                        time_ids=torch.zeros(4, 6), num_instance=2)
    settings = LoopSettings(max_steps=1, gradient_accumulation=1, max_grad_norm=None, prediction_type="epsilon",
                            snr_gamma=None, noise_offset=0.0, prior_loss_weight=0.3, seed=0)
    instance, prior = diffusion_loss(SplitUNet(2), DDPMScheduler(), inputs, batch_generators(0, 10, 2, True), settings,
                                     torch.float32)
    # example k of the run draws from its own generator, whatever batch it comes in: instance 10, 11, class 10, 11
    noise = torch.stack([torch.randn(4, 8, 8, generator=example_generator(0, position, role))
                         for role in ("instance", "class") for position in (10, 11)])
    torch.testing.assert_close(instance, noise[:2].square().mean(dim=(1, 2, 3)))
    torch.testing.assert_close(prior, (1 - noise[2:]).square().mean(dim=(1, 2, 3)))

    no_prior = LoopSettings(**{**settings.__dict__, "prior_loss_weight": None})
    _, prior = diffusion_loss(SplitUNet(2), DDPMScheduler(), inputs, batch_generators(0, 10, 2, True), no_prior,
                              torch.float32)
    assert prior is None


def test_cached_and_uncached_conditioning_give_the_same_loss(tmp_path, class_dir):
    from diffusers import DDPMScheduler

    from waveft_train.data.dataset import DreamBoothDataset, collate
    from waveft_train.data.encode import Conditioning
    from waveft_train.data.images import images_from_files, load_images
    from waveft_train.models.loading import load_components
    from waveft_train.train.loop import LoopSettings, batch_generators, diffusion_loss

    config = load_config(DEMO, fast_overrides(tmp_path, class_dir))
    components = load_components(config.model.pretrained)
    instance = load_images(config.data.instance_dir, caption_column=None, default_prompt=config.data.instance_prompt)
    stand_ins = images_from_files(sorted(Path(config.data.instance_dir).glob("*.png"))[:2], prompt="a photo of toy",
                                  source="test")  # any images serve as class images here
    dataset = DreamBoothDataset(instance, resolution=32, seed=0, random_flip=True, class_images=stand_ins)
    settings = LoopSettings(max_steps=1, gradient_accumulation=1, max_grad_norm=None, prediction_type="epsilon",
                            snr_gamma=None, noise_offset=0.1, prior_loss_weight=1.0, seed=0)
    losses = []
    for cache in (True, False):
        conditioning = Conditioning(components, dataset, device=torch.device("cpu"), cache_latents=cache, progress=False)
        assert (conditioning.examples is dataset) is not cache  # the cache replaces pixels by latents
        batch = collate([conditioning.examples[3], conditioning.examples[0]], with_prior=True)
        inputs = conditioning(batch)
        instance, prior = diffusion_loss(components.unet, DDPMScheduler(), inputs, batch_generators(0, 5, 2, True),
                                         settings, torch.float32)
        losses.append((instance.sum() + prior.sum()).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)


@pytest.mark.usefixtures("trains_on_the_cpu")
def test_interrupted_run_resumes_to_the_same_adapter(tmp_path, class_dir, monkeypatch, capsys):
    reference = train(tmp_path / "uninterrupted", class_dir)

    crash_after_checkpoint(monkeypatch, 2)
    with pytest.raises(Interrupted):
        train(tmp_path / "resumed", class_dir)
    monkeypatch.undo()
    assert not (tmp_path / "resumed" / "adapter").exists()

    capsys.readouterr()
    resumed = train(tmp_path / "resumed", class_dir)
    assert "Resuming from" in capsys.readouterr().out
    expected = load_file(reference / "adapter" / "adapter_model.safetensors")
    actual = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=1e-5)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.usefixtures("trains_on_the_cpu")
def test_txt_captions_train_the_same_adapter_as_the_same_captions_in_metadata_jsonl(tmp_path, class_dir):
    from helpers import SUBJECT_PHOTOS, captioned_subject

    from waveft_train.data.images import load_images

    captions = {name: f"a photo of sks toy, stripes, view {number}" for number, name in enumerate(SUBJECT_PHOTOS)}
    folders = [captioned_subject(tmp_path / "txt", captions=captions),
               captioned_subject(tmp_path / "metadata", metadata=captions)]
    assert load_images(folders[0], caption_column="text", default_prompt="p").prompts == tuple(captions.values())
    adapters = [load_file(train(tmp_path / f"run-{folder.name}", class_dir, **{
        "data.instance_dir": folder, "data.caption_column": "text", "train.max_steps": 2, "validation.every": 0,
        "validation.prompts": "[]"}) / "adapter" / "adapter_model.safetensors") for folder in folders]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][key], adapters[1][key]) for key in adapters[0])  # bit for bit
    assert max(tensor.abs().max().item() for tensor in adapters[0].values()) > 0  # it trained


def test_output_dir_with_another_run_is_refused_unless_forced(tmp_path, class_dir):
    from waveft_train.common.errors import UserError

    output_dir = train(tmp_path / "run", class_dir, **{"train.max_steps": 2, "validation.every": 0})
    other = load_config(DEMO, fast_overrides(output_dir, class_dir, **{"train.learning_rate": 5e-4}))
    with pytest.raises(UserError, match="different config.*--force"):
        run.train_from_config(other, progress=False)
    run.train_from_config(other, force=True, progress=False)
    assert load_config(output_dir / "config.yaml").train.learning_rate == 5e-4


def test_a_run_that_fails_while_loading_changes_nothing_in_the_output_folder(tmp_path, class_dir, monkeypatch):
    """--force replaces the previous run only once the new one has loaded; a failed start leaves no config.yaml
    behind that would refuse the corrected rerun."""
    from waveft_train.common.errors import UserError

    output_dir = train(tmp_path / "run", class_dir, **{"train.max_steps": 1, "validation.every": 0})
    before = {name: (output_dir / name).read_bytes() for name in files_under(output_dir)}
    other = load_config(DEMO, fast_overrides(output_dir, class_dir, **{"train.learning_rate": 5e-4,
                                                                       "validation.every": 0}))

    def broken_model(*args, **kwargs):
        raise UserError("the model folder is broken (simulated)")

    monkeypatch.setattr(run, "load_components", broken_model)  # what the run loads its models with
    with pytest.raises(UserError, match="simulated"):
        run.train_from_config(other, force=True, progress=False)
    assert {name: (output_dir / name).read_bytes() for name in files_under(output_dir)} == before

    fresh = load_config(DEMO, fast_overrides(tmp_path / "fresh", class_dir, **{"validation.every": 0}))
    with pytest.raises(UserError, match="simulated"):
        run.train_from_config(fresh, progress=False)
    assert not (tmp_path / "fresh" / "config.yaml").exists()
    monkeypatch.undo()

    (tmp_path / "fresh").mkdir(exist_ok=True)  # a config.yaml with nothing it produced, as older versions left
    (tmp_path / "fresh" / "config.yaml").write_text((output_dir / "config.yaml").read_text())
    fixed = load_config(DEMO, fast_overrides(tmp_path / "fresh", class_dir, **{"train.max_steps": 1,
                                                                                "validation.every": 0}))
    run.train_from_config(fixed, progress=False)  # not refused: there was nothing to lose
    assert (tmp_path / "fresh" / "adapter" / "adapter_model.safetensors").exists()


def test_resuming_past_a_lowered_max_steps_says_so(tmp_path, class_dir, capsys):
    options = {"train.checkpoint_every": 1, "train.max_steps": 3, "validation.every": 0}
    output_dir = train(tmp_path / "run", class_dir, **options)
    (output_dir / "summary.json").unlink()  # as if interrupted after its last checkpoint
    capsys.readouterr()
    train(tmp_path / "run", class_dir, **{**options, "train.max_steps": 2})
    out = capsys.readouterr().out
    assert "step 3, past train.max_steps 2" in out and "step 3 of 2" not in out


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config.waveft.target_modules


def test_params_reports_layers_and_lora_rank():
    from waveft_train.train.params import describe_parameters

    config = load_config(DEMO)
    text = describe_parameters(config.model, config.waveft)
    lines = [line for line in text.splitlines() if line.startswith(("down_blocks", "up_blocks", "mid_block"))]
    assert len(lines) == 64 and all(line.split()[-1] == "256" for line in lines)
    assert "trainable parameters: 16,384" in text
    assert "LoRA with the same budget: rank 2.00" in text  # 16384 / (64 * (64 + 64))


def test_params_applies_n_frequency_pattern_and_refuses_keys_that_match_nothing():
    from waveft_train.common.errors import UserError
    from waveft_train.train.params import describe_parameters

    pattern = "waveft.n_frequency_pattern={attn2.to_k: 16, down_blocks.1.attentions.0.*: 32}"
    config = load_config(DEMO, [pattern])
    rows = [line.split() for line in describe_parameters(config.model, config.waveft).splitlines()
            if line.startswith(("down_blocks", "up_blocks", "mid_block"))]
    sizes = {name: int(n) for name, _, n in rows}
    for name, n in sizes.items():  # peft's rule: a key is a regex matched against the end of the layer's name,
        # and the first key that matches wins
        expected = 16 if name.endswith("attn2.to_k") else 32 if name.startswith("down_blocks.1.attentions.0.") else 256
        assert n == expected, name
    assert sorted(set(sizes.values())) == [16, 32, 256]
    with pytest.raises(UserError, match=r"key\(s\) 'down_blocks.1.attentions.0' set no adapted layer"):
        config = load_config(DEMO, ["waveft.n_frequency_pattern={down_blocks.1.attentions.0: 16}"])
        describe_parameters(config.model, config.waveft)
    with pytest.raises(UserError, match=r"key\(s\) 'attn2.to_k' set no adapted layer.*an earlier key already sets"):
        config = load_config(DEMO, ["waveft.n_frequency_pattern={to_k: 100, attn2.to_k: 200}"])
        describe_parameters(config.model, config.waveft)


@pytest.mark.usefixtures("trains_on_the_cpu")
def test_fp16_mixed_precision_with_fp32_weights_on_the_cpu_warns_and_trains_in_fp32(tmp_path, class_dir, caplog):
    logger = logging.getLogger("waveft_train")
    logger.addHandler(caplog.handler)
    try:
        output_dir = train(tmp_path / "run", class_dir, **{"model.dtype": "fp32", "train.mixed_precision": "fp16",
                                                           "train.max_steps": 1, "validation.every": 0})
    finally:
        logger.removeHandler(caplog.handler)
    assert any("has no effect on the CPU" in r.getMessage() for r in caplog.records)
    assert json.loads((output_dir / "summary.json").read_text())["steps"] == 1


@pytest.mark.usefixtures("trains_on_the_cpu")
@pytest.mark.parametrize("dtype, mixed_precision", [("fp16", "fp16"), ("fp16", "bf16"), ("bf16", "fp16")])
def test_fp16_on_the_cpu_is_refused_before_any_model_loads(tmp_path, class_dir, dtype, mixed_precision):
    """On the CPU these combinations used to crash at the first step with a dtype mismatch (exit 1)."""
    from waveft_train.common.errors import UserError

    with pytest.raises(UserError, match="fp16 needs a GPU.*On the CPU use train.mixed_precision: bf16"):
        train(tmp_path / "run", class_dir, **{"model.dtype": dtype, "train.mixed_precision": mixed_precision})
    assert not (tmp_path / "run").exists()  # refused before the output folder is made


def test_bf16_weights_and_mixed_precision_train_and_sample(tmp_path, class_dir):
    """The default real-SDXL precision (bf16 weights, bf16 autocast, fp32 VAE and spectrum) runs end to end."""
    output_dir = train(tmp_path / "run", class_dir, **{"model.dtype": "bf16", "train.mixed_precision": "bf16",
                                                       "train.max_steps": 2, "validation.every": 0})
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN
    tensors = load_file(output_dir / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 and t.abs().sum() > 0 for t in tensors.values())
    assert (output_dir / "samples" / "step-000002.png").exists()


def test_without_periodic_checkpoints_a_rerun_resumes_and_max_steps_extends(tmp_path, class_dir, capsys):
    options = {"train.checkpoint_every": 0, "train.max_steps": 2, "validation.every": 0}
    output_dir = train(tmp_path / "run", class_dir, **options)
    assert [p.name for p in (output_dir / "checkpoints").iterdir()] == ["step-000002"]  # the final state
    metrics = (output_dir / "metrics.jsonl").read_text()
    capsys.readouterr()

    saved_config = (output_dir / "config.yaml").read_text()
    train(tmp_path / "run", class_dir, **options)
    assert "already holds the finished run (2 steps)" in capsys.readouterr().out
    assert (output_dir / "metrics.jsonl").read_text() == metrics  # nothing trained again
    train(tmp_path / "run", class_dir, **{**options, "train.max_steps": 1})  # lowered: nothing to do either
    assert "already holds the finished run (2 steps)" in capsys.readouterr().out
    assert (output_dir / "config.yaml").read_text() == saved_config  # still the config of what is in the folder

    train(tmp_path / "run", class_dir, **{**options, "train.max_steps": 3})
    assert "Resuming from" in capsys.readouterr().out
    assert json.loads((output_dir / "summary.json").read_text())["steps"] == 3
    steps = [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_extra_trainable_parameters_train_in_float32(tiny_model_dir):
    """bias: all makes base biases trainable; kept in bf16, an Adam step of 1e-3 would round away."""
    from peft import WaveFTConfig

    from waveft_train.models.loading import load_components
    from waveft_train.train.optim import trainable_parameters_in_float32
    from waveft_train.waveft import register

    register()
    unet = load_components(str(tiny_model_dir), weight_dtype=torch.bfloat16).unet
    unet.add_adapter(WaveFTConfig(n_frequency=64, target_modules=["to_q", "to_v"], bias="all"))
    trainable = trainable_parameters_in_float32(unet)
    biases = [p for name, p in unet.named_parameters() if p.requires_grad and name.endswith(".bias")]
    assert len(biases) > 50 and all(p.dtype == torch.float32 for p in trainable)
    assert unet.conv_in.weight.dtype == torch.bfloat16  # frozen weights keep their dtype
    before = [p.detach().clone() for p in biases]
    for p in trainable:
        p.grad = torch.ones_like(p)
    torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0).step()
    assert all(torch.allclose(b - p.detach(), torch.full_like(p, 1e-3), atol=1e-6) for b, p in zip(before, biases))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, []),
        ({"waveft.wavelet_family": "db10"}, []),
        ({"waveft.wavelet_family": "db11"}, ["stock peft does not reproduce this adapter"]),
        ({"waveft.wavelet_family": "coif4"}, ["stock peft does not reproduce this adapter"]),
        ({"waveft.wavelet_family": "coif6", "waveft.use_idwt": False}, []),  # without the IDWT no filter is used
        ({"waveft.bias": "waveft_only", "waveft.wavelet_family": "sym11"}, ["stock peft does not"]),
        ({"waveft.bias": "waveft_only"}, []),  # peft's own meaning: stock peft loads it
    ],
)
def test_what_stock_peft_would_not_reproduce_is_named_in_the_card(tmp_path, overrides, expected):
    config = load_config(DEMO, fast_overrides(tmp_path / "run", tmp_path / "class", **overrides))
    caveats = stock_peft_caveats(config.waveft)
    assert len(caveats) == len(expected) and all(part in caveat for part, caveat in zip(expected, caveats))
    card = model_card(base_model="tiny", waveft=config.waveft, data=config.data, prior=config.prior, train=config.train,
                      validation_prompts=config.validation.prompts, trainable_params=1, steps=1, has_samples=False)
    assert all(f"**Note:** {caveat}" in card for caveat in caveats)
    assert ("**Note:**" in card) == bool(caveats)


def test_waveft_only_trains_the_adapted_layers_biases_and_stock_peft_loads_them(tmp_path, class_dir):
    """peft's `<method>_only`: the adapted layers' own biases train and save as base_layer.bias; stock peft loads the
    adapter with the same outputs as ours, so the card carries no caveat."""
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    from waveft_train.models.tiny import tiny_model_dir
    from waveft_train.waveft import register, unregister

    output_dir = train(tmp_path / "run", class_dir, **{"waveft.bias": "waveft_only", "train.max_steps": 2,
                                                       "validation.every": 0, "train.learning_rate": 1e-2})
    keys = load_file(output_dir / "adapter" / "adapter_model.safetensors").keys()
    # peft's meaning of waveft_only: the adapted layers' own biases (SDXL: to_out.0), saved as base_layer.bias
    assert any(key.endswith("to_out.0.base_layer.bias") for key in keys)
    assert not any(key.endswith(".waveft_bias") for key in keys)
    assert "**Note:**" not in (output_dir / "adapter" / "README.md").read_text()
    torch.manual_seed(0)
    inputs = (torch.randn(1, 4, 16, 16), torch.tensor([500]))
    kwargs = dict(encoder_hidden_states=torch.randn(1, 77, 64),
                  added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])})
    outputs = []
    for tuner in (register, unregister):
        tuner()
        try:
            unet = UNet2DConditionModel.from_pretrained(tiny_model_dir(), subfolder="unet")
            with torch.no_grad():
                outputs.append(PeftModel.from_pretrained(unet, output_dir / "adapter")(*inputs, **kwargs).sample)
        finally:
            register()
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir(), subfolder="unet")
    with torch.no_grad():
        before = base(*inputs, **kwargs).sample
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    assert (outputs[0] - before).abs().max() > 1e-6


def test_train_compile_runs_training_steps_through_one_graph_and_validation_eagerly(tmp_path, class_dir, monkeypatch):
    """train.compile: the loop's UNet calls go through torch.compile (traced by dynamo here with a counting eager
    backend; inductor's code generation takes minutes on the CPU), as one graph (no graph break anywhere in the
    adapted UNet), compiled once for one latent size; validation samples through the eager UNet; the adapter is the
    eager run's."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend=counting_backend))
    settings = {"data.bucketing": False, "train.max_steps": 3, "validation.every": 0, "train.checkpoint_every": 0}
    compiled = train(tmp_path / "compiled", class_dir, **{"train.compile": True, **settings})
    assert len(graphs) == 1  # one graph, made at the first step: no graph break, no recompilation, none for sampling
    assert (compiled / "samples" / "step-000003.png").exists()
    eager = train(tmp_path / "eager", class_dir, **settings)
    ours, theirs = (load_file(folder / "adapter" / "adapter_model.safetensors") for folder in (compiled, eager))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)
