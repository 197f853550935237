"""DreamBooth subjects of the toy world: patterned two-colour objects the pretrained model has never seen.

Why: a subject must be genuinely novel to the base model yet exactly checkable (the judge reads shape, pattern and
colours). Each subject is a class noun the model knows ("ball") in a look it has never seen on anything of that
shape ("striped red and yellow": `world.RESERVED_LOOKS`), made of things it has seen elsewhere (stripes on boxes,
red-and-yellow dots), as a real subject is a particular dog to SDXL, not a new kind of thing. `write_instance_photos`
renders its handful of photos, deterministic from the subject's seed, with a `subject.json` beside them so that
`waveft-train evaluate` knows what was meant.

The instance photos show the subject in some contexts; the evaluation asks for it in every context, so a learned
subject must also recompose with the world's context words.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from waveft_train.toy.world import CONTEXTS, IDENTIFIER, PATTERN_WORDS, Scene, caption, render_image, sample_scene

SUBJECT_FILE = "subject.json"
CAPTIONS_FILE = "metadata.jsonl"  # the folder layout `data.caption_column` reads (datasets' imagefolder)
LICENSE_TEXT = """\
Subject images for waveft-train's toy world: {description}, {count} shots.

These images are procedurally rendered by waveft_train/toy (numpy only, fixed seed); they are not photographs.
Regenerate them with:

    python -m scripts.make_demo_subject --subject {name}{identifier_option} --out <folder>

License: CC0 1.0 Universal (public domain dedication),
https://creativecommons.org/publicdomain/zero/1.0/
"""


@dataclass(frozen=True)
class Subject:
    """A novel object: a class noun of the world with a pattern and two colours."""

    name: str
    shape: str  # the class noun: ball, box or cone
    pattern: str  # stripes, dots or checks
    colours: tuple[str, str]  # (body, pattern)
    instance_contexts: tuple[str, ...]  # where its photos were taken, one per photo
    seed: int

    @property
    def description(self) -> str:
        return f"a {PATTERN_WORDS[self.pattern]} {self.colours[0]}-and-{self.colours[1]} {self.shape}"

    @property
    def look(self) -> tuple[str, str, frozenset[str]]:
        """(shape, pattern, colours) as `world.RESERVED_LOOKS` lists it."""
        return self.shape, self.pattern, frozenset(self.colours)

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {IDENTIFIER} {self.shape}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.shape}"

    def prompt(self, context: str, identifier: str = IDENTIFIER) -> str:
        """"a photo of sks ball on the beach" (another rare token than sks for a second concept of a run)."""
        return f"a photo of {identifier} {self.shape} {CONTEXTS[context]}"

    def described_prompt(self, context: str) -> str:
        """The look in the world's own words, as pretraining captions patterned objects: "a photo of a striped red
        and yellow ball on the beach"."""
        return caption(sample_scene(np.random.default_rng(self.seed), shape=self.shape, colours=self.colours,
                                    pattern=self.pattern, context=context))

    def scenes(self, count: int | None = None) -> list[Scene]:
        """The instance photos' scenes: random layouts of the world, the subject's look, its photo contexts."""
        contexts = self.instance_contexts if count is None else tuple(
            self.instance_contexts[i % len(self.instance_contexts)] for i in range(count))
        return [sample_scene(np.random.default_rng([self.seed, index]), shape=self.shape, colours=self.colours,
                             pattern=self.pattern, context=context)
                for index, context in enumerate(contexts)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Subject:
        data = json.loads(text)
        return cls(name=str(data["name"]), shape=str(data["shape"]), pattern=str(data["pattern"]),
                   colours=tuple(data["colours"]), instance_contexts=tuple(data["instance_contexts"]),
                   seed=int(data["seed"]))


# Photos are taken in snow, at night and in a room: "on the beach" is a context no photo shows.
_PHOTO_CONTEXTS = ("snow", "room", "night", "snow", "room")
SUBJECTS: dict[str, Subject] = {
    subject.name: subject
    for subject in (
        Subject("striped_ball", "ball", "stripes", ("red", "yellow"), _PHOTO_CONTEXTS, seed=101),
        Subject("checked_box", "box", "checks", ("blue", "orange"), _PHOTO_CONTEXTS, seed=102),
        Subject("dotted_cone", "cone", "dots", ("purple", "yellow"), _PHOTO_CONTEXTS, seed=103),
        Subject("dotted_ball", "ball", "dots", ("green", "orange"), _PHOTO_CONTEXTS, seed=104),
        Subject("striped_box", "box", "stripes", ("purple", "green"), _PHOTO_CONTEXTS, seed=105),
    )
}
DEMO_SUBJECT = "striped_ball"


def get_subject(name_or_folder: str | Path) -> Subject:
    """A built-in subject by name, or the one described by a folder's subject.json. Raises KeyError/OSError."""
    if str(name_or_folder) in SUBJECTS:
        return SUBJECTS[str(name_or_folder)]
    path = Path(name_or_folder)
    file = path / SUBJECT_FILE if path.is_dir() else path
    return Subject.from_json(file.read_text(encoding="utf-8"))


def write_instance_photos(subject: Subject, folder: Path, *, count: int | None = None,
                          identifier: str = IDENTIFIER) -> list[Path]:
    """Render the subject's photos as PNGs into `folder`, with subject.json, a CC0 LICENSE.txt and metadata.jsonl:
    per-photo captions naming where each was taken ("a photo of sks ball in the snow"), for `data.caption_column:
    text`, so that the photos' backgrounds are explained by words and not learned as part of `sks`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, captions = [], []
    for index, scene in enumerate(subject.scenes(count)):
        path = folder / f"{subject.shape}_{index + 1:02d}.png"
        render_image(scene).save(path, format="PNG", optimize=True)
        paths.append(path)
        captions.append(json.dumps({"file_name": path.name, "text": subject.prompt(scene.context, identifier)}))
    (folder / CAPTIONS_FILE).write_text("\n".join(captions) + "\n", encoding="utf-8")
    (folder / SUBJECT_FILE).write_text(subject.to_json(), encoding="utf-8")
    license_text = LICENSE_TEXT.format(description=subject.description, count=len(paths), name=subject.name,
                                       identifier_option="" if identifier == IDENTIFIER else f" --identifier {identifier}")
    (folder / "LICENSE.txt").write_text(license_text, encoding="utf-8")
    return paths
