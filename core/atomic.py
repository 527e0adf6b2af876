"""Atomic file output: write to a temporary file in the target folder, then rename.

A reader (or a crash) never sees a half-written file, because `os.replace` within
one folder is atomic on POSIX and Windows.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` on success.

    The temporary file is removed if the body raises, so nothing partial is left.
    """
    target = Path(target)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    os.close(fd)
    tmp_path = Path(tmp_name)
    # mkstemp creates the file as 0600; give it the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `target` atomically."""
    with atomic_path(target) as tmp_path:
        tmp_path.write_bytes(data)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 `text` to `target` atomically."""
    write_bytes_atomic(target, text.encode("utf-8"))


def append_line_durably(target: str | os.PathLike[str], line: str) -> None:
    """Append one whole line to `target` with a single write, then fsync.

    A crash can at worst leave the last line torn (a full disk, or a crash inside
    the write), so readers must drop a final line that lacks its newline.
    """
    if not line.endswith("\n"):
        line += "\n"
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_folder(folder: str | os.PathLike[str], option: str) -> None:
    """Raise OutputError unless `folder` is, or can become, a writable folder.

    Called before any model loads, so a bad output path fails fast. The check writes
    and removes one probe file in the nearest existing folder, which also catches
    read-only mounts and immutable folders that `os.access` misses for root.
    """
    from renderqa.core.errors import OutputError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{option} {folder} is a file; pass a folder path")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{option} {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise OutputError(
            f"{option} {folder}: folder is not writable ({error.strerror}); choose a "
            "writable location or fix its permissions"
        ) from None


def check_output_file(path: str | os.PathLike[str], option: str) -> None:
    """Raise OutputError unless `path` can be written as a file (folder must exist)."""
    from renderqa.core.errors import OutputError

    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; pass a file path")
    if not path.parent.is_dir():
        raise OutputError(
            f"{option} {path}: folder {path.parent} does not exist; create it first"
        )
    check_output_folder(path.parent, option)
