"""One RL epoch: roll out the epoch's batches with the sampling policy, score them (the rewards of a batch
overlap the next rollout), turn the rewards into advantages across all processes, then `rl_num_inner_epochs`
passes of gradient updates (updates.py, awm_update.py) through the optimizer step (optimizer_step.py).

`RLEpoch` is a part the trainer holds (`trainer.rl_epoch_part`), built with what it uses passed in: the
settings, the run's models and data, the optimizer step. What it moves is the run's `RunState` (step through
the optimizer step, rl_epoch, rollout_streak, retried_epochs). The trainer's reporting (phase, metrics row,
the reward-failure pause) comes with each `run()` call: the part holds no reference to the trainer, so it
adds no cycle that would keep a dropped trainer (and its process group) alive (train()).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from ..rl.advantages import compute_advantages
from ..rl.nft import old_decay
from ..sampling import SDEWindow, rollout
from .awm_update import awm_end_of_epoch, awm_update
from .batches import RL_STREAM, fail_nonfinite_images, reward_samples, stream_seed, to_pil
from .distributed import gather_rewards, mean_across, own_slice, sync_on_last_backward
from .divergence import check_rollout_health, finite_samples, score_finite, zero_nonfinite
from .run_state import RunState
from .timing import Throughput, transformer_flops_per_image
from .updates import StatsMeter, grpo_backward, nft_backward_on, nft_targets
from .waits import await_scores

logger = logging.getLogger("calligrapher_rl.training")


class RLEpoch:
    """`run(phase=, log=, pause=)` is one epoch (`Trainer.rl_epoch_step`, once RL has begun); the other
    methods are its steps. Everything it is given it only uses, except the run state it moves."""

    def __init__(self, cfg, state: RunState, *, acc, stack, policies, conditions, sampler, rewards, tracker, stepper,
                 health, clock, autocast):
        self.cfg, self.state = cfg, state
        self.acc, self.stack, self.policies = acc, stack, policies
        self.conditions, self.sampler, self.rewards, self.tracker = conditions, sampler, rewards, tracker
        self.stepper, self.health, self.clock, self.autocast = stepper, health, clock, autocast
        self.throughput = self._throughput()
        self.awm_rollout_params = None  # AWM's snapshot of the weights that rolled out (awm_update.py)

    def run(self, *, phase, log, pause) -> None:
        """One RL epoch: roll out num_batches batches, score them (overlapping the next rollout),
        turn rewards into advantages across all processes, then num_inner_epochs of updates.
        `phase(name)` and `log(phase, stats)` are the trainer's reporting; `pause(failed)` its
        reward-failure pause (waits.py), called when too many rewards failed."""
        cfg, clock, pol, state = self.cfg, self.clock, self.policies, self.state
        t0, counts0, first_step = time.perf_counter(), dict(self.stack.forward_counts), state.step
        phase("rollout")
        batches, rollouts, futures, finite, sample_ok = [], [], [], [], []
        with clock("rollout"):
            # only what this phase evaluates is on the card (policies.place): GRPO's reference (its step means
            # are taken here), NFT's old policy (it samples)
            pol.place(self.acc.device, reference=cfg.rl_method in ("grpo", "awm") and cfg.rl_kl_beta > 0,
                      old=cfg.rl_method in ("nft", "awm"))
            for b in range(cfg.rl_num_batches_per_epoch):
                batch = self.conditions.batch(self.sampler.batch(RL_STREAM, state.rl_epoch * cfg.rl_num_batches_per_epoch + b))
                ro = self.rollout(batch, b)
                ok = finite_samples(ro)  # the latents, not clamped pixels: a diverged policy, never scored
                zero_nonfinite(ro, ok)
                images_ok, future = self.score(batch, ro, ok)
                finite.append(images_ok)
                futures.append(future)
                batches.append(batch), rollouts.append(ro), sample_ok.append(ok)
            # NFT's targets still need the old policy; AWM's update evaluates its EMA policy and the reference
            pol.place(self.acc.device, old=cfg.rl_method in ("nft", "awm"),
                      reference=cfg.rl_method == "awm" and cfg.rl_kl_beta > 0)
        counts1 = dict(self.stack.forward_counts)
        phase("scoring")
        with clock("reward"):
            scores = [fail_nonfinite_images(r, ok) for r, ok in zip(await_scores(futures, state, self.acc), finite)]
            stats = self.reward_stats(scores, np.concatenate(sample_ok))
            if stats["reward/failed"] > cfg.rl_reward_failure_limit:
                pause(stats["reward/failed"])  # returns when the run goes on; else RewardFailure ends it
            advantages = self.advantages(batches, scores)

        phase("update")
        meter, steps_done = StatsMeter(), 0
        n_batches, ga = len(batches), cfg.gradient_accumulation_steps
        if stats["reward/failed"] >= 1.0:  # no finite reward (e.g. resumed after a pause): nothing to learn from
            self.stepper.count_nonfinite("no finite reward in the epoch")
        t_update, counts2 = time.perf_counter(), dict(self.stack.forward_counts)
        with clock("update"):
            for inner in range(cfg.rl_num_inner_epochs if stats["reward/failed"] < 1.0 else 0):
                targets = self.nft_targets(batches, rollouts, inner) if cfg.rl_method == "nft" else None
                loss_ok = True
                for b, (batch, ro, adv) in enumerate(zip(batches, rollouts, advantages)):
                    group = min(ga, n_batches - b // ga * ga)  # the real size of b's accumulation group (the last may be short)
                    last = (b + 1) % ga == 0 or b == n_batches - 1  # gradients cross processes on its backward only
                    got = self.update(batch, ro, adv, inner, b, group, sync=last, targets=targets[b] if targets else None)
                    loss_ok &= math.isfinite(got.get("loss", 0.0))
                    meter.add(got)
                    if last:
                        with clock("optimizer"):
                            done = self.stepper.step(loss_ok)
                        meter.add(done)
                        steps_done += int(done["train/skipped"] == 0)
                        loss_ok = True
                        if state.step >= cfg.max_train_steps:  # the budget ends mid-epoch: stop exactly there
                            break
                if state.step >= cfg.max_train_steps:
                    break
        t_end, counts3 = time.perf_counter(), dict(self.stack.forward_counts)
        if cfg.rl_method == "nft":  # eta from the RL optimizer steps taken so far (DiffusionNFT's global_step)
            stats["nft/old_decay"] = old_decay(state.rl_steps, cfg.nft_decay_type)
            with clock("old_policy"):
                pol.update_old(stats["nft/old_decay"])
        if cfg.rl_method == "awm":
            stats.update(awm_end_of_epoch(self))
        state.rl_epoch += 1
        if self.tracker is not None:
            self.tracker.clear()
        stats.update(meter.means())
        stats.pop("train/skipped", None)
        stats["train/skipped_nonfinite"] = float(state.skipped_nonfinite)  # the total, not the epoch's mean
        if state.step == first_step:  # nothing trained (every reward failed): no row repeating the step
            state.retried_epochs += 1  # its times go into the next row
            return
        stats["rl/retried_epochs"] = float(state.retried_epochs)  # in all, this run
        local_images = len(batches) * len(batches[0].indices) if batches else 0
        images = local_images * self.acc.num_processes
        stats.update({**clock.take(), "time/epoch_s": time.perf_counter() - t0, "rl/epoch": state.rl_epoch,
                      "rl/optimizer_steps": steps_done, "perf/images_per_s": images / (time.perf_counter() - t0)})
        stats.update(self._perf_stats(counts0, counts1, counts2, counts3, t_update, t_end, stats, local_images))
        log("rl", mean_across(self.acc, stats))

    def rollout(self, batch, b: int):
        cfg = self.cfg
        gen = self._sample_generators(len(batch.indices), self.state.rl_epoch, b)
        window = None
        if cfg.rl_sde_window_size:
            lo, hi = cfg.sde_window()
            window = SDEWindow.pick(cfg.rl_num_inference_steps, cfg.rl_sde_window_size, lo, hi,
                                    np.random.default_rng(stream_seed(cfg.seed, RL_STREAM, self.state.rl_epoch, b)))
        params = self.policies.old if cfg.rl_method == "nft" else None
        # GRPO's KL needs the reference's step means on the trained steps: taken here, without gradient
        reference = self.policies.reference if cfg.rl_method == "grpo" and cfg.rl_kl_beta > 0 else None
        with self.autocast(), self.clock.span("sampler"):
            return rollout(self.stack, batch.fill, batch.text, batch.image_embeds, num_steps=cfg.rl_num_inference_steps,
                           guidance=cfg.rl_guidance_scale, noise_level=cfg.rl_noise_level, sde_type=cfg.rl_sde_type,
                           window=window, generator=gen, scale=cfg.ip_adapter_scale, params=params,
                           quantized=cfg.rl_method != "grpo",  # GRPO's log-probs need the training precision
                           reference=reference, reference_steps=None if window else cfg.num_trained_timesteps())

    def score(self, batch, ro, ok: np.ndarray):
        """(which decoded images are finite, the future of the batch's reward arrays): the final latents decoded
        and the finite samples scored on the reward worker, so the next rollout overlaps the scoring."""
        decoded = self.stack.decode(ro.final, batch.fill.height, batch.fill.width)
        finite = torch.isfinite(decoded.float()).flatten(1).all(1).cpu().numpy()
        return finite, score_finite(self.rewards, reward_samples(batch, to_pil(decoded)), ok)

    def _sample_generators(self, n: int, *key: int) -> list[torch.Generator]:
        """One generator per sample of this process's batch, keyed by (key, its place in the global batch): a
        sample's noise does not depend on how the batch is split over processes (one process = several)."""
        first = self.acc.process_index * self.sampler.images_per_process
        return [torch.Generator().manual_seed(stream_seed(self.cfg.seed, RL_STREAM, *key, first + i)) for i in range(n)]

    def reward_stats(self, scores: list[dict], sample_ok: np.ndarray) -> dict[str, float]:
        """Reward stats of the epoch over all processes. Non-finite samples (never scored) are counted as
        `rollout/nonfinite` and end the run when they persist; `reward/failed` is among the finite ones."""
        _, ok = gather_rewards(self.acc, [0] * len(sample_ok), sample_ok.astype(np.float64))
        ok = ok > 0
        state = self.state
        state.rollout_streak = check_rollout_health(int((~ok).sum()), len(ok), state.rollout_streak,
                                                    self.cfg.max_nonfinite_steps, state.step, self.health)
        out = {"rollout/nonfinite": float((~ok).sum())}
        for name in scores[0]:
            local = np.concatenate([s[name] for s in scores])
            _, vals = gather_rewards(self.acc, [0] * len(local), local)
            vals = vals[ok]
            key = "reward/mean" if name == "total" else f"reward/{name}"
            out[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
            if name == "total":
                out["reward/std"] = float(np.nanstd(vals)) if np.isfinite(vals).any() else float("nan")
                out["reward/failed"] = float(np.mean(~np.isfinite(vals)))
                out["reward/count"] = float(len(vals))  # all processes' samples: rewards were gathered
        return out

    def advantages(self, batches, scores) -> list[torch.Tensor]:
        cfg = self.cfg
        keys = [i for batch in batches for i in batch.indices]
        local = np.concatenate([s["total"] for s in scores])
        all_keys, all_rewards = gather_rewards(self.acc, keys, local)
        adv_all = compute_advantages(all_keys, all_rewards, self.tracker, cfg.rl_adv_clip_max)
        adv = own_slice(adv_all, self.acc, len(keys))
        per = self.sampler.images_per_process
        return [torch.as_tensor(adv[b * per:(b + 1) * per], dtype=torch.float32, device=self.acc.device)
                for b in range(len(batches))]

    def nft_targets(self, batches, rollouts, inner: int) -> list:
        """Every batch's old/reference predictions for this inner epoch, before any gradient exists; then
        both snapshots leave the card for the gradient passes (policies.place)."""
        cfg = self.cfg
        self.policies.place(self.acc.device, reference=cfg.rl_kl_beta > 0, old=True)
        out = []
        for b, (batch, ro) in enumerate(zip(batches, rollouts)):
            gen = self._sample_generators(len(batch.indices), self.state.rl_epoch, b, inner, 7)  # NFT's timesteps, noise
            out.append(nft_targets(self.stack, batch, ro, cfg.num_trained_timesteps(), policies=self.policies,
                                   guidance=cfg.rl_guidance_scale, scale=cfg.ip_adapter_scale, kl_beta=cfg.rl_kl_beta,
                                   generator=gen, autocast=self.autocast))
        self.policies.place(self.acc.device)
        return out

    def update(self, batch, ro, adv, inner: int, b: int, group: int, sync: bool, targets=None) -> dict[str, float]:
        """Forward + backward of batch b, its loss divided by the steps it trains and by `group`, the
        number of batches accumulated into its optimizer step; gradients cross processes once, on the
        last backward of the batch that ends the group (`sync`)."""
        cfg = self.cfg
        steps = ro.sde_steps if cfg.rl_sde_window_size else ro.sde_steps[:cfg.num_trained_timesteps()]
        n = {"grpo": len(steps), "nft": len(targets or [])}.get(cfg.rl_method, cfg.num_trained_timesteps())
        with sync_on_last_backward(self.stack, self.stepper.backward, n, sync) as backward:  # backward calls of the batch
            common = dict(guidance=cfg.rl_guidance_scale, scale=cfg.ip_adapter_scale, kl_beta=cfg.rl_kl_beta,
                          adv_clip_max=cfg.rl_adv_clip_max, autocast=self.autocast, backward=backward)
            if cfg.rl_method == "grpo":
                return grpo_backward(self.stack, batch, ro, adv, steps, noise_level=cfg.rl_noise_level,
                                     sde_type=cfg.rl_sde_type, clip_range=cfg.rl_grpo_clip_range,
                                     loss_scale=1.0 / (n * group), policies=self.policies,
                                     ratio_norm=cfg.rl_grpo_ratio_norm, **common)
            if cfg.rl_method == "awm":
                gen = torch.Generator().manual_seed(stream_seed(cfg.seed, RL_STREAM, self.state.rl_epoch, b, inner, 7,
                                                                self.acc.process_index))
                return awm_update(self, batch, ro, adv, inner, b, group, gen, policies=self.policies, **common)
            return nft_backward_on(self.stack, batch, ro, adv, targets, beta=cfg.nft_beta, adv_mode=cfg.nft_adv_mode,
                                   loss_scale=1.0 / (n * group), **common)

    def _perf_stats(self, c0, c1, c2, c3, t_update, t_end, stats, local_images: int) -> dict[str, float]:
        """Achieved transformer TFLOP/s of the rollout (no-grad forwards) and of the update (gradient
        forwards + backwards, and NFT's no-grad targets); the rollout phase's milliseconds per image-step (every
        sampler step of one image: what the FP8 target counts; decoding and reward submission included, so
        an upper bound on the sampler's own; GRPO's rollout also takes the reference's step means), and the sampler's
        own (the denoising loop alone, timed inside the rollout phase: the figure to hold against a benchmark's)."""
        image_steps = local_images * self.cfg.rl_num_inference_steps
        sampler_s = self.clock.take_span("sampler")
        per_step = ({"perf/rollout_ms_per_image_step": 1000.0 * stats["time/rollout_s"] / image_steps,
                     "perf/sampler_ms_per_image_step": 1000.0 * sampler_s / image_steps}
                    if image_steps and "time/rollout_s" in stats else {})
        if self.throughput is None:
            return per_step
        return {**per_step, "perf/rollout_tflops": self.throughput.tflops(c1["no_grad"] - c0["no_grad"], 0,
                                                              stats.get("time/rollout_s", 0.0)),
                "perf/update_tflops": self.throughput.tflops(c3["no_grad"] - c2["no_grad"], c3["grad"] - c2["grad"],
                                                             t_end - t_update)}

    def _throughput(self) -> Throughput | None:
        """The transformer's FLOPs per image at this run's shapes (counted on the meta device)."""
        tokens = (self.cfg.resolution // (self.stack.pipe.vae_scale_factor * 2)) ** 2
        try:
            return Throughput(transformer_flops_per_image(self.stack.pipe.transformer, tokens,
                                                          self.stack.max_sequence_length))
        except Exception as exc:  # noqa: BLE001 - a metric, never a reason to stop a run
            logger.warning("no perf/*_tflops metrics: counting the transformer's FLOPs failed (%s)", exc)
            return None
