"""WaveFT on SDXL's two CLIP text encoders (`waveft.text_encoders`), on the embedded tiny model: training changes them,
the saved encoder adapters reload exactly through stock peft, a crashed run resumes to the same adapters, the stop step
freezes them, the exports carry them under the apps' lora_te1_/lora_te2_ names (read by LyCORIS and diffusers), and
with the option off nothing changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import Interrupted, crash_after_checkpoint, fast_overrides
from safetensors.torch import load_file

from waveft_train.adapter.text_encoders import TEXT_ENCODERS
from waveft_train.config import config_fingerprint, load_config
from waveft_train.train import run

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny.yaml"
TEXT = {"waveft.text_encoders": "true", "train.max_steps": 4, "train.checkpoint_every": 2,
        "train.checkpoints_keep": "null", "validation.every": 0, "train.text_encoder_lr": "1.0e-2"}
ENCODER_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("class-images")


def train(output_dir: Path, class_dir: Path, **extra) -> Path:
    config = load_config(TINY, fast_overrides(output_dir, class_dir, **{**TEXT, **extra}))
    return run.train_from_config(config, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, class_dir) -> Path:
    return train(tmp_path_factory.mktemp("te") / "run", class_dir)


def spectra(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def token_ids(tokenizer, text: str = "a photo of sks toy") -> torch.Tensor:
    return tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encoder_outputs(encoder, ids) -> torch.Tensor:
    with torch.no_grad():
        output = encoder(ids, output_hidden_states=True)
    return torch.cat([output[0].flatten(), output.hidden_states[-2].flatten()])


def test_saved_encoder_adapters_change_the_encoders_and_reload_exactly_through_stock_peft(trained, tiny_model_dir):
    import transformers
    from peft import PeftModel

    from waveft_train.adapter.load import load_adapter_unet
    from waveft_train.models.loading import load_components
    from waveft_train.waveft import register

    adapter = trained / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()  # the UNet's, where it always was
    ours, _ = load_adapter_unet(adapter, None)  # what sample, export and evaluate load
    base = load_components(str(tiny_model_dir))
    register()
    for name in TEXT_ENCODERS:
        saved = spectra(adapter / name)
        assert saved and all(key.startswith("base_model.model.") and key.endswith(".waveft_spectrum") for key in saved)
        assert {key.split(".")[-2] for key in saved} == {"q_proj", "k_proj", "v_proj", "out_proj"}
        # Every layer trained, but text_encoder's last one: SDXL reads its next-to-last hidden states (and not its
        # pooled output), so that layer gets no gradient, as in every trainer that adapts all of CLIP's layers.
        unused = "encoder.layers.1." if name == "text_encoder" else "none"
        assert all((value.abs().sum() > 0) == (unused not in key) for key, value in saved.items()), name
        tokenizer = base.tokenizer if name == "text_encoder" else base.tokenizer_2
        ids = token_ids(tokenizer)
        plain = getattr(transformers, ENCODER_CLASSES[name]).from_pretrained(tiny_model_dir, subfolder=name).eval()
        before = encoder_outputs(plain, ids)
        stock = PeftModel.from_pretrained(plain, str(adapter / name)).eval()
        after = encoder_outputs(stock, ids)
        assert not torch.allclose(before, after)  # training changed what the encoder says
        assert torch.equal(after, encoder_outputs(getattr(ours, name), ids))  # stock peft = our loader, exactly


def test_a_crashed_run_resumes_to_the_same_adapters(trained, tmp_path, class_dir, monkeypatch):
    output_dir = tmp_path / "crashed"
    crash_after_checkpoint(monkeypatch, 2)
    with pytest.raises(Interrupted):
        train(output_dir, class_dir)
    monkeypatch.undo()
    assert {path.name for path in (output_dir / "checkpoints" / "step-000002").iterdir()} >= set(TEXT_ENCODERS)
    train(output_dir, class_dir)
    for folder in ("", *TEXT_ENCODERS):
        resumed, uninterrupted = spectra(output_dir / "adapter" / folder), spectra(trained / "adapter" / folder)
        assert resumed.keys() == uninterrupted.keys()
        for key in resumed:
            torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0, msg=key)


def test_the_stop_step_freezes_the_encoders_after_it(tmp_path, class_dir):
    output_dir = train(tmp_path / "stop", class_dir, **{"train.text_encoder_stop_step": 2})
    at_stop, final = output_dir / "checkpoints" / "step-000002", output_dir / "adapter"
    for name in TEXT_ENCODERS:
        trained_then, at_end = spectra(at_stop / name), spectra(final / name)
        assert any(value.abs().sum() > 0 for value in trained_then.values())  # they trained until the stop step
        assert all(torch.equal(trained_then[key], at_end[key]) for key in at_end)  # and not after it
    unet_then, unet_end = spectra(at_stop), spectra(final)
    assert any(not torch.equal(unet_then[key], unet_end[key]) for key in unet_end)  # the UNet kept training


def test_off_keeps_the_cached_prompts_the_fingerprint_and_the_layout(tmp_path, class_dir, monkeypatch):
    from waveft_train.data import encode

    built = []
    real = encode.PromptCache.__init__
    monkeypatch.setattr(encode.PromptCache, "__init__", lambda self, *a, **k: (built.append(1), real(self, *a, **k))[1])
    config = load_config(TINY, fast_overrides(tmp_path / "off", class_dir, **{"train.max_steps": 2}))
    explicit = load_config(TINY, fast_overrides(tmp_path / "off", class_dir, **{"train.max_steps": 2,
                                                                                 "waveft.text_encoders": "false"}))
    assert config_fingerprint(config) == config_fingerprint(explicit)
    output_dir = run.train_from_config(config, progress=False)
    assert built  # prompts encoded once, up front, as before
    assert not any((output_dir / "adapter" / name).exists() for name in TEXT_ENCODERS)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.text_encoder_stop_step": 9, "train.max_steps": 4, "waveft.text_encoders": "true"}, "past train.max_steps"),
    ({"train.text_encoder_lr": "1.0e-4"}, "waveft.text_encoders is false"),
    ({"waveft.text_encoders": "true", "train.text_encoder_stop_step": 0}, "greater than 0"),
    ({"waveft.text_encoders": "true", "waveft.text_encoder_n_frequency": -3}, "greater than 0"),
    ({"waveft.text_encoders": "true", "train.optimizer": "prodigy", "train.learning_rate": 1.0,
      "train.text_encoder_lr": "1.0e-4"}, "barely train"),
])
def test_bad_text_encoder_settings_are_refused_while_the_config_loads(tmp_path, overrides, message):
    from waveft_train.common.errors import UserError

    with pytest.raises(UserError, match=message):
        load_config(TINY, fast_overrides(tmp_path / "bad", tmp_path / "class", **overrides))


# --------------------------------------------------------------------------------------------- exports for apps
class TextModelLevel(torch.nn.Module):
    """CLIPTextModel as sd-scripts, ComfyUI and A1111 lay it out (its layers under `text_model.`, as transformers < 5
    did too): how LyCORIS names the first encoder's modules for `lora_te1_text_model_...` keys."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.text_model = encoder


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def adapted(trained):
    """The trained adapter as our loader applies it (UNet and both encoders)."""
    from waveft_train.adapter.load import load_adapter_unet

    return load_adapter_unet(trained / "adapter", None)[0]


def test_comfyui_file_carries_the_encoders_as_lora_te_keys_that_lycoris_applies(trained, adapted, tiny_model_dir,
                                                                                  tmp_path, monkeypatch):
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    from waveft_train.adapter.export import export
    from waveft_train.models.loading import load_components

    out = export(trained / "adapter", tmp_path / "subject.safetensors", format="comfyui", dtype="fp32").path
    keys = set(load_file(out))
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.diff" in keys
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.diff" in keys
    assert len([key for key in keys if key.startswith("lora_te")]) == 16  # 2 encoders x 2 layers x 4 projections

    base = load_components(str(tiny_model_dir))
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])  # see test_interop.lycoris_applied
    encoders = [TextModelLevel(base.text_encoder), base.text_encoder_2]
    network, _ = create_network_from_weights(1.0, str(out), None, encoders, base.unet, for_inference=True)
    network.apply_to(encoders, base.unet, apply_text_encoder=True, apply_unet=True)
    assert len(network.text_encoder_loras) == 16  # every encoder key found its module
    for name, tokenizer in (("text_encoder", base.tokenizer), ("text_encoder_2", base.tokenizer_2)):
        ids = token_ids(tokenizer)
        applied, ours = encoder_outputs(getattr(base, name), ids), encoder_outputs(getattr(adapted, name), ids)
        with network_off(network):
            plain = encoder_outputs(getattr(base, name), ids)
        assert relative(ours, plain) > 1e-4  # the adapter does change the encoder
        assert relative(applied, ours) <= 1e-5, name


def network_off(network):
    """LyCORIS's modules at multiplier 0 inside the block."""
    from contextlib import contextmanager

    @contextmanager
    def off():
        modules = network.unet_loras + network.text_encoder_loras
        for module in modules:
            module.multiplier = 0.0
        try:
            yield
        finally:
            for module in modules:
                module.multiplier = 1.0

    return off()


def test_lora_file_carries_the_encoders_and_diffusers_loads_them(trained, adapted, tiny_model_dir, tmp_path):
    from waveft_train.adapter.export import export
    from waveft_train.adapter.export_files import text_encoder_updates
    from waveft_train.models.loading import build_pipeline, load_components

    result = export(trained / "adapter", tmp_path / "lora.safetensors", format="lora", rank=4, dtype="fp32")
    encoder_errors = {key: error for key, error in result.errors.items() if key.startswith("lora_te")}
    assert len(encoder_errors) == 16 and "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in encoder_errors
    pipeline = build_pipeline(load_components(str(tiny_model_dir)))
    before = {name: {key: value.clone() for key, value in getattr(pipeline, name).state_dict().items()}
              for name in TEXT_ENCODERS}
    pipeline.load_lora_weights(str(result.path.parent), weight_name=result.path.name)
    pipeline.fuse_lora(components=["unet", *TEXT_ENCODERS])
    deltas = {key: update.delta for key, update in text_encoder_updates(trained / "adapter", str(tiny_model_dir), None)}
    checked = 0
    for name in TEXT_ENCODERS:
        after = {key.replace(".base_layer.", "."): value for key, value in getattr(pipeline, name).state_dict().items()
                 if "lora_" not in key}
        for key, delta in deltas.items():
            if not key.startswith("lora_te1" if name == "text_encoder" else "lora_te2"):
                continue
            module = key.split("_", 2)[2].removeprefix("text_model_")  # e.g. encoder_layers_0_self_attn_q_proj
            weight = next(param for param in after if param.endswith(".weight") and
                          param.removesuffix(".weight").replace(".", "_").endswith(module))
            applied = after[weight] - before[name][weight]
            if delta.norm() == 0:  # text_encoder's last layer: SDXL never reads it, so it does not train
                assert applied.norm() <= 1e-6
                continue
            assert relative(applied, delta) == pytest.approx(encoder_errors[key], abs=1e-4), key
            checked += 1
    assert checked >= 12


def test_params_counts_the_encoders_and_refuses_an_n_frequency_they_cannot_hold(capsys):
    from helpers import run_cli

    code, out, err = run_cli(["params", "-c", TINY, "--set", "waveft.text_encoders=true",
                              "--set", "waveft.text_encoder_n_frequency=100"], capsys)
    assert code == 0, err
    assert "text_encoder.encoder.layers.0.self_attn.q_proj" in out
    assert "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj" in out
    _, without, _ = run_cli(["params", "-c", TINY], capsys)
    count = {text: int(next(line for line in text.splitlines() if line.startswith("trainable parameters:"))
                       .split(":")[1].replace(",", "")) for text in (out, without)}
    assert count[out] - count[without] == 16 * 100  # 2 encoders x 2 layers x 4 projections
    code, _, err = run_cli(["params", "-c", TINY, "--set", "waveft.text_encoders=true",
                            "--set", "waveft.text_encoder_n_frequency=5000"], capsys)
    assert code != 0 and "text_encoder_n_frequency" in err


def test_the_documented_peft_snippet_gives_a_pipeline_our_prompt_embeddings(trained, adapted, tiny_model_dir):
    from peft import PeftModel

    from waveft_train.models.loading import build_pipeline, load_components
    from waveft_train.waveft import register

    register()
    pipe = build_pipeline(load_components(str(tiny_model_dir)))
    for name in TEXT_ENCODERS:  # docs/training.md and the model card, with this run's folder
        setattr(pipe, name, PeftModel.from_pretrained(getattr(pipe, name), str(trained / "adapter" / name)))
    ours = build_pipeline(adapted)
    with torch.no_grad():
        theirs = pipe.encode_prompt("a photo of sks toy", do_classifier_free_guidance=False)
        expected = ours.encode_prompt("a photo of sks toy", do_classifier_free_guidance=False)
    for got, want in zip(theirs, expected):
        if want is not None:
            assert torch.equal(got, want)


def test_two_processes_train_the_same_encoders_as_one(tmp_path, class_dir, trains_on_the_cpu):
    """The encoders are not wrapped in DDP: the loop averages their gradients over the processes itself."""
    import subprocess

    from test_scale_out import environment, launch, overrides, set_args

    settings = {"waveft.text_encoders": "true", "train.text_encoder_lr": "1.0e-2"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes: CPU sums split by thread count round differently
    try:
        one = run.train_from_config(load_config(TINY, overrides(tmp_path / "one", class_dir, **settings,
                                                                **{"train.batch_size": 2})), progress=False)
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    launched = subprocess.run([*launch(2), *set_args(overrides(two, class_dir, **settings))], env=environment(),
                              capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    for name in TEXT_ENCODERS:
        first, second = spectra(one / "adapter" / name), spectra(two / "adapter" / name)
        difference = torch.cat([(first[key] - second[key]).flatten() for key in first]).norm()
        size = torch.cat([value.flatten() for value in first.values()]).norm()
        assert size > 0 and difference / size <= 1e-5, name


def test_sample_uses_the_adapted_encoders_and_its_base_columns_switch_them_off(trained, tmp_path, capsys):
    import shutil

    import numpy as np
    from helpers import run_cli
    from PIL import Image

    unet_only = tmp_path / "unet-only"
    shutil.copytree(trained / "adapter", unet_only, ignore=shutil.ignore_patterns("text_encoder*"))
    grids = {}
    for label, adapter in (("both", trained / "adapter"), ("unet", unet_only)):
        out = tmp_path / f"{label}.png"
        code, _, err = run_cli(["sample", "--adapter", adapter, "--out", out, "--steps", 2, "--num-images", 1,
                                "--prompt", "a photo of sks toy", "--compare-base"], capsys)
        assert code == 0, err
        grids[label] = np.asarray(Image.open(out).convert("RGB")).astype(int)
    width = grids["both"].shape[1]
    size = grids["both"].shape[0]  # one row of square tiles: base, a gap, adapter
    assert np.array_equal(grids["both"][:, :size], grids["unet"][:, :size])  # base columns: the base model, both times
    assert not np.array_equal(grids["both"][:, width - size:], grids["unet"][:, width - size:])  # the encoders count


def test_steps_that_train_the_encoders_make_no_syncing_call(tmp_path, tiny_model_dir):
    """Issue 35's rule holds with the encoders in the step: before their stop step (with gradients) and after it."""
    from test_no_sync import SyncRecorder

    from scripts.sync_check import train_with_step_guard

    recorders = []

    def recording(kwargs):
        optimizer = kwargs["optimizer"].optimizer

        def optimizer_step_count(name, args):  # as test_no_sync: AdamW's host-side step counts wait for no device
            counts = [state["step"] for state in optimizer.state.values() if "step" in state]
            return name == "_local_scalar_dense" and any(args[0] is count for count in counts)

        recorders.append(SyncRecorder(optimizer_step_count))
        return recorders[-1]

    overrides = {"output.dir": tmp_path / "run", "prior.class_dir": tmp_path / "class", "prior.num_class_images": 2,
                 "prior.generation_steps": 2, "data.resolution": 32, "train.max_steps": 3, "train.checkpoint_every": 0,
                 "train.gradient_accumulation": 2, "validation.every": 0, "validation.prompts": "[]",
                 "waveft.n_frequency": 64, "waveft.text_encoders": "true", "train.text_encoder_stop_step": 2,
                 "data.caption_dropout": 0.5}  # dropped captions: zeros beside encoded prompts
    config = load_config(TINY, [f"{key}={value}" for key, value in overrides.items()])
    train_with_step_guard(config, recording)
    assert len(recorders) == 4 and all(recorder.seen > 1000 for recorder in recorders[:3])
    assert [recorder.calls for recorder in recorders] == [[], [], [], []]


def test_a_run_crashed_at_the_stop_step_resumes_to_the_uninterrupted_adapters(tmp_path, class_dir, monkeypatch):
    stop = {"train.text_encoder_stop_step": 2}
    uninterrupted = train(tmp_path / "straight", class_dir, **stop)
    crash_after_checkpoint(monkeypatch, 2)
    with pytest.raises(Interrupted):
        train(tmp_path / "crashed", class_dir, **stop)
    monkeypatch.undo()
    resumed = train(tmp_path / "crashed", class_dir, **stop)
    for folder in ("", *TEXT_ENCODERS):
        first, second = spectra(resumed / "adapter" / folder), spectra(uninterrupted / "adapter" / folder)
        assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first), folder
