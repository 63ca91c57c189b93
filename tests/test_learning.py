"""Learning tests that a broken update cannot pass: on the tiny random model, on CPU, GRPO and
DiffusionNFT raise a cheap reward, and the same runs with the learning signal destroyed do not.

Each test runs the real trainer in-process (tiny FLUX-Fill, bundled data, fixed seed) and reads
metrics.jsonl. The thresholds come from measurements over seeds 1-3 (docs/learning.md has the table).

- Paired controls: the same seed with each epoch's advantages permuted across the samples (the update
  machinery runs, the signal is gone) must gain less than half of the real run; with the reward negated
  the measured quantity must fall. An absolute floor alone let a shuffled-advantage GRPO pass.
- All features on: KL > 0, an SDE window, gradient accumulation 2, supervised warmup, EMA and (NFT)
  decay type 2 still learn, and inside an epoch the old (rollout) policy differs from the live one.
- One process = two processes: one optimizer step on 2 gloo processes equals the step on 1 process.
- On-policy: the first ratio is exactly 1, with and without an SDE window (rollouts use the K/V cache).

Settings (flags only): 32 px, 4 sampler steps, 8 style tokens, `--trainable attn`, `--ip_adapter_scale 2`,
lr 2e-2, all 16 bundled prompts in every batch so `reward/mean` carries no prompt-sampling noise.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calligrapher_rl.config_parse import parse_args
from calligrapher_rl.training.rl_epoch import RLEpoch
from calligrapher_rl.training.run_dir import read_metrics
from calligrapher_rl.training.trainer import Trainer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

K = 4  # epochs averaged at each end of a run
EPOCHS = 15
FLOOR = {"grpo": 0.006, "nft": 0.005}  # about half the smallest gain over seeds 1-3 (docs/learning.md)

# Everything that is not the method: model, data, sizes, no warmup/eval/checkpoints/EMA in between.
COMMON = ["--pretrained_model_name_or_path", "tiny", "--siglip_path", "tiny", "--train_data_json", "bundled",
          "--rewards", "fidelity:1.0", "--train_batch_size", "16", "--ip_adapter_scale", "2.0",
          "--learning_rate", "2e-2", "--ema_decay", "0.99",  # the random tiny, as measured in docs/learning.md
          "--resolution", "32", "--num_style_tokens", "8", "--rl_num_inference_steps", "4",
          "--rl_warmup_steps", "0", "--use_ema", "false", "--eval_steps", "0", "--eval_at_start", "false",
          "--checkpointing_steps", "100000", "--report_to", "none", "--rl_kl_beta", "0",
          "--mixed_precision", "no", "--rl_guidance_scale", "30", "--rl_per_prompt_stat_tracking", "true",
          "--gradient_accumulation_steps", "1", "--rl_num_inner_epochs", "1",
          "--trainable", "attn", "--ip_adapter_scale", "2", "--learning_rate", "2e-2", "--train_batch_size", "16"]
GRPO = ["--preset", "tiny-grpo", *COMMON, "--rl_noise_level", "1.0", "--rl_sde_type", "sde", "--rl_sde_window_size",
        "0", "--rl_grpo_clip_range", "0.2", "--rl_num_images_per_prompt", "2",
        "--rl_num_batches_per_epoch", "8", "--max_train_steps", str(8 * EPOCHS)]
NFT = ["--preset", "tiny-nft", *COMMON, "--nft_beta", "0.1", "--nft_num_timesteps", "2", "--nft_decay_type", "1",
       "--nft_adv_mode", "normal", "--rl_noise_level", "0", "--rl_num_images_per_prompt", "4",
       "--rl_num_batches_per_epoch", "4", "--max_train_steps", str(4 * EPOCHS)]
# every feature on: KL, a window of 2 of the 3 stochastic steps, accumulation 2, warmup, EMA, decay type 2
ALL_ON = ["--rl_warmup_steps", "2", "--use_ema", "true", "--ema_decay", "0.9", "--gradient_accumulation_steps", "2",
          "--rl_sde_window_size", "2", "--rl_sde_window_range", "0,3"]
GRPO_ALL = [*GRPO, *ALL_ON, "--rl_kl_beta", "0.01", "--max_train_steps", str(2 + 4 * EPOCHS)]
NFT_ALL = [*NFT, *ALL_ON, "--rl_kl_beta", "1e-4", "--nft_decay_type", "2", "--rl_noise_level", "1.0",
           "--max_train_steps", str(2 + 2 * EPOCHS)]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny model's matrices are too small for two to help, on a shared machine
    spinning OpenMP threads made these runs up to 5x slower, and the trajectory no longer depends on the
    core count. (Measured single-threaded: docs/learning.md.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _permuted(flat: torch.Tensor, epoch: int) -> torch.Tensor:
    return flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(1000 + epoch)).to(flat.device)]


class PermutedEpoch(RLEpoch):
    """Control: each epoch's advantages shuffled across its samples (fixed seed per epoch). Everything
    else (rollouts, losses, optimizer) is the real run's; only the link between image and reward is cut."""

    def advantages(self, batches, scores):
        adv = super().advantages(batches, scores)
        return list(_permuted(torch.cat(adv), self.state.rl_epoch).split([len(a) for a in adv]))


class PermutedAdvantages(Trainer):
    rl_epoch_type = PermutedEpoch


class RecordingEpoch(RLEpoch):
    """The real run, unchanged, keeping each epoch's advantages (flat, on the CPU) for a borrowed control."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded: dict[int, torch.Tensor] = {}

    def advantages(self, batches, scores):
        adv = super().advantages(batches, scores)
        self.recorded[self.state.rl_epoch] = torch.cat(adv).cpu()
        return adv


class RecordingAdvantages(Trainer):
    rl_epoch_type = RecordingEpoch


class BorrowedEpoch(RLEpoch):
    """Control for an expensive reward: each epoch's advantages are the real run's of the same epoch (same seed),
    permuted across the samples as PermutedEpoch permutes; its own images are neither decoded nor scored. As
    PermutedEpoch's, the update gets advantages of the real signal's distribution with the link between an image
    and its reward cut: a permutation of the real run's values instead of its own (which would cost the reward of
    every rollout, OCR's half of a run). `borrowed` (epoch -> flat advantages) is set by `borrowed_advantages`."""

    borrowed: dict[int, torch.Tensor] = {}

    def score(self, batch, ro, ok):
        done: cf.Future = cf.Future()
        done.set_result({name: np.zeros(len(ok)) for name in [*self.rewards.names, "total"]})
        return np.ones(len(ok), dtype=bool), done

    def advantages(self, batches, scores):
        if self.state.rl_epoch not in self.borrowed:  # e.g. a real run cut short by bench/tiny_learning.py --minutes
            raise RuntimeError(f"the real run recorded no advantages for RL epoch {self.state.rl_epoch}: its control "
                               "cannot run further than it did")
        flat = _permuted(self.borrowed[self.state.rl_epoch], self.state.rl_epoch).to(self.acc.device)
        return list(flat.split([len(b.indices) for b in batches]))


def borrowed_advantages(recorded: dict[int, torch.Tensor]) -> type[Trainer]:
    """A Trainer class whose RL epochs take the permuted advantages of `recorded` (RecordingEpoch.recorded)."""
    epoch = type("BorrowedEpoch", (BorrowedEpoch,), {"borrowed": dict(recorded)})
    return type("BorrowedAdvantages", (Trainer,), {"rl_epoch_type": epoch})


class OldGapEpoch(RLEpoch):
    """Records, before each update, the largest |old - live| weight difference (NFT's old policy)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.old_gaps = {}

    def update(self, batch, ro, adv, inner, b, group, sync, targets=None):
        if self.policies.old is not None:
            gap = max(float((self.policies.old[n] - p.detach()).abs().max()) for n, p in self.policies.named)
            self.old_gaps.setdefault(self.state.rl_epoch, []).append(gap)
        return super().update(batch, ro, adv, inner, b, group, sync, targets)


class OldPolicyProbe(Trainer):
    rl_epoch_type = OldGapEpoch


def _run(tmp_path, flags, *extra, trainer=Trainer, name="run"):
    """(RL epoch rows, trainer) of a run of `flags` (+ `extra`, which override them)."""
    out = tmp_path / name
    tr = trainer(parse_args([*flags, "--output_dir", str(out), *extra]))
    assert tr.run() == "finished"
    return [r for r in read_metrics(str(out)) if r.get("phase") == "rl" and "reward/mean" in r], tr


def _gain(rows, key: str) -> float:
    r = np.array([row[key] for row in rows])
    return float(r[-K:].mean() - r[:K].mean())


def _assert_clear_rise(rows: list[dict], key: str, floor: float) -> float:
    """The last K epochs' mean of `key` beats the first K's by >= max(floor, 3 sigma), and every one of
    the last K epochs beats every one of the first K. sigma = the epoch-to-epoch noise at the start,
    std(first differences of the first 2K epochs) / sqrt(2) (a steady trend drops out of them); the
    difference of two K-epoch means has a standard error of sigma sqrt(2 / K) = 0.71 sigma, so 3 sigma
    is over 4 standard errors."""
    r = np.array([row[key] for row in rows])
    assert len(r) == EPOCHS and np.isfinite(r).all() and all(row["reward/failed"] == 0 for row in rows)
    gain = _gain(rows, key)
    noise = float(np.std(np.diff(r[:2 * K])) / np.sqrt(2))
    curve = np.round(r, 4).tolist()
    assert gain >= max(floor, 3 * noise), f"gain {gain:.4f}, sigma {noise:.4f}, {key} {curve}"
    assert r[-K:].min() > r[:K].max(), f"the last epochs do not all beat the first ones: {curve}"
    return gain


def _assert_controls(tmp_path, flags, real_gain: float) -> None:
    """Same seed, advantages permuted: gains < half the real gain. Reward negated: brightness falls."""
    perm, _ = _run(tmp_path, flags, "--rewards", "brightness:1", "--seed", "1", trainer=PermutedAdvantages, name="perm")
    neg, _ = _run(tmp_path, flags, "--rewards", "brightness:-1", "--seed", "1", name="neg")
    g_perm, g_neg = _gain(perm, "reward/brightness"), _gain(neg, "reward/brightness")
    assert g_perm < 0.5 * real_gain, f"permuted advantages gained {g_perm:.4f} vs {real_gain:.4f}"
    assert g_neg < -0.25 * real_gain, f"the negated reward did not lower brightness: {g_neg:.4f} vs {real_gain:.4f}"


def test_grpo_with_every_feature_on_learns_and_its_controls_do_not(tmp_path):
    rows, _ = _run(tmp_path, GRPO_ALL, "--rewards", "brightness:1", "--seed", "1")
    gain = _assert_clear_rise(rows, "reward/brightness", floor=FLOOR["grpo"])
    assert all(row["kl"] > 0 for row in rows[1:]) and all(row["rl/optimizer_steps"] == 4 for row in rows)
    assert max(row["ratio/std"] for row in rows) > 1e-4  # the second optimizer step of an epoch is off-policy
    _assert_controls(tmp_path, GRPO_ALL, gain)


def test_nft_with_every_feature_on_learns_its_old_policy_lags_and_its_controls_do_not(tmp_path):
    rows, tr = _run(tmp_path, NFT_ALL, "--rewards", "brightness:1", "--seed", "1", trainer=OldPolicyProbe)
    gain = _assert_clear_rise(rows, "reward/brightness", floor=FLOOR["nft"])
    assert all(row["kl"] > 0 for row in rows[1:]) and all(row["rl/optimizer_steps"] == 2 for row in rows)
    assert all(row["nft/old_decay"] == 0 for row in rows)  # type 2, fewer than 75 RL steps: eta 0
    assert tr.rl_epoch_part.old_gaps, "the probe saw no update"
    for epoch, gaps in tr.rl_epoch_part.old_gaps.items():  # 4 batches, 2 optimizer steps per epoch
        assert gaps[0] == 0 and gaps[1] == 0, (epoch, gaps)  # eta 0: old = live at the epoch's start
        assert gaps[2] > 0 and gaps[3] > 0, (epoch, gaps)  # after the first step the live policy moved on
    _assert_controls(tmp_path, NFT_ALL, gain)


@pytest.mark.parametrize("window", [[], ["--rl_sde_window_size", "2", "--rl_sde_window_range", "0,3"]],
                         ids=["all-steps", "window"])
def test_grpo_first_ratio_is_exactly_one_on_policy(tmp_path, window):
    """One rollout batch per epoch, one inner epoch, no accumulation: every update evaluates the very
    policy that rolled out (the rollout with the K/V cache, the update without), so the ratio is 1."""
    rows, _ = _run(tmp_path, GRPO, "--rewards", "brightness:1", "--seed", "1", "--train_batch_size", "4",
                   "--rl_num_images_per_prompt", "4", "--rl_num_batches_per_epoch", "1", "--max_train_steps", "3",
                   *window)
    assert len(rows) == 3
    for row in rows:
        assert row["ratio/mean"] == 1.0 and row["ratio/std"] == 0.0, row
        assert row["clipfrac"] == 0 and row["approx_kl"] == 0, row
        assert row["rl/optimizer_steps"] == 1


STEP_SCRIPT = '''
import sys, torch
from calligrapher_rl.config_parse import parse_args
from calligrapher_rl.training.optim import consolidated_state_dict
from calligrapher_rl.training.rl_epoch import RLEpoch
from calligrapher_rl.training.trainer import Trainer

class CaptureEpoch(RLEpoch):
    def advantages(self, batches, scores):
        adv = super().advantages(batches, scores)
        self.captured = torch.cat(adv).cpu()
        return adv

class Capture(Trainer):
    rl_epoch_type = CaptureEpoch

torch.set_num_threads(1)
tr = Capture(parse_args(sys.argv[2:]))
assert tr.run() == "finished"
beta1 = tr.cfg.adam_beta1
flat = lambda ts: torch.cat([t.detach().reshape(-1).float().cpu() for t in ts])
# Adam's first moment; on several processes the moments are sharded: rank 0 gets them consolidated
state = consolidated_state_dict(tr.optimizer)
grad = None if state is None else flat(state["state"][i]["exp_avg"] / (1 - beta1) for i in range(len(tr.policies.params)))
torch.save({"adv": tr.rl_epoch_part.captured, "grad": grad, "weights": flat(tr.policies.params)},
           f"{sys.argv[1]}/rank{tr.acc.process_index}.pt")
from calligrapher_rl.training.distributed import end_process_group
acc = tr.acc
del tr
end_process_group(acc)  # as train() does: not left to the interpreter's exit
'''


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["grpo", "nft"])
def test_one_process_step_equals_two_process_step(tmp_path, method):
    """The same GRPO or NFT step (2 prompts x 4 images; rollout noise and NFT's timesteps keyed by a
    sample's place in the global batch) on 1 process and on 2 gloo processes: the advantages, the averaged
    gradient and the new weights agree to float tolerance."""
    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT)
    flags = [*(GRPO if method == "grpo" else NFT), "--rewards", "brightness:1", "--seed", "3", "--rl_num_images_per_prompt", "4",
             "--rl_num_batches_per_epoch", "1", "--max_train_steps", "1", "--learning_rate", "1e-3",
             "--adam_epsilon", "1e-3"]  # Adam's first step is ~sign(g); a large eps keeps it smooth where g ~ 0
    # the script lives in tmp_path, so its processes import this checkout's package (not an installed copy)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        out.mkdir()
        launch = [sys.executable] if n == 1 else [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
            "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
        r = subprocess.run([*launch, str(script), str(out), *flags, "--output_dir", str(out / "run"),
                            "--train_batch_size", str(2 // n)], capture_output=True, text=True, timeout=500,
                           cwd=ROOT, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[n] = [torch.load(out / f"rank{i}.pt", weights_only=True) for i in range(n)]
    one, two = outs[1][0], outs[2]
    assert torch.allclose(torch.cat([two[0]["adv"], two[1]["adv"]]), one["adv"], atol=1e-4)
    assert one["adv"].abs().max() > 0.5  # a real signal, not all zeros
    assert two[1]["grad"] is None  # the moments were sharded: only rank 0 holds them all, consolidated
    assert torch.allclose(two[0]["grad"], one["grad"], rtol=1e-3, atol=1e-6 * float(one["grad"].abs().max()))
    for rank in two:
        assert torch.allclose(rank["weights"], one["weights"], atol=1e-7)
    assert not torch.allclose(one["grad"], torch.zeros_like(one["grad"]))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
