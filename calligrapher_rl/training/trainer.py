"""The training run: supervised warmup, then epochs of rollout -> rewards -> advantages -> update.

`Trainer.run()` is the one-screen loop; the pieces it calls live in batches.py (data and conditions),
lifecycle.py (checkpoints and stopping), evaluation.py,
updates.py (the three gradient computations), policies.py (reference/old/EMA), checkpointing.py and
run_dir.py (everything the studio reads).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time

import numpy as np
import torch

from ..config import TrainConfig
from ..rl.advantages import PerPromptStatTracker, compute_advantages
from ..rl.nft import old_decay
from ..sampling import SDEWindow, rollout
from . import setup
from .awm_update import awm_end_of_epoch, awm_update
from .batches import (
    RL_STREAM,
    WARMUP_STREAM,
    ConditionCache,
    GroupSampler,
    fail_nonfinite_images,
    reward_samples,
    stream_seed,
    to_pil,
)
from .callbacks import CallbackHandler, StatusCallback
from .checkpointing import (
    REFERENCE_FILE,
    check_resume,
    remove_orphans,
    resolve_resume,
    save_reference,
)
from .distributed import (
    average_gradients,
    end_process_group,
    gather_rewards,
    gradient_sync,
    mean_across,
    own_slice,
    prepare_data_parallel,
    sync_on_last_backward,
)
from .divergence import Diverged, WeightHealth, check_rollout_health, finite_samples, score_finite, zero_nonfinite
from .evaluation import Evaluation
from .lifecycle import RunLifecycle
from .lora_policies import build_policies, describe
from .memory import out_of_memory
from .optim import reset_state, restart_warmup
from .progress import ProgressCallback, system_metrics
from .resume_guard import refuse_mismatched_resume
from .run_dir import RunDir, StatusNotRecorded, claim_run_dir, ending
from .sample_prompts import SamplePromptsCallback
from .starting_point import StartingPointCallback
from .timing import PhaseClock, Throughput, since_process_start, transformer_flops_per_image
from .updates import StatsMeter, grpo_backward, nft_backward_on, nft_targets, warmup_backward
from .waits import RewardFailure, await_scores, check_policy, pause_for_rewards

logger = logging.getLogger("calligrapher_rl.training")


class NonFiniteTraining(RuntimeError):
    """--max_nonfinite_steps optimizer steps in a row had a non-finite loss or gradient norm."""



class Trainer(RunLifecycle, Evaluation):
    """`Trainer(config, rewards=None, dataset=None, callbacks=None).run()` (docs/library.md).

    `rewards`: None = config.rewards, else a list of registered names, Reward objects and callables
    `(images, prompts, metadata) -> scores` (see rewards.registry.build_rewards). `dataset`: None =
    config.train_data_json, else any sequence of the dataset's items. `callbacks`: see callbacks.py;
    StatusCallback and a ProgressCallback (unless you pass one) come first. `on_reward_failure`: what a
    reward-failure pause does (waits.py): "fail" ends the run at once, "wait" waits for control files
    (the command line), or a function (trainer, message) -> bool (True continues).
    """

    def __init__(self, config: TrainConfig, rewards=None, dataset=None, callbacks=None, on_reward_failure="fail"):
        self.on_reward_failure = check_policy(on_reward_failure)
        callbacks = list(callbacks or [])
        # checkpoint-0 (starting_point.py) and the user's sample prompts (sample_prompts.py)
        defaults = [StatusCallback(), StartingPointCallback(), SamplePromptsCallback()]
        defaults += [] if any(isinstance(c, ProgressCallback) or c is ProgressCallback for c in callbacks) else [
            ProgressCallback()]
        self.callbacks = CallbackHandler(defaults + callbacks)
        self._custom = {"rewards": rewards, "dataset": dataset}
        if dataset is not None:  # run.json names where the data came from (config.train_data_json is not used)
            config = dataclasses.replace(config, train_data_json=f"python:{type(dataset).__name__}")
        self.cfg = cfg = config.validate().resolved()  # a config built in Python gets the command line's checks
        self.phase, self._last_row = "", {"phase": ""}
        setup.check_output_dir(cfg)
        self.step, self.rl_epoch = 0, 0
        self._stop, self._signals, self._loading = False, 0, True
        self.run_dir, self._lock = None, None
        self._old_handlers = self._install_signal_handlers()  # a signal while loading ends the run at once
        try:
            self.acc = setup.make_accelerator(cfg)
            self.clock = PhaseClock(self.acc.device)
            self.is_main = self.acc.is_main_process
            if self.is_main:  # refused (another trainer, an earlier run's files) before anything is written
                self._lock = claim_run_dir(cfg.output_dir, resume=bool(cfg.resume_from_checkpoint),
                                           overwrite=cfg.overwrite_output_dir, logging_dir=cfg.logging_dir)
            orphans = remove_orphans(cfg.output_dir) if self.is_main else []
            refuse_mismatched_resume(cfg, custom_rewards=rewards is not None)  # writes nothing when it refuses
            self.run_dir = RunDir(cfg.output_dir, is_main=self.is_main, logging_dir=cfg.logging_dir,
                                  accelerator=self.acc)
            if self._lock is not None and self._lock.removed:
                logger.warning("--overwrite_output_dir: removed the earlier run's %s", ", ".join(self._lock.removed))
            if orphans:
                logger.warning("removed %d leftover(s) of writes interrupted in an earlier life of this run: %s",
                               len(orphans), ", ".join(orphans))
            self.run_dir.clear_control()  # stale requests of an earlier life of this run dir; later ones count
            self.run_dir.set_status("starting", 0, "loading models")
            from .preflight import require_ready

            # rewards, paths, GPUs, dataset: fail before loading anything, with status failed (objects passed
            # in Python are the caller's to check)
            require_ready(cfg, rewards=rewards is None, dataset=dataset is None)
            self._resume_path = resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)
            if self._resume_path is not None:
                check_resume(cfg, self._resume_path)  # method and model, before minutes of loading
            t_load = time.perf_counter()
            self._build(cfg)
            self.clock.add("load", time.perf_counter() - t_load)
        except BaseException as exc:  # a watcher must not see "starting" forever
            exc = self._loading_ended(exc)  # a stop signal while loading is the cause, whatever it broke
            if isinstance(exc, torch.OutOfMemoryError):  # the user's to fix with a flag: one line, no traceback
                exc = out_of_memory(cfg, "loading", getattr(getattr(self, "acc", None), "device", "cpu"))
            if self.run_dir is not None:
                self.run_dir.final_status(*ending(exc, 0))
                self.run_dir.close()
            self._release()
            raise exc
        self._loading = False

    def _build(self, cfg: TrainConfig) -> None:
        setup.start_trackers(self.acc, cfg)
        self.autocast = setup.autocast_for(self.acc, cfg)
        with self.acc.main_process_first():  # the first use of 'tiny'/'bundled' builds them into the cache
            self.stack = setup.build_stack(cfg, self.acc.device)
            self.dataset = setup.build_dataset(cfg, self._custom["dataset"])
            self.rewards = setup.build_rewards(cfg, setup.resolved_siglip_path(cfg), self.acc.device,
                                               self._custom["rewards"])
        if self._custom["rewards"] is not None:  # run.json records the rewards that were used
            self.cfg = cfg = dataclasses.replace(cfg, rewards=",".join(f"{n}:{w:g}" for n, w in self.rewards.weights.items()))
        self.policies = build_policies(self.stack, cfg, use_ema=cfg.use_ema, ema_decay=cfg.ema_decay,
                                       ema_update_interval=cfg.ema_update_interval,
                                       snapshot_dtype=torch.bfloat16 if cfg.snapshot_dtype == "bf16" else torch.float32,
                                       ema_device="cpu" if cfg.ema_on_cpu else None)
        self.run_dir.status_fields["trained"] = describe(self.policies, cfg)  # the run page says what trains
        prepare_data_parallel(self.acc, self.stack)  # DDP over the trainable set chosen just above
        self.optimizer, self.scheduler = setup.build_optimizer(cfg, self.policies.params, self.acc.num_processes)
        self.scaler = setup.make_grad_scaler(self.acc, cfg)  # fp16 only: dynamic loss scaling
        self.conditions = ConditionCache(self.stack, self.dataset, cfg.seed)
        entries = getattr(self.dataset, "entries", None)  # a Python dataset's prompts come with its items
        if entries is not None:
            self.stack.precompute_prompts([e.prompt for e in entries])
            if self.stack.release_text_encoder_two():
                logger.info("T5-XXL released from host memory: every prompt of the data is encoded "
                            "(a new prompt reads it from the model folder again)")
        self.sampler = GroupSampler(len(self.dataset), cfg.train_batch_size, cfg.rl_num_images_per_prompt if cfg.use_rl else 1,
                                    num_processes=self.acc.num_processes, rank=self.acc.process_index, seed=cfg.seed)
        self.tracker = PerPromptStatTracker(cfg.rl_global_std) if cfg.rl_per_prompt_stat_tracking else None
        self.rl_steps = 0  # RL optimizer steps taken (warmup and skipped steps not counted): NFT's decay clock
        self.skipped_nonfinite, self._nonfinite_streak, self._nonfinite_failure = 0, 0, None
        self.health = WeightHealth(growth=cfg.max_weight_norm_growth)
        self._rollout_streak, self._diverged = 0, False  # epochs in a row with non-finite samples; a Diverged ending
        self.throughput = self._throughput()
        self._first_step_logged = False
        self._status_note = ""
        self._saved_step = self._evaluated_step = -1
        self._reference_source = None  # where the KL reference comes from (checkpoint state.json)
        if self.is_main:
            from ..atomic import write_text

            write_text(os.path.join(cfg.output_dir, "run.json"), cfg.to_json())
            for w in cfg.warnings():
                logger.warning(w)

    # ================================================================== the loop
    def run(self) -> str:
        cfg = self.cfg
        outcome = "failed"
        try:
            try:
                self._maybe_resume()
                if cfg.use_rl and self.step >= cfg.rl_warmup_steps and self.policies.reference is None:
                    self._begin_rl()
                self.run_dir.set_status("running", self.step, "")
                self.callbacks.call("on_train_begin", self)
                if cfg.eval_at_start and self.step == 0 and cfg.eval_steps:
                    self.evaluate()
                while self.step < cfg.max_train_steps and not self._stop_requested():
                    before = self.step
                    if not cfg.use_rl or self.step < cfg.rl_warmup_steps:
                        self.warmup_step()
                    else:
                        self.rl_epoch_step()
                    if self._nonfinite_failure:
                        raise NonFiniteTraining(self._nonfinite_failure)
                    self._after_steps(before)
                final = "stopped" if self.step < cfg.max_train_steps else "finished"
                if final == "finished" and cfg.eval_steps and self._evaluated_step != self.step:
                    self.evaluate()  # the last grid is of the final weights
                message = "stop requested" if final == "stopped" else "done"
            except RewardFailure as exc:  # reward failures (or a signal while scoring) end the run: keep the work
                final, message = exc.state, str(exc)
            except NonFiniteTraining as exc:  # the skipped steps left the weights finite: keep them, say why
                logger.error("%s", exc)
                final, message = "failed", str(exc)
            except Diverged as exc:  # save() refuses these weights: the newest earlier checkpoint stays the last
                logger.error("%s", exc)
                self._diverged = True
                final, message = "failed", str(exc)
            self.save()
            if not self.run_dir.final_status(final, self.step, message):
                raise StatusNotRecorded(f"the run ended {final}, but status.json could not say so")
            outcome = final
            return final
        except BaseException as exc:
            if isinstance(exc, torch.OutOfMemoryError):  # the user's to fix with a flag: one line, no traceback
                error = out_of_memory(self.cfg, self.phase, self.acc.device)
                logger.error("%s", error)
                self.run_dir.final_status(*ending(error, self.step))
                raise error from None
            if not isinstance(exc, StatusNotRecorded):
                self.run_dir.final_status(*ending(exc, self.step))
            raise
        finally:
            try:
                self.callbacks.call("on_train_end", self, state=outcome)
            except Exception:  # noqa: BLE001 - must not hide the run's own exception; logged with its traceback
                logger.exception("a callback failed in on_train_end")
            self.rewards.close()
            self.run_dir.close()
            self._release()

    def _release(self) -> None:
        """The run folder and the signal handlers go back (to a later run, to the embedding program)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        for signum, old in (self._old_handlers or {}).items():
            try:
                signal.signal(signum, old)
            except (ValueError, TypeError):
                pass
        self._old_handlers = None

    def _after_steps(self, before: int) -> None:
        cfg = self.cfg
        crossed = lambda every: every and self.step // every > before // every  # noqa: E731
        self.callbacks.call("on_step_end", self, step=self.step, phase=self._last_row["phase"], metrics=self._last_row)
        if crossed(cfg.eval_steps):  # before the checkpoint: a resume from it must not lose this grid
            self.evaluate()
        if crossed(cfg.checkpointing_steps):
            self.save()
        self.run_dir.set_status("running", self.step, self._status_note)  # a note lasts until the next status
        self._status_note = ""

    # ================================================================== phases
    def warmup_step(self) -> None:
        cfg, t0 = self.cfg, time.time()
        self._phase("warmup")
        gen = torch.Generator().manual_seed(stream_seed(cfg.seed, WARMUP_STREAM, self.step, self.acc.process_index))
        meter, loss_ok = StatsMeter(), True
        for micro in range(cfg.gradient_accumulation_steps):
            k = self.step * cfg.gradient_accumulation_steps + micro
            batch = self.conditions.batch(self.sampler.batch(WARMUP_STREAM, k))
            with gradient_sync(self.stack, sync=micro == cfg.gradient_accumulation_steps - 1):
                got = warmup_backward(self.stack, batch, guidance=cfg.rl_guidance_scale, scale=cfg.ip_adapter_scale,
                                      generator=gen, loss_scale=1.0 / cfg.gradient_accumulation_steps,
                                      autocast=self.autocast, backward=self._backward)
            loss_ok &= math.isfinite(got["loss"])
            meter.add(got)
        with self.clock("optimizer"):
            stats = {**meter.means(), **self.optimizer_step(loss_ok)}
        stats.update(self.clock.take())
        stats["time/step_s"] = time.time() - t0
        self._log("warmup", mean_across(self.acc, stats))

    def rl_epoch_step(self) -> None:
        """One RL epoch: roll out num_batches batches, score them (overlapping the next rollout),
        turn rewards into advantages across all processes, then num_inner_epochs of updates."""
        cfg, clock, pol = self.cfg, self.clock, self.policies
        if pol.reference is None:
            self._begin_rl()
        t0, counts0, first_step = time.perf_counter(), dict(self.stack.forward_counts), self.step
        self._phase("rollout")
        batches, rollouts, futures, finite, sample_ok = [], [], [], [], []
        with clock("rollout"):
            # only what this phase evaluates is on the card (policies.place): GRPO's reference (its step means
            # are taken here), NFT's old policy (it samples)
            pol.place(self.acc.device, reference=cfg.rl_method in ("grpo", "awm") and cfg.rl_kl_beta > 0,
                      old=cfg.rl_method in ("nft", "awm"))
            for b in range(cfg.rl_num_batches_per_epoch):
                batch = self.conditions.batch(self.sampler.batch(RL_STREAM, self.rl_epoch * cfg.rl_num_batches_per_epoch + b))
                ro = self._rollout(batch, b)
                ok = finite_samples(ro)  # the latents, not clamped pixels: a diverged policy, never scored
                zero_nonfinite(ro, ok)
                decoded = self.stack.decode(ro.final, batch.fill.height, batch.fill.width)
                finite.append(torch.isfinite(decoded.float()).flatten(1).all(1).cpu().numpy())
                futures.append(score_finite(self.rewards, reward_samples(batch, to_pil(decoded)), ok))
                batches.append(batch), rollouts.append(ro), sample_ok.append(ok)
            # NFT's targets still need the old policy; AWM's update evaluates its EMA policy and the reference
            pol.place(self.acc.device, old=cfg.rl_method in ("nft", "awm"),
                      reference=cfg.rl_method == "awm" and cfg.rl_kl_beta > 0)
        counts1 = dict(self.stack.forward_counts)
        self._phase("scoring")
        with clock("reward"):
            scores = [fail_nonfinite_images(r, ok) for r, ok in zip(await_scores(self, futures), finite)]
            stats = self._reward_stats(scores, np.concatenate(sample_ok))
            advantages = self._advantages(batches, scores)

        self._phase("update")
        meter, steps_done = StatsMeter(), 0
        n_batches, ga = len(batches), cfg.gradient_accumulation_steps
        if stats["reward/failed"] >= 1.0:  # no finite reward (e.g. resumed after a pause): nothing to learn from
            self._count_nonfinite("no finite reward in the epoch")
        t_update, counts2 = time.perf_counter(), dict(self.stack.forward_counts)
        with clock("update"):
            for inner in range(cfg.rl_num_inner_epochs if stats["reward/failed"] < 1.0 else 0):
                targets = self._nft_targets(batches, rollouts, inner) if cfg.rl_method == "nft" else None
                loss_ok = True
                for b, (batch, ro, adv) in enumerate(zip(batches, rollouts, advantages)):
                    group = min(ga, n_batches - b // ga * ga)  # the real size of b's accumulation group (the last may be short)
                    last = (b + 1) % ga == 0 or b == n_batches - 1  # gradients cross processes on its backward only
                    got = self._update(batch, ro, adv, inner, b, group, sync=last, targets=targets[b] if targets else None)
                    loss_ok &= math.isfinite(got.get("loss", 0.0))
                    meter.add(got)
                    if last:
                        with clock("optimizer"):
                            done = self.optimizer_step(loss_ok)
                        meter.add(done)
                        steps_done += int(done["train/skipped"] == 0)
                        loss_ok = True
                        if self.step >= cfg.max_train_steps:  # the budget ends mid-epoch: stop exactly there
                            break
                if self.step >= cfg.max_train_steps:
                    break
        t_end, counts3 = time.perf_counter(), dict(self.stack.forward_counts)
        if cfg.rl_method == "nft":  # eta from the RL optimizer steps taken so far (DiffusionNFT's global_step)
            stats["nft/old_decay"] = old_decay(self.rl_steps, cfg.nft_decay_type)
            with clock("old_policy"):
                pol.update_old(stats["nft/old_decay"])
        if cfg.rl_method == "awm":
            stats.update(awm_end_of_epoch(self))
        self.rl_epoch += 1
        if self.tracker is not None:
            self.tracker.clear()
        stats.update(meter.means())
        stats.pop("train/skipped", None)
        stats["train/skipped_nonfinite"] = float(self.skipped_nonfinite)  # the total, not the epoch's mean
        if self.step == first_step:  # nothing trained (every reward failed): no row repeating the step
            self._retried_epochs = getattr(self, "_retried_epochs", 0) + 1  # its times go into the next row
            return
        stats["rl/retried_epochs"] = float(getattr(self, "_retried_epochs", 0))  # in all, this run
        images = len(batches) * len(batches[0].indices) * self.acc.num_processes if batches else 0
        stats.update({**clock.take(), "time/epoch_s": time.perf_counter() - t0, "rl/epoch": self.rl_epoch,
                      "rl/optimizer_steps": steps_done, "perf/images_per_s": images / (time.perf_counter() - t0)})
        stats.update(self._tflops(counts0, counts1, counts2, counts3, t_update, t_end, stats))
        self._log("rl", mean_across(self.acc, stats))

    def _tflops(self, c0, c1, c2, c3, t_update, t_end, stats) -> dict[str, float]:
        """Achieved transformer TFLOP/s of the rollout (no-grad forwards) and of the update (gradient
        forwards + backwards, and NFT's no-grad targets)."""
        if self.throughput is None:
            return {}
        return {"perf/rollout_tflops": self.throughput.tflops(c1["no_grad"] - c0["no_grad"], 0,
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

    def _nft_targets(self, batches, rollouts, inner: int) -> list:
        """Every batch's old/reference predictions for this inner epoch, before any gradient exists; then
        both snapshots leave the card for the gradient passes (policies.place)."""
        cfg = self.cfg
        self.policies.place(self.acc.device, reference=cfg.rl_kl_beta > 0, old=True)
        out = []
        for b, (batch, ro) in enumerate(zip(batches, rollouts)):
            gen = self._sample_generators(len(batch.indices), self.rl_epoch, b, inner, 7)  # NFT's timesteps, noise
            out.append(nft_targets(self.stack, batch, ro, cfg.num_trained_timesteps(), policies=self.policies,
                                   guidance=cfg.rl_guidance_scale, scale=cfg.ip_adapter_scale, kl_beta=cfg.rl_kl_beta,
                                   generator=gen, autocast=self.autocast))
        self.policies.place(self.acc.device)
        return out

    def _phase(self, phase: str) -> None:
        self.phase = phase
        self.callbacks.call("on_phase", self, phase=phase)

    def _log(self, phase: str, stats: dict[str, float]) -> dict:
        """One metrics.jsonl row (+ trackers), with this process's GPU memory/utilisation on CUDA."""
        if not self._first_step_logged and self.step > 0:  # command start to the end of the first optimizer step
            self._first_step_logged = True
            stats = {**stats, "time/first_step_s": since_process_start()}
        row = self.run_dir.log_metrics(self.step, phase, {**stats, **system_metrics(self.acc.device)})
        if not any(k.startswith("eval/") for k in row):
            self._last_row = row
        self.callbacks.call("on_log", self, step=self.step, phase=phase, logs=row)
        return row

    # ================================================================== the Python API
    def add_callback(self, callback) -> None:
        self.callbacks.add(callback)

    def pop_callback(self, callback):
        """Remove a callback (an instance, or the first of a class) and return it."""
        return self.callbacks.pop(callback)

    def remove_callback(self, callback) -> None:
        self.callbacks.pop(callback)

    def stop(self) -> None:
        """Ask the run to end after the current step, with a checkpoint (what control/stop does)."""
        self._stop = True

    # ================================================================== pieces
    def _begin_rl(self) -> None:
        """Snapshot the reference (and NFT's old) policy. After a supervised warmup, AdamW's moments start
        afresh: supervised gradients are far larger than policy gradients (~30x on the tiny model), and
        their second moment (beta2 0.999) would otherwise shrink every RL step for thousands of steps. The
        learning rate then warms up again (--rl_lr_warmup_steps)."""
        self.policies.begin_rl(with_old=self.cfg.rl_method == "nft" or (self.cfg.rl_method == "awm"
                                                                         and self.cfg.awm_ema_kl_beta > 0))
        # the reference is stored once per run: nothing when it is the initial adapter (a resume rebuilds it
        # from the same file or seed), else the run folder's reference.safetensors
        if getattr(self.policies, "reference_is_base", False):
            self._reference_source = "base"  # a LoRA run's reference is the frozen model itself: nothing to store
        elif self.step == 0:
            self._reference_source = {"initial": True, "initial_ip_adapter_path": self.cfg.initial_ip_adapter_path}
        else:
            self._reference_source = REFERENCE_FILE
            if self.is_main:
                save_reference(self.cfg.output_dir, self.policies.reference)
        if self.step > 0:
            reset_state(self.optimizer)
            restart_warmup(self.scheduler)  # --rl_lr_warmup_steps: fresh moments take sign-like steps
            logger.info("RL begins at step %d: optimizer moments reset, learning rate warmed up again over %d steps",
                        self.step, self.cfg.rl_lr_warmup_steps)
    def _rollout(self, batch, b: int):
        cfg = self.cfg
        gen = self._sample_generators(len(batch.indices), self.rl_epoch, b)
        window = None
        if cfg.rl_sde_window_size:
            lo, hi = cfg.sde_window()
            window = SDEWindow.pick(cfg.rl_num_inference_steps, cfg.rl_sde_window_size, lo, hi,
                                    np.random.default_rng(stream_seed(cfg.seed, RL_STREAM, self.rl_epoch, b)))
        params = self.policies.old if cfg.rl_method == "nft" else None
        # GRPO's KL needs the reference's step means on the trained steps: taken here, without gradient
        reference = self.policies.reference if cfg.rl_method == "grpo" and cfg.rl_kl_beta > 0 else None
        with self.autocast():
            return rollout(self.stack, batch.fill, batch.text, batch.image_embeds, num_steps=cfg.rl_num_inference_steps,
                           guidance=cfg.rl_guidance_scale, noise_level=cfg.rl_noise_level, sde_type=cfg.rl_sde_type,
                           window=window, generator=gen, scale=cfg.ip_adapter_scale, params=params,
                           quantized=cfg.rl_method != "grpo",  # GRPO's log-probs need the training precision
                           reference=reference, reference_steps=None if window else cfg.num_trained_timesteps())

    def _sample_generators(self, n: int, *key: int) -> list[torch.Generator]:
        """One generator per sample of this process's batch, keyed by (key, its place in the global batch): a
        sample's noise does not depend on how the batch is split over processes (one process = several)."""
        first = self.acc.process_index * self.sampler.images_per_process
        return [torch.Generator().manual_seed(stream_seed(self.cfg.seed, RL_STREAM, *key, first + i)) for i in range(n)]

    def _reward_stats(self, scores: list[dict], sample_ok: np.ndarray) -> dict[str, float]:
        """Reward stats of the epoch over all processes. Non-finite samples (never scored) are counted as
        `rollout/nonfinite` and end the run when they persist; `reward/failed` is among the finite ones."""
        _, ok = gather_rewards(self.acc, [0] * len(sample_ok), sample_ok.astype(np.float64))
        ok = ok > 0
        self._rollout_streak = check_rollout_health(int((~ok).sum()), len(ok), self._rollout_streak,
                                                    self.cfg.max_nonfinite_steps, self.step, self.health)
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
        if out["reward/failed"] > self.cfg.rl_reward_failure_limit:
            self._pause_for_rewards(out["reward/failed"])
        return out

    def _pause_for_rewards(self, failed: float) -> None:
        pause_for_rewards(self, failed)

    def _advantages(self, batches, scores) -> list[torch.Tensor]:
        cfg = self.cfg
        keys = [i for batch in batches for i in batch.indices]
        local = np.concatenate([s["total"] for s in scores])
        all_keys, all_rewards = gather_rewards(self.acc, keys, local)
        adv_all = compute_advantages(all_keys, all_rewards, self.tracker, cfg.rl_adv_clip_max)
        adv = own_slice(adv_all, self.acc, len(keys))
        per = self.sampler.images_per_process
        return [torch.as_tensor(adv[b * per:(b + 1) * per], dtype=torch.float32, device=self.acc.device)
                for b in range(len(batches))]

    def _update(self, batch, ro, adv, inner: int, b: int, group: int, sync: bool, targets=None) -> dict[str, float]:
        """Forward + backward of batch b, its loss divided by the steps it trains and by `group`, the
        number of batches accumulated into its optimizer step; gradients cross processes once, on the
        last backward of the batch that ends the group (`sync`)."""
        cfg = self.cfg
        steps = ro.sde_steps if cfg.rl_sde_window_size else ro.sde_steps[:cfg.num_trained_timesteps()]
        n = {"grpo": len(steps), "nft": len(targets or [])}.get(cfg.rl_method, cfg.num_trained_timesteps())
        with sync_on_last_backward(self.stack, self._backward, n, sync) as backward:  # backward calls of the batch
            common = dict(guidance=cfg.rl_guidance_scale, scale=cfg.ip_adapter_scale, kl_beta=cfg.rl_kl_beta,
                          adv_clip_max=cfg.rl_adv_clip_max, autocast=self.autocast, backward=backward)
            if cfg.rl_method == "grpo":
                return grpo_backward(self.stack, batch, ro, adv, steps, noise_level=cfg.rl_noise_level,
                                     sde_type=cfg.rl_sde_type, clip_range=cfg.rl_grpo_clip_range,
                                     loss_scale=1.0 / (n * group), policies=self.policies,
                                     ratio_norm=cfg.rl_grpo_ratio_norm, **common)
            if cfg.rl_method == "awm":
                gen = torch.Generator().manual_seed(stream_seed(cfg.seed, RL_STREAM, self.rl_epoch, b, inner, 7,
                                                                self.acc.process_index))
                return awm_update(self, batch, ro, adv, inner, b, group, gen, policies=self.policies, **common)
            return nft_backward_on(self.stack, batch, ro, adv, targets, beta=cfg.nft_beta, adv_mode=cfg.nft_adv_mode,
                                   loss_scale=1.0 / (n * group), **common)

    def _backward(self, loss: torch.Tensor) -> None:
        if not loss.requires_grad:  # nothing trainable reached the loss (e.g. --ip_adapter_scale 0): zero gradient
            return
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self, loss_ok: bool = True) -> dict[str, float]:
        """Average, unscale (fp16), clip and apply the gradients. A non-finite loss or gradient norm on
        any process skips the step on every process (no update, no EMA step), counted and logged."""
        self.health.baseline(self.policies.params, self.step)  # the weight norm before this process's first update
        grad_norm = self._clipped_grad_norm()
        ok = self._all_agree(loss_ok and bool(torch.isfinite(grad_norm)))
        self._apply_gradients(ok)
        self.step += 1
        self._account_update(ok, loss_ok)
        stats = {"grad_norm": float(grad_norm), "lr": float(self.scheduler.get_last_lr()[0]), "train/skipped": float(not ok),
                 "train/skipped_nonfinite": float(self.skipped_nonfinite),  # in all, this run
                 "train/weight_norm": self.health.check(self.policies.params, ok, float(grad_norm), self.step)}
        if self.health.failure:
            raise Diverged(self.health.failure)
        if self.scaler is not None:
            stats["train/loss_scale"] = float(self.scaler.get_scale())
        return stats

    def _clipped_grad_norm(self) -> torch.Tensor:
        """The gradients averaged over processes (a no-op when DDP already did), unscaled (fp16) and clipped;
        returns their norm before clipping."""
        params = self.policies.params
        average_gradients(params, self.acc, self.stack)
        if self.scaler is not None:
            for p in params:  # the scaler records its inf check per gradient: give it one even if nothing flowed
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
            self.scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)

    def _apply_gradients(self, ok: bool) -> None:
        """The optimizer and schedule step (only when every process agreed the step is finite), the loss scale's
        update (an overflow lowers it), and the gradients cleared either way."""
        if ok:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            self.scheduler.step()
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _account_update(self, ok: bool, loss_ok: bool) -> None:
        """After the step counter moved: the EMA and the RL step count follow an applied update; a skipped one
        is counted (and, in a row, ends the run: _count_nonfinite)."""
        if ok:
            self.rl_steps += int(self.cfg.use_rl and self.step - 1 >= self.cfg.rl_warmup_steps)
            with self.clock("ema"):
                self.policies.ema_step(self.step)  # the post-increment step, as Flow-GRPO
            self._nonfinite_streak = 0
        elif not loss_ok or self.scaler is None:  # an fp16 overflow alone is the scaler's business
            self._count_nonfinite(f"non-finite {'loss' if not loss_ok else 'gradient norm'}")
        else:
            self.skipped_nonfinite += 1

    def _count_nonfinite(self, cause: str) -> None:
        """One more skipped update; --max_nonfinite_steps in a row end the run once this step or epoch is
        logged (the counts are the same on every process, so all of them end together)."""
        self.skipped_nonfinite += 1
        self._nonfinite_streak += 1
        logger.warning("step %d skipped: %s (%d in a row, limit %d)", self.step, cause, self._nonfinite_streak,
                       self.cfg.max_nonfinite_steps)
        if self._nonfinite_streak >= self.cfg.max_nonfinite_steps and self._nonfinite_failure is None:
            self._nonfinite_failure = (f"{cause} in {self._nonfinite_streak} updates in a row (--max_nonfinite_steps "
                                       f"{self.cfg.max_nonfinite_steps}); skipped steps left the weights as they were")

    def _all_agree(self, ok: bool) -> bool:
        """True on every process only if it is true on every process."""
        if self.acc.num_processes == 1:
            return ok
        bad = self.acc.reduce(torch.tensor([0.0 if ok else 1.0], device=self.acc.device), reduction="sum")
        return bool(bad.item() == 0)


def train(cfg: TrainConfig) -> str:
    """The command line's run: one Trainer (a reward-failure pause waits for control/resume, at most
    --pause_timeout_s), then the process group torn down before the interpreter exits (see end_process_group;
    a no-op on one process)."""
    try:
        trainer = Trainer(cfg, on_reward_failure="wait")
    except BaseException:
        end_process_group(None, synchronize=False)
        raise
    acc = trainer.acc
    try:
        outcome = trainer.run()
    except BaseException:
        del trainer
        end_process_group(acc, synchronize=False)  # the traceback keeps the trainer: best effort
        raise
    del trainer  # its DDP wrapper and ZeRO optimizer hold the process group
    end_process_group(acc)
    return outcome
