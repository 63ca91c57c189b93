"""Advantage Weighted Matching (AWM; Xue et al. 2025, arXiv 2509.25050).

AWM trains on clean rollouts, like DiffusionNFT, with the pretraining loss itself: each rollout's ``x0``
is re-noised at a few schedule timesteps and the flow-matching error of the current velocity is the
(negative) log-likelihood surrogate of the sample. A PPO-style ratio of these surrogates, weighted by
the advantages, is the policy loss: good samples are matched more closely, bad ones less. On-policy
(one optimizer step per rollout) the ratio is exactly 1 and the gradient is that of
``mean(A * weighted flow-matching loss)``. Two velocity-MSE terms keep the policy near the reference
(start of RL) and near a slowly following copy of itself (the "EMA" policy of the authors' code).

Pure tensor functions; ``training/awm_update.py`` feeds them. Formulas: ``docs/rl-formulas.md``.
"""

from __future__ import annotations

import torch

from .grpo import grpo_loss, masked_mean

__all__ = ["AWM_WEIGHTINGS", "AWM_EMA_DECAY_TYPES", "awm_log_likelihood", "awm_loss", "awm_timestep_indices",
           "velocity_kl", "awm_ema_decay"]

AWM_WEIGHTINGS = ("uniform", "t", "t2", "huber", "ghuber")
AWM_EMA_DECAY_TYPES = ("linear", "constant")
_TINY = 1e-10  # keeps the (generalised) Huber root differentiable at a zero error, as the authors do


def _mean_dims(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def awm_log_likelihood(v_theta: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t, weighting: str = "ghuber",
                       ghuber_power: float = 0.25) -> torch.Tensor:
    """The per-sample surrogate log-likelihood: minus the weighted flow-matching error, shape [B].

    ``e = mean_dims((v_theta - (eps - x0))^2)`` at ``x_t = (1 - t) x0 + t eps``; then
    ``uniform``: ``-e``; ``t``: ``-t e``; ``t2``: ``-t^2 e``; ``huber``: ``-t (sqrt(e + 1e-10) - 1e-5)``;
    ``ghuber`` (the authors' default, power ``p`` = 0.25): ``-t ((e + 1e-10)^p - (1e-10)^p) / p``.
    The Huber forms grow slower than ``e``, so a few badly matched samples do not dominate the gradient.
    """
    if weighting not in AWM_WEIGHTINGS:
        raise ValueError(f"unknown awm weighting {weighting!r}; expected one of {', '.join(AWM_WEIGHTINGS)}")
    if ghuber_power <= 0:
        raise ValueError(f"ghuber_power must be > 0, got {ghuber_power}")
    v = v_theta.float()
    if not (v.shape == x0.shape == eps.shape):
        raise ValueError("v_theta, x0 and eps must share a shape")
    err = _mean_dims((v - (eps.detach().float() - x0.detach().float())) ** 2)
    tt = torch.as_tensor(t, dtype=torch.float32, device=v.device).reshape(-1)
    tt = tt.expand(v.shape[0]) if tt.numel() == 1 else tt
    if tt.numel() != v.shape[0]:
        raise ValueError(f"t must be a scalar or one value per sample ({v.shape[0]}), got {tt.numel()}")
    if weighting == "uniform":
        return -err
    if weighting == "t":
        return -err * tt
    if weighting == "t2":
        return -err * tt**2
    if weighting == "huber":
        return -(torch.sqrt(err + _TINY) - 1e-5) * tt
    p = float(ghuber_power)
    return -((err + _TINY) ** p - _TINY**p) * tt / p


def awm_loss(log_lik: torch.Tensor, old_log_lik: torch.Tensor, advantages: torch.Tensor, *, clip_range: float,
             adv_clip_max: float, advantage_max: float, valid: torch.Tensor | None = None):
    """PPO-clip on the AWM surrogate: ``mean(max(-A' r, -A' clip(r, 1 - c, 1 + c)))`` with
    ``r = exp(log_lik - old_log_lik)`` and ``A' = clip(A, -M, M) / M * advantage_max`` (``M`` =
    ``adv_clip_max``: the advantages are rescaled into ``[-advantage_max, advantage_max]``, 1 by default).

    A NaN advantage (failed reward) and samples outside ``valid`` are left out. Returns
    ``(loss, stats)`` with GRPO's statistics (``clipfrac``, ``ratio/mean`` ...).
    """
    if advantage_max <= 0 or adv_clip_max <= 0:
        raise ValueError(f"advantage_max ({advantage_max}) and adv_clip_max ({adv_clip_max}) must be > 0")
    adv = torch.clamp(advantages.detach().float(), -adv_clip_max, adv_clip_max) / adv_clip_max * advantage_max
    return grpo_loss(log_lik, old_log_lik, adv, clip_range, advantage_max, valid=valid)


def velocity_kl(v_theta: torch.Tensor, v_other: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean over the batch of mean_dims((v_theta - v_other)^2)`` (the authors' "Uniform" KL weight);
    ``mask`` picks the samples that count (0, still attached, when none)."""
    per_sample = _mean_dims((v_theta.float() - v_other.detach().float()) ** 2)
    if mask is None:
        return per_sample.mean()
    return masked_mean(per_sample, mask)


def awm_timestep_indices(num_steps: int, fraction: float, count: int, generator: torch.Generator | None = None
                         ) -> torch.Tensor:
    """``count`` schedule indices, one drawn uniformly in each of ``count`` equal strata of ``[1, M)``,
    ``M = int(num_steps * fraction)`` (the authors' ``discrete_wo_init``: the pure-noise sigma 1 at index 0
    is never trained). Boundaries ``linspace(1, M, count + 1)`` truncated to integers; the index of stratum
    ``k`` is ``lo_k + floor(u_k (hi_k - lo_k))``. Shared by the whole batch, in increasing order."""
    m = int(num_steps * fraction)
    if not 1 <= count <= m - 1:
        raise ValueError(f"awm: {count} timesteps do not fit in schedule indices [1, {m}) "
                         f"(int(steps {num_steps} x fraction {fraction}) - 1 = {m - 1} at most)")
    bounds = torch.linspace(1, m, count + 1, dtype=torch.float32)
    lo, hi = bounds[:-1].long(), bounds[1:].long()
    u = torch.rand(count, generator=generator)
    return lo + (u * (hi - lo)).long()


def awm_ema_decay(step: int, decay: float, decay_type: str = "linear") -> float:
    """``eta`` of the EMA policy's update ``ema <- eta ema + (1 - eta) theta`` after each epoch:
    ``constant``: ``decay``; ``linear``: ``min(decay, 0.001 step)`` (the authors' default, decay 0.3), so
    early on the EMA policy is the previous epoch's weights, a trust region around the rollout policy."""
    if decay_type not in AWM_EMA_DECAY_TYPES:
        raise ValueError(f"unknown awm ema decay type {decay_type!r}; expected one of {AWM_EMA_DECAY_TYPES}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"awm ema decay must be in [0, 1], got {decay}")
    return float(decay) if decay_type == "constant" else float(min(decay, 0.001 * step))
