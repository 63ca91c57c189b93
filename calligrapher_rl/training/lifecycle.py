"""What keeps a run's work safe: checkpoints (save, exact resume) and stopping (control files from the studio,
trainer.stop(), SIGTERM/SIGINT in two stages).

Both are parts the trainer holds, built with what they use passed in, as rl_epoch.py: `Checkpoints`
(`trainer.checkpoints`) writes and restores the run's models, optimizer and `RunState` (run_state.py);
`Stopping` (`trainer.stopping`) answers stop requests and is the signal handler. The trainer's reporting (phase,
the on_save callbacks) comes with each `save()` call, so neither part holds a reference to the trainer: the
signal module keeps a handler until the run ends, and train() relies on `del trainer` freeing it at once."""

from __future__ import annotations

import functools
import logging
import os
import signal
import time

import torch

from ..disk import check_memory_backed_room, writing
from ..errors import UserError
from .checkpointing import (
    REFERENCE_FILE,
    check_against,
    folder_bytes,
    identity,
    list_checkpoints,
    load_checkpoint,
    load_reference,
    save_checkpoint,
    save_reference,
)
from .divergence import save_refusal
from .optim import consolidated_state_dict, flat_state_dict
from .resume_guard import settings
from .run_dir import Interrupted
from .run_state import RunState
from .timing import timed_phase

logger = logging.getLogger("calligrapher_rl.training")


class Checkpoints:
    """`save(phase=, saved=)` is `Trainer.save`, `resume(path)` the start of a resumed run. It writes what the
    run state says of where the run stands and restores it; everything else it is given it only saves and loads."""

    def __init__(self, cfg, state: RunState, *, is_main: bool, acc, stack, policies, optimizer, scheduler, scaler,
                 tracker, health, run_dir, clock):
        self.cfg, self.state, self.is_main, self.acc = cfg, state, is_main, acc
        self.stack, self.policies, self.optimizer, self.scheduler = stack, policies, optimizer, scheduler
        self.scaler, self.tracker, self.health, self.run_dir, self.clock = scaler, tracker, health, run_dir, clock

    @timed_phase("checkpoint_save")
    def save(self, *, phase, saved) -> None:
        """A checkpoint of this step, unless one is saved already or the weights diverged. `phase(name)` is the
        trainer's reporting, `saved(step=, path=)` its on_save callbacks."""
        run = self.state
        if run.saved_step == run.step:  # e.g. the last step was a checkpoint step
            return
        refused = save_refusal(self.health, run.diverged, self.stack.adapter)  # the same on every process
        if refused:
            found = list_checkpoints(self.cfg.output_dir)
            logger.error("not saving checkpoint-%d: %s; the run's last checkpoint stays %s", run.step, refused,
                         f"checkpoint-{found[-1][0]}" if found else "none (none was saved before)")
            return
        optimizer_state = consolidated_state_dict(self.optimizer)  # a collective when the moments are sharded
        if not self.is_main:
            run.saved_step = run.step
            return
        run.saved_step = run.step
        phase("saving")
        p = self.policies
        state = {"rl_epoch": run.rl_epoch, "ema_updates": p.ema.num_updates if p.ema else 0,
                 "reference": run.reference_source,
                 "tracker": self.tracker.state_dict() if self.tracker else None, "rl_steps": run.rl_steps,
                 "skipped_nonfinite": run.skipped_nonfinite,
                 "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "config": identity(self.cfg), "settings": settings(self.cfg)}
        t0 = time.perf_counter()
        averages = averages_dtype(self.cfg)
        lora_files = getattr(p, "write_files", None)  # a LoRA run writes its own weight files (lora_policies.py)
        if lora_files is not None:
            state.update(p.checkpoint_state())
            lora_files = functools.partial(lora_files, ema_dtype=averages)
        adapter = None if lora_files else self.stack.adapter.state_dict()
        ema, old = p.ema_state(), p.old_state()
        needed = (2 * tensor_bytes(adapter or {}) + 2 * tensor_bytes(ema, averages) + tensor_bytes(old, averages)
                  + tensor_bytes(optimizer_state))
        target = os.path.join(self.cfg.output_dir, f"checkpoint-{run.step}")
        # on tmpfs the files are RAM (the tensors themselves are written from where they live, a piece at a time:
        # no host copy on top). The old policy is left out (not written while it equals the adapter): a lower
        # bound, so a refusal is never a false one
        check_memory_backed_room(target, tensor_bytes([adapter or {}, optimizer_state]) + tensor_bytes(ema, averages))
        with writing(target, needed):  # torch's words -> "disk"
            path = save_checkpoint(self.cfg.output_dir, run.step, adapter=adapter, ema=ema, old=old,
                                   optimizer=optimizer_state, scheduler=self.scheduler, state=state,
                                   total_limit=self.cfg.checkpoints_total_limit, weights=lora_files,
                                   averages_dtype=averages)
        logger.info("saved %s (%.2f GB in %.1f s)", path, folder_bytes(path) / 1e9, time.perf_counter() - t0)
        saved(step=run.step, path=str(path))

    @timed_phase("resume_load")
    def resume(self, path: str | None) -> None:
        """Restore the checkpoint at `path` (None: the run starts at step 0) into the models, the optimizer and
        the run state; metric rows logged after it are dropped (they are redone)."""
        if path is None:
            if self.cfg.resume_from_checkpoint == "latest":  # e.g. killed before its first checkpoint
                dropped = self.run_dir.truncate_metrics(-1)
                logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet, so the run starts at step 0%s",
                               self.cfg.output_dir, f"; dropped the {dropped} metric rows of the earlier attempt"
                               if dropped else "")
            return
        ck = load_checkpoint(path)
        ck["optimizer"] = flat_state_dict(self.optimizer, ck["optimizer"])  # LoRA's per-tensor state of older versions
        check_against(ck, self.stack.adapter.state_dict(), dict(self.policies.named), self.optimizer)
        reference = ck["ref"] if ck["ref"] is not None else self._recorded_reference(ck["state"], path)
        if ck["ref"] is not None:  # a checkpoint of an earlier version kept the reference itself: once per run now
            self.state.reference_source = REFERENCE_FILE
            if self.is_main:
                save_reference(self.cfg.output_dir, ck["ref"])
        try:
            if ck["lora"]:
                self.policies.load_files(path, ck["state"])
            else:
                self.stack.adapter.load_state_dict({k: v.to(self.acc.device) for k, v in ck["adapter"].items()})
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
            self.policies.load_snapshots(reference, ck["old"], self.acc.device)
            if self.cfg.use_rl and self.cfg.rl_method == "nft" and reference is not None and ck["old"] is None:
                self.policies.old = self.policies.snapshot()  # a GRPO checkpoint, --allow_changed_settings
            if ck["ema"] is not None:
                self.policies.load_ema_state(ck["ema"], ck["state"].get("ema_updates", 0))
            if self.tracker is not None and ck["state"].get("tracker"):
                self.tracker.load_state_dict(ck["state"]["tracker"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise UserError(f"could not be restored ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                            where=path, field="--resume_from_checkpoint") from None
        run = self.state
        run.step, run.rl_epoch = int(ck["state"]["step"]), int(ck["state"]["rl_epoch"])
        # older checkpoints lack the RL step count: every step past the warmup was an RL step then
        default_rl = max(0, run.step - self.cfg.rl_warmup_steps) if self.cfg.use_rl else 0
        run.rl_steps = int(ck["state"].get("rl_steps", default_rl))
        run.skipped_nonfinite = int(ck["state"].get("skipped_nonfinite", 0))
        if self.scaler is not None and ck["state"].get("grad_scaler"):
            self.scaler.load_state_dict(ck["state"]["grad_scaler"])
        run.saved_step = run.step
        dropped = self.run_dir.truncate_metrics(run.step)
        logger.info("resumed from %s at step %d%s", path, run.step,
                    f"; dropped {dropped} metric rows logged after it (they are redone)" if dropped else "")

    def _recorded_reference(self, state: dict, path: str) -> dict | None:
        """The KL reference a checkpoint names: the run's initial adapter (the live one before the
        checkpoint is loaded over it - rebuilt from the same file or seed) or the run folder's file."""
        source = state.get("reference")
        self.state.reference_source = source
        if source is None or source == "base":  # none recorded, or the base model (LoRA: load_files restores it)
            return None
        if source == REFERENCE_FILE:
            return load_reference(self.cfg.output_dir)
        if isinstance(source, dict) and source.get("initial") is True:
            if source.get("initial_ip_adapter_path") != self.cfg.initial_ip_adapter_path:
                raise UserError(f"its KL reference is the run's initial adapter "
                                f"{source.get('initial_ip_adapter_path')!r}, this run starts from "
                                f"{self.cfg.initial_ip_adapter_path!r}: resume with the same "
                                f"--initial_ip_adapter_path", where=path, field="--resume_from_checkpoint")
            return self.policies.snapshot()
        raise UserError(f"unknown KL reference {source!r} in trainer_state/state.json", where=path,
                        field="--resume_from_checkpoint")


class Stopping:
    """Stop requests: `requested()` is the loop's question, `control(resume=)` also the reward-failure pause's
    (waits.py), `on_signal` the SIGTERM/SIGINT handler. It moves `state.stop`, `state.signals` and
    `state.stop_signal`. Built before anything loads (a signal then ends the loading): the run folder and the
    accelerator come with `attach` once they exist; until then a second signal has no status to record."""

    def __init__(self, cfg, state: RunState):
        self.cfg, self.state = cfg, state
        self.loading = True  # until the trainer is built: a first signal ends the loading at once
        self.run_dir, self.acc, self.is_main = None, None, False

    def attach(self, run_dir, acc, is_main: bool) -> None:
        self.run_dir, self.acc, self.is_main = run_dir, acc, is_main

    def control(self, resume: bool = False) -> tuple[bool, bool]:
        """(stop, resume) requests. Only the main process reads (and consumes) control/stop and
        control/resume; one collective gives every process the same answer, so all stay in step."""
        stop = self.state.stop or (self.is_main and self.run_dir.stop_requested())
        res = resume and self.is_main and not stop and self.run_dir.consume_resume()
        if self.acc.num_processes > 1:  # a signal on any process stops all of them
            flags = self.acc.reduce(torch.tensor([float(stop), float(res)], device=self.acc.device), reduction="sum")
            stop, res = bool(flags[0].item() > 0), bool(flags[1].item() > 0)
        return stop, res

    def requested(self) -> bool:
        self.state.stop = self.control()[0]  # every process must leave the loop at the same step
        if self.state.stop:
            self.run_dir.set_status("stopping", self.state.step, "saving a checkpoint")
        return self.state.stop

    def install_signal_handlers(self) -> dict:
        """SIGTERM/SIGINT: while loading, end at once (nothing is trained yet); while training, the first
        finishes the current step (a hung reward call ends at its timeout), saves and stops; a second
        exits at once without saving, status `stopped`. Returns the handlers it replaced."""
        old = {}
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                old[signum] = signal.signal(signum, self.on_signal)
        except ValueError:  # not the main thread (e.g. embedded in a test); stop files still work
            pass
        return old

    def loading_ended(self, exc: BaseException) -> BaseException:
        """What ended the loading: a stop signal, whatever error it caused on its way out of a half-built
        library object (an AttributeError of a tracker, a loader's own error), else `exc` itself."""
        if self.state.stop_signal is not None and not isinstance(exc, Interrupted):
            return Interrupted(self.state.stop_signal)
        return exc

    def on_signal(self, signum, frame) -> None:
        run = self.state
        run.signals += 1
        run.stop_signal = run.stop_signal or signum
        if self.loading and run.signals == 1:
            raise Interrupted(signum)
        if run.signals == 1:
            logger.warning("signal %d: stopping after the current step (a checkpoint is saved); "
                           "a second signal exits at once without saving", signum)
            run.stop = True
            try:
                self.run_dir.set_status("stopping", run.step, f"signal {signum}: stopping after the current step")
            except OSError:
                pass
            return
        found = list_checkpoints(self.cfg.output_dir) if self.run_dir is not None else []
        message = (f"stopped at once by a second signal ({signum}) without saving; "
                   + (f"a resume continues from checkpoint-{found[-1][0]}" if found else "no checkpoint yet"))
        logger.error(message)
        recorded = self.run_dir.final_status("stopped", run.step, message) if self.run_dir is not None else True
        for handler in logging.getLogger("calligrapher_rl").handlers + logging.getLogger().handlers:
            try:
                handler.flush()
            except Exception:  # noqa: BLE001 - exiting regardless
                pass
        os._exit(128 + signum if recorded else 1)  # not sys.exit: a hung reward thread would be waited for


def tensor_bytes(obj, dtype: torch.dtype | None = None) -> int:
    """Bytes of the tensors in nested dicts/lists (what a checkpoint of them needs on disk, about); with `dtype`,
    of their floating-point ones written as `dtype`."""
    if isinstance(obj, torch.Tensor):
        size = dtype.itemsize if dtype is not None and obj.is_floating_point() else obj.element_size()
        return obj.numel() * size
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, dtype) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, dtype) for v in obj)
    return 0


def averages_dtype(cfg) -> torch.dtype | None:
    """What --checkpoint_averages_dtype writes the EMA and the old policy as (None: as they are held, fp32)."""
    return torch.bfloat16 if cfg.checkpoint_averages_dtype == "bf16" else None
