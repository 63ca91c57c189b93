"""Atomic file writes: write a temporary file beside the target, fsync, then rename over it.

A run killed mid-write (or a full disk) leaves the previous file intact, never half a checkpoint.
Temporaries are named `.NAME.*.tmp` beside their target so that the next start of a run can find and
remove what a killed writer left behind (checkpointing.remove_orphans).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator

from .disk import writing


def _read_umask() -> int:
    mask = os.umask(0o022)  # read once at import: os.umask() is process-wide and other threads write files
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _umask_mode(base: int) -> int:
    """`base` as open()/mkdir() would create it: mkstemp/mkdtemp make 0600/0700, which would hide a
    run's files from the other users of a shared machine."""
    return base & ~_UMASK


def _fsync_dir(folder: str) -> None:
    """Make a rename durable (the new directory entry), where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path in the target's folder; renamed onto `path` if the block succeeds."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with writing(path, _size(path)):  # a full disk: one line naming the device, the file and the space needed
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            yield tmp
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, _umask_mode(0o666))
            os.replace(tmp, path)
            _fsync_dir(folder)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _size(path: str) -> int:
    """About what a rewrite of `path` needs: its present size (at least a block)."""
    try:
        return max(os.path.getsize(path), 4096)
    except OSError:
        return 4096


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def overwrite_in_place(path: str | os.PathLike, text: str) -> None:
    """Last resort when an atomic write fails (a full disk: the temporary file gets no space): rewrite an
    existing small file in the blocks it already owns. Write first, truncate after, so the file never
    needs more space than it has while the new text is no longer than the old one's blocks. Not atomic:
    only for a final status, where a stale one is worse than a torn one. Never creates the file."""
    data = text.encode("utf-8")
    with open(path, "r+b") as fh:
        fh.write(data)
        fh.truncate(len(data))
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary folder; it replaces `path` (a checkpoint folder) only once complete."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        _fsync_tree(tmp)  # a power cut after the rename must not leave a complete-looking folder of empty files
        os.chmod(tmp, _umask_mode(0o777))
        if os.path.exists(path):
            old = tmp + ".old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(parent)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
