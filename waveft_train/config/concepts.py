"""Several concepts in one run: the `concepts:` list and the rule that relates it to `data`/`prior`. Torch-free.

The rule. A run names its subject photos in exactly one place: `data.instance_dir` (with `data.instance_prompt`:
one subject, the classic DreamBooth form) or a top-level `concepts:` list (each entry its own photos, prompt, class
prompt, class folder, number of class images, repeats and validation prompts). Everything shared (resolution,
crops, flips, bucketing, caption handling, prior.enabled, prior.loss_weight, generation settings) stays in
`data` and `prior`, and a concept's class prompt, class folder and number of class images default to the prior's.
A folder of kohya-style `<repeats>_<prompt>` subfolders, wherever an instance folder is named, is read as one
concept per subfolder (data/concepts.py).
"""

from __future__ import annotations

import re

from pydantic import PositiveInt

from waveft_train.config.fields import Prompt, Section, doc


class ConceptSection(Section):
    """One concept of a several-concept run (docs/data.md#several-concepts); unset keys come from data and prior."""

    instance_dir: str = doc(..., "this concept's photos: a local folder (or a folder of kohya-style `<repeats>_<prompt>` "
                            "subfolders, one concept each), or a hub dataset id", example="./dog", min_length=1)
    instance_prompt: Prompt | None = doc(None, "rare token + class noun, e.g. `a photo of sks dog`; may be left out "
                                         "only when caption_column gives every photo a caption, or for a kohya folder "
                                         "(the subfolder names are the prompts)", example="a photo of sks dog")
    caption_column: str | None = doc(None, "per-photo captions, as data.caption_column; null = instance_prompt")
    class_prompt: str | None = doc(None, "prompt of this concept's class images; null = prior.class_prompt",
                                   example="a photo of dog")
    class_dir: str | None = doc(None, "this concept's class images; null = a subfolder of prior.class_dir named after "
                                "the class prompt, so concepts with one class prompt share their class images")
    num_class_images: PositiveInt | None = doc(None, "class images used; null = prior.num_class_images")
    repeats: PositiveInt = doc(1, "weight: each photo appears this many times per epoch, so the concept is drawn "
                               "in proportion to photos × repeats")
    validation_prompts: list[Prompt] = doc(lambda: [], "grid rows added to validation.prompts for this concept")


def class_folder_name(class_prompt: str) -> str:
    """A folder name for a class prompt: lower-case words joined by '_' ("a photo of dog" -> a_photo_of_dog)."""
    name = re.sub(r"[^a-z0-9]+", "_", class_prompt.lower()).strip("_")
    return name[:80] or "class"


def concept_problems(config) -> list[str]:
    """What the concepts list may not do, one sentence each (TrainConfig raises them; `config` is a TrainConfig)."""
    problems = []
    concepts, data, prior = config.concepts, config.data, config.prior
    if concepts and data.instance_dir is not None:
        problems.append("concepts and data.instance_dir are two ways to name the subject photos, and a run takes one: "
                        "move data.instance_dir (and data.instance_prompt) into a concepts entry, or remove concepts")
    if concepts and data.instance_prompt is not None:
        problems.append("data.instance_prompt is read only with data.instance_dir; with concepts, give each entry its "
                        "own instance_prompt and remove data.instance_prompt")
    if concepts and data.caption_column is not None:
        problems.append("data.caption_column is read only with data.instance_dir; with concepts, give the entries "
                        "that have captions their own caption_column")
    if concepts and data.repeats != 1:
        problems.append("data.repeats is read only with data.instance_dir; with concepts, give each entry its repeats")
    if not concepts and data.instance_dir is None:
        problems.append("`data.instance_dir` is required (the subject photos: a folder or a hub dataset id), or a "
                        "concepts list for several subjects (docs/data.md#several-concepts)")
    if not concepts and data.instance_dir is None and data.instance_prompt is None:
        # with data.instance_dir it may be left out for a kohya folder (its subfolders name the prompts) or when
        # data.caption_column captions every photo: checked where the folder is read (data/concepts.py)
        problems.append("`data.instance_prompt` is required with data.instance_dir (rare token + class noun, e.g. "
                        "\"a photo of sks dog\")")
    if not concepts:
        problems += prior.missing_class_fields()
    for index, concept in enumerate(concepts):
        if prior.enabled and concept.class_prompt is None and not (prior.class_prompt or "").strip():
            problems.append(f"concepts[{index}].class_prompt is needed with prior.enabled (or prior.class_prompt for "
                            "every concept)")
        if prior.enabled and concept.class_dir is None and not (prior.class_dir or "").strip():
            problems.append(f"concepts[{index}].class_dir is needed with prior.enabled (or prior.class_dir, under which "
                            "each class prompt gets its own folder)")
    if config.validation.every > 0 and not all_validation_prompts(config):
        problems.append(f"validation.prompts is empty but validation.every is {config.validation.every}; give prompts "
                        "(or concepts' validation_prompts), or set validation.every: 0 to turn validation off")
    if not concepts and config.validation.evaluate and data.instance_prompt is None:
        problems.append("validation.evaluate prompts the subject with data.instance_prompt, which is not set; set it, "
                        "or set validation.evaluate: false")
    if concepts and config.validation.evaluate:
        problems.append("validation.evaluate scores one subject; with concepts set it to false and score the run with "
                        "`waveft-train evaluate`, which reports per concept")
    return problems


def all_validation_prompts(config) -> list[str]:
    """validation.prompts, then every concept's validation_prompts, each once."""
    prompts = list(config.validation.prompts)
    for concept in config.concepts:
        prompts += concept.validation_prompts
    return list(dict.fromkeys(prompts))


def validation_with_concepts(config):
    """The validation section as a run draws its grids: its prompts are `all_validation_prompts` (`config` is a
    TrainConfig)."""
    return config.validation.model_copy(update={"prompts": all_validation_prompts(config)})
