"""One writer per folder: an advisory lock that a second run (or export) on the same folder reports, naming the holder.

Why `flock`: the kernel releases it when the holding process ends in any way (kill -9 included), so a crashed run
never leaves a lock that blocks the next one, and there is no stale-PID guessing. The lock file also records who
holds it (PID, host, command), which is what the refusal names. It is deleted on release (a crash leaves it
behind, harmlessly: nobody holds it); a taker checks that the file it locked is still the one at the path, so a
deletion racing with a new taker cannot let two processes hold it. On network filesystems without lock support the
lock degrades to a warning-free no-op rather than refusing every run. Under `accelerate launch` only the main
process takes it: the other processes never write to the folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from waveft_train.common.errors import UserError

LOCK_NAME = ".waveft-train.lock"


class FolderLock:
    """`with FolderLock(folder, what="training run"):` holds the folder's lock for the block (or refuses)."""

    def __init__(self, folder: Path, *, what: str, lock_path: Path | None = None):
        self.folder, self.what = Path(folder), what
        self.path = lock_path if lock_path is not None else self.folder / LOCK_NAME
        self._descriptor: int | None = None

    def acquire(self) -> None:
        while True:
            descriptor = self._lock_file()
            if descriptor is None:
                return  # a filesystem without locks
            try:
                if os.fstat(descriptor).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(descriptor)  # the holder deleted the file as we locked it: take the new one
        self._descriptor = descriptor
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(record).encode("utf-8"), 0)

    def _lock_file(self) -> int | None:
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(
                    f"{self.folder} is in use by another {self.what} (PID {holder.get('pid', '?')} on host "
                    f"{holder.get('host', '?')}, started {holder.get('started', '?')}: {holder.get('command', '?')}). "
                    "Two writers in one folder would mix their files. Wait for it to finish, stop it, or choose "
                    f"another folder. (The lock is {self.path}; it is released when that process ends, even if it is "
                    "killed.)"
                ) from None
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return None  # a filesystem without locks: run unguarded rather than refuse everything
            raise
        return descriptor

    def release(self) -> None:
        if self._descriptor is not None:
            try:
                self.path.unlink(missing_ok=True)  # while still held, so no one locks a file about to vanish
            except OSError:
                pass
            os.close(self._descriptor)  # closing the descriptor releases the flock
            self._descriptor = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


def _read_holder(descriptor: int) -> dict:
    try:
        return json.loads(os.pread(descriptor, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
