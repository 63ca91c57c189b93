"""Adapter references: a checkpoint folder, or a folder that only points at the file a run started from.

Every run keeps its starting point as `checkpoint-0/`. When the run started from a file
(`--initial_ip_adapter_path`, or the shipped `tiny-pretrained` adapter), copying it would cost 12 GB at real
size, so `checkpoint-0/` holds only `initial-adapter.json`:

    {"path": "/models/calligrapher.bin", "name": "/models/calligrapher.bin", "size": 12345, "fingerprint": "..."}

`fingerprint` is the SHA-256 of the size, the first and the last MiB (hashing 12 GB would take minutes at
every start): a file replaced since the run started is refused with one line, never silently used. A run
whose adapter started from its seeded random init holds the weights themselves (`ip-adapter.safetensors`).

`resolve_adapter_path` turns any of these into the file to read: a file is itself; a folder with
`initial-adapter.json` is the file it names; a checkpoint folder is its EMA file when it has one (the
weights the run evaluates), else its raw file, else its release `.bin`.
"""

from __future__ import annotations

import hashlib
import json
import os

from ..errors import UserError

POINTER = "initial-adapter.json"
FOLDER_FILES = ("ip-adapter-ema.safetensors", "ip-adapter.safetensors", "ip-adapter.bin")
_CHUNK = 1 << 20


def fingerprint(path: str) -> str:
    """SHA-256 of (size, first MiB, last MiB): cheap on a 12 GB file, and any rewrite of it shows."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(_CHUNK))
        if size > _CHUNK:
            fh.seek(max(_CHUNK, size - _CHUNK))
            h.update(fh.read(_CHUNK))
    return h.hexdigest()


def pointer_record(path: str, name: str | None = None) -> dict:
    """What `initial-adapter.json` holds for the adapter file `path` (`name`: how the user spelled it, e.g.
    `tiny-pretrained`, which is resolved again on load so a moved installation still works)."""
    real = os.path.abspath(path)
    return {"path": real, "name": name or real, "size": os.path.getsize(real), "fingerprint": fingerprint(real)}


def _read_pointer(folder: str) -> str:
    where = os.path.join(folder, POINTER)
    try:
        with open(where, encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserError(f"unreadable ({type(exc).__name__})", where=where) from None
    if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
        raise UserError("expected a JSON object with 'path', 'size' and 'fingerprint'", where=where)
    from .tiny import PRETRAINED_NAME, resolve_adapter_name

    target = resolve_adapter_name(rec["name"]) if rec.get("name") == PRETRAINED_NAME else rec["path"]
    if not os.path.isfile(target):
        raise UserError(f"the run started from {target}, which is no longer there", where=where)
    if rec.get("size") is not None and os.path.getsize(target) != rec["size"]:
        raise UserError(f"the run started from {target} of {rec['size']} bytes; it now has "
                        f"{os.path.getsize(target)} (the file was replaced)", where=where)
    if rec.get("fingerprint") and fingerprint(target) != rec["fingerprint"]:
        raise UserError(f"{target} changed since the run started (its fingerprint differs)", where=where)
    return target


def resolve_adapter_path(path: str | os.PathLike) -> str:
    """The adapter file a path stands for (see the module docstring); a file is returned unchanged."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path
    if os.path.isfile(os.path.join(path, POINTER)):
        return _read_pointer(path)
    for name in FOLDER_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise UserError(f"a folder without an adapter (expected {POINTER} or one of {', '.join(FOLDER_FILES)})",
                    where=path)


def is_adapter_folder(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in (POINTER, *FOLDER_FILES))
