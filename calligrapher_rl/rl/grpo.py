"""GRPO's clipped policy objective over one trained sampler step (Flow-GRPO, PPO-clip).

The policy is the stochastic sampler step of ``rl.sde``; each trained step of the stored rollout is a
micro-batch whose log-probability is recomputed under the current weights and compared with the one
recorded at rollout time. Only the policy term lives here; the KL to the reference policy is
``rl.sde.kl_to_reference`` and the trainer adds ``beta_kl * kl.mean()``.
"""

from __future__ import annotations

import torch

__all__ = ["grpo_loss", "masked_mean", "ratio_norm_log_ratio"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; 0 (still attached to the graph) when nothing is selected, so a
    micro-batch whose rewards all failed contributes no gradient instead of NaN."""
    mask = mask.to(device=x.device, dtype=torch.bool)
    picked = torch.where(mask, x, torch.zeros_like(x))
    return picked.sum() / mask.sum().clamp_min(1).to(x.dtype)


def _valid_mask(advantages: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Samples that enter the loss: those marked valid whose advantage is finite. A failed reward
    gives a NaN advantage (``rl.advantages``), which must never reach the gradient."""
    mask = torch.isfinite(advantages)
    if valid is not None:
        mask = mask & valid.to(device=advantages.device, dtype=torch.bool).reshape(mask.shape)
    return mask


def _stat(x: torch.Tensor, mask: torch.Tensor, fn: str) -> float:
    sel = x.detach()[mask]
    if sel.numel() == 0:
        return 0.0
    if fn == "std":
        return float(sel.std(unbiased=False)) if sel.numel() > 1 else 0.0
    return float(sel.mean())


def ratio_norm_log_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor,
                         old_mean: torch.Tensor, std_dev_t: torch.Tensor, dt) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO-Guard's RatioNorm (Wang et al. 2025, arXiv 2510.22319) for one ``sde`` step, and its gradient
    reweight.

    With ``s`` the step's transition std averaged over the batch (``mean(std_dev_t) * mean(sqrt(-dt))``):
    ``log r' = s (logp - logp_old + mean_dims((mean - mean_old)^2) / (2 s^2))``. The added term removes the
    ratio's negative bias (``E[log r] = -mean_dims(delta^2) / (2 s^2)`` for a mean shift ``delta``) and
    the factor ``s`` makes its spread the same at every step: ``log r' = mean_dims(noise * delta)``.
    The policy loss of the step is then divided by ``mean(sqrt(-dt))^2`` (returned as ``weight``) so
    that steps contribute comparably. Returns ``(log r' [B], weight)``.
    """
    logp, old = log_prob.float().reshape(-1), old_log_prob.detach().float().reshape(-1).to(log_prob.device)
    m = mean.float()
    std = torch.as_tensor(std_dev_t, dtype=torch.float32, device=m.device)
    neg_dt = -torch.as_tensor(dt, dtype=torch.float32, device=m.device)
    if bool((neg_dt <= 0).any()) or bool((std <= 0).any()):
        raise ValueError("ratio normalisation needs a stochastic step (std_dev_t > 0, dt < 0)")
    sqrt_dt = torch.sqrt(neg_dt).mean()
    s = std.mean() * sqrt_dt
    bias = (m - old_mean.detach().float()).pow(2).reshape(m.shape[0], -1).mean(dim=1) / (2.0 * s**2)
    return (logp - old + bias) * s, 1.0 / sqrt_dt**2


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
              clip_range: float, adv_clip_max: float, *, valid: torch.Tensor | None = None,
              log_ratio: torch.Tensor | None = None, weight=1.0):
    """PPO-clip loss ``mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))`` with ``r = exp(logp - logp_old)``.

    Args:
        log_prob: [B] log-probabilities under the current weights (carries the gradient).
        old_log_prob: [B] log-probabilities recorded at rollout (no gradient).
        advantages: [B]; clipped here to ``[-adv_clip_max, adv_clip_max]``; NaN marks a failed reward.
        clip_range: ``eps`` of PPO (1e-4 for ``sde``, 1e-5 for ``cps`` in Flow-GRPO; guide default 0.2).
        valid: optional [B] bool mask; samples outside it (and NaN advantages) are excluded from the
            loss and from every statistic.
        log_ratio: optional [B] replacement of ``logp - logp_old`` (GRPO-Guard's ``ratio_norm_log_ratio``);
            ``weight`` multiplies the policy loss (its gradient reweight). ``approx_kl`` stays that of
            the raw log-probabilities.

    Returns:
        ``(loss, stats)``: scalar float32 loss; ``stats`` a dict of python floats: ``policy_loss``,
        ``clipfrac``, ``approx_kl``, ``ratio/mean``, ``ratio/std``, ``advantage/mean``,
        ``advantage/std``, ``num_valid``.
    """
    logp = log_prob.float().reshape(-1)
    old = old_log_prob.detach().float().reshape(-1).to(logp.device)
    adv_raw = advantages.detach().float().reshape(-1).to(logp.device)
    if not (logp.shape == old.shape == adv_raw.shape):
        raise ValueError(f"log_prob {tuple(logp.shape)}, old_log_prob {tuple(old.shape)} and advantages "
                         f"{tuple(adv_raw.shape)} must hold one value per sample")
    mask = _valid_mask(adv_raw, valid)
    adv = torch.clamp(torch.nan_to_num(adv_raw, nan=0.0), -adv_clip_max, adv_clip_max)

    raw_log_ratio = logp - old
    ratio = torch.exp(raw_log_ratio if log_ratio is None else log_ratio.float().reshape(-1))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    loss = masked_mean(per_sample, mask) * weight

    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1.0).abs() > clip_range).float(), mask)
        approx_kl = 0.5 * masked_mean(raw_log_ratio**2, mask)
    stats = {
        "policy_loss": float(loss.detach()),
        "clipfrac": float(clipfrac),
        "approx_kl": float(approx_kl),
        "ratio/mean": _stat(ratio, mask, "mean"),
        "ratio/std": _stat(ratio, mask, "std"),
        "advantage/mean": _stat(adv, mask, "mean"),
        "advantage/std": _stat(adv, mask, "std"),
        "num_valid": float(mask.sum()),
    }
    return loss, stats
