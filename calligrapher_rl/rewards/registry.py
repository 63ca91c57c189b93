"""Reward registry, the ``--rewards`` spec parser and :class:`RewardSet` (what the trainer holds).

Rewards register a class or factory under a name; ``make_reward`` passes each factory only the
options its signature accepts (``siglip_path``, ``device``, ...), so a cheap reward need not declare
options it ignores and a third-party reward can be registered without knowing all of them.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import math
import re
from typing import Callable

import numpy as np

from ..config import parse_reward_spec
from ..errors import UserError
from .base import Reward, RewardError, RewardSample
from .worker import DaemonWorker, Deadline

_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str):
    """Decorator: ``@register_reward("ocr") class OcrReward(Reward): ...``."""

    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def make_reward(name: str, **options) -> Reward:
    """Build one local reward; unknown name -> UserError listing the valid names."""
    if name not in _REGISTRY:
        raise UserError(f"unknown reward '{name}' (valid: {', '.join(available_rewards())})", field="--rewards")
    factory = _REGISTRY[name]
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in options.items() if takes_any or k in params}
    reward = factory(**kwargs)
    reward.name = name
    return reward


def parse_spec(spec: str) -> dict[str, float]:
    """``"ocr:0.7,style:0.3"`` -> {"ocr": 0.7, "style": 0.3}; a bare name weighs 1.0; names must be registered.

    The configuration's parser (one grammar for ``--rewards`` everywhere) with the registry's names.
    """
    return parse_reward_spec(spec, known=available_rewards())


class RewardSet:
    """Weighted rewards: ``score`` -> {name: array, ..., "total": weighted sum}.

    ``total`` is NaN for a sample where any component is NaN: a partial sum would be a biased reward.
    ``score_async`` runs ``score`` on a single (daemon) worker thread so the trainer can start the next
    rollout while this batch is scored; one worker keeps batches in order and engines single-threaded.
    ``deadlines``: {name: seconds} for local rewards whose call is cut at that time (worker.Deadline).
    """

    def __init__(self, rewards: dict[str, Reward], weights: dict[str, float], remote=None,
                 deadlines: dict[str, float] | None = None):
        self.rewards = rewards  # local ones
        self.weights = dict(weights)
        self.remote = remote  # a client.RemoteRewards computing the names not in `rewards`
        self.names = list(weights)
        self._deadlines = {n: Deadline(n, t) for n, t in (deadlines or {}).items() if t and n in rewards}
        self._pool: DaemonWorker | None = None

    def score(self, samples: list[RewardSample]) -> dict[str, np.ndarray]:
        n = len(samples)
        if not n:
            return {k: np.zeros(0) for k in [*self.names, "total"]}
        out: dict[str, np.ndarray] = {}
        if self.remote is not None:
            out.update(self.remote.score(samples))
        for name, reward in self.rewards.items():
            try:
                vals = self._deadlines[name](reward.score, samples) if name in self._deadlines else reward.score(samples)
            except RewardError:
                raise
            except Exception as exc:  # noqa: BLE001 - a crashed reward fails the batch, loudly
                raise RewardError(f"reward {name} failed on the batch: {type(exc).__name__}: {exc}") from exc
            if len(vals) != n:
                raise RewardError(f"reward {name} returned {len(vals)} scores for {n} samples")
            out[name] = np.asarray(vals, dtype=np.float64)
        total = np.zeros(n, dtype=np.float64)
        for name, w in self.weights.items():
            total = total + w * out[name]  # NaN propagates
        out["total"] = total
        return {k: out[k] for k in [*self.names, "total"]}

    def score_async(self, samples: list[RewardSample]) -> cf.Future:
        if self._pool is None:
            self._pool = DaemonWorker()
        return self._pool.submit(self.score, list(samples))

    def check_health(self) -> None:
        """Raise RewardError if a reward server is down (no-op for local rewards)."""
        if self.remote is not None:
            self.remote.check_health()

    def close(self) -> None:
        if self._pool is not None:  # a call still running (hung past every deadline) is left behind
            self._pool.shutdown(wait_s=1.0)
            self._pool = None
        for r in self.rewards.values():
            r.close()
        if self.remote is not None:
            self.remote.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CallableReward(Reward):
    """Any function ``fn(images, prompts, metadata) -> scores`` as a reward (the Python API's rewards).

    ``images`` are the generated PIL images, ``prompts`` the text each image should show, ``metadata`` one
    dict per image with ``text``, ``mask`` (PIL 'L', 255 = the repainted region), ``reference`` and
    ``source`` (PIL or None). ``scores`` holds one number per image; None or NaN marks a failed sample.
    """

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def score(self, samples: list[RewardSample]) -> list[float]:
        metadata = [{"text": s.text, "mask": s.mask, "reference": s.reference, "source": s.source} for s in samples]
        scores = self.fn([s.image for s in samples], [s.text for s in samples], metadata)
        scores = scores.tolist() if hasattr(scores, "tolist") else list(scores)  # numpy, torch or a sequence
        return [math.nan if v is None else float(v) for v in scores]


def _reward_name(obj) -> str:
    """A reward's name in metrics (`reward/<name>`): its `name`, else its function or class name, as a word."""
    raw = getattr(obj, "name", None)
    if not isinstance(raw, str) or raw == Reward.name:
        raw = getattr(obj, "__name__", None) or type(obj).__name__
    word = re.sub(r"[^a-z0-9_]+", "_", raw.lower()).strip("_") or "reward"
    return word if word[0].isalpha() else f"r_{word}"


def _entries(items) -> list[tuple[str, object, float]]:
    """(name, registered name or reward object, weight) of each item of the Python API's ``rewards=``."""
    out: list[tuple[str, object, float]] = []
    for item in [items] if isinstance(items, str) else list(items):
        name, weight = None, 1.0
        if isinstance(item, tuple) and len(item) == 3:
            name, item, weight = item
        elif isinstance(item, tuple) and len(item) == 2:
            item, weight = item
        if isinstance(item, str):
            if name is not None or weight != 1.0:  # ("ocr", 0.5) is the spec "ocr:0.5"
                item = f"{item}:{weight}"
            out.extend((n, n, w) for n, w in parse_spec(item).items())
            continue
        if not (isinstance(item, Reward) or callable(item)):
            raise UserError(f"a reward must be a registered name, a Reward or a callable "
                            f"(images, prompts, metadata) -> scores, got {type(item).__name__}", field="rewards")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            raise UserError(f"the weight of a reward must be a finite number, got {weight!r}", field="rewards")
        out.append((name or _reward_name(item), item, float(weight)))
    names = [n for n, _, _ in out]
    if not out or len(set(names)) != len(names):
        raise UserError(f"expected at least one reward, each name once, got {names}", field="rewards")
    return out


def build_rewards(spec, *, siglip_path=None, server_urls=None, device="cpu", timeout_s: float | None = None) -> RewardSet:
    """Build the rewards of ``spec``: a ``--rewards`` string, or a list mixing registered names (``"ocr"``,
    ``"ocr:0.7"``), :class:`Reward` objects and callables ``(images, prompts, metadata) -> scores``, each
    optionally as ``(item, weight)`` or ``(name, item, weight)``. Registered names are computed locally, or
    by the reward servers when ``server_urls`` is given; objects always run in this process. ``timeout_s``
    bounds each server request, each call of a local reward that makes one (e.g. the VLM judge) and each
    call of the objects passed here (a call past it is left running and its samples count as failed)."""
    entries = _entries(spec)
    weights = {name: w for name, _, w in entries}
    local: dict[str, Reward] = {}
    for name, item, _ in entries:
        if isinstance(item, Reward):
            item.name = name
            local[name] = item
        elif not isinstance(item, str):
            local[name] = CallableReward(item, name)
    # the caller's own objects get the deadline (a function that never returns must not hold the run); the
    # registered rewards bound their own network calls and may legitimately take long to load on first use
    deadlines = {name: timeout_s for name in local} if timeout_s else {}
    registered = [name for name, item, _ in entries if isinstance(item, str)]
    remote = None
    if server_urls:
        from .client import RemoteRewards

        urls = [u.strip() for u in server_urls.split(",")] if isinstance(server_urls, str) else list(server_urls)
        urls = [u for u in urls if u]
        if not urls:
            raise UserError("no URL given", field="--reward_server_url")
        if registered:
            remote = RemoteRewards(urls, registered, **({"timeout_s": timeout_s} if timeout_s else {}))
    else:
        options = {"timeout_s": timeout_s} if timeout_s else {}
        local.update({name: make_reward(name, siglip_path=siglip_path, device=device, **options) for name in registered})
    return RewardSet(local, weights, remote=remote, deadlines=deadlines)
