"""The one-file exports of a WaveFT adapter, for the apps people make SDXL images in (export.py checks the options and
the target first).

- `comfyui`: each adapted layer's full update scale·ΔW as a LyCORIS/kohya "full" module, `lora_unet_<name>.diff`
  (plus `.diff_b` for a trained bias, `bias: waveft_only`). ComfyUI, Forge, A1111 and LyCORIS apply it as
  W + strength·diff, so the file is exact and the apps' strength slider multiplies the learned update. None of them
  knows WaveFT, and peft/diffusers-keyed files are what they fail on ("lora key not loaded").
- `lora`: each ΔW factored by SVD into kohya LoRA keys (`lora_down`, `lora_up`, `alpha`; apps apply
  strength·(alpha/rank)·up·down). WaveFT's ΔW is high-rank, so this is lossy: every layer's relative Frobenius error
  (of the file as saved, its dtype's rounding included) is reported and recorded in the metadata, and `--max-error`
  picks the rank per layer.

Naming. ComfyUI (`comfy.lora.model_lora_keys_unet`) maps `lora_unet_` + ldm names and + diffusers names (through
`comfy.utils.unet_to_diffusers`), Forge uses the same mapper, A1111 (`networks.load_network`) turns diffusers names
into ldm ones with `convert_diffusers_name_to_compvis` and also takes ldm names, and LyCORIS
(`lycoris.kohya.create_network_from_weights`) keys `lora_unet_` + the module names of the UNet it is given, which
for a diffusers UNet are diffusers names. Diffusers names are therefore the default (`naming="diffusers"`): all
three read them. `naming="ldm"` writes kohya's own SDXL spelling (`lora_unet_input_blocks_4_1_...`) for tools that
expect it (custom nodes that parse block indices, sd-scripts' SDXL UNet); ComfyUI, Forge, A1111 and diffusers read
it too, LyCORIS only on an ldm-named UNet.

ΔW comes from the tuner's own layers (`WaveFTLayer.get_delta_weight`, float32) after the adapter is loaded and
checked as every export checks it (load.load_adapted_unet).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from waveft_train.adapter.files import read_adapter
from waveft_train.adapter.load import inject, load_adapted_unet
from waveft_train.adapter.text_encoders import KOHYA_PREFIXES, has_text_encoder_adapters
from waveft_train.common.errors import UserError
from waveft_train.common.files import write_atomically, writing
from waveft_train.common.paths import is_local, is_single_file
from waveft_train.models.builtin import BUILTIN_MODELS, TOY_MODEL_NAME, toy_weights_version
from waveft_train.models.loading import DTYPES, load_text_encoder
from waveft_train.models.single_file import file_sha256
from waveft_train.models.unet_names import UNetNames, kohya_key
from waveft_train.waveft import WaveFTLayer
from waveft_train.waveft.transform import synthesis_filters

FORMAT_KEY = "waveft.format"  # marks a file as written here: --force replaces only such files
SDXL_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version: A1111 lists a LoRA for SDXL only with an sdxl_ value
NETWORK_MODULES = {"comfyui": "lycoris.kohya", "lora": "networks.lora", "waveft": "waveft"}
WAVEFT_FORMAT_VERSION = 1  # integrations/comfyui/comfyui_waveft/waveft_format.py reads it (and refuses newer ones)


@dataclass(frozen=True)
class LayerUpdate:
    """One adapted layer's update in float32: `delta` = scale·ΔW (d_out, d_in), `bias` = trained minus base bias."""

    name: str  # diffusers module path, e.g. down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q
    delta: torch.Tensor | None  # None when only the spectrum is exported (--format waveft)
    bias: torch.Tensor | None = None
    layer: WaveFTLayer | None = None  # where the spectrum, its locations and the transform's settings live
    adapter_name: str = "default"


@dataclass(frozen=True)
class LowRank:
    down: torch.Tensor  # (rank, d_in), in the file's dtype
    up: torch.Tensor  # (d_out, rank)
    rank: int
    error: float  # ||ΔW - up·down||_F / ||ΔW||_F of the factors as saved


def adapter_updates(adapter_dir: Path | str, base: str | None, *, dense: bool = True, base_config: str | None = None
                    ) -> tuple[Any, str, Any, list[LayerUpdate]]:
    """(adapter files, base model name, UNet config, the update of every adapted layer); `dense`: with ΔW."""
    adapter, base_name, base_values, model = load_adapted_unet(adapter_dir, base, base_config)
    if adapter.config.modules_to_save:
        raise UserError(f"The adapter {adapter.folder} also trains whole modules (modules_to_save: "
                        f"{sorted(adapter.config.modules_to_save)}), which this format does not hold; export it "
                        "merged with --format diffusers.")
    unet = model.base_model.model
    updates, used = [], set()
    with torch.no_grad():
        for name, layer in unet.named_modules():
            if not isinstance(layer, WaveFTLayer):
                continue
            delta = layer.get_delta_weight(model.active_adapter).float().contiguous() if dense else None
            bias = None
            if f"{name}.bias" in base_values:
                used.add(f"{name}.bias")
                bias = layer.get_base_layer().bias.float() - base_values[f"{name}.bias"]
            updates.append(LayerUpdate(name, delta, bias if bias is not None and bias.any() else None, layer,
                                       model.active_adapter))
        changed = sorted(key for key in set(base_values) - used if not torch.equal(unet.get_parameter(key), base_values[key]))
    if changed:
        raise UserError(f"The adapter {adapter.folder} also changes tensors outside its WaveFT layers (first: "
                        f"{changed[0]}, {len(changed)} in all; bias: {adapter.config.bias}), which this format does not "
                        "hold; export it merged with --format diffusers, or train with bias none or waveft_only.")
    return adapter, base_name, unet.config, updates


def text_encoder_updates(adapter_dir: Path | str, base_name: str, base_config: str | None
                         ) -> list[tuple[str, LayerUpdate]]:
    """(kohya key, update) of every adapted layer of the text encoders' adapters saved with the UNet's
    (`waveft.text_encoders`), keyed as kohya, ComfyUI and A1111 name SDXL's encoders: `lora_te1_` / `lora_te2_` + the
    module path under `text_model`, e.g. lora_te1_text_model_encoder_layers_0_self_attn_q_proj."""
    updates = []
    for name in has_text_encoder_adapters(adapter_dir):
        folder = Path(adapter_dir) / name
        encoder = load_text_encoder(base_name, name, config=base_config)
        model = inject(encoder, read_adapter(folder), base_name, 1.0)
        with torch.no_grad():
            for module_name, layer in model.base_model.model.named_modules():
                if isinstance(layer, WaveFTLayer):  # transformers 5 drops CLIPTextModel's `text_model.` level
                    path = module_name if module_name.startswith("text_model.") else f"text_model.{module_name}"
                    key = f"{KOHYA_PREFIXES[name]}_{path.replace('.', '_')}"
                    delta = layer.get_delta_weight(model.active_adapter).float().contiguous()
                    updates.append((key, LayerUpdate(f"{name}.{module_name}", delta, None, layer, model.active_adapter)))
    return updates


def low_rank(delta: torch.Tensor, dtype: torch.dtype, rank: int | None, max_error: float | None,
             alpha: float) -> LowRank:
    """ΔW ≈ (alpha/r)·up·down by truncated SVD, with √S on each side (fp16 factors keep ΔW's scale in range).

    `rank` fixes the rank r (capped at min(d_out, d_in)); with `max_error` r is the smallest rank whose saved factors
    meet it, at most `rank`. Every app scales a kohya LoRA by alpha/r, so the factors carry √(r/alpha) each. A zero
    ΔW gives rank-1 zero factors and error 0.
    """
    full = min(delta.shape)
    cap = min(rank or full, full)
    norm = torch.linalg.matrix_norm(delta).item()
    if norm == 0:
        return LowRank(delta.new_zeros(1, delta.shape[1]).to(dtype), delta.new_zeros(delta.shape[0], 1).to(dtype), 1, 0.0)
    left, values, right = torch.linalg.svd(delta, full_matrices=False)
    tail = values.double().square().flip(0).cumsum(0).flip(0)  # tail[k] = Σ_{i≥k} s_i²: the energy rank k leaves out
    if max_error is None:
        chosen = cap
    else:
        predicted = (tail / tail[0]).sqrt().tolist()[1:] + [0.0]  # predicted[r-1]: error at rank r
        chosen = next((r for r in range(1, cap + 1) if predicted[r - 1] <= max_error), cap)
    while True:
        root = (values[:chosen] * (chosen / alpha)).sqrt()
        up = (left[:, :chosen] * root).to(dtype)
        down = (root[:, None] * right[:chosen]).to(dtype)
        saved = (up.float() @ down.float()) * (alpha / chosen)
        error = (torch.linalg.matrix_norm(delta - saved) / norm).item()
        if max_error is None or error <= max_error or chosen >= cap:  # the dtype's rounding may need one more
            return LowRank(down.contiguous(), up.contiguous(), chosen, error)
        chosen += 1


def _finite(tensor: torch.Tensor, what: str, dtype: str) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise UserError(f"{what} does not fit in {dtype} (its values overflow to inf); export with --dtype bf16 or fp32.")
    return tensor


def comfyui_tensors(updates: list[LayerUpdate], key_of, dtype: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for update in updates:
        key = key_of(update.name)
        tensors[f"{key}.diff"] = _finite(update.delta.to(DTYPES[dtype]), f"The update of {update.name}", dtype)
        if update.bias is not None:
            tensors[f"{key}.diff_b"] = _finite(update.bias.to(DTYPES[dtype]), f"The bias update of {update.name}", dtype)
    return tensors


def waveft_layer_tensors(prefix: str, spectrum: torch.Tensor, locations: torch.Tensor, family: str | None,
                         scaling: float, dtype: str) -> dict[str, torch.Tensor]:
    """One layer of the single-file WaveFT format (the key list is in the ComfyUI node's waveft_format.py): the spectrum
    in `dtype`, its locations (int16 while they fit: as many bytes as an fp32 spectrum), the reconstruction filters of
    `family` (None: trained without the inverse DWT), the scaling and the format version."""
    index_dtype = torch.int16 if int(locations.max()) < 2**15 else torch.int32
    tensors = {
        f"{prefix}.waveft_spectrum": _finite(spectrum.detach().float().cpu().to(DTYPES[dtype]),
                                             f"The spectrum of {prefix}", dtype).contiguous(),
        f"{prefix}.waveft_locations": locations.detach().cpu().to(index_dtype).contiguous(),
        f"{prefix}.waveft_scaling": torch.tensor(float(scaling), dtype=torch.float32),
        f"{prefix}.waveft_version": torch.tensor(WAVEFT_FORMAT_VERSION, dtype=torch.int32),
    }
    if family is not None:
        tensors[f"{prefix}.waveft_filters"] = torch.tensor(synthesis_filters(family), dtype=torch.float32)
    return tensors


def waveft_tensors(updates: list[LayerUpdate], key_of, dtype: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for update in updates:
        layer, name, key = update.layer, update.adapter_name, key_of(update.name)
        family = layer.waveft_wavelet_family[name] if layer.waveft_use_idwt[name] else None
        tensors.update(waveft_layer_tensors(key, layer.waveft_spectrum[name], layer.waveft_indices[name], family,
                                            layer.waveft_scaling[name], dtype))
        if update.bias is not None:
            tensors[f"{key}.diff_b"] = _finite(update.bias.to(DTYPES[dtype]), f"The bias update of {update.name}", dtype)
    return tensors


def lora_tensors(updates: list[LayerUpdate], key_of, dtype: str, rank: int | None, max_error: float | None):
    """(tensors, per-layer errors, per-layer ranks, alpha), keyed by kohya module key."""
    with_bias = [update.name for update in updates if update.bias is not None]
    if with_bias:
        raise UserError(f"The adapter trains biases ({len(with_bias)} layers, e.g. {with_bias[0]}; bias: waveft_only), "
                        "which kohya LoRA files cannot hold. Use --format comfyui, which keeps them (.diff_b).")
    # One alpha for the whole file: diffusers' kohya conversion (0.42) misplaces per-module alphas when ranks differ
    # (its alpha_pattern keys match no module), so a per-layer rank carries its own scale in the factors instead.
    # alpha = --rank gives the usual alpha/rank = 1 at that rank; without --rank, kohya's default alpha 1.
    alpha = float(rank) if rank is not None else 1.0
    tensors, errors, ranks = {}, {}, {}
    for update in updates:
        key = key_of(update.name)
        factors = low_rank(update.delta, DTYPES[dtype], rank, max_error, alpha)
        _finite(factors.up, f"The LoRA factors of {update.name}", dtype)
        _finite(factors.down, f"The LoRA factors of {update.name}", dtype)
        tensors[f"{key}.lora_down.weight"] = factors.down
        tensors[f"{key}.lora_up.weight"] = factors.up
        tensors[f"{key}.alpha"] = torch.tensor(alpha)  # float32 whatever --dtype: bf16 would round e.g. 711 to 712
        errors[key], ranks[key] = factors.error, factors.rank
    return tensors, errors, ranks, alpha


def waveft_settings(config) -> dict[str, Any]:
    """The WaveFT fields of the adapter config that say what was trained (JSON-ready)."""
    targets = config.target_modules
    return {
        "n_frequency": config.n_frequency,
        "scaling": config.scaling,
        "wavelet_family": config.wavelet_family,
        "use_idwt": config.use_idwt,
        "random_loc_seed": config.random_loc_seed,
        "target_modules": targets if isinstance(targets, str) or targets is None else sorted(targets),
        "n_frequency_pattern": dict(config.n_frequency_pattern or {}),
        "proportional_parameters": config.proportional_parameters,
        "bias": config.bias,
    }


def base_model_record(base_name: str) -> dict[str, str]:
    """How a shared file names its base model: a hub id or built-in name as it is; a single-file checkpoint by its file
    name and sha256 (civitai's AutoV2 is its first 10 digits); a local folder by its name and the sha256 of its UNet
    weights; never by the user's absolute path (the file is meant to travel)."""
    if is_single_file(base_name):
        path = Path(base_name).expanduser()
        return {"waveft.base_model": path.name, "waveft.base_model_sha256": file_sha256(path)}
    if base_name in BUILTIN_MODELS or not is_local(base_name):
        record = {"waveft.base_model": base_name}
        if base_name == TOY_MODEL_NAME:
            record["waveft.base_model_version"] = toy_weights_version()
        return record
    folder = Path(base_name).expanduser()
    weights = sorted((folder / "unet").glob("diffusion_pytorch_model*.safetensors"))
    digest = hashlib.sha256()
    for path in weights:
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 24), b""):
                digest.update(block)
    record = {"waveft.base_model": folder.resolve().name}
    if weights:
        record["waveft.base_model_unet_sha256"] = digest.hexdigest()
    return record


def file_metadata(format: str, naming: str, dtype: str, base_name: str, adapter, unet_config, layers: int, *,
                  prediction_type: str | None, lora: dict[str, Any] | None = None) -> dict[str, str]:
    """safetensors metadata (strings only): ours under `waveft.`, plus the kohya `ss_` keys apps read."""
    base = base_model_record(base_name)
    metadata = {
        FORMAT_KEY: format,
        "waveft.naming": naming,
        "waveft.dtype": dtype,
        **base,
        "waveft.settings": json.dumps(waveft_settings(adapter.config), sort_keys=True),
        "waveft.adapted_layers": str(layers),
        "waveft.exported_by": f"waveft-train {version('waveft-train')}",
        "ss_sd_model_name": base["waveft.base_model"],
        "ss_network_module": NETWORK_MODULES[format],
    }
    if "waveft.base_model_sha256" in base:  # kohya's key for the sha256 of a single-file base
        metadata["ss_new_sd_model_hash"] = base["waveft.base_model_sha256"]
    if unet_config.get("addition_embed_type") == "text_time":  # SDXL-class UNet
        metadata["ss_base_model_version"] = SDXL_VERSION
    if format == "comfyui":
        metadata["ss_network_args"] = json.dumps({"algo": "full"})
    if prediction_type:
        metadata["waveft.prediction_type"] = prediction_type
        metadata["ss_v_parameterization"] = str(prediction_type == "v_prediction")
    for name, value in (lora or {}).items():
        metadata[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return metadata


def write_file(adapter_dir: Path | str, out_path: Path, *, format: str, base: str | None, dtype: str, naming: str,
               rank: int | None, max_error: float | None, prediction_type: str | None, base_config: str | None = None
               ) -> tuple[int, dict[str, float], dict[str, int]]:
    """Write the adapter as one `.safetensors` file in `format` (comfyui, lora or waveft) at `out_path`, atomically,
    its options and target already checked (export.py). Returns (layers, each layer's LoRA error, each layer's rank)."""
    adapter, base_name, unet_config, updates = adapter_updates(adapter_dir, base, dense=format != "waveft",
                                                               base_config=base_config)
    prediction_type = prediction_type or adapter.prediction_type
    key_of = _key_function(unet_config, naming)
    if format != "waveft":  # the encoders ride along under the apps' names (the WaveFT file format is the UNet's)
        encoder_updates = text_encoder_updates(adapter_dir, base_name, base_config)
        updates = updates + [update for _, update in encoder_updates]
        key_of = partial(_encoder_or_unet_key, {update.name: key for key, update in encoder_updates}, key_of)
    lora_metadata, errors, ranks = None, {}, {}
    if format == "comfyui":
        tensors = comfyui_tensors(updates, key_of, dtype)
    elif format == "waveft":
        tensors = waveft_tensors(updates, key_of, dtype)
        lora_metadata = {"waveft.format_version": str(WAVEFT_FORMAT_VERSION)}
    else:
        tensors, errors, ranks, alpha = lora_tensors(updates, key_of, dtype, rank, max_error)
        energy = {key_of(update.name): torch.linalg.matrix_norm(update.delta).item() ** 2 for update in updates}
        total = sum(energy.values())
        overall = math.sqrt(sum(errors[key] ** 2 * energy[key] for key in errors) / total) if total else 0.0
        worst = max(errors, key=errors.get)
        lora_metadata = {
            "waveft.lora_rank": str(rank) if rank is not None else "per layer",
            "waveft.lora_max_error": str(max_error) if max_error is not None else "none",
            "waveft.lora_ranks": ranks,
            "waveft.lora_errors": {key: round(value, 6) for key, value in errors.items()},
            "waveft.lora_worst_layer": worst,
            "waveft.lora_worst_error": f"{errors[worst]:.6f}",
            "waveft.lora_overall_error": f"{overall:.6f}",  # ||all errors||_F / ||all ΔW||_F
            "ss_network_dim": str(max(ranks.values())),
            "ss_network_alpha": f"{alpha:g}",
        }
    metadata = file_metadata(format, naming, dtype, base_name, adapter, unet_config, len(updates),
                             prediction_type=prediction_type, lora=lora_metadata)
    data = save(tensors, metadata=metadata)
    with writing(out_path, f"the {format} export"):
        write_atomically(out_path, lambda stream: stream.write(data))
    return len(updates), errors, ranks


def _encoder_or_unet_key(encoder_keys: dict[str, str], unet_key_of, name: str) -> str:
    return encoder_keys[name] if name in encoder_keys else unet_key_of(name)


def _key_function(unet_config, naming: str):
    if naming == "diffusers":
        return kohya_key
    try:
        names = UNetNames(unet_config)
    except ValueError as error:
        raise UserError(f"--naming ldm: {error} Use --naming diffusers.") from None

    def key_of(name: str) -> str:
        try:
            return names.kohya_key(name, "ldm")
        except KeyError as error:
            raise UserError(f"--naming ldm: {error.args[0]}; use --naming diffusers.") from None

    return key_of
