"""Caption files: `photo.txt` beside `photo.jpg` is that photo's caption (kohya's sd-scripts, SimpleTuner, ai-toolkit).

The one rule that joins them with a folder's metadata.jsonl and `data.caption_column` (docs/data.md, Captions):
- `data.caption_column: null` (the default): every photo trains with `data.instance_prompt`, whatever files lie
  beside it. Caption files found there are not used; a warning names them and says what to set.
- `data.caption_column: <key>` (`text` by convention): a photo's caption is its `.txt` file or the `<key>` of its
  metadata.jsonl line. A photo captioned by both must be captioned the same by both, else the run is refused, naming
  the photo and both files. A blank file or value is no caption; a photo with none trains with the instance prompt,
  with the warning a blank metadata.jsonl caption gets (images.py `_prompts`).

Why caption files are opt-in, not picked up on their own: a config that works today must mean what it meant, and
today `caption_column: null` means "the instance prompt for every photo" even where `.txt` files lie beside the photos
(captions written for another trainer, often without the rare token). Reading them silently would change what that
run trains on; refusing would break it. So they wait for one setting, and the warning names it.

A caption file holds one caption: its text, stripped (UTF-8, a byte-order mark allowed). Several lines of text are
refused rather than guessed at (kohya's sd-scripts reads the first line, SimpleTuner picks one line at random).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from waveft_train.common.errors import UserError

logger = logging.getLogger(__name__)

CAPTION_SUFFIX = ".txt"
SHOWN = 4  # caption files named in one notice before "… and N more"


def caption_file_of(photo: str | Path) -> Path:
    """The caption file of a photo: its path with the extension replaced by .txt (`photo.jpg` → `photo.txt`)."""
    return Path(photo).with_suffix(CAPTION_SUFFIX)


def read_caption_file(path: Path) -> str:
    """The caption a file holds, stripped ('' when blank); non-UTF-8 text and several lines of text are refused."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"The caption file {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                        f"{error.start}); save it as UTF-8 (captions may hold any language in UTF-8).") from None
    except OSError as error:
        raise UserError(f"The caption file {path} cannot be read: {error}.") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        raise UserError(f"The caption file {path} holds {len(lines)} lines of text, but a caption file holds one "
                        "caption, on one line (kohya's sd-scripts would read only the first line, SimpleTuner one at "
                        "random). Join them into one line (tags separated by commas), or keep one.")
    return lines[0] if lines else ""


def _listed(names: Sequence[str]) -> str:
    more = f" … and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def merge_caption_files(columns: dict[str, list], folder: Path, caption_column: str | None, *, default_prompt: str,
                        config_key: str, report: bool = True) -> set[str]:
    """Apply the rule above to a local folder's rows, before they become a table.

    `columns` holds the rows as imagefolder makes them: "image" (absolute photo paths under the resolved `folder`)
    and one list per metadata.jsonl key. With a caption column, every photo's `.txt` caption is written into
    `columns[caption_column]` (made if metadata.jsonl has no such key), after the check that it agrees with the
    metadata.jsonl caption; metadata.jsonl's non-string values are left for the caption check to name. Returns the
    caption files' names (relative to the folder, as the skipped-file report names files): they are not reported as
    skipped files.
    """
    base = folder.resolve()
    captions: dict[Path, str] = {}  # caption file → its caption; a photo listed twice in metadata.jsonl reads it once
    for photo in columns["image"]:
        path = caption_file_of(photo)
        if path not in captions and path != Path(photo) and path.is_file():  # a photo named .txt is no caption
            captions[path] = read_caption_file(path) if caption_column is not None else ""
    names = {path.relative_to(base).as_posix() for path in captions}
    if not captions:
        return names
    if caption_column is None:
        if report:
            logger.warning("%s: %d photo(s) have a caption file beside them (%s), not used: data.caption_column is "
                           "null, so every photo trains with the instance prompt %r. To train with those captions, "
                           "set data.caption_column: text (docs/data.md, Captions).", config_key, len(captions),
                           _listed(sorted(names)), default_prompt)
        return names
    listed = columns.get(caption_column, [None] * len(columns["image"]))
    merged, conflicts = [], []
    for photo, value in zip(columns["image"], listed):
        path = caption_file_of(photo)
        caption = captions.get(path, "")
        if caption and isinstance(value, str) and value.strip() and value.strip() != caption:
            conflicts.append((photo, path, value.strip(), caption))
        merged.append(caption if caption and (value is None or isinstance(value, str)) else value)
    if conflicts:
        photo, path, listed_caption, file_caption = conflicts[0]
        others = f" ({len(conflicts) - 1} more photo(s) differ too)" if len(conflicts) > 1 else ""
        raise UserError(
            f"The photo {photo} is captioned twice, differently: its caption file {path} says {file_caption!r} and "
            f"its line in {folder / 'metadata.jsonl'} says {listed_caption!r} under {caption_column!r}{others}. A "
            f"photo's caption is its .txt file or its metadata.jsonl line ({config_key}, data.caption_column); where "
            "both caption a photo they must agree. Make them the same, or delete one of the two."
        )
    columns[caption_column] = merged
    if report:
        from_files = sum(bool(captions.get(caption_file_of(photo))) for photo in columns["image"])
        logger.info("%s: %d of %d photo(s) captioned by their .txt file; the others by metadata.jsonl's %r where it "
                    "has one, else by the instance prompt.", config_key, from_files, len(merged), caption_column)
    return names
