"""The cache folder of built-on-first-use assets (the tiny model, the bundled dataset).

`build_once` writes into a temporary sibling folder and renames it into place, so a crash or a
concurrent builder never leaves a half-written folder where a later run would read it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserError


def cache_dir() -> Path:
    """env CALLIGRAPHER_RL_CACHE, default ~/.cache/calligrapher-rl."""
    return Path(os.environ.get("CALLIGRAPHER_RL_CACHE") or Path.home() / ".cache" / "calligrapher-rl")


def build_once(final: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """Ensure `final` exists and holds `marker` (a relative file path); `build(tmp_dir)` fills it once."""
    final = Path(final)
    if (final / marker).is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    except OSError as exc:
        raise UserError(f"cannot write the cache folder ({exc.strerror}); set CALLIGRAPHER_RL_CACHE",
                        where=str(final.parent)) from None
    try:
        build(tmp)
        if final.exists() and not (final / marker).is_file():  # a stale folder without its marker
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / marker).is_file():  # not a lost race with another builder: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
