"""A full disk, said in one line: `no space left on DEVICE PATH, needs ~N GB (M GB free on MOUNT)`.

Each writer reports a full disk in its own words: Python's `OSError: [Errno 28]` without the file's name
when a write (not the open) fails, torch's `RuntimeError: [enforce fail at inline_container.cc:...]
... file write failed`, safetensors' `IoError(... StorageFull ...)`. `writing(path, needed_bytes)` turns
any of them into `DiskFull` (an OSError, errno ENOSPC) naming the device, the path and the space needed,
so the trainer's one-line error and status.json say "disk" and what to free.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Iterator

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how torch's zip writer and safetensors (Rust) word a failed write
_WRITE_FAILED = ("file write failed", "inline_container", "StorageFull", "No space left", "os error 28",
                 "code: 28", "unexpected pos")


class DiskFull(OSError):
    def __init__(self, message: str, path: str, needed: float = 0):
        super().__init__(errno.ENOSPC, message, path)
        self.message, self.needed = message, needed

    def __str__(self) -> str:
        return self.message


class RamFull(DiskFull):
    """A write into tmpfs refused for want of RAM (check_memory_backed_room): its message stands as written."""


def _existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _partition_of(path: str) -> tuple[str, str, str]:
    """(device, mount point, filesystem type) of the filesystem holding `path`: the longest matching mount."""
    real = os.path.realpath(_existing(path))
    best = ("?", "/", "")
    try:
        import psutil

        for part in psutil.disk_partitions(all=True):
            mount = part.mountpoint.rstrip("/") or "/"
            if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[1]):
                best = (part.device or part.fstype or "?", mount, part.fstype)
    except Exception:  # noqa: BLE001 - the device only decorates the message; an unknown type skips the RAM check
        pass
    return best


def device_of(path: str) -> tuple[str, str]:
    """(device, mount point) of the filesystem holding `path`."""
    return _partition_of(path)[:2]


def fstype_of(path: str) -> str:
    """The filesystem type holding `path` ("tmpfs", "ext4", ...; "" when unknown)."""
    return _partition_of(path)[2]


def check_memory_backed_room(path: str, file_bytes: float, host_bytes: float = 0, available: float | None = None) -> None:
    """A run folder on tmpfs (/dev/shm) is written into RAM: a checkpoint there takes its size out of the host's
    memory, beside the host copies the save makes (`host_bytes`). Where that exceeds what the machine has
    available the kernel would kill the process mid-write (SIGKILL: no message, no status); raise DiskFull
    instead, before writing, naming the RAM. A disk-backed folder is left to the disk checks."""
    if fstype_of(path) != "tmpfs":
        return
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    need = file_bytes + host_bytes
    if need > available:
        raise RamFull(f"not enough memory to write {path} into tmpfs (RAM): needs ~{_gb(max(need, 1e7))} GB, {_gb(available)} GB "
                       f"available; put --output_dir on a disk or free memory", path, need)


def _gb(n: float) -> str:
    return f"{max(n, 0) / 1e9:.2f}"


def no_space(path: str, needed_bytes: float | None = None) -> DiskFull:
    device, mount = device_of(path)
    try:
        free = shutil.disk_usage(_existing(path)).free
    except OSError:
        free = 0
    needed = max(needed_bytes or 0, 1e7)  # at least ~0.01 GB: a small file needs little, but never "0.00"
    return DiskFull(f"no space left on {device} {path}, needs ~{_gb(needed)} GB ({_gb(free)} GB free on {mount})",
                    path, needed)


def is_full(exc: BaseException, path: str | None = None, needed_bytes: float | None = None) -> bool:
    """Is `exc` a write that failed for want of space?  A library's own wording counts when the free
    space is below what the write needed (or the message says so)."""
    if isinstance(exc, DiskFull):
        return True
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    text = str(exc)
    if not any(w in text for w in _WRITE_FAILED):
        return False
    if "No space" in text or "StorageFull" in text or "os error 28" in text or "code: 28" in text:
        return True
    if path is None:
        return False
    try:
        return shutil.disk_usage(_existing(path)).free < max(needed_bytes or 0, 1 << 20)
    except OSError:
        return False


def as_disk_full(exc: BaseException, path: str, needed_bytes: float | None = None) -> BaseException:
    """`exc` as a DiskFull naming `path` (what the writer was writing, not its temporary) when it is a full
    disk; else `exc`."""
    if isinstance(exc, RamFull) or not is_full(exc, path, needed_bytes):
        return exc
    needed = max(needed_bytes or 0, getattr(exc, "needed", 0))  # a nested writer's part of a larger write
    return no_space(os.fspath(path), needed)


@contextlib.contextmanager
def writing(path: str, needed_bytes: float | None = None) -> Iterator[None]:
    """Writes inside the block that fail for want of space raise DiskFull naming `path` (the outermost
    block names the file or folder: a checkpoint, not its temporary's first file)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - translated only when it is a full disk, else re-raised as is
        translated = as_disk_full(exc, path, needed_bytes)
        if translated is exc:
            raise
        raise translated from None
