"""Atomic writes of files and folders: a temporary sibling, fsync, then rename. Readers see the old or the new, never half.

Files go through `write_atomically`; folders (adapters, checkpoints, merged exports, the embedded model cache)
through `atomic_folder`. Leftovers of a crash are hidden siblings named `.tmp-*` (and `.old-*` during a swap).

Temporary files and folders from `tempfile` are private (mode 600 / 700) whatever the umask. Everything that
is renamed into place gets the modes a plain `open()` / `mkdir()` would give instead (0o666 / 0o777 minus the
umask), so outputs are as readable by others as the user's umask allows.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import struct
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from waveft_train.common.errors import UserError


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status, since 4.7).

    Elsewhere it is read the only portable way, by setting and restoring it (briefly racy with other threads).
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 minus the umask."""
    return 0o666 & ~current_umask()


def apply_default_permissions(root: Path) -> None:
    """Give `root` and everything below it the modes of normally created files and folders.

    For trees built in a `tempfile.mkdtemp` folder or written by libraries that write through `mkstemp`
    (safetensors does), before they are renamed into place. Symbolic links are left alone.
    """
    root = Path(root)
    umask = current_umask()
    file_mode, folder_mode = 0o666 & ~umask, 0o777 & ~umask
    for folder, folders, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.chmod(path, file_mode)
        for name in folders:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, folder_mode)
    if not root.is_symlink():
        os.chmod(root, folder_mode if root.is_dir() else file_mode)


def write_atomically(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(stream)` on a hidden temporary file beside `path`, then replace `path` with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, default_file_mode())  # mkstemp made it 0o600
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda stream: stream.write(text.encode("utf-8")))


def save_png_atomically(image, path: Path) -> None:
    """A PIL image as PNG."""
    write_atomically(path, lambda stream: image.save(stream, format="PNG"))


def make_folder(path: Path, what: str) -> None:
    """Create `path` (and its parents) if missing, or fail with one paragraph naming `what` (a config key or option).

    Runs take this early for the folders they will write, so a path that cannot be a folder (a file, a read-only
    place) fails in seconds rather than after the models have loaded.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(path))
    except OSError as error:
        file = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if path.is_symlink() and not path.exists():
            reason = f"it is a symlink to {os.readlink(path)}, which does not exist"
        elif file is not None:
            reason = "it is a file" if file == path else f"{file} is a file"
        else:
            culprit = f" ({error.filename})" if error.filename and str(error.filename) != str(path) else ""
            reason = f"{(error.strerror or str(error)).lower()}{culprit}"
        raise UserError(f"{what} {path} cannot be used as a folder: {reason}. Choose a folder you can write to "
                        "(it is created if missing).") from None


TEMP_PREFIX = ".tmp-"  # a folder being written (left behind only by a crash)
OLD_PREFIX = ".old-"  # the previous folder during a swap


def is_leftover(name: str) -> bool:
    """A name `atomic_folder` uses for work in progress, which only a crash leaves behind."""
    return name.startswith((TEMP_PREFIX, OLD_PREFIX))


def write_bytes_synced(path: Path, data: bytes) -> None:
    """Write and fsync, so a rename after this never publishes a file whose bytes are still in flight."""
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def fsync_folder(folder: Path) -> None:
    """Persist renames in `folder` (best effort: some filesystems refuse fsync on folders)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def atomic_folder(target: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty hidden sibling of `target` to write into; when the block succeeds it becomes `target`.

    The new folder gets the umask's modes and is fsynced before the rename. With `replace`, an existing `target`
    is renamed aside, the new one renamed in, and only then is the old one deleted; without it, an existing
    `target` (e.g. built meanwhile by another process racing for the same cache) wins and the new one is
    discarded. On any error the sibling is removed and `target` is left as it was.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} exists and is not a folder; cannot write a folder there. Remove it or choose "
                        "another place.")
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    scratch = target.parent / f"{TEMP_PREFIX}{target.name}-{token}"
    old = target.parent / f"{OLD_PREFIX}{target.name}-{token}"
    scratch.mkdir()
    try:
        yield scratch
        apply_default_permissions(scratch)
        fsync_folder(scratch)
        if not replace:
            try:
                os.rename(scratch, target)  # fails when another process has put its folder there meanwhile
            except OSError:
                if not target.exists():
                    raise
                shutil.rmtree(scratch, ignore_errors=True)
            fsync_folder(target.parent)
            return
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(scratch, target)
        except BaseException:
            if old.exists():
                os.replace(old, target)
            raise
        fsync_folder(target.parent)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Any failure to write `what` at `path` (full disk, permissions, I/O error; safetensors' own error type) becomes
    one paragraph naming the path. The writers below are atomic, so nothing half-written is left behind."""
    try:
        yield
    except UserError:
        raise
    except OSError as error:
        where = f" ({error.filename})" if error.filename and str(error.filename) != str(path) else ""
        raise UserError(f"Could not write {what} to {path}{where}: {error.strerror or error}. Nothing was "
                        "half-written. Free some disk space or fix the permissions, then rerun the same command."
                        ) from error
    except Exception as error:
        if type(error).__name__ != "SafetensorError":  # safetensors reports I/O failures as its own type
            raise
        raise UserError(f"Could not write {what} to {path}: {str(error).strip()}. Nothing was half-written. Free "
                        "some disk space or fix the permissions, then rerun the same command.") from error


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets; `__metadata__`), without reading
    the tensors. Raises ValueError naming what is wrong when the file is too short, has no valid header, or is
    shorter or longer than its header says (a truncated copy): a cheap check before gigabytes are loaded."""
    try:
        size = Path(path).stat().st_size
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise ValueError("is too short to be a safetensors file")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > size - 8:
                raise ValueError("has a header longer than the file")
            header = json.loads(file.read(header_size))
    except OSError as error:
        raise ValueError(f"cannot be read ({error.strerror or error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"has no valid safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise ValueError("has no valid safetensors header")
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    expected = 8 + header_size + max(ends, default=0)
    if size != expected:
        raise ValueError(f"has {size} bytes but its header describes {expected}")
    return header
