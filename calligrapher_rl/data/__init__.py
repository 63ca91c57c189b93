"""Datasets for Calligrapher training: loading, validating, and a synthetic text set.

`load_dataset(path)` reads a JSON/JSONL dataset file, a folder holding one, or the release's bench
folder; the value "bundled" means a small synthetic set built on first use in the cache folder
(env CALLIGRAPHER_RL_CACHE, default ~/.cache/calligrapher-rl), which the CPU demo trains on.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..cache import build_once, cache_dir
from .entries import DEFAULT_PROMPT, Entry, parse_entries, read_entry_images
from .synth import SYNTH_VERSION, render_sample, synthesize

BUNDLED = "bundled"
BUNDLED_GLYPHS = "bundled-glyphs"  # 4 four-character examples of the pretrained tiny's task (synth --task glyphs), 64 px

__all__ = [
    "BUNDLED", "BUNDLED_GLYPHS", "DEFAULT_PROMPT", "Entry", "TextImageDataset", "collate_fn", "default_dataset_dir",
    "ensure_default_dataset", "load_dataset", "parse_entries", "read_entry_images", "render_sample",
    "resolve_dataset_path", "synthesize",
]


_TORCH_NAMES = ("TextImageDataset", "collate_fn", "load_dataset")


def __getattr__(name: str):
    """The torch-backed names load on first use, so the `synth`/`validate` commands start fast."""
    if name in _TORCH_NAMES:
        from . import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_dataset_dir(resolution: int = 64, n: int = 16, seed: int = 0, task: str = "words") -> Path:
    """Where the default synthetic set of these parameters lives (the name changes with SYNTH_VERSION)."""
    kind = "synth" if task == "words" else f"synth-{task}"
    return cache_dir() / "datasets" / f"{kind}-v{SYNTH_VERSION}-r{resolution}-n{n}-s{seed}"


def ensure_default_dataset(resolution: int = 64, n: int = 16, seed: int = 0, task: str = "words") -> str:
    """Build the default set if it is not there yet; return the path of its data.jsonl.

    It is written into a temporary sibling folder and renamed into place, so a crash or a concurrent
    process never leaves a half-written set where a later run would read it.
    """
    final = build_once(default_dataset_dir(resolution, n, seed, task), "data.jsonl",
                       lambda tmp: synthesize(tmp, n=n, resolution=resolution, seed=seed, task=task))
    return str(final / "data.jsonl")


def resolve_dataset_path(value) -> str:
    """A dataset argument as a path: "bundled" (any case) means the default synthetic set."""
    if isinstance(value, str) and value.strip().lower() == BUNDLED:
        return ensure_default_dataset()
    if isinstance(value, str) and value.strip().lower() == BUNDLED_GLYPHS:
        from .synth import synthesize_glyph_set

        final = build_once(cache_dir() / "datasets" / f"glyphs-4char-v{SYNTH_VERSION}-n4-s1", "data.jsonl",
                           lambda tmp: synthesize_glyph_set(tmp, n=4, seed=1, length=4))
        return str(final / "data.jsonl")
    return os.fspath(value)
