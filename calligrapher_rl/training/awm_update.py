"""AWM's gradient computation (Advantage Weighted Matching), and its glue to the RL epoch (rl_epoch.py).

Like DiffusionNFT, AWM trains on the clean rollouts x0: each is re-noised with fresh noise at a few
schedule timesteps (one per stratum, shared by the batch) and the current velocity's weighted
flow-matching error is the log-likelihood surrogate of `rl.awm`. The surrogate's ratio needs the
rollout policy's value: in an epoch's first optimizer step the weights are still the rollout's, so the
current value, detached, is exact and free; later steps of the same epoch (several optimizer steps or
inner epochs) evaluate a snapshot of the weights taken before the epoch's first update.
"""

from __future__ import annotations

import torch

from ..rl.awm import awm_ema_decay, awm_log_likelihood, awm_loss, awm_timestep_indices, velocity_kl
from ..sampling import Rollout
from .batches import Batch
from .updates import StatsMeter, _plain_backward


def awm_backward(stack, batch: Batch, ro: Rollout, advantages: torch.Tensor, *, num_timesteps: int,
                 fraction: float, policies, rollout_params: dict | None, guidance: float, scale: float,
                 weighting: str, ghuber_power: float, clip_range: float, advantage_max: float, adv_clip_max: float,
                 kl_beta: float, ema_kl_beta: float, generator: torch.Generator, loss_scale: float, autocast,
                 backward=_plain_backward) -> dict[str, float]:
    """Forward + backward of one rollout batch, one micro-batch per trained timestep.

    `rollout_params`: the weights the rollouts came from, or None when they are the live ones (the
    epoch's first optimizer step). `policies.reference` anchors the KL term (`kl_beta`), `policies.old`
    (AWM's EMA policy) the second one (`ema_kl_beta`)."""
    meter = StatsMeter()
    x0 = ro.final.float()
    valid = torch.isfinite(advantages)
    steps = awm_timestep_indices(len(ro.sigmas) - 1, fraction, num_timesteps, generator)
    for idx in steps.tolist():
        t = float(ro.sigmas[idx])
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t = (1 - t) * x0 + t * eps

        def velocity(params=None, x_t=x_t, t=t):
            return stack.velocity(x_t, batch.fill, batch.text, t, batch.image_embeds, guidance, scale, params=params)

        with autocast():
            v = velocity()
        log_lik = awm_log_likelihood(v, x0, eps, t, weighting, ghuber_power)
        with torch.no_grad(), autocast():
            old = log_lik.detach() if rollout_params is None else awm_log_likelihood(
                velocity(rollout_params), x0, eps, t, weighting, ghuber_power)
            v_ref = velocity(policies.reference) if kl_beta > 0 else None
            v_ema = velocity(policies.old) if ema_kl_beta > 0 and policies.old is not None else None
        loss, stats = awm_loss(log_lik, old, advantages, clip_range=clip_range, adv_clip_max=adv_clip_max,
                               advantage_max=advantage_max, valid=valid)
        stats["awm/fm_loss"] = float(-log_lik.detach()[valid].mean()) if valid.any() else 0.0
        stats["awm/t"] = t
        if v_ref is not None:
            kl = velocity_kl(v, v_ref, valid)
            loss = loss + kl_beta * kl
            stats["kl"] = float(kl.detach())
        if v_ema is not None:
            ema_kl = velocity_kl(v, v_ema, valid)
            loss = loss + ema_kl_beta * ema_kl
            stats["awm/ema_kl"] = float(ema_kl.detach())
        backward(loss * loss_scale)
        stats["loss"] = float(loss.detach())
        meter.add(stats)
    return meter.means()


def awm_update(epoch, batch, ro, adv, inner: int, b: int, group: int, generator: torch.Generator, **common):
    """The RL epoch's AWM branch (`epoch`: rl_epoch.RLEpoch): picks the rollout weights for the ratio (a
    snapshot taken at the epoch's first update when the epoch holds more than one optimizer step, kept as
    `epoch.awm_rollout_params`) and the loss scale."""
    cfg = epoch.cfg
    ga = cfg.gradient_accumulation_steps
    several_steps = cfg.rl_num_batches_per_epoch > ga or cfg.rl_num_inner_epochs > 1
    if inner == 0 and b == 0:  # nothing updated since the rollouts: these are their weights
        epoch.awm_rollout_params = epoch.policies.snapshot() if several_steps else None
    first_step = inner == 0 and b < ga
    n = cfg.num_trained_timesteps()
    return awm_backward(epoch.stack, batch, ro, adv, num_timesteps=n, fraction=cfg.rl_timestep_fraction,
                        rollout_params=None if first_step else epoch.awm_rollout_params, weighting=cfg.awm_weighting,
                        ghuber_power=cfg.awm_ghuber_power, clip_range=cfg.awm_clip_range,
                        advantage_max=cfg.awm_advantage_max, ema_kl_beta=cfg.awm_ema_kl_beta, generator=generator,
                        loss_scale=1.0 / (n * group), **common)


def awm_end_of_epoch(epoch) -> dict[str, float]:
    """After each epoch the EMA policy follows: ema <- eta ema + (1 - eta) theta (eta from the RL optimizer
    steps so far); the epoch's rollout snapshot is dropped."""
    cfg = epoch.cfg
    epoch.awm_rollout_params = None
    eta = awm_ema_decay(epoch.state.rl_steps, cfg.awm_ema_kl_decay, cfg.awm_ema_kl_decay_type)
    epoch.policies.update_old(eta)
    return {"awm/ema_decay": eta}
