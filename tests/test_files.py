"""Atomic writers give final files and folders the modes a plain open()/mkdir() would (umask respected)."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from waveft_train.common.files import (
    apply_default_permissions,
    atomic_write_text,
    current_umask,
    save_png_atomically,
    write_atomically,
)


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under a known umask; the previous one is restored afterwards."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def plain_modes(folder: Path) -> tuple[int, int]:
    """(file mode, folder mode) that open() and mkdir() give under the current umask: the reference."""
    (folder / "plain-folder").mkdir()
    (folder / "plain-file").write_text("x")
    return mode(folder / "plain-file"), mode(folder / "plain-folder")


def test_current_umask_reads_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_atomic_writers_respect_the_umask(umask, tmp_path):
    file_mode, _ = plain_modes(tmp_path)
    assert file_mode == 0o666 & ~umask
    atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    write_atomically(tmp_path / "summary.json", lambda stream: stream.write(b"{}"))
    save_png_atomically(Image.new("RGB", (4, 4)), tmp_path / "samples" / "step-000001.png")
    for path in (tmp_path / "config.yaml", tmp_path / "summary.json", tmp_path / "samples" / "step-000001.png"):
        assert mode(path) == file_mode, f"{path.name}: {oct(mode(path))}"
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"
    assert not [p for p in tmp_path.rglob("*.tmp")], "no temporary file is left behind"


def test_replacing_a_file_also_gets_the_default_mode(umask, tmp_path):
    path = tmp_path / "metrics.jsonl"
    atomic_write_text(path, "1\n")
    atomic_write_text(path, "1\n2\n")
    assert mode(path) == 0o666 & ~umask and path.read_text() == "1\n2\n"


def test_apply_default_permissions_fixes_a_private_tree(umask, tmp_path):
    import tempfile

    file_mode, folder_mode = plain_modes(tmp_path)
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    (root / "sub").mkdir(mode=0o700)
    handle, name = tempfile.mkstemp(dir=root / "sub")
    os.close(handle)
    (root / "link").symlink_to(tmp_path / "plain-file")
    assert mode(root) == 0o700 and mode(Path(name)) == 0o600
    apply_default_permissions(root)
    assert (mode(root), mode(root / "sub"), mode(Path(name))) == (folder_mode, folder_mode, file_mode)


def test_the_tiny_model_cache_is_readable_like_normal_files(umask, tmp_path):
    from waveft_train.models.tiny import tiny_model_dir

    file_mode, folder_mode = plain_modes(tmp_path)
    folder = tiny_model_dir(tmp_path / "cache")
    assert mode(folder) == folder_mode
    for path in folder.rglob("*"):
        assert mode(path) == (folder_mode if path.is_dir() else file_mode), f"{path}: {oct(mode(path))}"


def test_make_folder_names_what_is_in_the_way(tmp_path):
    from waveft_train.common.errors import UserError
    from waveft_train.common.files import make_folder

    make_folder(tmp_path / "a" / "b", "output.dir")  # missing parents are made
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    cases = {
        tmp_path / "file": "it is a file",
        tmp_path / "file" / "sub": f"{tmp_path / 'file'} is a file",
        tmp_path / "dangling": f"it is a symlink to {tmp_path / 'nowhere'}, which does not exist",
    }
    for path, reason in cases.items():
        with pytest.raises(UserError, match=re.escape(f"output.dir {path} cannot be used as a folder: {reason}.")):
            make_folder(path, "output.dir")
