"""The sampler-step log-probability, GRPO and NFT losses against independent re-derivations.

References are written differently from the code under test: float64 numpy, per-element loops, the
Gaussian density from its definition, so a shared mistake is unlikely.
"""

import math

import numpy as np
import pytest
import torch

from calligrapher_rl.rl.grpo import grpo_loss
from calligrapher_rl.rl.nft import nft_loss, old_decay, update_old_params
from calligrapher_rl.rl.sde import kl_to_reference, sde_step_with_logprob, step_variance

B, L, C = 3, 5, 4


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def ref_sde_step(x, v, s, s2, a, eps=None, prev=None):
    """float64 numpy, one sample at a time: mean, total std and the mean Gaussian log-density."""
    x, v = np.asarray(x, np.float64), np.asarray(v, np.float64)
    dt = s2 - s
    std_t = a * math.sqrt(s / (1 - (s2 if s == 1 else s)))
    mean = x + (v + std_t**2 / (2 * s) * (x + (1 - s) * v)) * dt
    total = std_t * math.sqrt(-dt)
    if prev is None:
        prev = mean + total * eps
    dens = np.exp(-((prev - mean) ** 2) / (2 * total**2)) / (total * math.sqrt(2 * math.pi))
    return prev, float(np.log(dens).mean()), mean, total


# ---------------------------------------------------------------- sde


@pytest.mark.parametrize("sigmas_as_tensor", [False, True])
def test_sde_logprob_matches_gaussian_density(sigmas_as_tensor):
    x, v = rand(B, L, C, seed=1), rand(B, L, C, seed=2)
    s, s2, a = 0.8, 0.65, 0.7
    sig = torch.full((B,), s) if sigmas_as_tensor else s
    sig2 = torch.full((B,), s2) if sigmas_as_tensor else s2
    prev, logp, mean, std_t = sde_step_with_logprob(v, sig, sig2, x, a, generator=torch.Generator().manual_seed(3))
    assert prev.dtype == logp.dtype == mean.dtype == torch.float32
    assert logp.shape == (B,) and std_t.shape == (B, 1, 1)
    for b in range(B):
        _, ref_lp, ref_mean, ref_total = ref_sde_step(x[b], v[b], s, s2, a, prev=prev[b].double().numpy())
        assert logp[b].item() == pytest.approx(ref_lp, abs=1e-5)
        np.testing.assert_allclose(mean[b].numpy(), ref_mean, atol=1e-6)
        assert (std_t[b] * math.sqrt(s - s2)).item() == pytest.approx(ref_total, rel=1e-6)


def test_sde_given_prev_sample_recomputes_same_logprob_and_grad_through_mean():
    x, v = rand(B, L, C, seed=4), rand(B, L, C, seed=5)
    prev, logp, _, _ = sde_step_with_logprob(v, 0.5, 0.4, x, 0.9, generator=torch.Generator().manual_seed(6))
    v2 = v.clone().requires_grad_(True)
    prev2, logp2, _, _ = sde_step_with_logprob(v2, 0.5, 0.4, x, 0.9, prev_sample=prev)
    assert torch.equal(logp, logp2.detach()) and torch.equal(prev2, prev)
    logp2.sum().backward()
    assert v2.grad is not None and torch.isfinite(v2.grad).all() and v2.grad.abs().sum() > 0


def test_sde_per_item_generators_and_seeding():
    x, v = rand(B, L, C, seed=7), rand(B, L, C, seed=8)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(B)]
    prev, *_ = sde_step_with_logprob(v, 0.5, 0.4, x, 0.7, generator=gens)
    single, *_ = sde_step_with_logprob(v[1:2], 0.5, 0.4, x[1:2], 0.7, generator=[torch.Generator().manual_seed(101)])
    assert torch.equal(prev[1:2], single)  # an item's noise does not depend on its batch mates
    with pytest.raises(ValueError):
        sde_step_with_logprob(v, 0.5, 0.4, x, 0.7, generator=gens[:2])


def test_sde_sigma_one_uses_next_sigma_in_denominator():
    x, v = rand(2, L, C, seed=9), rand(2, L, C, seed=10)
    s2, a = 0.9, 0.8
    prev, logp, mean, std_t = sde_step_with_logprob(v, 1.0, s2, x, a, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(logp).all() and torch.isfinite(prev).all()
    assert std_t.flatten()[0].item() == pytest.approx(a * math.sqrt(1.0 / (1.0 - s2)), rel=1e-6)
    _, ref_lp, ref_mean, _ = ref_sde_step(x[0], v[0], 1.0, s2, a, prev=prev[0].double().numpy())
    assert logp[0].item() == pytest.approx(ref_lp, abs=1e-5)
    np.testing.assert_allclose(mean[0].numpy(), ref_mean, atol=1e-6)
    # per-sample sigmas mixing the first step with a later one
    _, logp_mix, _, std_mix = sde_step_with_logprob(v, torch.tensor([1.0, 0.5]), torch.tensor([s2, 0.4]), x, a,
                                                    prev_sample=prev)
    assert logp_mix[0] == logp[0] and std_mix[1].item() == pytest.approx(a, rel=1e-6)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_noise_level_zero_is_euler_step(sde_type):
    x, v = rand(B, L, C, seed=11), rand(B, L, C, seed=12)
    for s, s2 in [(1.0, 0.8), (0.6, 0.3), (0.2, 0.0)]:
        prev, logp, mean, std_t = sde_step_with_logprob(v, s, s2, x, 0.0, sde_type=sde_type)
        torch.testing.assert_close(prev, x + v * (s2 - s), atol=1e-6, rtol=0)
        assert torch.equal(logp, torch.zeros(B)) and torch.equal(std_t, torch.zeros_like(std_t))


def test_cps_formula():
    x, v = rand(B, L, C, seed=13), rand(B, L, C, seed=14)
    s, s2, a = 0.7, 0.5, 0.6
    prev, logp, mean, std_t = sde_step_with_logprob(v, s, s2, x, a, sde_type="cps",
                                                    generator=torch.Generator().manual_seed(1))
    xd, vd = x.double().numpy(), v.double().numpy()
    std = s2 * math.sin(a * math.pi / 2)
    ref_mean = (1 - s2) * (xd - s * vd) + math.sqrt(s2**2 - std**2) * (xd + (1 - s) * vd)
    np.testing.assert_allclose(mean.numpy(), ref_mean, atol=1e-6)
    assert std_t.flatten()[0].item() == pytest.approx(std, rel=1e-6)
    ref_lp = [-np.mean((prev[b].double().numpy() - ref_mean[b]) ** 2) for b in range(B)]
    np.testing.assert_allclose(logp.numpy(), ref_lp, atol=1e-6)
    assert step_variance(std_t, s2 - s, "cps").flatten()[0].item() == pytest.approx(std**2, rel=1e-6)


def test_bf16_inputs_use_float32_math():
    x, v = rand(B, L, C, seed=15, dtype=torch.bfloat16), rand(B, L, C, seed=16, dtype=torch.bfloat16)
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    out16 = sde_step_with_logprob(v, 0.5, 0.4, x, 0.7, generator=gen())
    out32 = sde_step_with_logprob(v.float(), 0.5, 0.4, x.float(), 0.7, generator=gen())
    for a, b in zip(out16, out32):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_sampled_step_has_stated_mean_and_std():
    n = 20000
    x, v = rand(1, 2, 3, seed=17).expand(n, 2, 3), rand(1, 2, 3, seed=18).expand(n, 2, 3)
    s, s2 = 0.75, 0.6
    prev, _, mean, std_t = sde_step_with_logprob(v, s, s2, x, 0.8, generator=torch.Generator().manual_seed(5))
    total = (std_t[0] * math.sqrt(s - s2)).item()
    emp_mean, emp_std = prev.double().mean(0), prev.double().std(0)
    assert (emp_mean - mean[0].double()).abs().max() < 5 * total / math.sqrt(n)
    assert (emp_std / total - 1).abs().max() < 0.03


def test_kl_to_reference_is_flow_grpo_convention():
    """Both types, as Flow-GRPO's train scripts: mean((m - m_ref)^2) / (2 std_dev_t^2), NOT divided by the
    transition variance std^2 |dt| (so a beta means what it means in Flow-GRPO); [B]; 0 where std is 0."""
    m, m_ref = rand(B, L, C, seed=19), rand(B, L, C, seed=20)
    std_t = torch.tensor([0.5, 0.7, 0.0]).view(B, 1, 1)
    for dt in (-0.1, torch.tensor([-0.1, -0.2, -0.05])):
        kl = kl_to_reference(m, m_ref, std_t, dt)
        kl_cps = kl_to_reference(m, m_ref, std_t, dt, "cps")
        assert kl.shape == kl_cps.shape == (B,)
        for b in range(B):
            sq = ((m[b].double() - m_ref[b].double()) ** 2).mean().item()
            std = std_t[b].item()
            assert kl[b].item() == pytest.approx(sq / (2 * std**2) if std > 0 else 0.0, rel=1e-5)
            assert kl_cps[b].item() == pytest.approx(sq / (2 * std**2) if std > 0 else 0.0, rel=1e-5)
    assert kl_to_reference(m, m, std_t, -0.1).abs().max() == 0
    with pytest.raises(ValueError):
        kl_to_reference(m, m_ref, std_t, -0.1, "ode")


# ---------------------------------------------------------------- grpo


def test_grpo_ratio_one_gives_minus_mean_advantage():
    logp = rand(6, seed=21)
    adv = torch.tensor([1.0, -2.0, 7.0, 0.5, -9.0, 0.0])
    loss, st = grpo_loss(logp, logp.clone(), adv, 0.2, 5.0)
    assert loss.item() == pytest.approx(-adv.clamp(-5, 5).mean().item(), abs=1e-6)
    assert st["ratio/mean"] == 1.0 and st["ratio/std"] == 0.0 and st["clipfrac"] == 0.0 and st["approx_kl"] == 0.0
    for key in ("advantage/mean", "advantage/std", "policy_loss"):
        assert isinstance(st[key], float)


def test_grpo_clipping_and_gradients():
    eps = 0.2
    old = torch.zeros(4)
    # ratios: 1.5 (A>0, clipped), 0.5 (A<0, clipped), 1.5 (A<0, not clipped), 0.5 (A>0, not clipped)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, st = grpo_loss(logp, old, adv, eps, 5.0)
    ratio = np.array([1.5, 0.5, 1.5, 0.5])
    a = adv.numpy()
    expected = np.mean([max(-a[i] * ratio[i], -a[i] * min(max(ratio[i], 1 - eps), 1 + eps)) for i in range(4)])
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    g = logp.grad
    assert g[0] == 0 and g[1] == 0  # flat beyond the clip in the direction the advantage pushes
    assert g[2].item() == pytest.approx(1.5 / 4) and g[3].item() == pytest.approx(-0.5 / 4)
    assert st["clipfrac"] == 1.0
    _, st2 = grpo_loss(torch.log(torch.tensor([1.1, 1.3, 0.9, 0.7])), old, adv, eps, 5.0)
    assert st2["clipfrac"] == pytest.approx(0.5)
    assert st2["approx_kl"] == pytest.approx(0.5 * np.mean(np.log([1.1, 1.3, 0.9, 0.7]) ** 2), rel=1e-5)


def test_grpo_valid_mask_and_nan_advantages():
    logp, old = rand(4, seed=22).requires_grad_(True), rand(4, seed=23)
    adv = torch.tensor([1.0, float("nan"), -0.5, 2.0])
    valid = torch.tensor([True, True, True, False])
    loss, st = grpo_loss(logp, old, adv, 0.2, 5.0, valid=valid)
    sub_loss, _ = grpo_loss(logp[[0, 2]], old[[0, 2]], adv[[0, 2]], 0.2, 5.0)
    assert loss.item() == pytest.approx(sub_loss.item(), rel=1e-6) and st["num_valid"] == 2
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[1] == 0 and logp.grad[3] == 0
    none_loss, _ = grpo_loss(logp, old, adv, 0.2, 5.0, valid=torch.zeros(4, dtype=torch.bool))
    assert none_loss.item() == 0.0


# ---------------------------------------------------------------- nft


def ref_nft(vt, vo, vr, xt, x0, t, adv, beta, kl_beta, mode, m=5.0):
    """float64 numpy, per sample, straight from the formulas file."""
    vt, vo, xt, x0 = (np.asarray(z, np.float64) for z in (vt, vo, xt, x0))
    total = []
    for b in range(vt.shape[0]):
        a = min(max(float(adv[b]), -m), m)
        a = {"normal": a, "positive_only": max(a, 0.0), "negative_only": min(a, 0.0),
             "one_only": 1.0 if a > 0 else 0.0, "binary": float(np.sign(a))}[mode]
        r = min(max(a / 10 + 0.5, 0.0), 1.0)
        x0p = xt[b] - t[b] * (beta * vt[b] + (1 - beta) * vo[b])
        x0n = xt[b] - t[b] * ((1 + beta) * vo[b] - beta * vt[b])
        wp, wn = max(np.abs(x0p - x0[b]).mean(), 1e-5), max(np.abs(x0n - x0[b]).mean(), 1e-5)
        pol = r * ((x0p - x0[b]) ** 2).mean() / wp / beta + (1 - r) * ((x0n - x0[b]) ** 2).mean() / wn / beta
        total.append((5 * pol, ((vt[b] - np.asarray(vr[b], np.float64)) ** 2).mean()))
    pol, kl = np.array(total).T
    return pol.mean() + kl_beta * kl.mean()


def nft_inputs(seed=30):
    x0, eps = rand(B, L, C, seed=seed), rand(B, L, C, seed=seed + 1)
    t = torch.tensor([0.3, 0.7, 1.0])
    xt = (1 - t.view(B, 1, 1)) * x0 + t.view(B, 1, 1) * eps
    vo = eps - x0 + 0.3 * rand(B, L, C, seed=seed + 2)
    vt = vo + 0.1 * rand(B, L, C, seed=seed + 3)
    vr = vo + 0.05 * rand(B, L, C, seed=seed + 4)
    return vt, vo, vr, xt, x0, t


@pytest.mark.parametrize("mode", ["normal", "positive_only", "negative_only", "one_only", "binary"])
def test_nft_loss_matches_formula(mode):
    vt, vo, vr, xt, x0, t = nft_inputs()
    adv = torch.tensor([2.5, -7.0, 0.0])
    loss, st = nft_loss(vt, vo, vr, xt, x0, t, adv, 0.5, 0.01, adv_mode=mode)
    assert loss.dtype == torch.float32
    ref = ref_nft(vt.numpy(), vo.numpy(), vr.numpy(), xt.numpy(), x0.numpy(), t.numpy(), adv.numpy(), 0.5, 0.01, mode)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    for key in ("policy_loss", "kl", "r/mean", "w_pos/mean", "w_neg/mean"):
        assert isinstance(st[key], float)


def test_nft_gradient_only_through_v_theta_and_validity():
    vt, vo, vr, xt, x0, t = (z.clone().requires_grad_(True) for z in nft_inputs())
    adv = torch.tensor([1.0, float("nan"), -1.0])
    loss, st = nft_loss(vt, vo, vr, xt, x0, t, adv, 1.0, 0.1, valid=torch.tensor([True, True, True]))
    loss.backward()
    assert vt.grad is not None and torch.isfinite(vt.grad).all() and vt.grad[1].abs().max() == 0
    assert all(z.grad is None for z in (vo, vr, xt, x0, t)) and st["num_valid"] == 2
    with pytest.raises(ValueError, match="normal.*binary"):
        nft_loss(vt, vo, vr, xt, x0, t, adv, 1.0, 0.0, adv_mode="bogus")
    with pytest.raises(ValueError):
        nft_loss(vt, vo, None, xt, x0, t, adv, 1.0, 0.1)
    loss0, st0 = nft_loss(vt, vo, None, xt, x0, t, adv, 1.0, 0.0)
    assert st0["kl"] == 0.0 and torch.isfinite(loss0)


def test_nft_positive_sample_pulls_x0_pos_toward_x0():
    vt, vo, _, xt, x0, t = nft_inputs(seed=40)
    vt = vt.clone().requires_grad_(True)
    beta = 0.5

    def err(v):
        return ((xt - t.view(B, 1, 1) * (beta * v + (1 - beta) * vo)) - x0).abs().mean().item()

    loss, st = nft_loss(vt, vo, None, xt, x0, t, torch.full((B,), 5.0), beta, 0.0)
    assert st["r/mean"] == 1.0
    loss.backward()
    before = err(vt.detach())
    after = err(vt.detach() - 1e-3 * vt.grad)
    assert after < before


def test_old_decay_schedules_and_update():
    assert [old_decay(s, 0) for s in (0, 10, 1000)] == [0.0, 0.0, 0.0]
    assert [old_decay(s, 1) for s in (0, 100, 499, 500, 2000)] == pytest.approx([0.0, 0.1, 0.499, 0.5, 0.5])
    assert [old_decay(s, 2) for s in (0, 74, 75, 76, 175, 500)] == pytest.approx([0, 0, 0, 0.0075, 0.75, 0.999])
    with pytest.raises(ValueError):
        old_decay(1, 3)
    old, new = [torch.zeros(3), torch.ones(2, dtype=torch.bfloat16)], [torch.ones(3), torch.zeros(2)]
    update_old_params(old, new, 0.25)
    assert torch.allclose(old[0], torch.full((3,), 0.75)) and old[1].dtype == torch.bfloat16
    assert torch.equal(old[1].float(), torch.full((2,), 0.25))
    update_old_params(old, new, 0.0)
    assert torch.equal(old[0], new[0])


def test_sde_window_start_in_lo_to_hi_minus_size_and_never_the_last_step():
    """Flow-GRPO: start ~ randint(lo, hi - size) inclusive, so the window lies inside [lo, hi); the last
    step (into sigma 0) is never stochastic, and a range with no room is an error."""
    from calligrapher_rl.sampling import SDEWindow

    rng = np.random.default_rng(0)
    assert {SDEWindow.pick(10, 2, 1, 6, rng).start for _ in range(400)} == {1, 2, 3, 4}
    assert {tuple(SDEWindow.pick(4, 3, 0, 3, rng).steps()) for _ in range(20)} == {(0, 1, 2)}
    for size, lo, hi in ((1, 0, 4), (3, 1, 3), (0, 0, 2)):
        with pytest.raises(ValueError, match="no room"):
            SDEWindow.pick(4, size, lo, hi, rng)
