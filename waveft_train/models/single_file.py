"""Single-file SDXL checkpoints (one `.safetensors` file in the A1111/ComfyUI layout): the checks made before any
weight is read, the content hash an adapter records, and loading the four parts with diffusers' single-file loaders.

Why this shape:
- Most SDXL models people use (Pony, Illustrious, Juggernaut, ...) are shared only as such a file. The file holds
  weights, not configs: the architecture, the scheduler and the tokenizers come from a diffusers folder or hub id of
  the same family (`model.config`, SDXL base by default), as diffusers' `from_single_file(config=...)` takes them.
- Every check reads only the file's header (key names and shapes), so a wrong family (SD 1.5, the refiner, a LoRA)
  or a `model.config` of another architecture fails in a second with one paragraph, not after gigabytes have loaded
  or, worse, with a model whose missing weights were left at random.
- The parts are read one at a time (each through diffusers' own converter), so memory holds one part's tensors at a
  time rather than the whole file twice. The text encoders are each given only their own keys: diffusers tells them
  apart by width, which small models whose two encoders are equally wide (the tiny and toy models) would defeat.
- An adapter trained on a file records its name, size and sha256 (the whole file's: civitai's "AutoV2" is its first
  10 hex digits), so `sample`/`export` can refuse a file that changed. Hashing 7 GB takes a while, so a file's hash
  is kept in the waveft-train cache under its path, size, mtime and inode, and computed once per file, not per run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from waveft_train.common.errors import UserError
from waveft_train.common.files import atomic_write_text, read_safetensors_header
from waveft_train.common.paths import SINGLE_FILE_SUFFIX, is_pickle_checkpoint
from waveft_train.models import ldm_layout
from waveft_train.models.tiny import default_cache_root

DEFAULT_CONFIG = "stabilityai/stable-diffusion-xl-base-1.0"  # model.config when null: Pony, Illustrious, ... are SDXL base
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
HASH_BLOCK = 1 << 24
HASH_PROGRESS_FROM = 1 << 28  # files from 256 MiB on show a progress bar while they are hashed
_HARMLESS_EXTRAS = re.compile(r"(position_ids|logit_scale)$")  # in real SDXL files, read by no diffusers model
# safetensors metadata of an adapter trained on a single file (peft ignores metadata; adapter_config.json keeps the
# file's absolute path in base_model_name_or_path, as it keeps a folder's)
RECORD_FILE, RECORD_SHA256, RECORD_BYTES, RECORD_CONFIG = (
    "waveft_train.base_file", "waveft_train.base_sha256", "waveft_train.base_bytes", "waveft_train.base_config")


@dataclass(frozen=True)
class SingleFileBase:
    """A base checkpoint file as adapters record it."""

    path: Path  # absolute
    sha256: str  # of the whole file, lowercase hex
    size: int  # bytes
    config: str  # model.config: a hub id, a built-in name or an absolute diffusers folder

    @property
    def autov2(self) -> str:
        """civitai's short hash: the first 10 hex digits of the sha256."""
        return self.sha256[:10].upper()

    def describe(self) -> str:
        return f"{self.path.name} (sha256 {self.sha256}, AutoV2 {self.autov2}, {self.size:,} bytes)"

    def metadata(self) -> dict[str, str]:
        return {RECORD_FILE: self.path.name, RECORD_SHA256: self.sha256, RECORD_BYTES: str(self.size),
                RECORD_CONFIG: self.config}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], path: str) -> SingleFileBase | None:
        """The record in an adapter's metadata (None when its base is not a single file); `path`: where it was."""
        if RECORD_SHA256 not in metadata:
            return None
        return cls(path=Path(path), sha256=metadata[RECORD_SHA256], size=int(metadata.get(RECORD_BYTES, -1)),
                   config=metadata.get(RECORD_CONFIG, DEFAULT_CONFIG))


def parts_from_file(separate_vae: bool) -> tuple[str, ...]:
    """The parts a run takes from the file: all four, or all but the VAE when model.vae gives one."""
    return tuple(part for part in PARTS if not (separate_vae and part == "vae"))


# ------------------------------------------------------------------------------------------------ the file itself
def checked_file(name: str, what: str = "model.pretrained") -> Path:
    """`name` as an existing `.safetensors` file (absolute), or a UserError naming `what` and what is allowed."""
    path = Path(str(name).strip()).expanduser()
    if is_pickle_checkpoint(path.name):
        raise UserError(
            f"{what} {name} is a pickle checkpoint ({path.suffix}): loading one can run arbitrary code, so waveft-train "
            f"reads only safetensors. Use the model's {SINGLE_FILE_SUFFIX} release (civitai and the Hugging Face hub "
            "offer almost every SDXL checkpoint as one), or convert the file once with a tool you trust.")
    if not path.exists():
        raise UserError(f"{what} {name}: no such file ({path.absolute()}). Give the path of an SDXL checkpoint "
                        f"({SINGLE_FILE_SUFFIX}, the A1111/ComfyUI layout), a local diffusers folder, a hub id, "
                        "`tiny` or `toy`.")
    if not path.is_file() or path.suffix.lower() != SINGLE_FILE_SUFFIX:
        raise UserError(f"{what} {name} is not a {SINGLE_FILE_SUFFIX} file. A single-file checkpoint must be "
                        f"safetensors, named *{SINGLE_FILE_SUFFIX}.")
    return path.resolve()


def file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the file's header (no tensor is read)."""
    try:
        header = read_safetensors_header(path)
    except ValueError as error:
        raise UserError(f"{path} {error}, so it is not a readable safetensors file; it may be truncated by an "
                        "interrupted download or copy. Download it again.") from None
    return {key: tuple(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}


def check_family(path: Path, keys, *, separate_vae: bool) -> None:
    """Refuse a file that is not an SDXL-family base checkpoint, naming what it is."""
    problem = ldm_layout.family_problem(keys)
    if problem is None and not separate_vae and not ldm_layout.has_vae(keys):
        problem = (f"it has no VAE ({ldm_layout.VAE_PREFIX}*); give one with model.vae (e.g. "
                   "madebyollin/sdxl-vae-fp16-fix)")
    if problem:
        raise UserError(f"{path} is not an SDXL-family checkpoint waveft-train can train on: {problem}. model.pretrained "
                        "takes an SDXL checkpoint in the A1111/ComfyUI layout (SDXL base and its fine-tunes: Pony, "
                        "Illustrious, Juggernaut, ...), a diffusers folder or a hub id.")


def expected_shapes(config_dir: str, parts=PARTS) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per part, the single-file keys and shapes of the model the configs in `config_dir` describe (built on meta)."""
    expected = {}
    with init_empty_weights():
        for part in parts:
            if part == "unet":
                config = UNet2DConditionModel.load_config(config_dir, subfolder="unet")
                state = ldm_layout.unet_to_ldm(UNet2DConditionModel.from_config(config).state_dict(), config)
            elif part == "vae":
                config = AutoencoderKL.load_config(config_dir, subfolder="vae")
                state = ldm_layout.vae_to_ldm(AutoencoderKL.from_config(config).state_dict(), config)
            else:
                model = TEXT_ENCODERS[part](CLIPTextConfig.from_pretrained(config_dir, subfolder=part))
                convert = ldm_layout.clip_to_ldm if part == "text_encoder" else ldm_layout.open_clip_to_ldm
                state = convert(model.state_dict())
            expected[part] = {key: tuple(tensor.shape) for key, tensor in state.items()}
    return expected


def _same_shape(key: str, found: tuple[int, ...], wanted: tuple[int, ...]) -> bool:
    """Equal shapes; the VAE's attention weights may also be stored as linear (c, c) rather than ldm's 1×1 convolution
    (c, c, 1, 1), which diffusers' converter reads alike."""
    if found == wanted:
        return True
    return ".mid.attn_1." in key and found == tuple(size for size in wanted if size != 1)


def check_fits_config(path: Path, shapes: Mapping[str, tuple[int, ...]], config_name: str, config_dir: str,
                      parts=PARTS) -> None:
    """Every tensor the configs' parts need is in the file with the same shape, and the file has no UNet or text
    encoder layers they lack; else a UserError naming the first difference."""
    for part, wanted in expected_shapes(config_dir, parts).items():
        prefix = ldm_layout.PART_PREFIXES[part]
        missing = [key for key in wanted if key not in shapes]
        wrong = [key for key in wanted if key in shapes and not _same_shape(key, shapes[key], wanted[key])]
        extra = [key for key in shapes if key.startswith(prefix) and key not in wanted and not _HARMLESS_EXTRAS.search(key)
                 and (part == "unet" or ".resblocks." in key or ".layers." in key)]
        if not (missing or wrong or extra):
            continue
        if wrong:
            detail = (f"{wrong[0]} has shape {list(shapes[wrong[0]])} in the file, but {list(wanted[wrong[0]])} in the "
                      f"{part} that model.config describes ({len(wrong)} such tensor(s))")
        elif missing:
            detail = f"the file has no {missing[0]} ({len(missing)} tensor(s) of model.config's {part} are missing)"
        else:
            detail = f"the file has {extra[0]}, which model.config's {part} lacks ({len(extra)} such tensor(s))"
        raise UserError(
            f"{path} does not match model.config {config_name}: {detail}. The file's {part} is another architecture "
            "than model.config's. Set model.config to the diffusers folder or hub id of the model the checkpoint was "
            f"fine-tuned from (null = {DEFAULT_CONFIG}, right for SDXL base and its fine-tunes such as Pony, "
            "Illustrious and Juggernaut).")


# ------------------------------------------------------------------------------------------------ the content hash
def file_sha256(path: Path, *, progress: bool = True) -> str:
    """The sha256 of the whole file (hex), computed once per file: the cache keys it on path, size, mtime and inode."""
    path = Path(path).resolve()
    stat = path.stat()
    identity = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}".encode()
    cached = default_cache_root() / "sha256" / f"{hashlib.sha256(identity).hexdigest()}.txt"
    try:
        known = cached.read_text(encoding="ascii").strip()
        if re.fullmatch(r"[0-9a-f]{64}", known):
            return known
    except (OSError, UnicodeDecodeError):
        pass
    digest = hashlib.sha256()
    show = progress and stat.st_size >= HASH_PROGRESS_FROM
    with open(path, "rb") as stream, tqdm(total=stat.st_size, unit="B", unit_scale=True, file=sys.stderr,
                                          desc=f"sha256 of {path.name} (once per file)", disable=not show) as bar:
        for block in iter(lambda: stream.read(HASH_BLOCK), b""):
            digest.update(block)
            bar.update(len(block))
    try:
        atomic_write_text(cached, digest.hexdigest())
    except OSError:  # a read-only cache costs a rehash next time, nothing else
        pass
    return digest.hexdigest()


def single_file_base(path: Path, config_name: str) -> SingleFileBase:
    return SingleFileBase(path=path, sha256=file_sha256(path), size=path.stat().st_size, config=config_name)


# ------------------------------------------------------------------------------------------------ loading
@contextlib.contextmanager
def quiet_diffusers_fp32_notice() -> Iterator[None]:
    """Hide diffusers' "modules ... should be kept in float32: []" warning, which ModelMixin.to logs for every
    dtype cast (also when no module needs fp32, as for the SDXL UNet); other warnings still show."""
    class Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "should be kept in float32: []" not in record.getMessage()

    logger = logging.getLogger("diffusers.models.modeling_utils")
    notice_filter = Filter()
    logger.addFilter(notice_filter)
    try:
        yield
    finally:
        logger.removeFilter(notice_filter)


def _missing_weights(part: str, model: torch.nn.Module, path: Path) -> None:
    missing = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if missing:
        raise UserError(f"{path} lacks weights of its {part} ({missing[0]} and {len(missing) - 1} more); the file is "
                        "damaged or not a full SDXL checkpoint.")


def load_parts(path: Path, config_dir: str, dtypes: Mapping[str, torch.dtype]) -> dict[str, torch.nn.Module]:
    """The file's parts named in `dtypes` (unet, vae, text_encoder, text_encoder_2), each in its dtype, each through
    diffusers' single-file loader with its config from `config_dir` (a local diffusers folder)."""
    loaded = {}
    with safe_open(str(path), framework="pt") as weights:
        keys = list(weights.keys())
        for part, dtype in dtypes.items():
            prefix = ldm_layout.PART_PREFIXES[part]
            tensors = {key: weights.get_tensor(key) for key in keys if key.startswith(prefix)}
            options = {"config": config_dir, "subfolder": part, "torch_dtype": dtype, "local_files_only": True}
            with quiet_diffusers_fp32_notice():
                if part == "unet":
                    model = UNet2DConditionModel.from_single_file(tensors, **options)
                elif part == "vae":
                    model = AutoencoderKL.from_single_file(tensors, **options)
                else:
                    model = create_diffusers_clip_model_from_ldm(TEXT_ENCODERS[part], tensors, **options)
            del tensors
            _missing_weights(part, model, path)
            loaded[part] = model
    return loaded
