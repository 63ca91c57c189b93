"""Group-relative advantages from rewards (GRPO and NFT share them).

Each prompt is sampled several times; an image's advantage is its reward relative to the other
images of the same prompt, so the policy learns what makes one rendering of a text better than
another rather than which prompts are easy. Rewards must already be gathered across processes.

A NaN reward means the reward call failed for that sample. It is an error to surface, never a silent
0: here it is left out of every mean and std, and its advantage is NaN, which the losses exclude.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np

__all__ = ["STD_EPS", "PerPromptStatTracker", "batch_advantages", "compute_advantages"]

STD_EPS = 1e-4


def _as_rewards(rewards) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"rewards must be one value per sample, got shape {r.shape}")
    return r


def _std(values: np.ndarray) -> float:
    """Population std of the finite values; 0 when fewer than two (so a lone sample scores 0)."""
    v = values[np.isfinite(values)]
    return float(v.std()) if v.size > 1 else 0.0


def batch_advantages(rewards) -> np.ndarray:
    """Batch z-score ``(r - mean) / (std + 1e-4)`` over the finite rewards; NaN stays NaN."""
    r = _as_rewards(rewards)
    ok = np.isfinite(r)
    out = np.full_like(r, np.nan)
    if ok.any():
        mean = float(r[ok].mean())
        out[ok] = (r[ok] - mean) / (_std(r) + STD_EPS)
    return out


def _freeze(key):
    """JSON turns tuples into lists; turn them back so prompt keys stay hashable after a resume."""
    return tuple(_freeze(k) for k in key) if isinstance(key, list) else key


class PerPromptStatTracker:
    """Per-prompt reward statistics over one epoch (Flow-GRPO's tracker).

    ``update`` adds the rewards to each prompt's history and scores them against that history:
    ``A = (r - mean_prompt) / (std + 1e-4)`` with ``std`` the prompt group's, or, with ``global_std``,
    that of all finite rewards of the call (steadier when groups are small). ``clear()`` at the start
    of every epoch. Prompts are any hashable (a string, or a tuple such as (text, reference id)).
    """

    def __init__(self, global_std: bool = False):
        self.global_std = bool(global_std)
        self.stats: dict[Hashable, list[float]] = {}
        self.history_prompts: set = set()

    def update(self, prompts: Sequence[Hashable], rewards) -> np.ndarray:
        r = _as_rewards(rewards)
        prompts = list(prompts)
        if len(prompts) != r.size:
            raise ValueError(f"{len(prompts)} prompts for {r.size} rewards")
        groups: dict[Hashable, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(_freeze(p), []).append(i)
        for p, idx in groups.items():
            finite = [float(r[i]) for i in idx if np.isfinite(r[i])]
            self.stats.setdefault(p, []).extend(finite)
            self.history_prompts.add(p)

        global_std = _std(r) if self.global_std else None
        out = np.full_like(r, np.nan)
        for p, idx in groups.items():
            history = np.asarray(self.stats[p], dtype=np.float64)
            if history.size == 0:
                continue  # every sample of this prompt failed: all NaN
            mean = float(history.mean())
            std = global_std if global_std is not None else _std(history)
            for i in idx:
                if np.isfinite(r[i]):
                    out[i] = (r[i] - mean) / (std + STD_EPS)
        return out

    def get_stats(self) -> tuple[float, int]:
        """(average number of valid rewards per prompt this epoch, prompts seen since creation)."""
        sizes = [len(v) for v in self.stats.values()]
        avg = float(sum(sizes) / len(sizes)) if sizes else 0.0
        return avg, len(self.history_prompts)

    def prompt_means(self) -> dict:
        """Mean valid reward of each prompt this epoch (for logging)."""
        return {p: float(np.mean(v)) for p, v in self.stats.items() if v}

    def clear(self) -> None:
        """Forget this epoch's rewards (the prompt history used by ``get_stats`` is kept)."""
        self.stats = {}

    def state_dict(self) -> dict:
        """Plain lists, floats and bools only: JSON-serialisable for an exact resume."""
        return {
            "global_std": self.global_std,
            "stats": [[p, list(map(float, v))] for p, v in self.stats.items()],
            "history_prompts": list(self.history_prompts),
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_std = bool(state["global_std"])
        self.stats = {_freeze(p): [float(x) for x in v] for p, v in state["stats"]}
        self.history_prompts = {_freeze(p) for p in state["history_prompts"]}


def compute_advantages(prompts: Sequence[Hashable], rewards, tracker: PerPromptStatTracker | None,
                       adv_clip_max: float) -> np.ndarray:
    """Advantages for a gathered batch: per-prompt when a tracker is given, else the batch z-score;
    then clipped to ``[-adv_clip_max, adv_clip_max]`` (NaN of failed rewards kept)."""
    if tracker is not None:
        adv = tracker.update(prompts, rewards)
    else:
        adv = batch_advantages(rewards)
    return np.clip(adv, -adv_clip_max, adv_clip_max)
