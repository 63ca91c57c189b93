"""AWM and GRPO-Guard through the real trainer on the random tiny (CPU, seconds): what each update sees.

The formulas themselves are checked against their authors' code in test_rl_peers.py; here the trainer's
glue: which weights give the AWM ratio's old value, the EMA policy that follows the weights, the step
means GRPO-Guard normalises against, and the studio's charts of each method's statistics.
"""

from __future__ import annotations

import pytest
import torch
from test_learning import COMMON, one_thread  # noqa: F401  (autouse: one intra-op thread, as the learning tests)

from app import charts
from calligrapher_rl.config_parse import parse_args
from calligrapher_rl.training.rl_epoch import RLEpoch
from calligrapher_rl.training.run_dir import read_metrics
from calligrapher_rl.training.trainer import Trainer

AWM = ["--preset", "tiny-awm", *COMMON, "--rewards", "brightness:1", "--seed", "1", "--train_batch_size", "4",
       "--rl_num_images_per_prompt", "4", "--rl_noise_level", "0", "--awm_num_timesteps", "2",
       "--rl_kl_beta", "0.003", "--learning_rate", "1e-2"]


class UpdateProbeEpoch(RLEpoch):
    """Keeps every batch update's stats, and whether the AWM ratio used the epoch's rollout snapshot."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.updates = []

    def update(self, batch, ro, adv, inner, b, group, **kwargs):
        got = super().update(batch, ro, adv, inner, b, group, **kwargs)
        self.updates.append((self.state.rl_epoch, b, got, self.awm_rollout_params is not None))
        return got


class UpdateProbe(Trainer):
    rl_epoch_type = UpdateProbeEpoch


def _run(tmp_path, flags, *extra):
    out = tmp_path / "run"
    tr = UpdateProbe(parse_args([*flags, "--output_dir", str(out), *extra]))
    assert tr.run() == "finished"
    assert tr.rl_epoch_part.updates, "the probe saw no update"
    return [r for r in read_metrics(str(out)) if r.get("phase") == "rl" and "reward/mean" in r], tr


def test_awm_ratio_is_one_in_the_first_step_then_against_the_rollout_weights(tmp_path):
    """Two rollout batches per epoch, one optimizer step each: the first update's ratio is exactly 1 (the
    live weights rolled out), the second's is against the snapshot taken before the first update, so it
    moves off 1; the EMA policy follows the weights after each epoch (its KL term > 0 from epoch 2); the
    studio draws AWM's statistics."""
    rows, tr = _run(tmp_path, AWM, "--rl_num_batches_per_epoch", "2", "--gradient_accumulation_steps", "1",
                    "--max_train_steps", "6")
    assert len(rows) == 3 and all(r["rl/optimizer_steps"] == 2 for r in rows)
    firsts = [st for _, b, st, _ in tr.rl_epoch_part.updates if b == 0]
    seconds = [st for _, b, st, _ in tr.rl_epoch_part.updates if b == 1]
    assert all(st["ratio/mean"] == 1.0 and st["ratio/std"] == 0.0 for st in firsts)
    assert all(abs(st["ratio/mean"] - 1.0) > 1e-7 or st["ratio/std"] > 0 for st in seconds)
    assert all(snap for _, _, _, snap in tr.rl_epoch_part.updates)  # several optimizer steps an epoch: a snapshot is taken
    assert tr.rl_epoch_part.awm_rollout_params is None  # ... and dropped after the epoch
    for r in rows:
        assert r["awm/fm_loss"] > 0 and 0 < r["awm/t"] < 1 and r["kl"] >= 0
        assert r["awm/ema_decay"] == pytest.approx(min(0.3, 0.001 * r["rl/epoch"] * 2))
    # the EMA policy starts as the live weights: 0 in the very first update, > 0 once the weights moved
    assert firsts[0]["awm/ema_kl"] == 0.0 and all(st["awm/ema_kl"] > 0 for _, _, st, _ in tr.rl_epoch_part.updates[1:])
    live = dict(zip(tr.policies.names, tr.policies.params))
    assert any(not torch.equal(tr.policies.old[n].float(), live[n].detach().float()) for n in tr.policies.names)

    figs = charts.figures(read_metrics(str(tmp_path / "run")), method="awm")
    assert [t.name for t in figs["kl"].data][-1] == "kl (rl)" and "awm/ema_kl" in [t.name for t in figs["kl"].data]
    assert "AWM" in figs["clipfrac"].layout.title.text and figs["clipfrac"].data


def test_awm_on_policy_epochs_take_no_snapshot(tmp_path):
    """One optimizer step an epoch (the authors' recipe): no snapshot, the ratio is exactly 1 every time."""
    rows, tr = _run(tmp_path, AWM, "--rl_num_batches_per_epoch", "2", "--gradient_accumulation_steps", "2",
                    "--max_train_steps", "2")
    assert len(rows) == 2 and not any(snap for _, _, _, snap in tr.rl_epoch_part.updates)
    assert all(st["ratio/mean"] == 1.0 and st["clipfrac"] == 0.0 for _, _, st, _ in tr.rl_epoch_part.updates)


def test_grpo_guard_ratio_is_exactly_one_on_policy_and_normalised_off_policy(tmp_path):
    """RatioNorm against the rollout's recorded step means: on-policy the normalised ratio is exactly 1
    (the update recomputes the rollout's means bit for bit); the epoch's second optimizer step moves it."""
    flags = ["--preset", "tiny-grpo", *COMMON, "--rewards", "brightness:1", "--seed", "1", "--train_batch_size", "4",
             "--rl_num_images_per_prompt", "4", "--rl_noise_level", "1.0", "--rl_sde_type", "sde",
             "--rl_grpo_ratio_norm", "true", "--rl_grpo_clip_range", "2e-6", "--rl_num_batches_per_epoch", "2",
             "--gradient_accumulation_steps", "1", "--max_train_steps", "4"]
    rows, tr = _run(tmp_path, flags)
    assert len(rows) == 2
    firsts = [st for _, b, st, _ in tr.rl_epoch_part.updates if b == 0]
    seconds = [st for _, b, st, _ in tr.rl_epoch_part.updates if b == 1]
    assert all(st["ratio/mean"] == 1.0 and st["ratio/std"] == 0.0 and st["approx_kl"] == 0 for st in firsts)
    assert all(st["ratio/std"] > 0 and st["approx_kl"] > 0 for st in seconds)
    # the normalised log-ratio is O(delta) where the raw one is O(delta / s): it stays far closer to 1
    assert all(abs(st["ratio/mean"] - 1.0) < 1e-2 for st in seconds)
