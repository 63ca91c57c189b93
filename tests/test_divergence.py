"""A diverged policy fails the run with its cause (never a reward pause), and leaves no checkpoint of its weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calligrapher_rl.rewards import build_rewards
from calligrapher_rl.rewards.base import RewardSample
from calligrapher_rl.sampling import Rollout
from calligrapher_rl.training.divergence import (
    Diverged,
    WeightHealth,
    check_rollout_health,
    finite_samples,
    score_finite,
    weight_norm,
    zero_nonfinite,
)

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--pretrained_model_name_or_path", "tiny", "--siglip_path", "tiny", "--train_data_json", "bundled",
        "--rewards", "fidelity:1.0", "--rl_num_images_per_prompt", "4", "--train_batch_size", "4",
        "--resolution", "32", "--rl_num_inference_steps", "4", "--num_style_tokens", "8", "--eval_steps", "0",
        "--eval_at_start", "false"]


def test_nonfinite_samples_are_not_scored_and_are_zeroed():
    seen = []

    def reward(images, prompts, metadata):
        seen.append(list(prompts))
        return [1.0] * len(images)

    rewards = build_rewards([reward])
    samples = [RewardSample(image=Image.new("RGB", (8, 8)), mask=Image.new("L", (8, 8)), text=t) for t in "abc"]
    latents = torch.zeros(3, 3, 2, 2)
    latents[1, 1, 0, 0] = float("inf")  # a middle latent, not only the final one
    ro = Rollout(latents=latents, log_probs=torch.zeros(3, 2), sigmas=torch.linspace(1, 0, 3), sde_steps=[0, 1])
    ok = finite_samples(ro)
    assert ok.tolist() == [True, False, True]
    zero_nonfinite(ro, ok)
    assert torch.isfinite(ro.latents).all()
    try:
        got = score_finite(rewards, samples, ok).result()
        assert seen == [["a", "c"]]  # the non-finite sample never reached the reward
        assert got["total"][[0, 2]].tolist() == [1.0, 1.0] and np.isnan(got["total"][1])
        assert np.isnan(score_finite(rewards, samples, np.zeros(3, bool)).result()["total"]).all()
    finally:
        rewards.close()


def test_rollout_health_counts_streaks_and_fails_on_all_nonfinite():
    health = WeightHealth()
    assert check_rollout_health(0, 8, 0, 3, step=4, health=health) == 0 and health.sampled_ok_step == 4
    assert check_rollout_health(1, 8, 0, 3, step=5, health=health) == 1
    assert check_rollout_health(2, 8, 1, 3, step=6, health=health) == 2
    with pytest.raises(Diverged, match=r"3 epochs in a row.*those of step 4"):
        check_rollout_health(1, 8, 2, 3, step=7, health=health)
    with pytest.raises(Diverged, match="non-finite values in all 8 rollout samples"):
        check_rollout_health(8, 8, 0, 3, step=7, health=WeightHealth())


def test_weight_health_baseline_is_before_the_first_update():
    p = [torch.nn.Parameter(torch.ones(4))]
    health = WeightHealth(growth=100.0)
    health.baseline(p, step=0)
    with torch.no_grad():
        p[0].mul_(1e30)  # a first-step blow-up: finite in float32, its sum of squares is not
    assert weight_norm(p) == pytest.approx(2e30)
    health.check(p, applied=True, grad_norm=1.0, step=1)
    assert "grew from 2 (before the first update) to 2e+30" in health.failure and "step 0" in health.failure
    nan = WeightHealth()
    nan.baseline(p, step=3)
    with torch.no_grad():
        p[0][0] = float("nan")
    nan.check(p, applied=True, grad_norm=1.0, step=4)
    assert "non-finite values in the trainable weights" in nan.failure


@pytest.mark.parametrize("method,extra,cause", [
    # caught by the norm alarm at step 1 while still finite, before its checkpoint of step 1 would be written
    ("grpo", ["--checkpointing_steps", "1"], "trainable weight norm grew"),
    ("nft", ["--max_weight_norm_growth", "0"], "non-finite values in all 16 rollout samples"),
])
def test_learning_rate_1e30_ends_failed_naming_the_cause(tmp_path, method, extra, cause):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "calligrapher_rl.train", "--preset", f"tiny-{method}", "--output_dir",
                           str(out), *FAST, "--learning_rate", "1e30", "--rl_warmup_steps", "0", "--max_train_steps",
                           "15", *extra], capture_output=True, text=True, timeout=300, cwd=ROOT)
    status = json.loads((out / "status.json").read_text())
    assert proc.returncode == 1 and status["state"] == "failed", (proc.returncode, status, proc.stderr[-2000:])
    assert "diverged at step" in status["message"] and cause in status["message"], status["message"]
    assert status["step"] <= 15 and "reward servers" not in proc.stderr
    # checkpoint-0 is the run's starting point, written before any update
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-0"], "a checkpoint was written from diverged weights"
