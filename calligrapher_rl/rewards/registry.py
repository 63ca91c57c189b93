"""Reward registry, the ``--rewards`` spec parser and :class:`RewardSet` (what the trainer holds).

Rewards register a class or factory under a name; ``make_reward`` passes each factory only the
options its signature accepts (``siglip_path``, ``device``, ...), so a cheap reward need not declare
options it ignores and a third-party reward can be registered without knowing all of them.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import math
from typing import Callable

import numpy as np

from ..errors import UserError
from .base import Reward, RewardError, RewardSample

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
    """``"ocr:0.7,style:0.3"`` -> {"ocr": 0.7, "style": 0.3}; a bare name weighs 1.0."""
    valid = ", ".join(available_rewards())
    out: dict[str, float] = {}
    items = [it.strip() for it in (spec or "").split(",")]
    if not any(items):
        raise UserError(f"no reward given; expected NAME[:WEIGHT],... with NAME one of: {valid}", field="--rewards")
    for item in items:
        if not item:
            raise UserError(f"empty entry in '{spec}'; expected NAME[:WEIGHT],...", field="--rewards")
        name, sep, w = item.partition(":")
        name = name.strip()
        if name not in _REGISTRY:
            raise UserError(f"unknown reward '{name}' (valid: {valid})", field="--rewards")
        try:
            weight = float(w) if sep else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise UserError(f"weight '{w.strip()}' of '{name}' is not a finite number", field="--rewards")
        if name in out:
            raise UserError(f"reward '{name}' given twice", field="--rewards")
        out[name] = weight
    return out


class RewardSet:
    """Weighted rewards: ``score`` -> {name: array, ..., "total": weighted sum}.

    ``total`` is NaN for a sample where any component is NaN: a partial sum would be a biased reward.
    ``score_async`` runs ``score`` on a single worker thread so the trainer can start the next rollout
    while this batch is scored; one worker keeps batches in order and engines single-threaded.
    """

    def __init__(self, rewards: dict[str, Reward], weights: dict[str, float], remote=None):
        self.rewards = rewards  # local ones
        self.weights = dict(weights)
        self.remote = remote  # a client.RemoteRewards computing the names not in `rewards`
        self.names = list(weights)
        self._pool: cf.ThreadPoolExecutor | None = None

    def score(self, samples: list[RewardSample]) -> dict[str, np.ndarray]:
        n = len(samples)
        if not n:
            return {k: np.zeros(0) for k in [*self.names, "total"]}
        out: dict[str, np.ndarray] = {}
        if self.remote is not None:
            out.update(self.remote.score(samples))
        for name, reward in self.rewards.items():
            try:
                vals = reward.score(samples)
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
            self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards")
        return self._pool.submit(self.score, list(samples))

    def check_health(self) -> None:
        """Raise RewardError if a reward server is down (no-op for local rewards)."""
        if self.remote is not None:
            self.remote.check_health()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for r in self.rewards.values():
            r.close()
        if self.remote is not None:
            self.remote.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def build_rewards(spec: str, *, siglip_path=None, server_urls=None, device="cpu") -> RewardSet:
    """Parse ``spec`` and build the rewards, locally or (``server_urls`` given) through the client."""
    weights = parse_spec(spec)
    if server_urls:
        from .client import RemoteRewards

        urls = [u.strip() for u in server_urls.split(",")] if isinstance(server_urls, str) else list(server_urls)
        urls = [u for u in urls if u]
        if not urls:
            raise UserError("no URL given", field="--reward_server_url")
        return RewardSet({}, weights, remote=RemoteRewards(urls, list(weights)))
    rewards = {name: make_reward(name, siglip_path=siglip_path, device=device) for name in weights}
    return RewardSet(rewards, weights)
