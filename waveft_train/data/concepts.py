"""Several concepts in one run: each concept's photos, prompt, class images and weight, and the dataset that mixes them.

Why it looks like this:
- A run's subjects become a list of `Concept`s in one place (`load_concepts`): the classic `data`/`prior` form is one
  concept, a `concepts:` entry is one, and a kohya-style folder (`10_sks dog/`, `5_ohwx woman/`) is one per subfolder
  (repeats from the number, times the entry's repeats; prompt from the rest; class settings from the entry, or from
  `prior` for `data.instance_dir`). Photos in a subfolder may still carry their own captions (`.txt`, metadata.jsonl)
  with the entry's caption_column.
- Class images are one set per (class folder, class prompt): concepts that share a class prompt (and so, by default,
  its folder `<prior.class_dir>/<prompt as a name>`) share the images, the largest num_class_images of them generated.
- One concept trains exactly as the classic form did (`concepts_dataset` returns its `DreamBoothDataset`), so a
  one-entry list and the data/prior form give the same adapter. Several are `ConceptsDataset`: concept k holds
  photos_k × repeats_k × m positions, m the fewest whole times that shows every concept's class images once, so
  concepts are drawn in proportion to photos × repeats and every class image is used (and cached). Each position
  pairs a photo with a class image of its own concept; its random draws are keyed by its place in the whole dataset.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from waveft_train.common.errors import UserError
from waveft_train.common.paths import is_hidden, is_local
from waveft_train.config import DataSection, PriorSection
from waveft_train.config.concepts import ConceptSection, class_folder_name
from waveft_train.data.dataset import DreamBoothDataset
from waveft_train.data.images import ImageSet, image_manifest, images_from_files, load_images, validate_image_folder
from waveft_train.data.photos import IMAGE_EXTENSIONS
from waveft_train.data.prior import class_images_for_run

KOHYA_NAME = re.compile(r"(\d+)_(.*)", re.DOTALL)


@dataclass(frozen=True)
class KohyaSubfolder:
    path: Path
    repeats: int
    prompt: str


def kohya_subfolders(folder: Path, config_key: str) -> list[KohyaSubfolder] | None:
    """The `<repeats>_<prompt>` subfolders of a kohya-style folder, sorted by name; None for any other folder.

    A folder is kohya-style when one of its (not hidden) subfolders is named `<digits>_<text>`; then every subfolder
    must be, and no photo may lie beside them (either would be left out silently otherwise).
    """
    if not folder.is_dir():
        return None
    entries = sorted((path for path in folder.iterdir() if not is_hidden(path, folder)), key=lambda path: path.name)
    subfolders = [path for path in entries if path.is_dir()]
    if not any(KOHYA_NAME.fullmatch(path.name) for path in subfolders):
        return None
    example = next(path.name for path in subfolders if KOHYA_NAME.fullmatch(path.name))
    rule = (f"{folder} ({config_key}) is read as a kohya-style folder, since its subfolder {example!r} is named "
            "<repeats>_<prompt>")
    odd = [path.name for path in subfolders if not KOHYA_NAME.fullmatch(path.name)]
    if odd:
        raise UserError(f"{rule}; so every subfolder must be, but {', '.join(map(repr, odd))} "
                        f"{'is' if len(odd) == 1 else 'are'} not. Rename {'it' if len(odd) == 1 else 'them'} "
                        "`<repeats>_<prompt>` (e.g. `10_sks dog`), or move them out.")
    loose = [path.name for path in entries if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        raise UserError(f"{rule}; photos belong in its subfolders, but {', '.join(map(repr, loose[:4]))} lie beside "
                        "them and would be left out. Move them into a `<repeats>_<prompt>` subfolder.")
    found = []
    for path in subfolders:
        repeats, prompt = KOHYA_NAME.fullmatch(path.name).groups()
        if int(repeats) < 1 or not prompt.strip():
            raise UserError(f"{rule}; the subfolder {path.name!r} needs repeats of at least 1 and a prompt after the "
                            "'_' (e.g. `10_sks dog`).")
        found.append(KohyaSubfolder(path, int(repeats), prompt.strip()))
    return found


@dataclass
class Concept:
    """One subject of the run, resolved: its photos (with their prompts), weight and class-image settings."""

    name: str  # where it was named, for messages and the summary: `data.instance_dir`, `concepts[1]/10_sks dog`
    images: ImageSet
    instance_prompt: str | None
    repeats: int
    class_prompt: str | None
    class_dir: Path | None
    num_class_images: int
    validation_prompts: list[str] = field(default_factory=list)

    @property
    def class_key(self) -> tuple[str, str]:
        return str(self.class_dir), str(self.class_prompt)


def _entries(listed: list[ConceptSection], data: DataSection, prior: PriorSection) -> list[dict[str, Any]]:
    """The config's concepts as plain settings: the classic form is one entry named data.instance_dir."""
    if not listed:
        return [dict(key="data.instance_dir", instance_dir=data.instance_dir, instance_prompt=data.instance_prompt,
                     caption_column=data.caption_column, class_prompt=prior.class_prompt,
                     class_dir=prior.class_dir, num_class_images=prior.num_class_images, repeats=data.repeats,
                     validation_prompts=[])]
    entries = []
    for index, concept in enumerate(listed):
        class_prompt = concept.class_prompt or prior.class_prompt
        class_dir = concept.class_dir or (str(Path(prior.class_dir) / class_folder_name(class_prompt))
                                          if prior.class_dir and class_prompt else None)
        entries.append(dict(key=f"concepts[{index}]", instance_dir=concept.instance_dir,
                            instance_prompt=concept.instance_prompt, caption_column=concept.caption_column,
                            class_prompt=class_prompt, class_dir=class_dir,
                            num_class_images=concept.num_class_images or prior.num_class_images,
                            repeats=concept.repeats, validation_prompts=list(concept.validation_prompts)))
    return entries


def load_concepts(listed: list[ConceptSection], data: DataSection, prior: PriorSection, *,
                  report: bool = True) -> list[Concept]:
    """Every concept of the run (the `concepts` list, or `data` and `prior` when it is empty), photos loaded and
    checked, class folders checked."""
    concepts = []
    for entry in _entries(listed, data, prior):
        source, key = entry["instance_dir"], entry["key"]
        kohya = kohya_subfolders(Path(source), key) if is_local(source) else None
        parts = ([(f"{key}/{sub.path.name}", str(sub.path), sub.prompt, entry["repeats"] * sub.repeats)
                  for sub in kohya] if kohya else [(key, source, entry["instance_prompt"], entry["repeats"])])
        for name, folder, prompt, repeats in parts:
            if prompt is None and entry["caption_column"] is None:
                field_name = "data.instance_prompt" if key == "data.instance_dir" else f"{key}.instance_prompt"
                raise UserError(f"`{field_name}` is required: the prompt of the photos in {folder} (rare token + "
                                "class noun, e.g. \"a photo of sks dog\"), unless a caption_column captions them")
            images = load_images(folder, caption_column=entry["caption_column"], default_prompt=prompt or "",
                                 config_key=key if name == key else f"{key} (subfolder {Path(folder).name})",
                                 report=report)
            class_dir = Path(entry["class_dir"]) if entry["class_dir"] else None
            concepts.append(Concept(name, images, prompt, repeats, entry["class_prompt"], class_dir,
                                    entry["num_class_images"], entry["validation_prompts"]))
    if prior.enabled:
        check_class_folders(concepts)
    return concepts


def class_folders(concepts: list[Concept], prior: PriorSection) -> dict[str, Path]:
    """Each class folder of the run (none without prior preservation) by the config key that names it."""
    if not prior.enabled:
        return {}
    return {"prior.class_dir" if concept.class_dir == Path(prior.class_dir or "") else f"{concept.name} class_dir":
            concept.class_dir for concept in concepts}


def prompts_by_source(concepts: list[Concept], *, with_class: bool) -> list[tuple[str, str]]:
    """(where, prompt) of every caption and class prompt, for the long-prompt warning."""
    found = [(name, prompt) for concept in concepts for name, prompt in zip(concept.images.names(), concept.images.prompts)]
    return found + [(f"{concept.name} class prompt", concept.class_prompt) for concept in concepts if with_class]


def named_prompts(concepts: list[Concept]) -> str:
    """The concepts' instance prompts in one line (the model card's), "(captions)" for a concept captioned per photo."""
    return " / ".join(dict.fromkeys(concept.instance_prompt or "(captions)" for concept in concepts))


def check_class_folders(concepts: list[Concept]) -> None:
    """One class prompt per class folder (the images a user put there would count for every prompt), each checked."""
    prompts: dict[Path, Concept] = {}
    for concept in concepts:
        first = prompts.setdefault(concept.class_dir, concept)
        if first.class_prompt != concept.class_prompt:
            raise UserError(f"{first.name} and {concept.name} keep class images in one folder ({concept.class_dir}) "
                            f"with different class prompts ({first.class_prompt!r}, {concept.class_prompt!r}); give "
                            "each class prompt its own class_dir (or leave class_dir out: each prompt then gets a "
                            "subfolder of prior.class_dir)")
    for folder, concept in prompts.items():
        key = "prior.class_dir" if concept.name.startswith("data.instance_dir") else f"{concept.name} class_dir"
        validate_image_folder(folder, config_key=key, role="class", allow_empty=True)


def class_image_sets(concepts: list[Concept]) -> dict[tuple[str, str], tuple[Concept, int]]:
    """Each (class folder, class prompt) once, in the order of first use, with the most class images a concept asks."""
    sets: dict[tuple[str, str], tuple[Concept, int]] = {}
    for concept in concepts:
        first, count = sets.get(concept.class_key, (concept, 0))
        sets[concept.class_key] = (first, max(count, concept.num_class_images))
    return sets


def class_images_for_concepts(concepts: list[Concept], prior, model, components, *, resolution: int, seed: int,
                              accelerator, progress: bool) -> dict[tuple[str, str], ImageSet]:
    """Collective. Each class image set (`class_image_sets`), generated where missing with the prior's settings; the
    classic form's one set is exactly `class_images_for_run(prior, ...)`."""
    found = {}
    for key, (concept, count) in class_image_sets(concepts).items():
        settings = prior.model_copy(update={"class_dir": str(concept.class_dir), "num_class_images": count,
                                            "class_prompt": concept.class_prompt})
        files = class_images_for_run(settings, model, components, resolution=resolution, seed=seed,
                                     accelerator=accelerator, progress=progress)
        found[key] = images_from_files(files, prompt=concept.class_prompt, source=str(concept.class_dir))
    return found


def concepts_manifest(concepts: list[Concept]) -> dict[str, str]:
    """A content hash per photo of every concept, keyed by name (what a resumed run must still train on)."""
    manifest: dict[str, str] = {}
    for concept in concepts:
        manifest.update(image_manifest(concept.images))
    return manifest


# ----------------------------------------------------------------------------------------------- the dataset
@dataclass(frozen=True)
class PromptSet:
    """What the conditioning reads of a dataset's image sets: the prompts it encodes up front."""

    prompts: tuple[str, ...]


class ConceptsDataset:
    """Several concepts' `DreamBoothDataset`s laid end to end (see the module docstring for the lengths).

    Index i means position i % len in epoch i // len, as for `DreamBoothDataset`; each item is its concept's
    item at the concept's own position, with random draws keyed by the position in the whole dataset, and says which
    concept it is (`concept`, in both the instance and the class example).
    """

    def __init__(self, parts: list[DreamBoothDataset]) -> None:
        if len(parts) < 2:
            raise ValueError("ConceptsDataset mixes several concepts; one is its own DreamBoothDataset")
        self.parts = parts
        times = max(math.ceil(part.num_class / part.num_instance) for part in parts)
        self.lengths = [part.num_instance * max(times, 1) for part in parts]
        self.starts = [sum(self.lengths[:index]) for index in range(len(parts))]
        self.instance_images = PromptSet(tuple(prompt for part in parts for prompt in part.instance_images.prompts))
        with_class = [part.class_images for part in parts if part.class_images is not None]
        self.class_images = PromptSet(tuple(prompt for images in with_class for prompt in images.prompts)) \
            if with_class else None
        self.buckets = [bucket for part in parts for bucket in part.buckets]

    def __len__(self) -> int:
        return sum(self.lengths)

    def locate(self, position: int) -> tuple[int, int]:
        """(concept, its own position) of a position of the whole dataset."""
        for concept in range(len(self.parts) - 1, -1, -1):
            if position >= self.starts[concept]:
                return concept, position - self.starts[concept]
        raise IndexError(position)

    def concept_of(self, index: int) -> int:
        return self.locate(index % len(self))[0]

    def bucket_of(self, position: int) -> tuple[int, int]:
        concept, local = self.locate(position)
        return self.parts[concept].bucket_of(local)

    def __getitem__(self, index: int) -> dict[str, dict[str, Any]]:
        if index < 0:
            raise IndexError(f"negative index {index}")
        epoch, position = divmod(index, len(self))
        concept, local = self.locate(position)
        item = self.parts[concept].item_at(epoch, local, rng_position=position)
        return {role: {**example, "concept": concept} for role, example in item.items()}


def concepts_dataset(concepts: list[Concept], class_images: dict[tuple[str, str], ImageSet] | None, *,
                     resolution: int, seed: int, center_crop: bool, random_flip: bool, bucketing: bool):
    """The run's dataset: one concept's `DreamBoothDataset` as the classic form builds it, or a `ConceptsDataset`."""
    parts = [DreamBoothDataset(
        concept.images, resolution=resolution, seed=seed, center_crop=center_crop, random_flip=random_flip,
        repeats=concept.repeats, class_images=None if class_images is None else class_images[concept.class_key],
        num_class_images=None if class_images is None else concept.num_class_images, bucketing=bucketing)
        for concept in concepts]
    return parts[0] if len(parts) == 1 else ConceptsDataset(parts)


def concepts_summary(concepts: list[Concept], dataset) -> list[dict[str, Any]]:
    """Per concept, for summary.json: prompt, photos, repeats, share of training examples, class prompt and folder."""
    lengths = dataset.lengths if isinstance(dataset, ConceptsDataset) else [len(dataset)]
    total = sum(lengths)
    return [{"name": concept.name, "instance_prompt": concept.instance_prompt, "photos": len(concept.images),
             "repeats": concept.repeats, "share": round(length / total, 6), "class_prompt": concept.class_prompt,
             "class_dir": None if concept.class_dir is None else str(concept.class_dir)}
            for concept, length in zip(concepts, lengths)]
