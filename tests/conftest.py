"""Shared test set-up: offline, one cache folder per session (the tiny model is built once), CPU threads."""

from __future__ import annotations

import gc
import os
import tempfile

import pytest

_CACHE = tempfile.mkdtemp(prefix="calligrapher-rl-test-cache-")
os.environ.setdefault("CALLIGRAPHER_RL_CACHE", _CACHE)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny model's ops are far too small for intra-op threads: on 2 cores one thread per process (and
# pytest-xdist's two workers) is several times faster than threads fighting over the cores.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_paths() -> tuple[str, str]:
    """(flux-fill folder, siglip folder) of the embedded tiny model."""
    from calligrapher_rl.models.tiny import ensure_tiny

    return ensure_tiny()


@pytest.fixture(scope="session")
def tiny_stack(tiny_paths):
    from calligrapher_rl.models.stack import CalligrapherStack

    return CalligrapherStack.from_pretrained(*tiny_paths, num_style_tokens=8)


def pytest_configure(config):
    """Hand tests to the xdist workers one at a time (`--maxschedchunk 1`, unless given). xdist 3's `load`
    schedule otherwise sends each worker a first chunk of consecutive tests (a quarter of its share: 57 of the
    suite's 463), so the slow tests sorted first below all went to gw0, which ran ~160 s longer than gw1."""
    if getattr(config.option, "maxschedchunk", 0) is None:  # the option exists (xdist) and was not given
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(config, items):
    """The slow (learning, multi-process) tests first: handed out one at a time (pytest_configure), the long ones
    start at once on the two xdist workers and the many short ones fill in behind them, instead of a long one
    starting last and running alone."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else 1)  # stable: otherwise collection order


def pytest_collection_finish(session):
    """Exempt what collection built (torch, diffusers, gradio, ...: most of a worker's ~900k objects) from the
    cyclic garbage collector: each full collection walked all of it, 25 s of a worker's ~1100 s in a full run,
    and pytest's five collections at the session's end. Measured on two modules: 5.8 s of GC -> 3.2 s."""
    gc.collect()
    gc.freeze()

