"""DreamBooth prior preservation: make sure the class folder holds enough class images, generating the rest.

Why it looks like this:
- Generation is an idempotent top-up. Every generated image is recorded in `class_dir/manifest.json`
  with the settings that made it; only records matching the current settings (model, prompt, seed,
  resolution, steps, guidance) count. A rerun generates nothing, a changed prompt or model tops up
  fresh images, and images from other settings stay on disk untouched (and unused).
- Images the user put in the folder (any image file the manifest does not record) always count, first.
- Image i is sampled from `torch.Generator("cpu").manual_seed(seed + i)`, so which image gets which
  noise does not depend on the batch size, the number of processes or which images already existed.
  (Pixels can still differ by a rounding step between batch sizes: batched float kernels round
  differently. The noise, and so the image content, is the same.)
- Several processes (accelerate) split the missing indices batch by batch: index i belongs to generation batch
  i // generation_batch_size, and batch k goes to process k % num_processes, so every image is generated in the
  same batch, with the same pixels, whatever the number of processes (a run is a function of its config, not of
  its layout). Each process writes its own files, and the main process alone writes the
  manifest after a barrier. The class folder must be on a filesystem every process sees.
- Files are written atomically (hidden temp file in the same folder + os.replace), so an interrupted
  run never leaves a half-written image or manifest behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from tqdm.auto import tqdm

from waveft_train.common.errors import UserError
from waveft_train.common.files import atomic_write_text, save_png_atomically, writing
from waveft_train.common.paths import is_hidden
from waveft_train.config import ModelSection, PriorSection
from waveft_train.data.images import IMAGE_EXTENSIONS
from waveft_train.models.builtin import TOY_MODEL_NAME, toy_weights_version
from waveft_train.models.loading import build_pipeline
from waveft_train.models.single_file import RECORD_CONFIG, RECORD_SHA256

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# Generated files are named class-<settings hash>-<index>.png. Names of this shape are reserved for
# generated images: one the manifest does not list (e.g. after the manifest was lost) is neither a user
# image nor a usable generated one, and is overwritten if its index is generated again.
GENERATED_NAME = re.compile(r"class-[0-9a-f]{8}-\d{6,}\.png")


class ProcessGroup(Protocol):
    """The part of `accelerate.Accelerator` that generation needs (a fake one works in tests)."""

    process_index: int
    num_processes: int
    is_main_process: bool

    def wait_for_everyone(self) -> None: ...


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides what a generated class image looks like; recorded per image."""

    model: str
    prompt: str
    seed: int
    resolution: int
    steps: int
    guidance: float

    @classmethod
    def of(cls, *, model: str, prompt: str, seed: int, resolution: int, steps: int,
           guidance: float) -> GenerationSettings:
        """Normalized types, so `guidance=5` and `guidance=5.0` are the same settings."""
        return cls(str(model), str(prompt), int(seed), int(resolution), int(steps), float(guidance))

    def digest(self) -> str:
        """8 hex digits of a hash of the settings: keeps files of different settings apart by name."""
        text = json.dumps(asdict(self), sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]

    def file_name(self, index: int) -> str:
        return f"class-{self.digest()}-{index:06d}.png"

    def record(self, index: int) -> dict[str, Any]:
        """One manifest entry, with the key order the manifest promises."""
        return {"file": self.file_name(index), "index": index, **asdict(self)}

    def matches(self, entry: dict[str, Any]) -> bool:
        """Exact match of every setting (JSON round-trips ints, strings and floats exactly)."""
        return all(
            not isinstance(entry.get(key), bool) and entry.get(key) == value for key, value in asdict(self).items()
        )


@dataclass(frozen=True)
class ClassImagePlan:
    """What a class folder holds for the current settings and which generation indices are missing."""

    user_images: tuple[Path, ...]  # sorted; at most num_images of them are used
    existing: dict[int, Path]  # generation index -> file of the current settings, present on disk
    missing: tuple[int, ...]  # generation indices to generate (ascending)
    unrecorded: tuple[int, ...] = ()  # existing files the manifest does not list yet (an interrupted run)

    def images(self, settings: GenerationSettings, class_dir: Path, num_images: int) -> list[Path]:
        """User images first, then generated ones by index; exactly num_images once complete."""
        generated = {**self.existing, **{index: class_dir / settings.file_name(index) for index in self.missing}}
        chosen = list(self.user_images[:num_images])
        chosen += [generated[index] for index in sorted(generated)][: num_images - len(chosen)]
        return chosen


# ----------------------------------------------------------------------------------------------- manifest
def _is_plain_name(name: Any) -> bool:
    """A manifest may only point at files directly inside the class folder."""
    return isinstance(name, str) and bool(name) and Path(name).name == name and name not in (".", "..")


def read_manifest(class_dir: Path) -> list[dict[str, Any]]:
    """The manifest's image entries; an unreadable or malformed manifest counts as empty (with a warning).

    Entries that are not well-formed (no plain file name, no integer index) are dropped one by one.
    """
    path = class_dir / MANIFEST_NAME
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("Ignoring the class-image manifest %s, which cannot be read (%s); generated images of the "
                       "current settings are recognized by their names, others are not used.", path, error)
        return []
    if not (isinstance(data, dict) and data.get("version") == MANIFEST_VERSION
            and isinstance(data.get("images"), list)):
        logger.warning("Ignoring the class-image manifest %s: it is not a version-%d manifest "
                       '({"version": %d, "images": [...]}); generated images of the current settings are '
                       "recognized by their names, others are not used.",
                       path, MANIFEST_VERSION, MANIFEST_VERSION)
        return []
    entries = [
        entry for entry in data["images"]
        if isinstance(entry, dict) and _is_plain_name(entry.get("file"))
        and isinstance(entry.get("index"), int) and not isinstance(entry.get("index"), bool) and entry["index"] >= 0
    ]
    if len(entries) != len(data["images"]):
        logger.warning("Ignoring %d malformed entries of the class-image manifest %s.",
                       len(data["images"]) - len(entries), path)
    return entries


def write_manifest(class_dir: Path, entries: Iterable[dict[str, Any]]) -> None:
    """Write the manifest atomically, sorted by file name (stable bytes for the same content)."""
    images = sorted(entries, key=lambda entry: entry["file"])
    text = json.dumps({"version": MANIFEST_VERSION, "images": images}, indent=2, ensure_ascii=False) + "\n"
    with writing(class_dir / MANIFEST_NAME, "the class-image manifest"):
        atomic_write_text(class_dir / MANIFEST_NAME, text)


def save_image_atomically(image: Image.Image, path: Path) -> None:
    save_png_atomically(image, path)


# ----------------------------------------------------------------------------------------------- planning
def _user_images(class_dir: Path, recorded: set[str]) -> list[Path]:
    """Image files not recorded in the manifest, skipping hidden names as `datasets` does."""
    found = []
    for path in class_dir.rglob("*"):
        if is_hidden(path, class_dir):
            continue
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.parent == class_dir and (path.name in recorded or GENERATED_NAME.fullmatch(path.name)):
            continue
        found.append(path)
    return sorted(found)


def plan_class_images(class_dir: Path, settings: GenerationSettings, num_images: int) -> ClassImagePlan:
    """Count what is usable now and choose the lowest free generation indices for the rest."""
    entries = read_manifest(class_dir)
    user_images = _user_images(class_dir, {entry["file"] for entry in entries})
    existing: dict[int, Path] = {}
    for entry in entries:
        path = class_dir / entry["file"]
        if settings.matches(entry) and entry["index"] not in existing and path.is_file():
            existing[entry["index"]] = path
    # Files are written atomically under a name that hashes the settings: one of ours with the current
    # digest is complete and matches, even if the run that made it died before recording it.
    recorded = set(existing)
    for path in class_dir.glob(f"class-{settings.digest()}-*.png"):
        match = GENERATED_NAME.fullmatch(path.name)
        if match and int(path.stem.rsplit("-", 1)[1]) not in existing:
            existing[int(path.stem.rsplit("-", 1)[1])] = path
    wanted = max(0, num_images - len(user_images))
    kept = dict(sorted(existing.items())[:wanted])
    missing: list[int] = []
    index = 0
    while len(kept) + len(missing) < wanted:
        if index not in kept:
            missing.append(index)
        index += 1
    unrecorded = tuple(index for index in kept if index not in recorded)
    return ClassImagePlan(tuple(user_images), kept, tuple(missing), unrecorded)


def shard_batches(indices: Sequence[int], batch_size: int, process_index: int, num_processes: int) -> list[list[int]]:
    """This process's share of the generation batches: index i is in batch i // batch_size, batch k is process
    k % num_processes's. Fixed by the indices alone, so every process computes the same split."""
    batches: dict[int, list[int]] = {}
    for index in indices:
        batches.setdefault(index // batch_size, []).append(index)
    return [batches[key] for key in sorted(batches) if key % num_processes == process_index]


# ----------------------------------------------------------------------------------------------- generation
def generate_class_images(
    pipeline: StableDiffusionXLPipeline, class_dir: Path, settings: GenerationSettings, batches: Sequence[list[int]],
    *, progress: bool,
) -> None:
    """Generate and save the images with these generation indices, one pipeline call per batch.

    The VAE decodes a batch one image at a time (its slicing): at 1024 px decoding, not the UNet, sets the peak; with
    an fp16-fix VAE a batch of two decoded at once needed a 16 GB card, one at a time 12 GB (BENCHMARKS.md §3).
    """
    vae, slicing = pipeline.vae, getattr(pipeline.vae, "use_slicing", False)
    vae.enable_slicing()
    try:
        total = sum(len(batch) for batch in batches)
        with tqdm(total=total, desc="Generating class images", unit="image", disable=not progress) as bar:
            for batch in batches:
                output = pipeline(
                    prompt=[settings.prompt] * len(batch),
                    height=settings.resolution,
                    width=settings.resolution,
                    num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance,
                    generator=[torch.Generator("cpu").manual_seed(settings.seed + index) for index in batch],
                    output_type="pil",
                )
                for index, image in zip(batch, output.images, strict=True):
                    with writing(class_dir / settings.file_name(index), "a generated class image"):
                        save_image_atomically(image, class_dir / settings.file_name(index))
                bar.update(len(batch))
    finally:
        if not slicing:  # the VAE is the run's own module: leave it as it was
            vae.disable_slicing()


def ensure_class_images(
    class_dir: Path,
    *,
    num_images: int,
    prompt: str,
    model_id: str,
    resolution: int,
    steps: int,
    guidance: float,
    seed: int,
    batch_size: int,
    make_pipeline: Callable[[], StableDiffusionXLPipeline],
    accelerator: ProcessGroup | None = None,
    progress: bool = True,
) -> list[Path]:
    """Return exactly `num_images` class images from `class_dir`, generating the missing ones first.

    User images (files the manifest does not record) come first, then generated images of the current
    settings by index. `make_pipeline` (a base SDXL pipeline, no adapter) is only called when this process
    has images to generate. With an `accelerator`, every process must call this; each generates its share
    and all return the same list.
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1, got {num_images} and {batch_size}")
    class_dir = Path(class_dir).expanduser()
    if class_dir.exists() and not class_dir.is_dir():
        raise UserError(f"prior.class_dir must be a folder for class images, but {class_dir} is a file. Point "
                        "prior.class_dir at a folder (it is created if missing).")
    class_dir.mkdir(parents=True, exist_ok=True)
    settings = GenerationSettings.of(model=model_id, prompt=prompt, seed=seed, resolution=resolution,
                                     steps=steps, guidance=guidance)
    process_index = accelerator.process_index if accelerator is not None else 0
    num_processes = accelerator.num_processes if accelerator is not None else 1
    is_main = accelerator.is_main_process if accelerator is not None else True

    plan = plan_class_images(class_dir, settings, num_images)
    if is_main:
        logger.info("Class images in %s: %d provided, %d generated earlier with these settings; generating %d "
                    "(prompt %r).", class_dir, len(plan.user_images), len(plan.existing), len(plan.missing), prompt)
    if not plan.missing:
        if is_main and plan.unrecorded:
            _record_generated(class_dir, settings, plan.unrecorded)
        return plan.images(settings, class_dir, num_images)
    if accelerator is not None:  # every process plans from the same folder state before anyone writes
        accelerator.wait_for_everyone()
    own = shard_batches(plan.missing, batch_size, process_index, num_processes)
    if own:
        pipeline = make_pipeline()
        generate_class_images(pipeline, class_dir, settings, own, progress=progress and is_main)
        del pipeline
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if is_main:
        _record_generated(class_dir, settings, plan.missing + plan.unrecorded)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return plan.images(settings, class_dir, num_images)


def _record_generated(class_dir: Path, settings: GenerationSettings, indices: Sequence[int]) -> None:
    """Add records for the generated files; keep other records whose files exist; drop replaced ones."""
    new = [settings.record(index) for index in indices if (class_dir / settings.file_name(index)).is_file()]
    if len(new) != len(indices):
        lost = sorted(set(indices) - {entry["index"] for entry in new})
        raise UserError(f"Class images with generation indices {lost} are missing from {class_dir} (prior.class_dir) "
                        "after every process generated its share. With several processes (or machines), "
                        "prior.class_dir must be on a filesystem that all of them share.")
    new_files = {entry["file"] for entry in new}
    kept = [entry for entry in read_manifest(class_dir)
            if entry["file"] not in new_files and (class_dir / entry["file"]).is_file()]
    write_manifest(class_dir, kept + new)


def model_identity(model: ModelSection, model_path: str, base_metadata: Mapping[str, str] | None = None) -> str:
    """What class images depend on besides the sampling settings: the base model's path, revision, VAE and dtype;
    for the bundled toy model the version of its weights, and for a single-file checkpoint its content hash and
    `model.config` (neither path changes when the weights behind it do)."""
    identity = model_path + (f"@{model.revision}" if model.revision else "")
    if str(model.pretrained).strip() == TOY_MODEL_NAME:
        identity += f"#{toy_weights_version()}"
    if base_metadata and RECORD_SHA256 in base_metadata:
        identity += f"#sha256={base_metadata[RECORD_SHA256]}|config={base_metadata.get(RECORD_CONFIG)}"
    return identity + (f"|vae={model.vae}" if model.vae else "") + f"|{model.dtype}"


def class_images_for_run(prior: PriorSection, model: ModelSection, components, *, resolution: int, seed: int,
                         accelerator: ProcessGroup, progress: bool) -> list[Path]:
    """`ensure_class_images` with a run's settings: generated with the run's base model (its path, revision, VAE and
    dtype are what the images depend on, beside the sampling settings) on the run's device."""
    return ensure_class_images(
        Path(prior.class_dir), num_images=prior.num_class_images, prompt=prior.class_prompt,
        model_id=model_identity(model, components.model_path, components.base_metadata),
        resolution=resolution, steps=prior.generation_steps, guidance=prior.generation_guidance, seed=seed,
        batch_size=prior.generation_batch_size,
        make_pipeline=lambda: build_pipeline(components, progress_bar=False).to(accelerator.device),
        accelerator=accelerator, progress=progress,
    )
