"""The embedded tiny SDXL model and the component loader: determinism, real round trips, caching, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from waveft_train.common.errors import UserError
from waveft_train.models import tiny
from waveft_train.models.loading import SDXLComponents, build_pipeline, load_components
from waveft_train.models.sources import resolve_pretrained

COMPONENT_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def files_by_name(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def generate(pipeline: StableDiffusionXLPipeline, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    result = pipeline("a photo of sks dog", num_inference_steps=2, height=64, width=64, generator=generator,
                      output_type="pt")  # fmt: skip
    return result.images


# --- the tiny model itself -------------------------------------------------------------------------------------


def test_build_is_byte_identical_and_leaves_global_rng_alone(tiny_model_dir: Path, tmp_path: Path):
    rng_before = torch.random.get_rng_state()
    rebuilt = tiny.build_tiny_pipeline(tmp_path / "rebuilt")
    assert torch.equal(torch.random.get_rng_state(), rng_before)

    original_files, rebuilt_files = files_by_name(tiny_model_dir), files_by_name(rebuilt)
    assert sorted(original_files) == sorted(rebuilt_files)
    weights = [name for name in original_files if name.endswith(".safetensors")]
    assert sorted(weights) == [
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    for name in weights:
        assert original_files[name] == rebuilt_files[name], name


def test_model_is_tiny_and_has_no_pickled_weights(tiny_model_dir: Path):
    files = files_by_name(tiny_model_dir)
    assert sum(len(data) for data in files.values()) < 8 * 1024 * 1024
    assert not [name for name in files if name.endswith((".bin", ".pt", ".ckpt", ".pkl"))]
    assert all((tiny_model_dir / name).is_dir() for name in COMPONENT_FOLDERS)


def test_round_trip_gives_sdxl_classes_with_consistent_config(tiny_model_dir: Path):
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)

    assert isinstance(pipeline.unet, UNet2DConditionModel)
    assert isinstance(pipeline.vae, AutoencoderKL)
    assert type(pipeline.text_encoder) is CLIPTextModel
    assert type(pipeline.text_encoder_2) is CLIPTextModelWithProjection
    assert isinstance(pipeline.tokenizer, CLIPTokenizer) and isinstance(pipeline.tokenizer_2, CLIPTokenizer)
    assert isinstance(pipeline.scheduler, EulerDiscreteScheduler)

    unet, te1, te2 = pipeline.unet.config, pipeline.text_encoder.config, pipeline.text_encoder_2.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size == 64
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim == 80
    assert tuple(unet.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert tuple(unet.up_block_types) == ("CrossAttnUpBlock2D", "UpBlock2D")
    assert tuple(unet.block_out_channels) == (32, 64)
    assert unet.sample_size == 32
    assert pipeline.vae.config.latent_channels == 4 and pipeline.vae.config.sample_size == 64
    assert pipeline.vae.config.scaling_factor == pytest.approx(0.13025)
    assert pipeline.vae_scale_factor == 2  # 64 px images <-> 32 px latents = the UNet's sample_size
    assert te1.max_position_embeddings == te2.max_position_embeddings == 77

    scheduler = pipeline.scheduler.config
    assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (scheduler.num_train_timesteps, scheduler.timestep_spacing, scheduler.steps_offset) == (1000, "leading", 1)

    # Attention linears the tuner targets exist, including a second transformer layer in the 64-channel blocks.
    names = {name for name, _ in pipeline.unet.named_modules()}
    assert "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k" in names
    assert "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in names


def test_tokenizers_make_whole_word_tokens_and_pad_to_77(tiny_model_dir: Path):
    for subfolder in ("tokenizer", "tokenizer_2"):
        tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder=subfolder)
        assert tokenizer.model_max_length == 77
        ids = tokenizer("a photo of sks dog").input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == [
            "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>", "<|endoftext|>",
        ]  # fmt: skip
        for word in tiny.PROMPT_WORDS:
            assert tokenizer.convert_ids_to_tokens(tokenizer(word).input_ids)[1:-1] == [word + "</w>"]
        # Text outside the word list still tokenizes byte by byte, never to the unknown (= end) token.
        inner = tokenizer("Zebra, 42 crème!").input_ids[1:-1]
        assert len(inner) > 4 and tokenizer.eos_token_id not in inner
        padded = tokenizer("word " * 200, padding="max_length", truncation=True, max_length=77).input_ids
        assert len(padded) == 77


def test_two_step_generation_makes_a_64px_image_reproducibly(tiny_model_dir: Path):
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    pipeline.set_progress_bar_config(disable=True)
    first, again = generate(pipeline, seed=0), generate(pipeline, seed=0)
    assert first.shape == (1, 3, 64, 64)
    assert torch.isfinite(first).all() and first.std() > 0
    assert torch.equal(first, again)
    assert pipeline("a dog", num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)


# --- the cache -----------------------------------------------------------------------------------------------


def fake_build(path: Path) -> Path:
    """Stands in for the real (seconds-long) build: writes the folder layout a complete build has."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text("{}")
    for name in COMPONENT_FOLDERS:
        (path / name).mkdir()
    return path


def test_cache_builds_once_under_a_versioned_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    builds: list[Path] = []
    monkeypatch.setattr(tiny, "build_tiny_pipeline", lambda path: builds.append(path) or fake_build(path))
    monkeypatch.setenv("WAVEFT_TRAIN_CACHE", str(tmp_path / "cache"))

    first = tiny.tiny_model_dir()
    second = tiny.tiny_model_dir()
    assert first == second == tmp_path / "cache" / tiny.TINY_MODEL_VERSION
    assert tiny.TINY_MODEL_VERSION == "tiny-sdxl-v1"
    assert len(builds) == 1 and builds[0].parent == first.parent and builds[0] != first  # built in a sibling
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [tiny.TINY_MODEL_VERSION]
    assert resolve_pretrained("tiny") == str(first)


def test_cache_ignores_leftover_temp_folder_and_replaces_damaged_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tiny, "build_tiny_pipeline", fake_build)
    leftover = tmp_path / f".{tiny.TINY_MODEL_VERSION}.building-crashed"
    leftover.mkdir(parents=True)
    (leftover / "half-written.safetensors").write_bytes(b"junk")
    damaged = tmp_path / tiny.TINY_MODEL_VERSION
    damaged.mkdir()
    (damaged / "model_index.json").write_text("{}")  # component folders missing

    result = tiny.tiny_model_dir(tmp_path)
    assert result == damaged and tiny.is_complete_model_dir(result)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([leftover.name, damaged.name])


def test_cache_uses_the_winner_when_another_process_renames_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / tiny.TINY_MODEL_VERSION

    def racing_build(path: Path) -> Path:
        fake_build(path)
        winner = fake_build(tmp_path / "winner")
        (winner / "winner.txt").write_text("first")
        winner.rename(target)  # the other process finishes while we are still building
        return path

    monkeypatch.setattr(tiny, "build_tiny_pipeline", racing_build)
    assert tiny.tiny_model_dir(tmp_path) == target
    assert (target / "winner.txt").read_text() == "first"
    assert [path.name for path in tmp_path.iterdir()] == [target.name]  # our staging folder was removed


def test_cache_build_failure_propagates_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def failing_build(path: Path) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(tiny, "build_tiny_pipeline", failing_build)
    with pytest.raises(OSError, match="disk full"):
        tiny.tiny_model_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- load_components / build_pipeline ------------------------------------------------------------------------


def test_load_components_freezes_everything_in_fp32_by_default(tiny_model_dir: Path):
    components = load_components(str(tiny_model_dir))
    assert isinstance(components, SDXLComponents)
    modules = [components.unet, components.vae, components.text_encoder, components.text_encoder_2]
    for module in modules:
        assert all(not parameter.requires_grad for parameter in module.parameters())
        assert {parameter.dtype for parameter in module.parameters()} == {torch.float32}
        assert not module.training
    assert components.model_path == str(tiny_model_dir.resolve())
    assert components.vae_scaling_factor == pytest.approx(0.13025)
    assert components.vae_force_upcast is True
    assert isinstance(components.scheduler, EulerDiscreteScheduler)
    noise_scheduler = components.training_noise_scheduler()
    assert isinstance(noise_scheduler, DDPMScheduler)
    assert torch.equal(noise_scheduler.betas, components.scheduler.betas)


def test_load_components_honours_dtypes(tiny_model_dir: Path):
    upcast = load_components(str(tiny_model_dir), weight_dtype=torch.bfloat16)
    for module in (upcast.unet, upcast.text_encoder, upcast.text_encoder_2):
        assert {parameter.dtype for parameter in module.parameters()} == {torch.bfloat16}
    assert upcast.vae.dtype == torch.float32  # force_upcast VAE stays fp32 unless asked otherwise

    explicit = load_components(str(tiny_model_dir), weight_dtype=torch.float16, vae_dtype=torch.bfloat16)
    assert explicit.unet.dtype == explicit.text_encoder_2.dtype == torch.float16
    assert {parameter.dtype for parameter in explicit.vae.parameters()} == {torch.bfloat16}
    assert not any(parameter.requires_grad for parameter in explicit.vae.parameters())


def test_load_components_tiny_and_separate_vae(tiny_model_dir: Path, tmp_path: Path):
    vae_only = shutil.copytree(tiny_model_dir / "vae", tmp_path / "my-vae")
    config = json.loads((vae_only / "config.json").read_text())
    (vae_only / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5, "force_upcast": False}))

    components = load_components("tiny", vae=str(vae_only), weight_dtype=torch.bfloat16)
    assert components.model_path == str(tiny_model_dir)  # 'tiny' resolves to the session cache
    assert components.vae_scaling_factor == 0.5 and components.vae_force_upcast is False
    assert components.vae.dtype == torch.bfloat16  # a VAE without force_upcast follows weight_dtype

    from_pipeline_folder = load_components("tiny", vae=str(tiny_model_dir))  # uses its vae/ subfolder
    assert from_pipeline_folder.vae_scaling_factor == pytest.approx(0.13025)


def test_build_pipeline_reuses_loaded_modules(tiny_components: SDXLComponents):
    pipeline = build_pipeline(tiny_components)
    assert pipeline.unet is tiny_components.unet and pipeline.vae is tiny_components.vae
    assert pipeline.text_encoder is tiny_components.text_encoder
    assert pipeline.text_encoder_2 is tiny_components.text_encoder_2
    assert pipeline.tokenizer_2 is tiny_components.tokenizer_2
    assert pipeline.scheduler is not tiny_components.scheduler  # pipelines mutate their scheduler
    assert dict(pipeline.scheduler.config) == dict(tiny_components.scheduler.config)
    assert pipeline._progress_bar_config == {"disable": True}

    reference = StableDiffusionXLPipeline.from_pretrained(tiny_components.model_path)
    reference.set_progress_bar_config(disable=True)
    assert torch.allclose(generate(pipeline), generate(reference))

    other_unet = UNet2DConditionModel.from_pretrained(tiny_components.model_path, subfolder="unet")
    assert build_pipeline(tiny_components, unet=other_unet).unet is other_unet
    assert build_pipeline(tiny_components, progress_bar=True)._progress_bar_config == {"disable": False}


# --- user errors ---------------------------------------------------------------------------------------------


def test_missing_local_folder_is_a_user_error(tmp_path: Path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(UserError) as caught:
        load_components(str(missing))
    message = str(caught.value)
    assert str(missing) in message and "no such folder" in message
    assert "`tiny`" in message and "hub id" in message and "local diffusers folder" in message


def test_folder_without_a_diffusers_model_is_a_user_error(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(UserError, match="model_index.json"):
        resolve_pretrained(str(tmp_path))


def test_unknown_hub_id_fails_fast_offline():
    with pytest.raises(UserError) as caught:
        load_components("waveft-tests/no-such-sdxl-model")
    message = str(caught.value)
    assert "'waveft-tests/no-such-sdxl-model'" in message
    assert "HF_HUB_OFFLINE=1" in message and "`tiny`" in message


def test_invalid_hub_id_is_a_user_error():
    with pytest.raises(UserError, match="not a valid hub id|nor a valid hub id"):
        resolve_pretrained("not a model id!")


def test_missing_safetensors_weights_are_a_user_error(tiny_model_dir: Path, tmp_path: Path):
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="the unet of model"):
        load_components(str(broken))


def test_missing_separate_vae_is_a_user_error(tiny_model_dir: Path, tmp_path: Path):
    with pytest.raises(UserError, match="the VAE '.*missing-vae'"):
        load_components(str(tiny_model_dir), vae=str(tmp_path / "missing-vae"))
