"""One stochastic sampler step of a rectified flow, with the log-density of the step (Flow-GRPO).

GRPO needs a policy with a tractable likelihood. The deterministic Euler step of a flow sampler has
none, so each trained step is replaced by a Gaussian transition whose mean keeps the marginals of the
flow (``sde``) or whose coefficients stay on the noise/data interpolation (``cps``). The same function
serves two purposes:

* rollout: ``prev_sample=None`` draws the next latent and records its log-probability;
* training: ``prev_sample`` is the stored latent and the log-probability is recomputed under the
  current weights (gradient flows through the mean only).

Conventions (``docs/rl-formulas.md``): sigmas run from 1 (noise) to 0 (clean), ``dt = s' - s < 0``,
the model predicts ``v ~ eps - x0``. All arithmetic is float32 whatever the model dtype, because the
log-probability ratio of GRPO is sensitive to rounding.

Variance convention of the log-prob: the variance of one transition is ``var = (std_dev_t * sqrt(-dt))^2``
for ``sde`` and ``var = std_dev_t^2`` for ``cps``, where ``std_dev_t`` is the value this function returns.
The KL term to the reference (``kl_to_reference``) follows Flow-GRPO's convention instead (see there).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["sde_step_with_logprob", "step_variance", "kl_to_reference", "SDE_TYPES"]

SDE_TYPES = ("sde", "cps")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _per_sample(value, batch: int, ndim: int, device: torch.device) -> torch.Tensor:
    """A float or [B] tensor as float32 of shape [B, 1, ..., 1], broadcastable to the sample."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    t = t.reshape(-1)
    if t.numel() != batch:
        raise ValueError(f"expected a scalar or {batch} per-sample values, got shape {tuple(t.shape)}")
    return t.reshape(batch, *([1] * (ndim - 1)))


def _mean_dims(x: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dim: one number per sample, independent of latent size."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _gaussian_noise(shape, device, generator) -> torch.Tensor:
    """Standard normal float32 noise; a list of generators seeds each batch item on its own,
    so a sample's noise does not depend on which other samples share its batch."""
    def draw(shp, gen):
        gen_device = gen.device if gen is not None else device
        noise = torch.randn(shp, generator=gen, device=gen_device, dtype=torch.float32)
        return noise.to(device)

    if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([draw((1, *shape[1:]), g) for g in generator], dim=0)
    return draw(tuple(shape), generator)


def sde_step_with_logprob(
    model_output: torch.Tensor,
    sigma,
    sigma_next,
    sample: torch.Tensor,
    noise_level,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    sde_type: str = "sde",
):
    """One sampler step ``sigma -> sigma_next`` and its Gaussian log-probability.

    Args:
        model_output: predicted velocity ``v``, same shape as ``sample`` (any rank >= 2, batch first).
        sigma, sigma_next: floats or tensors of shape [B]; ``sigma_next < sigma``.
        sample: the current latent ``x`` at ``sigma``.
        noise_level: ``a`` of the formulas (float or [B]); 0 gives the deterministic Euler (ODE) step.
        prev_sample: if given, the step is not sampled and the log-prob of this latent is returned.
        generator: a ``torch.Generator`` or one per batch item, for the step noise.
        sde_type: ``"sde"`` (Flow-GRPO) or ``"cps"`` (coefficients-preserving).

    Returns:
        ``(prev_sample, log_prob, prev_sample_mean, std_dev_t)``, all float32:
        ``prev_sample`` and ``prev_sample_mean`` shaped like ``sample``; ``log_prob`` of shape [B]
        (mean over non-batch dims; zeros where the step is deterministic); ``std_dev_t`` of shape
        [B, 1, ..., 1]. For ``sde`` it is the diffusion coefficient, the transition std being
        ``std_dev_t * sqrt(-dt)``; for ``cps`` it is the transition std itself (see ``step_variance``).
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"unknown sde_type {sde_type!r}; expected one of {SDE_TYPES}")
    if sample.ndim < 2 or model_output.shape != sample.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} "
                         "must share a shape of rank >= 2")
    x = sample.float()
    v = model_output.float()
    batch, ndim, device = x.shape[0], x.ndim, x.device
    s = _per_sample(sigma, batch, ndim, device)
    s_next = _per_sample(sigma_next, batch, ndim, device)
    a = _per_sample(noise_level, batch, ndim, device)
    dt = s_next - s

    if sde_type == "sde":
        # At s == 1 the ratio s / (1 - s) is infinite; like Flow-GRPO, the denominator then uses the
        # sigma of the second step (sigma_next of this first step) while the numerator keeps s.
        denom_sigma = torch.where(s >= 1.0, s_next, s)
        std_dev_t = a * torch.sqrt(s / (1.0 - denom_sigma))
        std_dev_t = torch.where(a == 0, torch.zeros_like(std_dev_t), std_dev_t)
        # Guard 1/(2s) for s == 0 (never sampled from, but keeps the graph NaN-free).
        drift = std_dev_t**2 / (2.0 * s.clamp_min(1e-12)) * (x + (1.0 - s) * v)
        mean = x + (v + drift) * dt
        step_std = std_dev_t * torch.sqrt(-dt)
    else:
        std_dev_t = s_next * torch.sin(a * (math.pi / 2.0))
        x0_hat = x - s * v
        x1_hat = x + (1.0 - s) * v
        mean = (1.0 - s_next) * x0_hat + torch.sqrt((s_next**2 - std_dev_t**2).clamp_min(0.0)) * x1_hat
        step_std = std_dev_t

    if prev_sample is None:
        noise = _gaussian_noise(x.shape, device, generator)
        prev = mean.detach() + step_std * noise
        # Sampled latents carry no graph; the log-prob below depends on the weights through the mean.
    else:
        if prev_sample.shape != x.shape:
            raise ValueError(f"prev_sample {tuple(prev_sample.shape)} must match sample {tuple(x.shape)}")
        prev = prev_sample.float()
    target = prev.detach()

    stochastic = step_std > 0
    if sde_type == "sde":
        safe_std = torch.where(stochastic, step_std, torch.ones_like(step_std))
        log_density = -((target - mean) ** 2) / (2.0 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI
    else:
        # Constants (and the variance) dropped, as in the formulas: only ratios of it are ever used.
        log_density = -((target - mean) ** 2)
    log_density = torch.where(stochastic, log_density, torch.zeros_like(log_density))
    log_prob = _mean_dims(log_density)
    return prev, log_prob, mean, std_dev_t


def step_variance(std_dev_t: torch.Tensor, dt, sde_type: str = "sde") -> torch.Tensor:
    """Variance of one transition, consistent with the log-prob: ``std_dev_t^2 * (-dt)`` for ``sde``,
    ``std_dev_t^2`` for ``cps``. ``dt = sigma_next - sigma`` (float or [B])."""
    std = std_dev_t.float()
    if sde_type == "sde":
        d = _per_sample(dt, std.shape[0], std.ndim, std.device)
        return std**2 * (-d)
    if sde_type == "cps":
        return std**2
    raise ValueError(f"unknown sde_type {sde_type!r}; expected one of {SDE_TYPES}")


def kl_to_reference(prev_sample_mean: torch.Tensor, ref_prev_sample_mean: torch.Tensor,
                    std_dev_t: torch.Tensor, dt, sde_type: str = "sde") -> torch.Tensor:
    """GRPO's per-sample KL term to the reference policy, shape [B], exactly as Flow-GRPO computes it for
    both SDE types: ``mean_dims((mean - ref_mean)^2) / (2 std_dev_t^2)``, with the ``std_dev_t`` that
    `sde_step_with_logprob` returns (``sde``: ``a sqrt(s / (1 - s))``; ``cps``: ``sigma_next sin(a pi / 2)``).

    For ``sde`` the divisor is ``std_dev_t^2``, not the transition variance ``std_dev_t^2 |dt|`` that the
    log-prob uses, so this is ``|dt|`` times the exact Gaussian KL; for ``cps`` it is the exact KL (the
    transition std is ``std_dev_t``). Keeping Flow-GRPO's convention makes a ``beta_kl`` mean here what it
    means there (published betas 0-0.04 carry over). ``dt`` is accepted for the signature's sake and
    checked, but does not enter. Where a step is deterministic (std 0) the KL is 0.
    GRPO's KL loss is ``kl_to_reference(...).mean()``.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"unknown sde_type {sde_type!r}; expected one of {SDE_TYPES}")
    if prev_sample_mean.shape != ref_prev_sample_mean.shape:
        raise ValueError("policy and reference means must share a shape")
    mean = prev_sample_mean.float()
    batch = mean.shape[0]
    _per_sample(dt, batch, mean.ndim, mean.device)  # one dt, or one per sample
    sq = _mean_dims((mean - ref_prev_sample_mean.float()) ** 2)
    std = torch.as_tensor(std_dev_t, dtype=torch.float32, device=mean.device)
    std = (std.expand(batch) if std.ndim == 0 else std.reshape(batch, -1)[:, 0]).float()
    safe = torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(std > 0, sq / (2.0 * safe**2), torch.zeros_like(sq))
