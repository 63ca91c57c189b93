"""Group-relative advantages (NaN = failed reward) and the parameter EMA."""

import json
import math

import numpy as np
import pytest
import torch

from calligrapher_rl.rl.advantages import PerPromptStatTracker, batch_advantages, compute_advantages
from calligrapher_rl.rl.ema import ParamEMA, ema_decay_at

NAN = float("nan")


def zscore(values, mean, std):
    return [(v - mean) / (std + 1e-4) for v in values]


def pop_std(values):
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def test_tracker_per_prompt_groups():
    prompts = ["a", "b", "a", "b", "a", "c"]
    rewards = [1.0, 0.2, 0.0, 0.6, 0.5, 0.9]
    adv = PerPromptStatTracker().update(prompts, rewards)
    ga, gb = [1.0, 0.0, 0.5], [0.2, 0.6]
    exp_a = zscore(ga, sum(ga) / 3, pop_std(ga))
    exp_b = zscore(gb, 0.4, pop_std(gb))
    np.testing.assert_allclose(adv, [exp_a[0], exp_b[0], exp_a[1], exp_b[1], exp_a[2], 0.0], atol=1e-9)


def test_tracker_global_std():
    prompts, rewards = ["a", "a", "b", "b"], [1.0, 0.0, 0.4, 0.2]
    adv = PerPromptStatTracker(global_std=True).update(prompts, rewards)
    s = pop_std(rewards)
    np.testing.assert_allclose(adv, zscore([1.0, 0.0], 0.5, s) + zscore([0.4, 0.2], 0.3, s), atol=1e-9)


def test_tracker_nan_rewards_and_single_valid_sample():
    for global_std in (False, True):
        tr = PerPromptStatTracker(global_std=global_std)
        adv = tr.update(["a", "a", "a", "b", "b", "c"], [1.0, NAN, 0.0, NAN, 0.7, NAN])
        assert math.isnan(adv[1]) and math.isnan(adv[3]) and math.isnan(adv[5])
        assert adv[4] == 0.0  # lone valid sample of its group
        std = pop_std([1.0, 0.0, 0.7]) if global_std else 0.5
        np.testing.assert_allclose(adv[[0, 2]], zscore([1.0, 0.0], 0.5, std), atol=1e-9)
        size, n_prompts = tr.get_stats()
        assert size == pytest.approx(3 / 3) and n_prompts == 3  # valid rewards: a=2, b=1, c=0
    b = batch_advantages([1.0, NAN, 0.0, 0.5])
    assert math.isnan(b[1])
    np.testing.assert_allclose(b[[0, 2, 3]], zscore([1.0, 0.0, 0.5], 0.5, pop_std([1.0, 0.0, 0.5])), atol=1e-9)
    assert batch_advantages([0.3, NAN]).tolist()[0] == 0.0


def test_tracker_history_clear_and_state_round_trip():
    tr = PerPromptStatTracker()
    tr.update(["a", "a"], [1.0, 0.0])
    second = tr.update(["a", ("b", 1)], [0.5, 0.2])  # "a" is scored against the whole epoch so far
    assert second[0] == pytest.approx((0.5 - 0.5) / (pop_std([1.0, 0.0, 0.5]) + 1e-4))
    assert tr.prompt_means()["a"] == pytest.approx(0.5)
    state = json.loads(json.dumps(tr.state_dict()))
    clone = PerPromptStatTracker()
    clone.load_state_dict(state)
    nxt = ["a", ("b", 1), "c"], [0.9, 0.1, 0.3]
    np.testing.assert_array_equal(tr.update(*nxt), clone.update(*nxt))
    assert tr.get_stats() == clone.get_stats()
    tr.clear()
    assert tr.get_stats()[0] == 0.0 and tr.update(["a", "a"], [1.0, 0.0]).tolist() == pytest.approx(
        zscore([1.0, 0.0], 0.5, 0.5))


def test_compute_advantages_picks_and_clips():
    rewards = [0.0] * 9 + [1.0]
    prompts = ["p"] * 10
    out = compute_advantages(prompts, rewards, None, 2.0)
    assert out.max() == 2.0 and out.min() == pytest.approx(-1 / 3, rel=1e-3)
    tracked = compute_advantages(prompts, rewards + [], PerPromptStatTracker(), 2.0)
    np.testing.assert_allclose(tracked, out)
    assert math.isnan(compute_advantages(["p", "p"], [NAN, 1.0], None, 5.0)[0])


# ---------------------------------------------------------------- EMA


def test_ema_decay_schedule_and_interval():
    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay_at(10, 0.9999) == pytest.approx(11 / 20)
    assert ema_decay_at(10**6, 0.999) == 0.999
    p = torch.zeros(4, dtype=torch.bfloat16)
    ema = ParamEMA([p], decay=0.99, update_interval=3)
    ref = 0.0
    for step in range(12):
        p.fill_(float(step + 1))
        updated = ema.step([p], step)
        assert updated == ((step + 1) % 3 == 0)
        if updated:  # one fold stands for the 3 steps it ends
            d = math.prod(min((1 + s) / (10 + s), 0.99) for s in range(step - 2, step + 1))
            ref += (1 - d) * (float(step + 1) - ref)
    assert ema.shadow[0].dtype == torch.float32 and ema.num_updates == 4
    assert ema.shadow[0][0].item() == pytest.approx(ref, rel=1e-6)


def test_ema_horizon_does_not_depend_on_the_fold_interval():
    """On a smooth weight path, folding every step and folding every k-th step give the same EMA (within the
    k/2-step sampling lag): the horizon is 1 / (1 - decay) steps either way, not k times longer."""
    n, decay = 300, 0.95  # a 20-step horizon

    def weights(step):
        return torch.tensor([step / n + 0.1 * math.sin(step / 60), 1 - step / n])

    def final(k):
        p = weights(0)
        ema = ParamEMA([p], decay=decay, update_interval=k)
        for step in range(n):
            p.copy_(weights(step + 1))
            ema.step([p], step)
        return ema.shadow[0]

    every = final(1)
    assert (every - weights(n)).abs().max() > 0.04  # the EMA does lag the weights (the test could tell a difference)
    for k in (5, 10):  # the k-step fold folds the latest weights: it leads by about k/2 steps of movement
        assert (final(k) - every).abs().max() < k / 2 * 1.2 / n, k


def test_ema_swap_restores_exactly_and_state_round_trip():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 5, generator=g).to(torch.bfloat16)),
              torch.nn.Parameter(torch.randn(7, generator=g))]
    ema = ParamEMA(params, decay=0.9, update_interval=1)
    with torch.no_grad():
        for step in range(5):
            for p in params:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
            ema.step(params, step)
    raw = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError):
        with ema.swapped_in(params):
            assert torch.equal(params[1].detach(), ema.shadow[1])
            assert torch.equal(params[0].detach(), ema.shadow[0].to(torch.bfloat16))
            raise RuntimeError("evaluation failed")
    assert all(torch.equal(p.detach(), r) for p, r in zip(params, raw))
    state = ema.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state["tensors"].values())
    assert json.loads(json.dumps(state["meta"])) == state["meta"]
    other = ParamEMA([torch.zeros(3, 5), torch.zeros(7)], decay=0.5)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    assert other.num_updates == 5 and other.decay == 0.9
    targets = [torch.empty(3, 5), torch.empty(7)]
    other.copy_to(targets)
    assert torch.equal(targets[1], ema.shadow[1])
