"""The memory estimate (waveft_train/train/memory.py) against a real training step, and its shape.

The real measurement: one training step of the tiny UNet with waveft-train's adapter on the CPU (real kernels,
fp32), counting the bytes of live tensor storages at the dispatcher (benchmarks/memory_tracking.py's LiveBytes):
the CPU counterpart of torch.cuda.max_memory_allocated. The estimate has to be within TOLERANCE of it.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.memory_tracking import LiveBytes
from waveft_train.train.memory import GiB, estimate_training_memory, sizes_of, smallest_gpu

TOLERANCE = 0.10  # relative, on the training step's total (resident state + the step's peak); measured: 1-3 %
SDXL_RECIPE = {  # the SDXL-base UNet with waveft-train's default adapter (n_frequency 2592 on 560 attention linears)
    "unet_params": 2_567_463_684, "trainable_params": 560 * 2592, "adapter_buffer_bytes": 173 * 2**20,
}  # fmt: skip


def sdxl_unet_config() -> dict:
    from waveft_train.models.architecture import SDXL_BASE

    return dict(SDXL_BASE.unet)


def measured_step(tiny_model_dir, *, latent: int, batch: int, gradient_checkpointing: bool):
    """(live bytes at the step's peak, the UNet): AdamW state exists, as from the second step of a run on."""
    from diffusers import UNet2DConditionModel
    from peft import WaveFTConfig

    from waveft_train import waveft

    torch.manual_seed(0)
    waveft.register()
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").requires_grad_(False)
    unet.add_adapter(WaveFTConfig(n_frequency=64, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def step() -> None:
        prediction = unet(
            torch.randn(batch, config.in_channels, latent, latent), torch.randint(0, 1000, (batch,)),
            encoder_hidden_states=torch.randn(batch, 77, config.cross_attention_dim),
            added_cond_kwargs={"text_embeds": torch.randn(batch, pooled), "time_ids": torch.randn(batch, 6)},
            return_dict=False,
        )[0]  # fmt: skip
        torch.nn.functional.mse_loss(prediction, torch.randn_like(prediction)).backward()

    step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with LiveBytes() as tracker:
        tensors = [*unet.parameters(), *unet.buffers()]
        tensors += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        tracker.track(*tensors)
        tracker.reset_peak()
        step()
    return tracker.peak, unet


@pytest.mark.parametrize(("resolution", "gradient_checkpointing"), [(64, False), (128, True)])
def test_estimate_is_within_tolerance_of_a_real_step_on_the_tiny_unet(tiny_model_dir, resolution, gradient_checkpointing):
    latent = resolution // 2  # the tiny VAE halves the image side
    peak, unet = measured_step(tiny_model_dir, latent=latent, batch=2, gradient_checkpointing=gradient_checkpointing)
    estimate = estimate_training_memory(
        dict(unet.config), **sizes_of(unet), resolution=resolution, batch_size=1, prior=True,
        gradient_checkpointing=gradient_checkpointing, weight_dtype="fp32", mixed_precision="no", vae_scale_factor=2,
    )  # fmt: skip
    # CUDA's cuBLAS/cuDNN workspaces are part of the estimate (for GPUs); a CPU step has none
    assert estimate["training_step"] - estimate["library_workspaces"] == pytest.approx(peak, rel=TOLERANCE)


def test_sizes_of_counts_the_adapter_on_the_meta_device():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from peft import WaveFTConfig, inject_adapter_in_model

    from waveft_train import waveft

    config = sdxl_unet_config()
    config["transformer_layers_per_block"] = (1, 1, 1)  # fewer layers: the same counting, a quicker test
    waveft.register()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
        inject_adapter_in_model(WaveFTConfig(n_frequency=2592, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), unet)
    sizes = sizes_of(unet)
    layers = sum(isinstance(module, waveft.WaveFTLayer) for module in unet.modules())
    assert sizes["trainable_params"] == layers * 2592
    assert 200 * 1024 < sizes["adapter_buffer_bytes"] / layers < 400 * 1024  # ~300 KiB of index tensors per layer
    assert sizes["unet_params"] + sizes["trainable_params"] == sum(p.numel() for p in unet.parameters())


def estimate(**overrides) -> dict:
    return estimate_training_memory(sdxl_unet_config(), **{**SDXL_RECIPE, **overrides})


def test_the_papers_recipe_fits_in_12_gb_by_the_estimate():
    """configs/subject.yaml: the fp16-fix VAE in bf16; with SDXL's own VAE (fp32) validation sampling needs 16 GB."""
    recipe = estimate(resolution=1024, batch_size=1, prior=True, gradient_checkpointing=True, vae_dtype="bf16",
                      generate_class_images=True)  # fmt: skip
    assert smallest_gpu(recipe["training_step"]) == 12 and smallest_gpu(recipe["peak"]) == 12
    own_vae = estimate(resolution=1024, batch_size=1, prior=True, gradient_checkpointing=True, vae_dtype="fp32")
    assert smallest_gpu(own_vae["peak"]) == 16


def test_the_estimate_reproduces_the_gpu_measurement():
    """`python -m benchmarks.memory --device cuda` on an H200 (BENCHMARKS.md §6): ours at 1024 px, batch 1 + class
    image, checkpointing on, bf16: training step 6.704 GiB allocated; with the fp16-fix VAE validation sampling 9.007
    and class-image generation 8.838 GiB (sums of measured parts), both before the 0.086 GiB of library workspaces."""
    measured = {"training_step": 6.704, "validation_sampling": 9.007 + 0.086, "class_image_generation": 8.838 + 0.086}
    recipe = estimate(resolution=1024, batch_size=1, prior=True, gradient_checkpointing=True, vae_dtype="bf16",
                      generate_class_images=True)  # fmt: skip
    for phase, gib in measured.items():
        assert recipe[phase] / GiB == pytest.approx(gib, rel=0.02), phase


@pytest.mark.parametrize(
    ("smaller", "larger"),
    [
        ({"resolution": 512}, {"resolution": 768}),
        ({"resolution": 768}, {"resolution": 1024}),
        ({"batch_size": 1}, {"batch_size": 2}),
        ({"prior": False}, {"prior": True}),
        ({"gradient_checkpointing": True}, {"gradient_checkpointing": False}),
        ({"optimizer": "adamw8bit"}, {"optimizer": "adamw"}),
        ({"optimizer": "adamw"}, {"optimizer": "prodigy"}),
        ({"ema": False}, {"ema": True}),
        ({"cache_latents": True}, {"cache_latents": False}),
        ({"text_encoders_in_training": False}, {"text_encoders_in_training": True}),  # data.shuffle_tags
        ({"weight_dtype": "bf16", "mixed_precision": "bf16"}, {"weight_dtype": "fp32", "mixed_precision": "no"}),
    ],
)
def test_estimate_grows_with_what_costs_memory(smaller, larger):
    small, large = estimate(**smaller), estimate(**larger)
    assert small["training_step"] < large["training_step"]
    assert small["peak"] <= large["peak"]
    assert small["activations"] <= large["activations"]


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy"])
def test_optimizer_state_bytes_are_the_optimizers_own(optimizer):
    """The estimate's bytes per trainable parameter against the state the optimizer really keeps after a step."""
    import prodigyopt

    from waveft_train.train.memory import OPTIMIZER_STATE_BYTES

    parameters = [torch.nn.Parameter(torch.randn(12, 7)), torch.nn.Parameter(torch.randn(30))]
    made = {"adamw": torch.optim.AdamW, "prodigy": prodigyopt.Prodigy}[optimizer](parameters)
    sum(parameter.square().sum() for parameter in parameters).backward()
    made.step()
    per_parameter = [tensor for parameter in parameters for tensor in made.state[parameter].values()
                     if isinstance(tensor, torch.Tensor) and tensor.numel() == parameter.numel()]  # not step counts
    stored = sum(tensor.numel() * tensor.element_size() for tensor in per_parameter)
    assert stored == OPTIMIZER_STATE_BYTES[optimizer] * sum(parameter.numel() for parameter in parameters)


def sdxl_config_folder(tmp_path, tiny_model_dir, *, vae_force_upcast: bool):
    """A model folder with SDXL-base's configs and no weights: enough for `params`, which builds on the meta device."""
    import json
    import shutil

    from waveft_train.models.architecture import SDXL_BASE

    folder = tmp_path / "sdxl-configs"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    configs = {"unet": {"_class_name": "UNet2DConditionModel", **SDXL_BASE.unet},
               "text_encoder": {"architectures": ["CLIPTextModel"], **SDXL_BASE.text_encoder},
               "text_encoder_2": {"architectures": ["CLIPTextModelWithProjection"], **SDXL_BASE.text_encoder_2},
               "vae": {"_class_name": "AutoencoderKL", **SDXL_BASE.vae, "force_upcast": vae_force_upcast}}
    for name, config in configs.items():
        (folder / name / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("vae_force_upcast", "peak_gpu"), [(False, "12 GB"), (True, "16 GB")])
def test_params_prints_the_memory_estimate_of_the_papers_recipe(tmp_path, tiny_model_dir, capsys, vae_force_upcast,
                                                                 peak_gpu):
    """configs/subject.yaml on SDXL-base's architecture: the training step and the run with an fp16-fix VAE fit 12 GB;
    with SDXL's own VAE (fp32) sampling needs 16 GB (BENCHMARKS.md §3's table)."""
    import re
    from pathlib import Path

    from tests.helpers import run_cli

    folder = sdxl_config_folder(tmp_path, tiny_model_dir, vae_force_upcast=vae_force_upcast)
    subject = Path(__file__).resolve().parents[1] / "configs" / "subject.yaml"
    code, out, err = run_cli(["params", "--config", subject, "--set", f"model.pretrained={folder}",
                              "--set", "model.vae=null"], capsys)
    assert code == 0, err
    assert "trainable parameters: 1,451,520" in out  # 560 layers × 2592
    step = re.search(r"training step\s+([\d.]+) GiB\s+fits (\d+) GB", out)
    assert step and abs(float(step.group(1)) - 6.70) < 0.15 and step.group(2) == "12", out  # measured on a GPU: 6.70
    assert re.search(rf"peak\s+[\d.]+ GiB: fits {peak_gpu}", out), out


def test_params_reads_a_separate_vae_from_a_pipeline_folder(tmp_path, tiny_model_dir, capsys):
    """model.vae may name a pipeline folder (its vae/ is used, as in training): its fp32 SDXL VAE sets the peak."""
    import re
    from pathlib import Path

    from tests.helpers import run_cli

    folder = sdxl_config_folder(tmp_path, tiny_model_dir, vae_force_upcast=True)
    subject = Path(__file__).resolve().parents[1] / "configs" / "subject.yaml"
    code, out, err = run_cli(["params", "--config", subject, "--set", f"model.pretrained={folder}",
                              "--set", f"model.vae={folder}"], capsys)
    assert code == 0, err
    assert re.search(r"peak\s+[\d.]+ GiB: fits 16 GB", out), out
