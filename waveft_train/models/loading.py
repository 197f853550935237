"""Load the SDXL components the trainer needs: from the hub, a local diffusers folder, the built-in tiny and toy
models, or one single-file checkpoint (A1111/ComfyUI layout) with its configs from `model.config` (single_file.py).

Everything is loaded frozen (the WaveFT tuner adds the only trainable parameters later) and through
safetensors only. Where models come from is sources.py's question; any model that cannot be found becomes a
`UserError` naming it and listing what `model.pretrained` accepts, instead of a stack of hub-client exceptions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from huggingface_hub.utils import EntryNotFoundError, HFValidationError
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from waveft_train.common.errors import UserError
from waveft_train.models import single_file
from waveft_train.models.builtin import BUILTIN_MODELS
from waveft_train.models.sources import ALLOWED_MODELS, ALLOWED_VAES, ModelFiles, first_line, locate_model, not_found, resolve_vae

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # the dtype names configs and flags use
Loaded = TypeVar("Loaded")


@dataclass
class SDXLComponents:
    """The loaded, frozen parts of an SDXL pipeline, plus the facts about them the trainer needs."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    scheduler: SchedulerMixin  # the model's own (sampling) scheduler, as named in its scheduler_config.json
    model_path: str  # absolute local folder or hub id, as resolved; a single-file checkpoint's absolute path
    # What adapters record as their base: `tiny` or `toy` for the built-in models (their folders differ from one
    # machine and user to the next, and every waveft-train resolves the names), else model_path.
    base_model_name: str
    vae_scaling_factor: float
    vae_force_upcast: bool  # the VAE overflows in fp16 and must decode in fp32 (SDXL's original VAE)
    # What adapters record in their metadata about a single-file base (its name, sha256, size, model.config); empty
    # for a folder or hub model.
    base_metadata: dict[str, str] = field(default_factory=dict)

    def training_noise_scheduler(self) -> DDPMScheduler:
        """A DDPM scheduler with the model's noise schedule: what DreamBooth training adds noise with."""
        return DDPMScheduler.from_config(self.scheduler.config)


def _load(what: str, name: str, loader: Callable[[], Loaded], allowed: str = ALLOWED_MODELS) -> Loaded:
    """Run one `from_pretrained`, turning 'cannot find it' errors into a UserError naming the model."""
    try:
        return loader()
    except (OSError, EntryNotFoundError, HFValidationError) as error:  # OSError covers the hub's HTTP errors
        local = Path(name).expanduser().exists()  # a broken local folder: the offline hint would mislead
        raise not_found(what, name, first_line(error), hub_id=not local, allowed=allowed) from error


def _frozen(module: Loaded) -> Loaded:
    module.requires_grad_(False)
    module.eval()
    return module


def _load_scheduler(model_path: str, revision: str | None) -> SchedulerMixin:
    """The scheduler class named in the model's config, restricted to diffusers' own schedulers."""
    config = diffusers.DDPMScheduler.load_config(model_path, subfolder="scheduler", revision=revision)
    class_name = config.get("_class_name", "EulerDiscreteScheduler")
    scheduler_class = getattr(diffusers, class_name, None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise UserError(
            f"The model '{model_path}' names the scheduler '{class_name}' in scheduler/scheduler_config.json, which "
            "is not a diffusers scheduler class. Use a model whose scheduler is one of diffusers' schedulers "
            "(e.g. EulerDiscreteScheduler)."
        )
    return scheduler_class.from_config(config)


def _load_vae(
    path: str, subfolder: str | None, revision: str | None, vae_dtype: torch.dtype | None, weight_dtype: torch.dtype
) -> AutoencoderKL:
    """Load the VAE directly in its final dtype (diffusers warns about casting after loading)."""
    if vae_dtype is None:
        config = AutoencoderKL.load_config(path, subfolder=subfolder, revision=revision)
        vae_dtype = torch.float32 if config.get("force_upcast", True) else weight_dtype
    return AutoencoderKL.from_pretrained(
        path, subfolder=subfolder, revision=revision, use_safetensors=True, torch_dtype=vae_dtype
    )


def load_scheduler(pretrained: str, *, revision: str | None = None, config: str | None = None) -> SchedulerMixin:
    """Only the (sampling) scheduler of a model, with the same not-found errors as `load_components`."""
    files = locate_model(pretrained, config, revision)
    return _load("the scheduler of model", pretrained, lambda: _load_scheduler(files.configs, revision))


def load_unet(pretrained: str, *, revision: str | None = None, dtype: torch.dtype = torch.float32,
              config: str | None = None):
    """Only the UNet of an SDXL model (an export needs nothing else), frozen, with the same not-found errors as
    `load_components`."""
    files = locate_model(pretrained, config, revision)
    if files.weights_file is not None:
        check_single_file(files, ("unet",), separate_vae=True)
        return _frozen(single_file.load_parts(files.weights_file, files.configs, {"unet": dtype})["unet"])
    unet = _load(
        "the unet of model",
        pretrained,
        lambda: UNet2DConditionModel.from_pretrained(
            files.configs, subfolder="unet", revision=revision, torch_dtype=dtype, use_safetensors=True
        ),
    )
    return _frozen(unet)


def load_text_encoder(pretrained: str, name: str, *, revision: str | None = None, dtype: torch.dtype = torch.float32,
                      config: str | None = None):
    """Only one text encoder (`text_encoder` or `text_encoder_2`) of an SDXL model, frozen (the exports of a text
    encoder's adapter need nothing else)."""
    files = locate_model(pretrained, config, revision)
    if files.weights_file is not None:
        check_single_file(files, (name,), separate_vae=True)
        return _frozen(single_file.load_parts(files.weights_file, files.configs, {name: dtype})[name])
    model_class = single_file.TEXT_ENCODERS[name]
    return _frozen(_load(f"the {name} of model", pretrained, lambda: model_class.from_pretrained(
        files.configs, subfolder=name, revision=revision, torch_dtype=dtype, use_safetensors=True)))


def check_single_file(files: ModelFiles, parts=single_file.PARTS, *, separate_vae: bool = False) -> None:
    """A single file's family, and its `parts`' shapes against their configs, from its header: seconds, before
    gigabytes load. `separate_vae`: model.vae replaces the file's VAE (so the file need not have one)."""
    shapes = single_file.file_shapes(files.weights_file)
    single_file.check_family(files.weights_file, shapes, separate_vae=separate_vae)
    single_file.check_fits_config(files.weights_file, shapes, files.config_name, files.configs, parts)


def _vae_dtype(configs: str, vae_dtype: torch.dtype | None, weight_dtype: torch.dtype) -> torch.dtype:
    """An explicit `vae_dtype`, else fp32 for a VAE that declares `force_upcast` and `weight_dtype` for any other."""
    if vae_dtype is not None:
        return vae_dtype
    config = AutoencoderKL.load_config(configs, subfolder="vae")
    return torch.float32 if config.get("force_upcast", True) else weight_dtype


def load_components(
    pretrained: str,
    *,
    revision: str | None = None,
    vae: str | None = None,
    weight_dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    config: str | None = None,
) -> SDXLComponents:
    """Load every SDXL component frozen: UNet and text encoders in `weight_dtype`, the VAE in `vae_dtype`.

    `vae_dtype=None` keeps a VAE that declares `force_upcast` (SDXL's original, which overflows in fp16)
    in fp32, as diffusers' SDXL training scripts do, and puts any other VAE in `weight_dtype`.
    `revision` applies to the base model only, not to a separate `vae`. `config` (model.config) is where a
    single-file `pretrained` takes its configs and tokenizers from (None: SDXL base).
    """
    files = locate_model(pretrained, config, revision)
    model_path = files.configs
    common: dict[str, Any] = {"revision": revision}
    weights: dict[str, Any] = {**common, "use_safetensors": True}

    def part(what: str, load: Callable[[], Loaded]) -> Loaded:
        return _load(f"the {what} of model", pretrained, load)

    # The scheduler is a tiny config file: loading it first makes a wrong id fail before any download.
    scheduler = part("scheduler", lambda: _load_scheduler(model_path, revision))
    tokenizer = part("tokenizer", lambda: CLIPTokenizer.from_pretrained(model_path, subfolder="tokenizer", **common))
    tokenizer_2 = part(
        "tokenizer_2", lambda: CLIPTokenizer.from_pretrained(model_path, subfolder="tokenizer_2", **common)
    )
    base_metadata: dict[str, str] = {}
    if files.weights_file is not None:
        check_single_file(files, single_file.parts_from_file(vae is not None), separate_vae=vae is not None)
        base_metadata = single_file.single_file_base(files.weights_file, files.config_name).metadata()
        dtypes = {"unet": weight_dtype, "text_encoder": weight_dtype, "text_encoder_2": weight_dtype}
        if vae is None:
            dtypes["vae"] = _vae_dtype(model_path, vae_dtype, weight_dtype)
        parts = single_file.load_parts(files.weights_file, model_path, dtypes)
        unet, text_encoder, text_encoder_2 = parts["unet"], parts["text_encoder"], parts["text_encoder_2"]
        model_path = str(files.weights_file)
    else:
        # transformers renamed torch_dtype to dtype (4.56); casting after loading works with every version.
        text_encoder = part(
            "text_encoder", lambda: CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder", **weights)
        ).to(dtype=weight_dtype)
        text_encoder_2 = part(
            "text_encoder_2",
            lambda: CLIPTextModelWithProjection.from_pretrained(model_path, subfolder="text_encoder_2", **weights),
        ).to(dtype=weight_dtype)
        unet = load_unet(pretrained, revision=revision, dtype=weight_dtype)
    if vae is not None:
        vae_path, vae_subfolder = resolve_vae(vae)
        vae_model = _load(
            "the VAE", vae, lambda: _load_vae(vae_path, vae_subfolder, None, vae_dtype, weight_dtype), ALLOWED_VAES
        )
    elif files.weights_file is not None:
        vae_model = parts["vae"]
    else:
        vae_model = part("vae", lambda: _load_vae(model_path, "vae", revision, vae_dtype, weight_dtype))
    return SDXLComponents(
        unet=_frozen(unet),
        vae=_frozen(vae_model),
        text_encoder=_frozen(text_encoder),
        text_encoder_2=_frozen(text_encoder_2),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
        model_path=model_path,
        base_model_name=str(pretrained).strip() if str(pretrained).strip() in BUILTIN_MODELS
        else model_path,
        vae_scaling_factor=float(vae_model.config.scaling_factor),
        vae_force_upcast=bool(getattr(vae_model.config, "force_upcast", True)),
        base_metadata=base_metadata,
    )


def build_pipeline(
    components: SDXLComponents, unet: torch.nn.Module | None = None, *, progress_bar: bool = False,
    prediction_type: str | None = None,
) -> StableDiffusionXLPipeline:
    """An SDXL pipeline over the already-loaded modules (nothing is reloaded or copied).

    `unet` replaces the components' UNet (e.g. the adapted one unwrapped from accelerate). The scheduler is a
    fresh instance from the same config, because pipelines mutate their scheduler's state while sampling;
    `prediction_type` overrides its prediction type (an adapter trained for v-prediction on an epsilon base).
    """
    pipeline = StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=unet if unet is not None else components.unet,
        scheduler=type(components.scheduler).from_config(
            components.scheduler.config, **({"prediction_type": prediction_type} if prediction_type else {})
        ),
    )
    pipeline.set_progress_bar_config(disable=not progress_bar)
    _decode_in_vae_dtype(components.vae)
    return pipeline


def _decode_in_vae_dtype(vae: torch.nn.Module) -> None:
    """Let a float32 VAE (kept for fp16 safety) decode bf16/fp16 latents.

    diffusers' SDXL pipeline casts latents to the VAE's dtype only when it upcasts an fp16 VAE itself; a VAE
    that is already float32 next to a bf16 UNet would otherwise fail at decode with a dtype mismatch.
    """
    if getattr(vae, "_waveft_decode_cast", False):
        return

    def cast_input(module, args):
        return tuple(arg.to(module.weight.dtype) if torch.is_tensor(arg) else arg for arg in args)

    target = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder.conv_in
    target.register_forward_pre_hook(cast_input)
    vae._waveft_decode_cast = True
