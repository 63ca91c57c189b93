"""The training run: supervised warmup, then epochs of rollout -> rewards -> advantages -> update.

`Trainer.run()` is the one-screen loop; the pieces it calls live in rl_epoch.py (an RL epoch),
optimizer_step.py and evaluation.py (parts the trainer builds with their collaborators passed in), batches.py
(data and conditions), lifecycle.py (checkpoints and stopping, parts too), updates.py (the three gradient
computations), policies.py (reference/old/EMA), checkpointing.py and run_dir.py (everything the studio
reads). Where the run stands (step, epoch, counters, stop flags) is one RunState (run_state.py) that the
pieces share.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import time

import torch

from ..config import TrainConfig
from ..rl.advantages import PerPromptStatTracker
from . import setup
from .batches import WARMUP_STREAM, ConditionCache, GroupSampler, stream_seed
from .callbacks import CallbackHandler, StatusCallback
from .checkpointing import REFERENCE_FILE, check_resume, remove_orphans, resolve_resume, save_reference
from .distributed import end_process_group, gradient_sync, mean_across, prepare_data_parallel
from .divergence import Diverged, WeightHealth
from .evaluation import Evaluation
from .lifecycle import Checkpoints, Stopping
from .lora_policies import build_policies, describe
from .memory import out_of_memory
from .optim import reset_state, restart_warmup
from .optimizer_step import OptimizerStep
from .progress import ProgressCallback, system_metrics
from .resume_guard import refuse_mismatched_resume
from .rl_epoch import RLEpoch
from .run_dir import RunDir, StatusNotRecorded, claim_run_dir, ending
from .run_state import RunState, StateField
from .sample_prompts import SamplePromptsCallback
from .starting_point import StartingPointCallback
from .timing import PhaseClock, since_process_start
from .updates import StatsMeter, warmup_backward
from .waits import RewardFailure, check_policy, pause_for_rewards

logger = logging.getLogger("calligrapher_rl.training")


class NonFiniteTraining(RuntimeError):
    """--max_nonfinite_steps optimizer steps in a row had a non-finite loss or gradient norm."""


class Trainer:
    """`Trainer(config, rewards=None, dataset=None, callbacks=None).run()` (docs/library.md).

    `rewards`: None = config.rewards, else a list of registered names, Reward objects and callables
    `(images, prompts, metadata) -> scores` (see rewards.registry.build_rewards). `dataset`: None =
    config.train_data_json, else any sequence of the dataset's items. `callbacks`: see callbacks.py;
    StatusCallback and a ProgressCallback (unless you pass one) come first. `on_reward_failure`: what a
    reward-failure pause does (waits.py): "fail" ends the run at once, "wait" waits for control files
    (the command line), or a function (trainer, message) -> bool (True continues).
    """

    # where the run stands lives in self.state; these names are what callbacks, tests and the studio read
    step = StateField("step")
    rl_epoch = StateField("rl_epoch")
    rl_steps = StateField("rl_steps")
    skipped_nonfinite = StateField("skipped_nonfinite")
    phase = StateField("phase")
    _nonfinite_streak = StateField("nonfinite_streak")
    _last_row = StateField("last_row")
    _stop = StateField("stop")  # bench/tiny_learning.py's deadline sets it
    stop_signal = StateField("stop_signal")  # the signal that stopped the run (the command exits 128 + it)

    # the RL epoch's class: a subclass of RLEpoch here changes a step of the epoch (the tests' probes do)
    rl_epoch_type = RLEpoch

    def __init__(self, config: TrainConfig, rewards=None, dataset=None, callbacks=None, on_reward_failure="fail"):
        self.state = RunState()  # first: the signal handlers and the failure paths below report from it
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
        setup.check_output_dir(cfg)
        self.run_dir, self._lock = None, None
        self.stopping = Stopping(cfg, self.state)  # its run folder and accelerator come as soon as they exist
        self._old_handlers = self.stopping.install_signal_handlers()  # a signal while loading ends the run at once
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
            self.stopping.attach(self.run_dir, self.acc, self.is_main)
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
            exc = self.stopping.loading_ended(exc)  # a stop signal while loading is the cause, whatever it broke
            if isinstance(exc, torch.OutOfMemoryError):  # the user's to fix with a flag: one line, no traceback
                exc = out_of_memory(cfg, "loading", getattr(getattr(self, "acc", None), "device", "cpu"))
            if self.run_dir is not None:
                self.run_dir.final_status(*ending(exc, 0))
                self.run_dir.close()
            self._release()
            raise exc
        self.stopping.loading = False

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
        self.health = WeightHealth(growth=cfg.max_weight_norm_growth)
        self.stepper = OptimizerStep(cfg, self.state, acc=self.acc, stack=self.stack, policies=self.policies,
                                     optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                                     health=self.health, clock=self.clock)
        self.rl_epoch_part = self.rl_epoch_type(
            cfg, self.state, acc=self.acc, stack=self.stack, policies=self.policies, conditions=self.conditions,
            sampler=self.sampler, rewards=self.rewards, tracker=self.tracker, stepper=self.stepper, health=self.health,
            clock=self.clock, autocast=self.autocast)
        self.evaluation_part = Evaluation(
            cfg, self.state, is_main=self.is_main, stack=self.stack, dataset=self.dataset, conditions=self.conditions,
            policies=self.policies, rewards=self.rewards, run_dir=self.run_dir, clock=self.clock, autocast=self.autocast)
        self.checkpoints = Checkpoints(
            cfg, self.state, is_main=self.is_main, acc=self.acc, stack=self.stack, policies=self.policies,
            optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, tracker=self.tracker,
            health=self.health, run_dir=self.run_dir, clock=self.clock)
        self._first_step_logged = False
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
                    if self.state.nonfinite_failure:
                        raise NonFiniteTraining(self.state.nonfinite_failure)
                    self._after_steps(before)
                final = "stopped" if self.step < cfg.max_train_steps else "finished"
                if final == "finished" and cfg.eval_steps and self.state.evaluated_step != self.step:
                    self.evaluate()  # the last grid is of the final weights
                message = "stop requested" if final == "stopped" else "done"
            except RewardFailure as exc:  # reward failures (or a signal while scoring) end the run: keep the work
                final, message = exc.state, str(exc)
            except NonFiniteTraining as exc:  # the skipped steps left the weights finite: keep them, say why
                logger.error("%s", exc)
                final, message = "failed", str(exc)
            except Diverged as exc:  # save() refuses these weights: the newest earlier checkpoint stays the last
                logger.error("%s", exc)
                self.state.diverged = True
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

    def save(self) -> None:
        """A checkpoint of this step (lifecycle.py); the trainer's reporting goes in with the call."""
        self.checkpoints.save(phase=self._phase, saved=functools.partial(self.callbacks.call, "on_save", self))

    def _maybe_resume(self) -> None:
        self.checkpoints.resume(self._resume_path)

    def _stop_requested(self) -> bool:  # bench/tiny_learning.py adds its deadline
        return self.stopping.requested()

    def _control(self, resume: bool = False) -> tuple[bool, bool]:
        """(stop, resume) requests, the same on every process (lifecycle.py; the reward-failure pause asks)."""
        return self.stopping.control(resume)

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
        self.callbacks.call("on_step_end", self, step=self.step, phase=self.state.last_row["phase"], metrics=self.state.last_row)
        if crossed(cfg.eval_steps):  # before the checkpoint: a resume from it must not lose this grid
            self.evaluate()
        if crossed(cfg.checkpointing_steps):
            self.save()
        self.run_dir.set_status("running", self.step, self.state.status_note)  # a note lasts until the next status
        self.state.status_note = ""

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
                                      autocast=self.autocast, backward=self.stepper.backward)
            loss_ok &= math.isfinite(got["loss"])
            meter.add(got)
        with self.clock("optimizer"):
            stats = {**meter.means(), **self.stepper.step(loss_ok)}
        stats.update(self.clock.take())
        stats["time/step_s"] = time.time() - t0
        self._log("warmup", mean_across(self.acc, stats))

    def rl_epoch_step(self) -> None:
        """One RL epoch (rl_epoch.py); RL begins first if it has not (the reference snapshot)."""
        if self.policies.reference is None:
            self._begin_rl()
        # the trainer's reporting goes in with the call: the part keeps no reference to the trainer
        self.rl_epoch_part.run(phase=self._phase, log=self._log, pause=self._pause_for_rewards)

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
            self.state.reference_source = "base"  # a LoRA run's reference is the frozen model itself: nothing to store
        elif self.state.step == 0:
            self.state.reference_source = {"initial": True, "initial_ip_adapter_path": self.cfg.initial_ip_adapter_path}
        else:
            self.state.reference_source = REFERENCE_FILE
            if self.is_main:
                save_reference(self.cfg.output_dir, self.policies.reference)
        if self.state.step > 0:
            reset_state(self.optimizer)
            restart_warmup(self.scheduler)  # --rl_lr_warmup_steps: fresh moments take sign-like steps
            logger.info("RL begins at step %d: optimizer moments reset, learning rate warmed up again over %d steps",
                        self.state.step, self.cfg.rl_lr_warmup_steps)

    def evaluate(self) -> None:
        """ODE samples of the eval set with the evaluation (EMA) weights: rewards logged, a grid saved
        (evaluation.py). The trainer's reporting goes in with the call, as for the RL epoch."""
        self.evaluation_part.run(phase=self._phase, log=self._log,
                                 evaluated=functools.partial(self.callbacks.call, "on_evaluate", self))

    def _pause_for_rewards(self, failed: float) -> None:
        """Too many rewards failed this epoch: returns when the run goes on (waits.py)."""
        pause_for_rewards(self, failed)

    def _phase(self, phase: str) -> None:
        self.state.phase = phase
        self.callbacks.call("on_phase", self, phase=phase)

    def _log(self, phase: str, stats: dict[str, float]) -> dict:
        """One metrics.jsonl row (+ trackers), with this process's GPU memory/utilisation on CUDA."""
        if not self._first_step_logged and self.step > 0:  # command start to the end of the first optimizer step
            self._first_step_logged = True
            stats = {**stats, "time/first_step_s": since_process_start()}
        row = self.run_dir.log_metrics(self.step, phase, {**stats, **system_metrics(self.acc.device)})
        if not any(k.startswith("eval/") for k in row):
            self.state.last_row = row
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
        self.state.stop = True

    def optimizer_step(self, loss_ok: bool = True) -> dict[str, float]:
        """Average, unscale (fp16), clip and apply the accumulated gradients (optimizer_step.py)."""
        return self.stepper.step(loss_ok)


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
