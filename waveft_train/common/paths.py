"""Two rules about names that several stages share, kept in one place (torch-free, so the config can use them).

- **Local path or hub id.** A hub id is `name` or `owner/name` (letters, digits, `_`, `.`, `-`); anything else —
  absolute, `~/…`, `./…`, `../…`, more than one `/`, a trailing `/`, a backslash — is meant as a local path. A name
  that could be either is local when a file or folder of that name exists. The config resolves local paths to
  absolute ones; the data loader, the model loader and the preflight then ask `is_local`.
- **Single-file checkpoints.** A name ending in `.safetensors` is one checkpoint file (the A1111/ComfyUI layout),
  always a local path; `.ckpt`, `.pt`, `.pth` and `.bin` are pickles, refused wherever weights load (unpickling can
  run code), and also always meant as local paths.
- **Hidden files.** `datasets`' imagefolder skips files under names starting with `.` or `__`; so do the subject
  and class image checks, so what we validate is exactly what gets trained on.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?")
SINGLE_FILE_SUFFIX = ".safetensors"
PICKLE_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def is_single_file(name: str) -> bool:
    """A `.safetensors` checkpoint file (by its name; whether it exists is the loader's question)."""
    return str(name).strip().lower().endswith(SINGLE_FILE_SUFFIX)


def is_pickle_checkpoint(name: str) -> bool:
    return str(name).strip().lower().endswith(PICKLE_CHECKPOINT_SUFFIXES)


def written_as_path(name: str) -> bool:
    """True when `name` cannot be a hub id, so it can only mean a local file or folder (a checkpoint file's name
    such as `model.safetensors` is a valid hub id by its letters, but always means a file)."""
    name = str(name)
    return (Path(name).expanduser().is_absolute() or not HUB_ID.fullmatch(name) or ".." in name
            or is_single_file(name) or is_pickle_checkpoint(name))


def is_local(name: str) -> bool:
    """A local file or folder: written as a path, or an existing one of that name (relative to the working folder)."""
    return written_as_path(name) or Path(str(name)).expanduser().exists()


def resolve_local_or_hub(name: str | None, base: Path, keywords: tuple[str, ...] = ()) -> str | None:
    """`name` as an absolute local path (resolved against `base`) when it is one, else unchanged (a hub id or keyword).

    A name that could be a hub id is taken as local only when `base / name` is an existing folder.
    """
    if name is None or name in keywords:
        return name
    if written_as_path(name) or (base / name).is_dir():
        return os.path.normpath(base / Path(name).expanduser())
    return name


def is_hidden(path: Path, root: Path) -> bool:
    """Whether `path` (below `root`) lies under a name starting with '.' or '__', which datasets skips."""
    return any(part.startswith((".", "__")) for part in Path(path).relative_to(root).parts)
