"""Load the SDXL components the trainer needs: from the hub, a local diffusers folder, or the embedded tiny model.

Everything is loaded frozen (the WaveFT tuner adds the only trainable parameters later) and through
safetensors only. Any model that cannot be found becomes a `UserError` naming it and listing what
`model.pretrained` accepts, instead of a stack of hub-client exceptions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from huggingface_hub.utils import EntryNotFoundError, HFValidationError, validate_repo_id
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from waveft_train.common.errors import UserError
from waveft_train.common.paths import written_as_path
from waveft_train.models.builtin import BUILTIN_MODELS, TINY_MODEL_NAME, TOY_MODEL_NAME, toy_model_dir
from waveft_train.models.tiny import tiny_model_dir

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # the dtype names configs and flags use
ALLOWED_MODELS = (
    "`tiny` (the embedded test model), `toy` (the pretrained toy-world model), a Hugging Face hub id such as "
    "stabilityai/stable-diffusion-xl-base-1.0, "
    "or a local diffusers folder containing model_index.json"
)
ALLOWED_VAES = (
    "a Hugging Face hub id of an AutoencoderKL such as madebyollin/sdxl-vae-fp16-fix, or a local folder with its "
    "config.json and diffusion_pytorch_model.safetensors (at the top or under vae/)"
)
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
    model_path: str  # absolute local folder or hub id, as resolved
    # What adapters record as their base: `tiny` or `toy` for the built-in models (their folders differ from one
    # machine and user to the next, and every waveft-train resolves the names), else model_path.
    base_model_name: str
    vae_scaling_factor: float
    vae_force_upcast: bool  # the VAE overflows in fp16 and must decode in fp32 (SDXL's original VAE)

    def training_noise_scheduler(self) -> DDPMScheduler:
        """A DDPM scheduler with the model's noise schedule: what DreamBooth training adds noise with."""
        return DDPMScheduler.from_config(self.scheduler.config)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _meant_as_folder(name: str) -> bool:
    """A name that cannot be a hub id and has a path's structure (a name like 'my model!' is neither: it gets the
    hub-id validator's explanation instead of "no such folder")."""
    return written_as_path(name) and ("/" in name or "\\" in name or name.startswith(("~", ".")))


def offline_note(hub_id: bool = True) -> str:
    """The sentence a not-found error about a hub id adds when the hub is switched off ('' otherwise)."""
    if hub_id and _hub_offline():
        return " Offline mode is on (HF_HUB_OFFLINE=1), so a hub id only works if it is already in the local cache."
    return ""


def _not_found(what: str, name: str, reason: str, *, hub_id: bool = True, allowed: str = ALLOWED_MODELS) -> UserError:
    return UserError(f"Could not load {what} '{name}': {reason.rstrip('. ')}.{offline_note(hub_id)} Allowed: {allowed}.")


def first_line(error: BaseException) -> str:
    """The first line of an error's message (at most 300 characters), for one-paragraph user errors."""
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _validate_hub_id(what: str, name: str, allowed: str) -> None:
    try:
        validate_repo_id(name)
    except HFValidationError as error:
        reason = f"it is neither an existing folder nor a valid hub id ({first_line(error)})"
        raise _not_found(what, name, reason, hub_id=False, allowed=allowed) from None


def resolve_pretrained(pretrained: str, cache_dir: Path | None = None) -> str:
    """Turn `model.pretrained` into what `from_pretrained` accepts: an absolute folder or a hub id.

    `tiny` builds (once) and returns the embedded model's cached folder; `cache_dir` overrides its cache root.
    `toy` is the pretrained toy-world pipeline committed inside the package (waveft_train/assets/toy).
    """
    name = str(pretrained).strip()
    if name == TINY_MODEL_NAME:
        return str(tiny_model_dir(cache_dir))
    if name == TOY_MODEL_NAME:
        return str(toy_model_dir())
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise _not_found("the model", name, "it is a file, not a folder", hub_id=False)
        if not ((local / "model_index.json").is_file() or (local / "unet").is_dir()):
            reason = f"the folder {local.resolve()} has neither model_index.json nor a unet/ subfolder"
            raise _not_found("the model", name, reason, hub_id=False)
        return str(local.resolve())
    if _meant_as_folder(name):
        raise _not_found("the model", name, f"no such folder ({local.absolute()})", hub_id=False)
    _validate_hub_id("the model", name, ALLOWED_MODELS)
    return name


def resolve_vae(vae: str) -> tuple[str, str | None]:
    """A separate VAE as (path or hub id, subfolder): an AutoencoderKL folder, a pipeline folder's vae/, or a hub id."""
    name = str(vae).strip()
    local = Path(name).expanduser()
    if local.exists():
        if (local / "config.json").is_file():
            return str(local.resolve()), None
        if (local / "vae" / "config.json").is_file():
            return str(local.resolve()), "vae"
        reason = f"the folder {local.resolve()} has neither config.json nor vae/config.json"
        raise _not_found("the VAE", name, reason, hub_id=False, allowed=ALLOWED_VAES)
    if _meant_as_folder(name):
        reason = f"no such folder ({local.absolute()})"
        raise _not_found("the VAE", name, reason, hub_id=False, allowed=ALLOWED_VAES)
    _validate_hub_id("the VAE", name, ALLOWED_VAES)
    return name, None


def _load(what: str, name: str, loader: Callable[[], Loaded], allowed: str = ALLOWED_MODELS) -> Loaded:
    """Run one `from_pretrained`, turning 'cannot find it' errors into a UserError naming the model."""
    try:
        return loader()
    except (OSError, EntryNotFoundError, HFValidationError) as error:  # OSError covers the hub's HTTP errors
        local = Path(name).expanduser().exists()  # a broken local folder: the offline hint would mislead
        raise _not_found(what, name, first_line(error), hub_id=not local, allowed=allowed) from error


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


def load_scheduler(pretrained: str, *, revision: str | None = None) -> SchedulerMixin:
    """Only the (sampling) scheduler of a model, with the same not-found errors as `load_components`."""
    model_path = resolve_pretrained(pretrained)
    return _load("the scheduler of model", pretrained, lambda: _load_scheduler(model_path, revision))


def load_unet(pretrained: str, *, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """Only the UNet of an SDXL model (an export needs nothing else), frozen, with the same not-found errors as
    `load_components`."""
    model_path = resolve_pretrained(pretrained)
    unet = _load(
        "the unet of model",
        pretrained,
        lambda: UNet2DConditionModel.from_pretrained(
            model_path, subfolder="unet", revision=revision, torch_dtype=dtype, use_safetensors=True
        ),
    )
    return _frozen(unet)


def load_components(
    pretrained: str,
    *,
    revision: str | None = None,
    vae: str | None = None,
    weight_dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
) -> SDXLComponents:
    """Load every SDXL component frozen: UNet and text encoders in `weight_dtype`, the VAE in `vae_dtype`.

    `vae_dtype=None` keeps a VAE that declares `force_upcast` (SDXL's original, which overflows in fp16)
    in fp32, as diffusers' SDXL training scripts do, and puts any other VAE in `weight_dtype`.
    `revision` applies to the base model only, not to a separate `vae`.
    """
    model_path = resolve_pretrained(pretrained)
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
    # transformers renamed torch_dtype to dtype (4.56); casting after loading works with every version.
    text_encoder = part(
        "text_encoder", lambda: CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder", **weights)
    ).to(dtype=weight_dtype)
    text_encoder_2 = part(
        "text_encoder_2",
        lambda: CLIPTextModelWithProjection.from_pretrained(model_path, subfolder="text_encoder_2", **weights),
    ).to(dtype=weight_dtype)
    unet = load_unet(pretrained, revision=revision, dtype=weight_dtype)
    if vae is None:
        vae_model = part("vae", lambda: _load_vae(model_path, "vae", revision, vae_dtype, weight_dtype))
    else:
        vae_path, vae_subfolder = resolve_vae(vae)
        vae_model = _load(
            "the VAE", vae, lambda: _load_vae(vae_path, vae_subfolder, None, vae_dtype, weight_dtype), ALLOWED_VAES
        )
    return SDXLComponents(
        unet=unet,
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
