"""The runs benchmarks.memory measures: one adapted SDXL (or tiny) UNet training step, UNet inference, the VAE.

Each `Session` holds one adapted UNet, fake (built on the meta device, then given fake tensors: nothing is
allocated) or real (cpu, cuda), and counts live tensor bytes the way torch.cuda.max_memory_allocated does
(benchmarks/memory_tracking.py), or asks CUDA itself on a GPU.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.memory_tracking import LiveBytes, cuda_like_kernels, fake_weights, module_tensors, reference_without_bounds_mask
from waveft_train.models.architecture import SDXL_BASE

GiB = 2**30
METHODS = ("ours", "lora", "reference")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TEXT_TOKENS = 77


@dataclass(frozen=True)
class Step:
    """One training-step setting."""

    model: str = "sdxl"  # or "tiny" (waveft_train.models.tiny)
    latent: int = 128  # latent side: pixels / 8 for SDXL
    batch: int = 2  # latents per micro-batch: batch_size, doubled by prior preservation
    method: str = "ours"
    checkpointing: bool = True
    dtype: str = "bf16"  # frozen weights; bf16/fp16 run under autocast in that dtype, fp32 without autocast
    micro_steps: int = 2
    n_frequency: int = 0  # 0: 2592 for sdxl, 256 for tiny
    transformer_layers: tuple = ()  # () = the model's own depth

    @property
    def frequencies(self) -> int:
        return self.n_frequency or (2592 if self.model == "sdxl" else 256)


def unet_config(step: Step) -> dict:
    if step.model == "tiny":
        from diffusers import UNet2DConditionModel

        from waveft_train.models.tiny import tiny_model_dir

        config = {k: v for k, v in UNet2DConditionModel.load_config(tiny_model_dir() / "unet").items() if k[0] != "_"}
    else:
        config = dict(SDXL_BASE.unet)
    if step.transformer_layers:
        config["transformer_layers_per_block"] = tuple(step.transformer_layers)
    return config


def build_unet(step: Step, device: str) -> tuple[nn.Module, int]:
    """(UNet with the method's adapter, LoRA rank). device "meta": no weights (filled by `fake_weights`)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from benchmarks.step import make_wrapper, target_linears

    dtype = DTYPES[step.dtype]
    if device == "meta":
        with init_empty_weights():
            unet = UNet2DConditionModel(**unet_config(step))
    else:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**unet_config(step))
        unet = unet.to(dtype)
    unet.requires_grad_(False).train()
    targets = target_linears(unet)
    rank = max(1, round(step.frequencies * len(targets) / sum(b.in_features + b.out_features for _, _, b in targets)))
    args = SimpleNamespace(n_frequency=step.frequencies, family="db1")
    for parent, attribute, base in targets:
        setattr(parent, attribute, make_wrapper(step.method, base, args, rank).to(device))
    for parameter in unet.parameters():  # as the trainer does: trainable parameters in float32
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return unet, rank


def make_inputs(config, step: Step, device: str) -> dict:
    """A micro-batch as the trainer feeds it under mixed precision: float32 latents, text states and time ids."""
    batch, side = step.batch, step.latent
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {
        "sample": torch.randn(batch, config.in_channels, side, side, device=device),
        "timestep": torch.randint(0, 1000, (batch,), device=device),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, config.cross_attention_dim, device=device),
        "added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, device=device),
                              "time_ids": torch.randn(batch, 6, device=device)},  # fmt: skip
        "target": torch.randn(batch, config.out_channels, side, side, device=device),
    }


def micro_step(unet: nn.Module, inputs: dict, step: Step, device: str) -> None:
    autocast = torch.autocast(device, dtype=DTYPES[step.dtype]) if step.dtype != "fp32" else nullcontext()
    with autocast:
        prediction = unet(**{k: v for k, v in inputs.items() if k != "target"}, return_dict=False)[0]
    loss = F.mse_loss(prediction.float(), inputs["target"], reduction="none").mean(dim=(1, 2, 3)).mean()
    loss.backward()


def storage_bytes(tensors) -> int:
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}.values())


class Session:
    """One adapted UNet, fake (on the meta device, then fake tensors) or real (cpu, cuda), and its counters."""

    def __init__(self, step: Step, mode: str):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.step, self.mode = step, mode
        self.device = "cuda" if mode == "cuda" else "cpu"
        self.stack = ExitStack()
        self.unet, self.lora_rank = build_unet(step, "meta" if mode == "fake" else self.device)
        self.tracker = LiveBytes() if mode != "cuda" else None
        if mode == "fake":
            self.stack.enter_context(FakeTensorMode())
        if self.tracker is not None:
            self.stack.enter_context(self.tracker)
        if mode != "cuda":
            self.stack.enter_context(cuda_like_kernels())
        if step.method == "reference" and mode == "fake":
            self.stack.enter_context(reference_without_bounds_mask())
        if mode == "fake":
            fake_weights(self.unet, DTYPES[step.dtype])
        self.trainable = [p for p in self.unet.parameters() if p.requires_grad]
        self.moments = [torch.zeros_like(p) for p in self.trainable for _ in range(2)]  # AdamW's exp_avg, exp_avg_sq
        if self.tracker is not None:
            self.tracker.track(*module_tensors(self.unet))

    def close(self) -> None:
        self.stack.close()

    def allocated(self) -> int:
        return torch.cuda.memory_allocated() if self.mode == "cuda" else self.tracker.current

    def reset_peak(self) -> None:
        if self.mode == "cuda":  # cached blocks of earlier phases freed, so the reserved peak is this phase's own
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.tracker.reset_peak()

    def peak(self) -> int:
        if self.mode == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self.tracker.peak

    def parts(self) -> dict[str, int]:
        """Resident bytes: frozen UNet weights, the adapter (trainable parameters, buffers), optimizer state."""
        frozen = [p for p in self.unet.parameters() if not p.requires_grad]
        adapter = [t for t in module_tensors(self.unet) if t.requires_grad or not isinstance(t, nn.Parameter)]
        return {"unet_weights": storage_bytes(frozen), "adapter": storage_bytes(adapter),
                "optimizer_state": storage_bytes(self.moments)}  # fmt: skip

    def train_step(self, checkpointing: bool, warm_up: bool = False) -> dict[str, int]:
        """Peak bytes `step.micro_steps` forward/backward passes add over what is resident before them."""
        if checkpointing:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()
        step = replace(self.step, checkpointing=checkpointing)
        for parameter in self.trainable:
            parameter.grad = None
        inputs = make_inputs(self.unet.config, step, self.device)
        if warm_up:  # real runs: lazy initializations and caches before measuring
            micro_step(self.unet, inputs, step, self.device)
            for parameter in self.trainable:
                parameter.grad = None
        resident = self.allocated()
        self.reset_peak()
        rss = _RSS() if self.mode == "cpu" else None
        for _ in range(step.micro_steps):
            micro_step(self.unet, inputs, step, self.device)
        result = {"resident": resident, "step_peak": self.peak() - resident, "grads": storage_bytes(
            [p.grad for p in self.trainable if p.grad is not None])}  # fmt: skip
        if rss is not None:
            result["rss_step_peak"] = rss.peak()
        if self.mode == "cuda":  # what the card needs beyond the allocated bytes: the allocator's reserve, the context
            free, total = torch.cuda.mem_get_info()
            result.update(reserved_peak=torch.cuda.max_memory_reserved(), device_used_after=total - free,
                          context=total - free - torch.cuda.memory_reserved())  # fmt: skip
        for parameter in self.trainable:
            parameter.grad = None
        return result

    def inference_peak(self, batch: int) -> int:
        """Peak bytes one no-grad UNet forward at `batch` latents adds (sampling: 2 × images with guidance)."""
        step = replace(self.step, batch=batch)
        inputs = make_inputs(self.unet.config, step, self.device)
        inputs.pop("target")
        before = self.allocated()
        self.reset_peak()
        autocast = torch.autocast(self.device, dtype=DTYPES[step.dtype]) if step.dtype != "fp32" else nullcontext()
        with torch.no_grad(), autocast:
            self.unet(**inputs, return_dict=False)
        return self.peak() - before


class _RSS:
    """Real CPU runs: the resident set size's peak over its value now (VmHWM reset through clear_refs)."""

    def __init__(self):
        from pathlib import Path

        from benchmarks.common import status_bytes

        self.status_bytes = status_bytes
        self.before = status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        return self.status_bytes("VmHWM") - self.before


def other_components(mode: str, dtype: str, latent: int) -> dict:
    """Parameter bytes of both text encoders (in the weight dtype) and the VAE (fp32 when it declares force_upcast,
    as SDXL's own VAE does; fp16-fix VAEs take the weight dtype), and the peak a VAE encode (latent caching, one
    image) and decode (sampling: 1 image for validation, 2 for class images) adds."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        encoders = [CLIPTextModel(CLIPTextConfig(**SDXL_BASE.text_encoder)),
                    CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_BASE.text_encoder_2))]  # fmt: skip
        vae = AutoencoderKL(**SDXL_BASE.vae)
    counts = [sum(p.numel() for p in encoder.parameters()) for encoder in encoders]
    vae_params = sum(p.numel() for p in vae.parameters())
    result = {"text_encoder_params": counts[0], "text_encoder_2_params": counts[1], "vae_params": vae_params,
              "text_encoders": sum(counts) * DTYPES[dtype].itemsize}  # fmt: skip
    for vae_dtype in ("fp32", dtype):
        result[f"vae_{vae_dtype}"] = vae_params * DTYPES[vae_dtype].itemsize
        result.update({f"vae_{vae_dtype}_{k}": v for k, v in vae_peaks(vae_dtype, latent, mode).items()})
    return result


def vae_peaks(dtype: str, latent: int, mode: str) -> dict[str, int]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from torch._subclasses.fake_tensor import FakeTensorMode

    device, torch_dtype = ("cuda" if mode == "cuda" else "cpu"), DTYPES[dtype]
    tracker = LiveBytes()
    with ExitStack() as stack:
        if mode == "fake":
            with init_empty_weights():
                vae = AutoencoderKL(**SDXL_BASE.vae).requires_grad_(False)
            stack.enter_context(FakeTensorMode())
            stack.enter_context(tracker)
            fake_weights(vae, torch_dtype)
        else:
            vae = AutoencoderKL(**SDXL_BASE.vae).requires_grad_(False).to(device, torch_dtype)
            if mode == "cpu":
                stack.enter_context(tracker)

        def added_peak(function) -> int:
            if mode == "cuda":
                torch.cuda.empty_cache()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                function()
                return torch.cuda.max_memory_allocated() - before
            before = tracker.current
            tracker.reset_peak()
            function()
            return tracker.peak - before

        def randn(*shape):
            return torch.randn(*shape, device=device, dtype=torch_dtype)

        side = latent * 8
        with torch.no_grad():
            return {
                "encode_1": added_peak(lambda: vae.encode(randn(1, 3, side, side))),
                "encode_2": added_peak(lambda: vae.encode(randn(2, 3, side, side))),
                "decode_1": added_peak(lambda: vae.decode(randn(1, 4, latent, latent))),
                "decode_2": added_peak(lambda: vae.decode(randn(2, 4, latent, latent))),
            }
