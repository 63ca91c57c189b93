"""The optimizer step: the accumulated gradients averaged over processes, unscaled (fp16), clipped and
applied, unless a non-finite loss or gradient norm on any process skips the step on every process. Skipped
steps are counted, and enough of them in a row end the run (--max_nonfinite_steps)."""

from __future__ import annotations

import logging

import torch

from .distributed import average_gradients
from .divergence import Diverged
from .run_state import RunState

logger = logging.getLogger("calligrapher_rl.training")


class OptimizerStep:
    """`step(loss_ok)` after the backward calls of an accumulation group; `backward(loss)` is what those
    calls go through (the fp16 loss scale). It moves `state.step`, `state.rl_steps` and the non-finite
    counts; everything else it is given it only uses."""

    def __init__(self, cfg, state: RunState, *, acc, stack, policies, optimizer, scheduler, scaler, health, clock):
        self.cfg, self.state = cfg, state
        self.acc, self.stack, self.policies = acc, stack, policies
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.health, self.clock = health, clock

    def backward(self, loss: torch.Tensor) -> None:
        if not loss.requires_grad:  # nothing trainable reached the loss (e.g. --ip_adapter_scale 0): zero gradient
            return
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, loss_ok: bool = True) -> dict[str, float]:
        """Average, unscale (fp16), clip and apply the gradients. A non-finite loss or gradient norm on
        any process skips the step on every process (no update, no EMA step), counted and logged."""
        state = self.state
        self.health.baseline(self.policies.params, state.step)  # the weight norm before this process's first update
        grad_norm = self._clipped_grad_norm()
        ok = self._all_agree(loss_ok and bool(torch.isfinite(grad_norm)))
        self._apply_gradients(ok)
        state.step += 1
        self._account_update(ok, loss_ok)
        stats = {"grad_norm": float(grad_norm), "lr": float(self.scheduler.get_last_lr()[0]), "train/skipped": float(not ok),
                 "train/skipped_nonfinite": float(state.skipped_nonfinite),  # in all, this run
                 "train/weight_norm": self.health.check(self.policies.params, ok, float(grad_norm), state.step)}
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
        is counted (and, in a row, ends the run: count_nonfinite)."""
        state = self.state
        if ok:
            state.rl_steps += int(self.cfg.use_rl and state.step - 1 >= self.cfg.rl_warmup_steps)
            with self.clock("ema"):
                self.policies.ema_step(state.step)  # the post-increment step, as Flow-GRPO
            state.nonfinite_streak = 0
        elif not loss_ok or self.scaler is None:  # an fp16 overflow alone is the scaler's business
            self.count_nonfinite(f"non-finite {'loss' if not loss_ok else 'gradient norm'}")
        else:
            state.skipped_nonfinite += 1

    def count_nonfinite(self, cause: str) -> None:
        """One more skipped update; --max_nonfinite_steps in a row end the run once this step or epoch is
        logged (the counts are the same on every process, so all of them end together)."""
        state = self.state
        state.skipped_nonfinite += 1
        state.nonfinite_streak += 1
        logger.warning("step %d skipped: %s (%d in a row, limit %d)", state.step, cause, state.nonfinite_streak,
                       self.cfg.max_nonfinite_steps)
        if state.nonfinite_streak >= self.cfg.max_nonfinite_steps and state.nonfinite_failure is None:
            state.nonfinite_failure = (f"{cause} in {state.nonfinite_streak} updates in a row (--max_nonfinite_steps "
                                       f"{self.cfg.max_nonfinite_steps}); skipped steps left the weights as they were")

    def _all_agree(self, ok: bool) -> bool:
        """True on every process only if it is true on every process."""
        if self.acc.num_processes == 1:
            return ok
        bad = self.acc.reduce(torch.tensor([0.0 if ok else 1.0], device=self.acc.device), reduction="sum")
        return bool(bad.item() == 0)
