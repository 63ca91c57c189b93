"""The Trainer of the tiny model driven step by step in process (the run as commands is test_training.py):
non-finite losses and rollouts, weight-health alarms, the EMA's step, the learning-rate warmups and their restart
for RL (fresh optimizer moments), the last accumulation group's scale, NFT's old-policy decay and trained
timesteps, and the reward timeout reaching the reward client."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from test_training import _args  # the tiny run's flags, shared with the end-to-end runs

from calligrapher_rl.config_parse import parse_args
from calligrapher_rl.training.divergence import Diverged
from calligrapher_rl.training.run_dir import read_metrics, read_status


@contextlib.contextmanager
def _trainer(out, *extra, preset="tiny-grpo"):
    """A Trainer of the tiny model that a test drives step by step (closed afterwards)."""
    from calligrapher_rl.training.trainer import Trainer

    tr = Trainer(parse_args(_args(out, "--eval_steps", "0", "--eval_at_start", "false", *extra, preset=preset)))
    try:
        yield tr
    finally:
        tr.rewards.close()
        tr.run_dir.close()


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in params])


def test_trainer_validates_a_config_built_in_python(tmp_path):
    from calligrapher_rl.config import ConfigError, TrainConfig
    from calligrapher_rl.training.trainer import Trainer

    cfg = TrainConfig(pretrained_model_name_or_path="tiny", siglip_path="tiny", train_data_json="bundled",
                      output_dir=str(tmp_path / "run"), rl_num_inference_steps=4, rl_sde_window_size=1,
                      rl_sde_window_range="0,4")
    with pytest.raises(ConfigError, match="rl_sde_window_range"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_nonfinite_loss_skips_the_step_and_is_logged(tmp_path):
    """A NaN in a frozen weight makes the loss NaN: no update, no EMA step, counted, NaN kept in the
    metrics (not dropped); once the weights are finite again, steps apply and the streak resets."""
    with _trainer(tmp_path / "run", "--rl_warmup_steps", "10", "--max_train_steps", "10", "--trainable", "attn") as tr:
        frozen = tr.stack.adapter.image_proj_mlp if hasattr(tr.stack.adapter, "image_proj_mlp") else None
        frozen_p = next(p for n, p in tr.stack.adapter.named_parameters() if not n.startswith("attn_adapter."))
        assert not frozen_p.requires_grad and frozen is not None
        before, ema_before = _flat(tr.policies.params), _flat(tr.policies.ema.shadow)
        keep = frozen_p.detach().clone()
        with torch.no_grad():
            frozen_p.view(-1)[0] = float("nan")
        tr.warmup_step()
        assert torch.equal(_flat(tr.policies.params), before) and torch.equal(_flat(tr.policies.ema.shadow), ema_before)
        assert tr.step == 1 and tr.skipped_nonfinite == 1 and tr.optimizer.state == {}
        row = read_metrics(str(tmp_path / "run"))[-1]
        assert row["train/skipped_nonfinite"] == 1 and row["train/skipped"] == 1
        assert "loss" in row and (row["loss"] is None or np.isnan(row["loss"])), row  # logged as NaN, not dropped
        with torch.no_grad():
            frozen_p.copy_(keep)
        tr.warmup_step()
        assert not torch.equal(_flat(tr.policies.params), before) and torch.isfinite(_flat(tr.policies.params)).all()
        assert tr._nonfinite_streak == 0 and tr.skipped_nonfinite == 1


def test_nonfinite_steps_in_a_row_fail_the_run_with_the_cause(tmp_path):
    out = tmp_path / "run"
    with _trainer(out, "--rl_warmup_steps", "10", "--max_train_steps", "10", "--max_nonfinite_steps", "3") as tr:
        with torch.no_grad():
            next(p for n, p in tr.stack.adapter.named_parameters() if not n.startswith("attn_adapter.")).fill_(float("nan"))
        assert tr.run() == "failed"
    status = read_status(str(out))
    assert status["state"] == "failed" and "non-finite loss" in status["message"] and "3" in status["message"]
    # the NaN this test put in a frozen adapter weight is in what a checkpoint would hold: none is written
    assert status["step"] == 3 and not (out / "checkpoint-3").exists()
    assert [r["train/skipped_nonfinite"] for r in read_metrics(str(out))] == [1, 2, 3]


def test_nan_rollouts_are_a_policy_failure_not_a_reward_pause(tmp_path):
    """NaN latents are a diverged policy: never scored (not the score of a black image, not a reward failure
    that pauses the run), no update; the run fails at once naming them and writes no checkpoint of its weights."""
    out = tmp_path / "run"
    with _trainer(out, "--rl_warmup_steps", "0", "--max_train_steps", "5", "--trainable", "attn") as tr:
        with torch.no_grad():
            next(p for n, p in tr.stack.adapter.named_parameters() if not n.startswith("attn_adapter.")).fill_(float("nan"))
        before = _flat(tr.policies.params)
        assert tr.run() == "failed"
        assert torch.equal(_flat(tr.policies.params), before)
    status = read_status(str(out))
    assert status["state"] == "failed" and status["step"] == 0, status
    assert "non-finite values in all 64 rollout samples" in status["message"], status["message"]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-0"]  # the start only: no diverged weights


def test_weight_health_alarms(tmp_path, caplog):
    with _trainer(tmp_path / "run", "--rl_warmup_steps", "10", "--max_train_steps", "10", "--ip_adapter_scale", "0",
                  "--trainable", "attn") as tr:
        with caplog.at_level("WARNING", logger="calligrapher_rl.training"):
            for _ in range(3):
                tr.warmup_step()  # style attention weighted 0: the style maps get exactly zero gradient
            assert any("gradient norm exactly 0" in r.getMessage() for r in caplog.records)
            with torch.no_grad():
                for p in tr.policies.params:
                    p.mul_(1000.0)
            with pytest.raises(Diverged, match="weight norm grew"):  # a failure now, not a warning
                tr.warmup_step()


def test_ema_steps_with_the_post_increment_step(tmp_path):
    """Flow-GRPO: global_step += 1, then ema.step(params, global_step): the first decay is min(2/11, d)."""
    with _trainer(tmp_path / "run", "--rl_warmup_steps", "10", "--max_train_steps", "10", "--ema_decay", "0.99") as tr:
        p0 = _flat(tr.policies.params)
        tr.warmup_step()
        p1, d = _flat(tr.policies.params), 2.0 / 11.0
        assert torch.allclose(_flat(tr.policies.ema.shadow), d * p0 + (1 - d) * p1, atol=1e-7)


def test_constant_lr_with_warmup_warms_up(tmp_path):
    from calligrapher_rl.training.setup import build_optimizer

    cfg = parse_args(_args(tmp_path / "x", "--lr_scheduler", "constant", "--lr_warmup_steps", "4",
                           "--learning_rate", "1e-3"))
    opt, sched = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))])
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_evaluation_reads_the_ema_in_place_without_copying_the_adapter(tmp_path):
    """The EMA weights reach the evaluation's forwards as a params= mapping: the live adapter is neither
    cloned nor written (its tensors' version counters do not move), and the EMA, not the live weights, paints."""
    with _trainer(tmp_path / "run", "--rl_warmup_steps", "10", "--max_train_steps", "10", "--ema_decay", "0.5") as tr:
        tr.warmup_step()
        tr.warmup_step()
        pol = tr.policies
        assert not torch.equal(_flat(pol.params), _flat(pol.ema.shadow))
        versions = [p._version for p in pol.params]
        tr.evaluate()
        assert [p._version for p in pol.params] == versions
        with_ema = read_metrics(str(tmp_path / "run"))[-1]
        ema, pol.ema = pol.ema, None  # the same evaluation with the live weights paints otherwise
        tr.evaluate()
        pol.ema = ema
        live = read_metrics(str(tmp_path / "run"))[-1]
    assert "eval/reward/mean" in with_ema and with_ema["eval/reward/mean"] != live["eval/reward/mean"]


def test_rl_learning_rate_warms_up_again_after_the_moments_reset(tmp_path):
    """--rl_lr_warmup_steps: RL after a supervised warmup resets AdamW's moments, and its learning rate ramps
    up again from lr/n; the ramp is in the scheduler's state, so a resumed run continues it."""
    from calligrapher_rl.training.optim import restart_warmup
    from calligrapher_rl.training.setup import build_optimizer

    with _trainer(tmp_path / "run", "--rl_warmup_steps", "1", "--max_train_steps", "10", "--rl_lr_warmup_steps", "4",
                  "--learning_rate", "1e-3") as tr:
        tr.warmup_step()
        assert tr._last_row["lr"] == pytest.approx(1e-3)
        tr.rl_epoch_step()
        k = tr._last_row["rl/optimizer_steps"]  # RL steps at lr/4, 2lr/4, ...; "lr" is the next step's
        assert tr.optimizer.state and k >= 1 and tr._last_row["lr"] == pytest.approx(1e-3 * min(1, (k + 1) / 4))

    cfg = parse_args(_args(tmp_path / "x", "--rl_lr_warmup_steps", "4", "--learning_rate", "1e-3"))
    opt, sched = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))])
    opt.step(), sched.step()
    restart_warmup(sched)
    lrs = []
    for _ in range(2):
        lrs.append(sched.get_last_lr()[0])
        opt.step(), sched.step()
    opt2, resumed = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))])
    resumed.load_state_dict(torch.load(_saved(sched.state_dict(), tmp_path), weights_only=True))
    opt2.load_state_dict(opt.state_dict())
    for _ in range(3):
        lrs.append(resumed.get_last_lr()[0])
        opt2.step(), resumed.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_rl_warmup_restart_keeps_a_tensor_learning_rate_a_tensor():
    """torchao's 8-bit AdamW keeps each group's lr as a tensor and refuses a float: the RL restart of the warmup
    ramp (supervised warmup, then RL) fills it in place. torch's AdamW takes a tensor lr too, so it stands in here."""
    from calligrapher_rl.training.optim import restart_warmup, with_restart_warmup

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=torch.tensor(1e-3))
    sched = with_restart_warmup(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 4)
    lr = opt.param_groups[0]["lr"]
    p.grad = torch.ones(2)
    opt.step(), sched.step()
    restart_warmup(sched)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(2.5e-4)
    opt.step(), sched.step()
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(5e-4)


def _saved(state, folder):
    path = folder / "scheduler.pt"
    torch.save(state, path)
    return path


def test_reward_timeout_reaches_the_reward_client(tmp_path):
    from fastapi import FastAPI
    from test_rewards_server import Served

    from calligrapher_rl.training.setup import build_rewards

    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok", "rewards": ["fidelity"]}

    server = Served(app)
    try:
        cfg = parse_args(_args(tmp_path / "x", "--rewards", "fidelity", "--reward_server_url", server.url,
                               "--reward_timeout_s", "7.5"))
        rewards = build_rewards(cfg, "tiny", "cpu")
        try:
            assert rewards.remote.timeout_s == 7.5 and rewards.remote.client.timeout.read == 7.5
        finally:
            rewards.close()
    finally:
        server.stop()


def test_last_accumulation_group_is_scaled_by_its_real_size(tmp_path):
    """One batch per epoch with --gradient_accumulation_steps 2: the group holds one batch, so its gradient
    is that batch's mean gradient, the same as without accumulation (not half of it)."""
    norms = []
    for ga in ("1", "2"):
        out = tmp_path / f"ga{ga}"
        with _trainer(out, "--rl_warmup_steps", "0", "--max_train_steps", "1", "--gradient_accumulation_steps", ga,
                      "--train_batch_size", "2") as tr:
            assert tr.run() == "finished"
        norms.append([r["grad_norm"] for r in read_metrics(str(out)) if "grad_norm" in r])
    assert len(norms[0]) == 1 and norms[0] == pytest.approx(norms[1], rel=1e-5)


def test_nft_old_decay_counts_rl_steps_only_and_the_count_is_checkpointed(tmp_path):
    """80 warmup steps, then one NFT epoch of 2 optimizer steps with decay type 2: eta = old_decay(2) = 0,
    so the old policy becomes the current one (counting warmup steps gave eta(82) = 0.05, a lagging old
    policy). The RL step count is saved and restored on resume."""
    out = tmp_path / "run"
    args = ("--rl_warmup_steps", "80", "--max_train_steps", "82", "--nft_decay_type", "2", "--use_ema", "false",
            "--rl_num_batches_per_epoch", "2", "--train_batch_size", "1", "--checkpointing_steps", "1000")
    with _trainer(out, *args, preset="tiny-nft") as tr:
        assert tr.run() == "finished"
        assert tr.rl_steps == 2
        old = torch.cat([tr.policies.old[n].reshape(-1) for n in tr.policies.names])
        assert torch.equal(old, _flat(tr.policies.params))
    rl = [r for r in read_metrics(str(out)) if r["phase"] == "rl" and "nft/old_decay" in r]
    assert [r["nft/old_decay"] for r in rl] == [0.0]
    state = json.loads((out / "checkpoint-82" / "trainer_state" / "state.json").read_text())
    assert state["rl_steps"] == 2 and state["step"] == 82
    with _trainer(out, *args, "--resume_from_checkpoint", "latest", "--max_train_steps", "90", preset="tiny-nft") as tr:
        tr._maybe_resume()
        assert tr.rl_steps == 2 and tr.step == 82


def test_nft_trains_distinct_timesteps_per_sample(tmp_path, monkeypatch):
    """Each sample trains the first k of its own permutation of the schedule's timesteps: with k = N every
    sample sees every timestep exactly once (draws with replacement repeat some)."""
    from calligrapher_rl.training.updates import nft_backward

    with _trainer(tmp_path / "run", "--rl_warmup_steps", "0", "--max_train_steps", "1", "--nft_num_timesteps", "4",
                  "--train_batch_size", "4", "--rl_kl_beta", "0", preset="tiny-nft") as tr:
        tr.policies.begin_rl(with_old=True)
        batch = tr.conditions.batch(tr.sampler.batch(1, 0))
        ro = tr.rl_epoch_part.rollout(batch, 0)
        seen, real = [], tr.stack.velocity

        def spy(latents, fill, text, sigma, *a, **k):
            if torch.is_grad_enabled():  # v_theta: once per trained timestep
                seen.append(torch.as_tensor(sigma).reshape(-1).clone())
            return real(latents, fill, text, sigma, *a, **k)

        monkeypatch.setattr(tr.stack, "velocity", spy)
        adv = torch.linspace(-1, 1, len(batch.indices))
        nft_backward(tr.stack, batch, ro, adv, 4, policies=tr.policies, guidance=30.0, scale=2.0, beta=0.1,
                     kl_beta=0.0, adv_mode="normal", adv_clip_max=5.0, generator=torch.Generator().manual_seed(0),
                     loss_scale=0.25, autocast=contextlib.nullcontext)
    t = torch.stack(seen, 1)  # [B, 4]
    assert t.shape == (16, 4)
    for row in t:
        assert sorted(row.tolist()) == pytest.approx(sorted(ro.sigmas[:-1].tolist()))


def test_rl_starts_with_fresh_optimizer_moments_after_warmup(tmp_path):
    """Supervised gradients dwarf policy gradients; their Adam second moment must not shrink the RL steps."""
    from calligrapher_rl.training.optim import FlatOptimizer

    with _trainer(tmp_path / "run", "--rl_warmup_steps", "2", "--max_train_steps", "3") as tr:
        assert type(tr.optimizer) is torch.optim.AdamW and not isinstance(tr.optimizer, FlatOptimizer)  # full rank
        assert tr.run() == "finished"
        assert {int(s["step"]) for s in tr.optimizer.state.values()} == {1}  # one RL step since the reset
