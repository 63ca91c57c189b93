"""AWM and GRPO-Guard against their authors' published code, on fixed tensors.

The references below are small re-implementations written from reading the authors' training scripts
(float64, batched the way those scripts batch: timesteps x batch flattened into one axis), not from this
project's docs:

* AWM: scxue/advantage_weighted_matching, ``scripts/train_sd3_awm.py`` (``compute_log_prob_awm``, the
  ``discrete_wo_init`` timestep draw, the ``exp_first`` PPO loss with its ``advantage_max`` rescaling and
  the two ``Uniform`` velocity KL terms, the ``linear`` EMA-policy decay) with ``config/dgx_awm.py``'s
  OCR values;
* GRPO-Guard: yifan123/flow_grpo, ``scripts/train_sd3_GRPO_Guard.py`` (``config.rationorm``) and its
  ``sd3_sde_with_logprob.py`` (``return_sqrt_dt``).

Each test feeds the same tensors to the project's code path (the pure functions in the order the
trainer calls them, one micro-batch per timestep) and to the reference, and compares the loss and its
gradient to float precision.
"""

import math

import numpy as np
import pytest
import torch

from calligrapher_rl.rl.awm import awm_ema_decay, awm_log_likelihood, awm_loss, awm_timestep_indices, velocity_kl
from calligrapher_rl.rl.grpo import grpo_loss, ratio_norm_log_ratio
from calligrapher_rl.rl.sde import kl_to_reference, sde_step_with_logprob

T, B, L, C = 3, 4, 5, 6


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ AWM


def authors_awm_loss(v, v_ref, v_ema, x0, noise, t, adv, old_lp, cfg):
    """AWM's loss for one training batch, float64, from train_sd3_awm.py. v*: [T*B, ...] model outputs,
    t: [T*B] timesteps (repeat_interleave over the batch), adv: [B], old_lp: [T, B] or None (on-policy)."""
    log_probs = authors_log_probs(v, x0, noise, t, cfg)
    old = log_probs.detach() if old_lp is None else old_lp
    a = torch.clamp(adv.double(), -cfg["adv_clip_max"], cfg["adv_clip_max"])
    a = a / cfg["adv_clip_max"] * cfg["advantage_max"]
    ratio = torch.exp(log_probs.view(-1) - old.view(-1).detach())
    a = a.unsqueeze(0).repeat(T, 1).view(-1)
    policy = torch.mean(torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - cfg["clip_range"], 1 + cfg["clip_range"])))
    shaped = lambda z: z.double().reshape(T, B, *z.shape[1:])  # noqa: E731
    kl = ((shaped(v) - shaped(v_ref)) ** 2).mean(dim=(2, 3), keepdim=True).mean(dim=0).mean()
    ema_kl = ((shaped(v) - shaped(v_ema)) ** 2).mean(dim=(2, 3), keepdim=True).mean(dim=0).mean()
    return policy + cfg["beta"] * kl + cfg["ema_beta"] * ema_kl


def authors_discrete_wo_init(num_steps, fraction, count, rand_u):
    """train_sd3_awm.py's `discrete_wo_init` timestep indices, given its uniform draws."""
    boundaries = torch.linspace(1, int(num_steps * fraction), steps=count + 1)
    lower, upper = boundaries[:-1].long(), boundaries[1:].long()
    return lower + (rand_u * (upper - lower)).long()


OCR_CFG = {"weighting": "ghuber", "ghuber_power": 0.25, "adv_clip_max": 5.0, "advantage_max": 1.0, "clip_range": 1.0,
           "beta": 0.003, "ema_beta": 1.0}


def awm_inputs(seed=0):
    x0 = rand(B, L, C, seed=seed)
    noise = rand(T, B, L, C, seed=seed + 1)
    t = torch.tensor([0.9, 0.6, 0.25])
    v = (noise - x0) + 0.5 * rand(T, B, L, C, seed=seed + 2)
    v_ref = v + 0.1 * rand(T, B, L, C, seed=seed + 3)
    v_ema = v + 0.05 * rand(T, B, L, C, seed=seed + 4)
    adv = torch.tensor([2.0, -7.5, 0.3, -1.1])
    return x0, noise, t, v, v_ref, v_ema, adv


def ours_awm(v, v_ref, v_ema, x0, noise, t, adv, old_v, cfg, weighting):
    """The project's path: one micro-batch per timestep (training/awm_update.py), loss scaled by 1/T."""
    total = 0.0
    for k in range(T):
        ll = awm_log_likelihood(v[k], x0, noise[k], t[k], weighting, cfg["ghuber_power"])
        old = ll.detach() if old_v is None else awm_log_likelihood(old_v[k], x0, noise[k], t[k], weighting,
                                                                   cfg["ghuber_power"])
        loss, _ = awm_loss(ll, old, adv, clip_range=cfg["clip_range"], adv_clip_max=cfg["adv_clip_max"],
                           advantage_max=cfg["advantage_max"])
        loss = loss + cfg["beta"] * velocity_kl(v[k], v_ref[k]) + cfg["ema_beta"] * velocity_kl(v[k], v_ema[k])
        total = total + loss / T
    return total


@pytest.mark.parametrize("weighting", ["uniform", "t", "t2", "huber", "ghuber"])
@pytest.mark.parametrize("off_policy", [False, True])
def test_awm_loss_and_gradient_match_the_authors(weighting, off_policy):
    x0, noise, t, v, v_ref, v_ema, adv = awm_inputs()
    cfg = dict(OCR_CFG, weighting={"uniform": "Uniform", "t2": "t**2"}.get(weighting, weighting))
    old_v = None
    if off_policy:  # a later optimizer step of the epoch: the rollout weights differ, and the clip binds
        old_v = v + 0.3 * rand(T, B, L, C, seed=9)
        cfg["clip_range"] = 0.05
    v_ours = v.clone().requires_grad_(True)
    ours = ours_awm(v_ours, v_ref, v_ema, x0, noise, t, adv, old_v, cfg, weighting)
    ours.backward()
    v_peer = v.double().reshape(T * B, L, C).clone().requires_grad_(True)
    t_flat = torch.repeat_interleave(t.double(), B)
    old_lp = None
    if old_v is not None:
        with torch.no_grad():
            ref_cfg = dict(cfg, beta=0.0, ema_beta=0.0)  # only the log-probs of the old weights are needed
            old_lp = authors_log_probs(old_v.double().reshape(T * B, L, C), x0.repeat(T, 1, 1),
                                       noise.reshape(T * B, L, C), t_flat, ref_cfg)
    peer = authors_awm_loss(v_peer, v_ref.reshape(T * B, L, C), v_ema.reshape(T * B, L, C),
                            x0.repeat(T, 1, 1), noise.reshape(T * B, L, C), t_flat, adv, old_lp, cfg)
    peer.backward()
    assert ours.item() == pytest.approx(peer.item(), rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(v_ours.grad.reshape(T * B, L, C).numpy(), v_peer.grad.numpy(), rtol=1e-4, atol=1e-8)
    assert v_ours.grad.abs().sum() > 0


def authors_log_probs(v, x0, noise, t, cfg):
    """compute_log_prob_awm's log_prob, [T, B] (v, noise: [T*B, ...]; x0 already repeated T times)."""
    mo = v.double()
    lp = (-(mo - (noise.double() - x0.double())) ** 2).mean(dim=tuple(range(1, mo.ndim)))
    w = cfg["weighting"]
    if w == "t":
        lp = lp * t
    elif w == "t**2":
        lp = lp * t**2
    elif w == "huber":
        lp = -(torch.sqrt(-lp + 1e-10) - 1e-5) * t
    elif w == "ghuber":
        p = cfg["ghuber_power"]
        lp = -(torch.pow(-lp + 1e-10, p) - 1e-10**p) * t / p
    return lp.reshape(T, B)


def test_awm_on_policy_ratio_is_one_and_gradient_is_advantage_weighted_matching():
    """On-policy the surrogate's value is -mean(A') and its gradient that of mean(A' * weighted FM loss)."""
    x0, noise, t, v, _, _, adv = awm_inputs(seed=20)
    v1 = v[0].clone().requires_grad_(True)
    ll = awm_log_likelihood(v1, x0, noise[0], t[0], "uniform")
    loss, st = awm_loss(ll, ll.detach(), adv, clip_range=1.0, adv_clip_max=5.0, advantage_max=1.0)
    a = adv.clamp(-5, 5) / 5
    assert loss.item() == pytest.approx(-a.mean().item(), rel=1e-6)
    assert st["ratio/mean"] == 1.0 and st["clipfrac"] == 0.0
    loss.backward()
    v2 = v[0].clone().requires_grad_(True)
    (a * ((v2 - (noise[0] - x0)) ** 2).mean(dim=(1, 2))).mean().backward()
    torch.testing.assert_close(v1.grad, v2.grad, rtol=1e-5, atol=1e-8)


def test_awm_timesteps_match_the_authors_strata():
    for steps, frac, count in ((14, 0.9, 6), (4, 1.0, 2), (10, 1.0, 9), (28, 0.5, 3)):
        gen = torch.Generator().manual_seed(steps)
        ours = awm_timestep_indices(steps, frac, count, gen)
        u = torch.rand(count, generator=torch.Generator().manual_seed(steps))
        assert torch.equal(ours, authors_discrete_wo_init(steps, frac, count, u))
        m = int(steps * frac)
        assert ours.min() >= 1 and ours.max() < m and len(set(ours.tolist())) == count  # distinct, never index 0
    with pytest.raises(ValueError, match="do not fit"):
        awm_timestep_indices(4, 1.0, 4)


def test_awm_ema_policy_decay_is_the_authors():
    """train_sd3_awm.py: decay = kl_ema_decay (constant) or min(kl_ema_decay, 0.001 * global_step) (linear)."""
    for step in (0, 1, 150, 300, 10000):
        assert awm_ema_decay(step, 0.3, "linear") == pytest.approx(min(0.3, 0.001 * step))
        assert awm_ema_decay(step, 0.3, "constant") == 0.3
    with pytest.raises(ValueError):
        awm_ema_decay(1, 0.3, "cosine")


def test_awm_failed_rewards_are_left_out():
    x0, noise, t, v, v_ref, _, _ = awm_inputs(seed=30)
    adv = torch.tensor([1.0, float("nan"), -0.5, 2.0])
    vv = v[0].clone().requires_grad_(True)
    ll = awm_log_likelihood(vv, x0, noise[0], t[0])
    valid = torch.isfinite(adv)
    loss, st = awm_loss(ll, ll.detach(), adv, clip_range=1.0, adv_clip_max=5.0, advantage_max=1.0, valid=valid)
    (loss + velocity_kl(vv, v_ref[0], valid)).backward()
    assert st["num_valid"] == 3 and torch.isfinite(vv.grad).all() and vv.grad[1].abs().max() == 0


# ------------------------------------------------------------------------------------------------ GRPO-Guard


def authors_sde_step(v, sigma, sigma_prev, sigma_max, sample, noise_level, prev_sample):
    """sd3_sde_with_logprob.py, sde type, float64: (log_prob, prev_sample_mean, std_dev_t, sqrt_dt)."""
    v, sample, prev_sample = v.double(), sample.double(), prev_sample.double()
    sigma = torch.full((v.shape[0], 1, 1), sigma, dtype=torch.float64)
    sigma_prev = torch.full_like(sigma, sigma_prev)
    dt = sigma_prev - sigma
    std = torch.sqrt(sigma / (1 - torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma))) * noise_level
    mean = sample * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    lp = (-((prev_sample.detach() - mean) ** 2) / (2 * ((std * torch.sqrt(-1 * dt)) ** 2))
          - torch.log(std * torch.sqrt(-1 * dt)) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    return lp.mean(dim=(1, 2)), mean, std, torch.sqrt(-1 * dt)


def authors_guard_loss(v, x, x_next, old_lp, old_mean, v_ref, adv, s, s2, s_max, a, clip, beta, literal=False):
    """train_sd3_GRPO_Guard.py's loss of one timestep with config.rationorm on.

    The script reduces the bias with `.mean(dim=tuple(range(1, log_prob.ndim)))` on an already per-sample
    log_prob, i.e. `dim=()`, which PyTorch reads as every dimension: one bias for the whole batch. The
    paper's (and verl-omni's) per-sample mean over the latent's dimensions is what is meant and what the
    project implements; `literal=True` reproduces the script's batch mean (the same on-policy)."""
    lp, mean, std, sqrt_dt = authors_sde_step(v, s, s2, s_max, x, a, x_next)
    _, mean_ref, _, _ = authors_sde_step(v_ref, s, s2, s_max, x, a, x_next)
    adv = torch.clamp(adv.double(), -5, 5)
    sigma_t = std.mean()
    bias = (mean - old_mean.double()).pow(2).mean(dim=() if literal else (1, 2))
    bias = bias / (2 * (sqrt_dt.mean() * sigma_t) ** 2)
    ratio = torch.exp((lp - old_lp.double() + bias) * (sqrt_dt.mean() * sigma_t))
    policy = torch.mean(torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)))
    policy = policy / (sqrt_dt.mean() ** 2)
    kl = torch.mean(((mean - mean_ref) ** 2).mean(dim=(1, 2), keepdim=True) / (2 * std**2))
    return policy + beta * kl


@pytest.mark.parametrize("sigmas", [(1.0, 0.8), (0.55, 0.4), (0.2, 0.1)])
@pytest.mark.parametrize("clip", [2e-6, 1e-2])
def test_grpo_guard_ratio_norm_matches_the_authors(sigmas, clip):
    s, s2 = sigmas
    # s_max, the schedule's second sigma, replaces sigma == 1 in std's denominator: the first step's next one
    s_max, a, beta = s2, 0.7, 0.04
    x = rand(B, L, C, seed=40)
    v_old = rand(B, L, C, seed=41)
    # rollout: the old policy's step, its log-prob and mean recorded
    x_next, old_lp, old_mean, _ = sde_step_with_logprob(v_old, s, s2, x, a, generator=torch.Generator().manual_seed(42))
    v = v_old + 0.02 * rand(B, L, C, seed=43)  # the current policy, moved a little since the rollout
    v_ref = v_old + 0.05 * rand(B, L, C, seed=44)
    adv = torch.tensor([1.5, -0.7, 6.0, -2.0])

    v_ours = v.clone().requires_grad_(True)
    _, logp, mean, std = sde_step_with_logprob(v_ours, s, s2, x, a, prev_sample=x_next)
    _, _, ref_mean, _ = sde_step_with_logprob(v_ref, s, s2, x, a, prev_sample=x_next)
    log_ratio, weight = ratio_norm_log_ratio(logp, old_lp, mean, old_mean, std, s2 - s)
    loss, st = grpo_loss(logp, old_lp, adv, clip, 5.0, log_ratio=log_ratio, weight=weight)
    loss = loss + beta * kl_to_reference(mean, ref_mean, std, s2 - s).mean()
    loss.backward()

    v_peer = v.double().clone().requires_grad_(True)
    peer = authors_guard_loss(v_peer, x, x_next, old_lp, old_mean, v_ref, adv, s, s2, s_max, a, clip, beta)
    peer.backward()
    assert loss.item() == pytest.approx(peer.item(), rel=1e-5, abs=1e-8)
    np.testing.assert_allclose(v_ours.grad.numpy(), v_peer.grad.numpy(), rtol=1e-4, atol=1e-7)
    assert 0 <= st["clipfrac"] <= 1
    # on-policy (the epoch's first optimizer step) the script's literal batch-mean bias agrees as well
    v_on = v_old.clone().requires_grad_(True)
    _, lp_on, mean_on, std_on = sde_step_with_logprob(v_on, s, s2, x, a, prev_sample=x_next)
    lr_on, w_on = ratio_norm_log_ratio(lp_on, old_lp, mean_on, old_mean, std_on, s2 - s)
    ours_on, _ = grpo_loss(lp_on, old_lp, adv, clip, 5.0, log_ratio=lr_on, weight=w_on)
    ours_on.backward()
    v_lit = v_old.double().clone().requires_grad_(True)
    authors_guard_loss(v_lit, x, x_next, old_lp, old_mean, v_ref, adv, s, s2, s_max, a, clip, 0.0, literal=True).backward()
    np.testing.assert_allclose(v_on.grad.numpy(), v_lit.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_ratio_norm_is_exactly_one_on_policy_and_removes_the_bias():
    """On-policy r' = 1; off-policy log r' = mean_dims(noise * (mean - mean_old)): no negative bias (the
    plain log-ratio's mean is -mean_dims(delta^2) / (2 s^2), s the transition std)."""
    x, v = rand(B, L, C, seed=50), rand(B, L, C, seed=51)
    s, s2, a = 0.6, 0.45, 0.7
    gen = torch.Generator().manual_seed(52)
    x_next, old_lp, old_mean, std = sde_step_with_logprob(v, s, s2, x, a, generator=gen)
    lr, w = ratio_norm_log_ratio(old_lp, old_lp, old_mean, old_mean, std, s2 - s)
    assert torch.equal(lr, torch.zeros(B)) and w.item() == pytest.approx(1 / (s - s2), rel=1e-5)
    delta = 0.01 * rand(B, L, C, seed=53)
    _, lp2, mean2, _ = sde_step_with_logprob(v, s, s2, x, a, prev_sample=x_next)
    mean2 = mean2 + delta
    step_std = std.flatten()[0] * math.sqrt(s - s2)
    lp2 = lp2 + (-((x_next - mean2) ** 2) + (x_next - mean2 + delta) ** 2).mean(dim=(1, 2)) / (2 * step_std**2)
    lr2, _ = ratio_norm_log_ratio(lp2, old_lp, mean2, old_mean, std, s2 - s)
    noise = (x_next - old_mean) / step_std
    torch.testing.assert_close(lr2, (noise * delta).mean(dim=(1, 2)), rtol=1e-3, atol=1e-7)
    with pytest.raises(ValueError, match="stochastic"):
        ratio_norm_log_ratio(old_lp, old_lp, old_mean, old_mean, torch.zeros_like(std), s2 - s)
