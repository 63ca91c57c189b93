"""DiffusionNFT: negative-aware fine-tuning on the forward (noising) process.

NFT needs no log-probabilities: rollouts come from the frozen "old" policy with any sampler, and
training re-noises the clean result ``x0`` at fresh timesteps. The current velocity is mixed with the
old one into an implicit positive policy ``v_pos`` and an implicit negative policy ``v_neg``; each
sample pulls ``x0_pos`` toward ``x0`` with weight ``r`` (its optimality probability) and ``x0_neg``
toward ``x0`` with weight ``1 - r``. Good samples thus attract the positive policy, bad ones repel it
(through the negative one, which moves opposite to ``v_theta``).
"""

from __future__ import annotations

from typing import Iterable

import torch

from .grpo import masked_mean

__all__ = ["ADV_MODES", "transform_advantages", "optimality_probability", "nft_loss", "old_decay",
           "update_old_params"]

ADV_MODES = ("normal", "positive_only", "negative_only", "one_only", "binary")
DECAY_TYPES = (0, 1, 2)
_MIN_WEIGHT = 1e-5


def transform_advantages(advantages: torch.Tensor, adv_mode: str, adv_clip_max: float) -> torch.Tensor:
    """Clip to ``[-M, M]`` then apply the advantage mode (``M = adv_clip_max``).

    The clip comes first, as in DiffusionNFT; the order is immaterial (every mode is monotone and
    maps into ``[-M, M]``), but clipping first bounds ``normal`` too.
    """
    if adv_mode not in ADV_MODES:
        raise ValueError(f"unknown adv_mode {adv_mode!r}; expected one of {', '.join(ADV_MODES)}")
    a = torch.clamp(advantages.float(), -adv_clip_max, adv_clip_max)
    if adv_mode == "positive_only":
        a = torch.clamp(a, 0.0, adv_clip_max)
    elif adv_mode == "negative_only":
        a = torch.clamp(a, -adv_clip_max, 0.0)
    elif adv_mode == "one_only":
        a = (a > 0).float()
    elif adv_mode == "binary":
        a = torch.sign(a)
    return a


def optimality_probability(advantages: torch.Tensor, adv_mode: str = "normal",
                           adv_clip_max: float = 5.0) -> torch.Tensor:
    """``r = clip(A' / (2 M) + 0.5, 0, 1)``, ``A'`` the clipped and mode-transformed advantage.

    With the default ``M = 5`` this is the formulas file's ``clip(clip(A, -5, 5) / 10 + 0.5, 0, 1)``;
    scaling by ``M`` (as DiffusionNFT does) keeps ``r`` spanning [0, 1] for other clip values.
    """
    a = transform_advantages(advantages, adv_mode, adv_clip_max)
    return torch.clamp(a / (2.0 * adv_clip_max) + 0.5, 0.0, 1.0)


def _mean_dims(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, v_ref: torch.Tensor | None, x_t: torch.Tensor,
             x0: torch.Tensor, t: torch.Tensor, advantages: torch.Tensor, beta: float, kl_beta: float,
             adv_mode: str = "normal", adv_clip_max: float = 5.0, *, valid: torch.Tensor | None = None):
    """DiffusionNFT loss at one timestep per sample.

    Args:
        v_theta: velocity of the trained policy at ``(x_t, t)`` (the only input that carries gradient).
        v_old: velocity of the old (rollout) policy; v_ref: of the reference (start-of-RL) policy, may
            be None when ``kl_beta == 0``.
        x_t: ``(1 - t) x0 + t eps``; x0: the clean rollout latent; t: [B] in (0, 1].
        advantages: [B]; NaN marks a failed reward (excluded, like samples outside ``valid``).
        beta: NFT mixing coefficient; kl_beta: ``lambda_kl`` of the velocity KL term.

    Loss: ``M mean(r mse_pos / w_pos / beta + (1 - r) mse_neg / w_neg / beta) + kl_beta mean(kl)``
    where ``M = adv_clip_max`` (5 in the formulas), ``mse_* = mean_dims((x0_* - x0)^2)``,
    ``w_* = stopgrad(mean_dims|x0_* - x0|)`` clipped at 1e-5 (an adaptive, scale-free weighting) and
    ``kl = mean_dims((v_theta - v_ref)^2)``.

    Returns ``(loss, stats)``; stats are python floats: ``loss``, ``policy_loss``, ``kl``, ``r/mean``,
    ``w_pos/mean``, ``w_neg/mean``, ``pos_mse/mean``, ``neg_mse/mean``, ``num_valid``.
    """
    if beta <= 0:
        raise ValueError(f"nft beta must be > 0, got {beta}")
    if v_ref is None and kl_beta != 0:
        raise ValueError("v_ref is required when kl_beta != 0")
    vt = v_theta.float()
    v_o = v_old.detach().float()
    xt = x_t.detach().float()
    x0_ = x0.detach().float()
    if not (vt.shape == v_o.shape == xt.shape == x0_.shape):
        raise ValueError("v_theta, v_old, x_t and x0 must share a shape")
    batch = vt.shape[0]
    tt = torch.as_tensor(t, dtype=torch.float32, device=vt.device).detach().reshape(-1)
    if tt.numel() != batch:
        raise ValueError(f"t must hold one timestep per sample ({batch}), got {tt.numel()}")
    tt = tt.reshape(batch, *([1] * (vt.ndim - 1)))

    adv = advantages.detach().float().reshape(-1).to(vt.device)
    mask = torch.isfinite(adv)
    if valid is not None:
        mask = mask & valid.to(device=vt.device, dtype=torch.bool).reshape(-1)
    r = optimality_probability(torch.nan_to_num(adv, nan=0.0), adv_mode, adv_clip_max)

    v_pos = beta * vt + (1.0 - beta) * v_o
    v_neg = (1.0 + beta) * v_o - beta * vt
    x0_pos = xt - tt * v_pos
    x0_neg = xt - tt * v_neg
    with torch.no_grad():
        w_pos = _mean_dims((x0_pos - x0_).abs()).clamp_min(_MIN_WEIGHT)
        w_neg = _mean_dims((x0_neg - x0_).abs()).clamp_min(_MIN_WEIGHT)
    pos_mse = _mean_dims((x0_pos - x0_) ** 2)
    neg_mse = _mean_dims((x0_neg - x0_) ** 2)
    per_sample = r * pos_mse / w_pos / beta + (1.0 - r) * neg_mse / w_neg / beta
    policy_loss = adv_clip_max * masked_mean(per_sample, mask)

    if v_ref is not None:
        kl_per_sample = _mean_dims((vt - v_ref.detach().float()) ** 2)
        kl = masked_mean(kl_per_sample, mask)
    else:
        kl = torch.zeros((), dtype=torch.float32, device=vt.device)
    loss = policy_loss + kl_beta * kl if kl_beta != 0 else policy_loss

    def avg(x):
        return float(masked_mean(x.detach(), mask))

    stats = {
        "loss": float(loss.detach()),
        "policy_loss": float(policy_loss.detach()),
        "kl": float(kl.detach()),
        "r/mean": avg(r),
        "w_pos/mean": avg(w_pos),
        "w_neg/mean": avg(w_neg),
        "pos_mse/mean": avg(pos_mse),
        "neg_mse/mean": avg(neg_mse),
        "num_valid": float(mask.sum()),
    }
    return loss, stats


def old_decay(step: int, decay_type: int) -> float:
    """``eta`` of the old-policy update ``old <- eta old + (1 - eta) current`` made after each epoch.

    ``step`` counts RL optimizer steps only (DiffusionNFT's ``global_step``; supervised warmup steps
    are not RL steps). ``eta = 0`` makes the old policy the current one (on-policy rollouts); the
    closer ``eta`` is to 1, the more the old policy lags behind.
    0: ``eta = 0`` always;
    1: ``min(0.001 step, 0.5)`` (lags more and more, at most an even mix);
    2: 0 below step 75 (on-policy), then ``min(0.0075 (step - 75), 0.999)`` (almost frozen later on).
    """
    if decay_type not in DECAY_TYPES or isinstance(decay_type, bool):
        raise ValueError(f"unknown nft decay_type {decay_type!r}; expected one of {DECAY_TYPES}")
    if decay_type == 0:
        return 0.0
    if decay_type == 1:
        return float(min(0.001 * step, 0.5))
    if step < 75:
        return 0.0
    return float(min(0.0075 * (step - 75), 0.999))


@torch.no_grad()
def update_old_params(old_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], eta: float) -> None:
    """In place ``old <- eta old + (1 - eta) p``, computed in float32 and stored in old's dtype."""
    old_list, new_list = list(old_params), list(params)
    if len(old_list) != len(new_list):
        raise ValueError(f"{len(old_list)} old parameters for {len(new_list)} parameters")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    for old, new in zip(old_list, new_list):
        if old.shape != new.shape:
            raise ValueError(f"shape mismatch {tuple(old.shape)} vs {tuple(new.shape)}")
        mixed = eta * old.float() + (1.0 - eta) * new.detach().float().to(old.device)
        old.copy_(mixed.to(old.dtype))
