"""A diverged policy is a failure of the run, never of the reward servers.

Two places show it. The rollouts: a sample whose latents (or GRPO log-probs) are not finite came from a
policy that has blown up; it is not scored (a NaN picture decodes to a black image, which a reward would
happily score), it is counted under `rollout/nonfinite`, and it is zeroed so that its (masked) part of the
update cannot carry a NaN into the gradient. The weights: after each optimizer step the trainable weights
must be finite and their norm within `--max_weight_norm_growth` times the norm before the first update.
A run that fails either check ends `failed` with the cause and the last healthy step, and no checkpoint is
ever written from weights that fail the check (the newest earlier checkpoint stays the run's last).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging

import numpy as np
import torch

from ..models.checkpoints import nonfinite_tensors

logger = logging.getLogger("calligrapher_rl.training")


class Diverged(RuntimeError):
    """The policy diverged: its samples or its weights are not healthy. The message names the cause."""


# ------------------------------------------------------------------ rollouts
def finite_samples(ro) -> np.ndarray:
    """One bool per rollout sample: every latent of its trajectory and every log-prob is finite."""
    ok = torch.isfinite(ro.latents).flatten(1).all(1) & torch.isfinite(ro.log_probs).flatten(1).all(1)
    return ok.cpu().numpy()


@torch.no_grad()
def zero_nonfinite(ro, ok: np.ndarray) -> None:
    """Replace the non-finite samples' trajectories by zeros in place: their rewards are NaN, so the loss
    masks them out, and a finite input keeps 0 x (their Jacobian) from turning the gradient into NaN."""
    bad = torch.as_tensor(~ok, device=ro.latents.device)
    if bad.any():
        ro.latents[bad] = 0.0
        ro.log_probs[bad.to(ro.log_probs.device)] = 0.0


def score_finite(rewards, samples: list, ok: np.ndarray) -> cf.Future:
    """Score only the finite samples (asynchronously); the future's arrays hold NaN for the others."""
    keep = [i for i, good in enumerate(ok) if good]
    if len(keep) == len(samples):
        return rewards.score_async(samples)
    inner = rewards.score_async([samples[i] for i in keep]) if keep else None
    out: cf.Future = cf.Future()

    def expand(done: cf.Future | None) -> None:
        try:
            got = done.result() if done is not None else {name: np.zeros(0) for name in [*rewards.names, "total"]}
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the result
            out.set_exception(exc)
            return
        full = {}
        for name, vals in got.items():
            arr = np.full(len(samples), np.nan)
            arr[keep] = np.asarray(vals, dtype=np.float64)
            full[name] = arr
        out.set_result(full)

    if inner is None:
        expand(None)
    else:
        inner.add_done_callback(expand)
    return out


# ------------------------------------------------------------------ weights
@torch.no_grad()
def weight_norm(params) -> float:
    """The L2 norm of all `params`, summed in float64 per tensor: weights of 1e30 overflow a float32 sum of
    squares, and a 3 B-parameter adapter must not be copied whole to a wider dtype."""
    total = 0.0
    for p in params:
        total += float(torch.linalg.vector_norm(p.detach(), dtype=torch.float64)) ** 2
    return total ** 0.5


class WeightHealth:
    """The trainable weights after each optimizer step. Warns when nothing trains (a gradient norm of
    exactly 0 for `zero_steps` steps in a row); records a `failure` when they are non-finite or their norm
    is more than `growth` times the norm before the first update (`growth` 0: no norm alarm)."""

    def __init__(self, zero_steps: int = 3, growth: float = 100.0):
        self.zero_steps, self.growth = zero_steps, growth
        self.norm0: float | None = None
        self.zero_streak = 0
        self.last_healthy_step: int | None = None
        self.sampled_ok_step: int | None = None  # the last step whose weights rolled out finite samples
        self.failure: str | None = None

    def baseline(self, params, step: int) -> None:
        """Call before the first update of this process (a resumed run: after loading the checkpoint)."""
        if self.norm0 is None:
            self.norm0 = weight_norm(params)
            self.last_healthy_step = step if not self.problem_of(self.norm0) else None

    def problem_of(self, norm: float) -> str | None:
        if not np.isfinite(norm):  # a float64 sum of float32 squares overflows only on a NaN or an infinity
            return "non-finite values in the trainable weights"
        if self.growth and self.norm0 and norm > self.growth * self.norm0:
            return (f"the trainable weight norm grew from {self.norm0:.3g} (before the first update) to {norm:.3g}, "
                    f"over {self.growth:g}x (--max_weight_norm_growth)")
        return None

    def check(self, params, applied: bool, grad_norm: float, step: int) -> float:
        """Call after each optimizer step (`applied` False when it was skipped) with the step it reached;
        returns the weight norm and records a failure (`failure`) the first time the weights are unhealthy."""
        norm = weight_norm(params)
        self.zero_streak = self.zero_streak + 1 if applied and grad_norm == 0 else 0
        if self.zero_streak == self.zero_steps:
            logger.warning("gradient norm exactly 0 for %d optimizer steps in a row: nothing trains (is "
                           "--ip_adapter_scale 0, or is every reward of each group equal?)", self.zero_steps)
        problem = self.problem_of(norm)
        if problem is None:
            self.last_healthy_step = step
        elif self.failure is None:
            self.failure = self.describe(f"diverged at step {step}: {problem}")
        return norm

    def describe(self, what: str) -> str:
        healthy = ("; the last healthy weights were those of step "
                   f"{self.last_healthy_step}" if self.last_healthy_step is not None else "")
        return f"{what}{healthy}; no checkpoint is written from the diverged weights"


def check_rollout_health(nonfinite: int, total: int, streak: int, limit: int, step: int,
                         health: WeightHealth) -> int:
    """After an epoch's rollouts (counts over all processes): returns the new streak of epochs with
    non-finite samples; raises Diverged when all samples are non-finite, or `limit` epochs in a row had some."""
    if not nonfinite:
        health.sampled_ok_step = step
        return 0
    streak += 1
    logger.warning("%d of %d rollout samples are not finite (a policy failure, not a reward failure): not scored, "
                   "left out of the update (%d epoch(s) in a row, limit %d)", nonfinite, total, streak, limit)
    if nonfinite == total or streak >= limit:
        what = (f"all {total} rollout samples" if nonfinite == total
                else f"rollout samples of {streak} epochs in a row (--max_nonfinite_steps {limit})")
        health.last_healthy_step = health.sampled_ok_step  # these weights passed the weight check, yet diverged
        raise Diverged(health.describe(f"the policy diverged at step {step}: non-finite values in {what}"))
    return streak


def save_refusal(health: WeightHealth, diverged: bool, adapter) -> str | None:
    """Why a checkpoint of the live adapter must not be written (None: it may): the run diverged, or a
    weight of the adapter (trainable or not) is not finite."""
    if diverged or health.failure:
        return health.failure or "the policy diverged"
    bad = nonfinite_tensors(adapter.named_parameters())
    if bad:
        return f"non-finite values in {len(bad)} adapter tensor(s), e.g. {bad[0]}"
    return None
