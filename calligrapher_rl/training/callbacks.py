"""Callbacks: your code at fixed points of a run, in the way of TRL's / transformers' `TrainerCallback`.

A callback is any object with some of these methods (a `TrainerCallback` subclass has them all as no-ops);
each gets the trainer first and its payload as keyword arguments:

    on_train_begin(trainer)                          the loop starts (after a resume), at trainer.step
    on_phase(trainer, phase)                         warmup | rollout | scoring | update | evaluating | saving
    on_log(trainer, step, phase, logs)               a row was appended to metrics.jsonl (logs = that row;
                                                     phase = warmup|rl, the row's phase; eval rows too)
    on_step_end(trainer, step, phase, metrics)       a warmup step or an RL epoch ended (metrics = its row)
    on_evaluate(trainer, step, metrics, grid_path)   an evaluation ended (metrics = the eval/... values)
    on_save(trainer, step, path)                     checkpoint-{step}/ was written (main process only)
    on_train_end(trainer, state)                     finished | stopped | failed; status.json is final

Within a step the order is: on_phase ... on_log, on_step_end, then (when due) on_evaluate and on_save.
An exception in a callback ends the run as `failed` with that exception's message: nothing is swallowed.
`trainer.stop()` from a callback ends the run after the current step, with a checkpoint (like control/stop).

Two callbacks are built in and on by default: `StatusCallback` (phase and ETA in status.json) and
`progress.ProgressCallback` (the console bar or log lines).
"""

from __future__ import annotations

import collections
import time

EVENTS = ("on_train_begin", "on_phase", "on_log", "on_step_end", "on_evaluate", "on_save", "on_train_end")
PHASES = ("warmup", "rollout", "scoring", "update", "evaluating", "saving")


class TrainerCallback:
    """Base class with every event as a no-op; override the ones you need."""

    def on_train_begin(self, trainer) -> None:
        pass

    def on_phase(self, trainer, phase: str) -> None:
        pass

    def on_log(self, trainer, step: int, phase: str, logs: dict) -> None:
        pass

    def on_step_end(self, trainer, step: int, phase: str, metrics: dict) -> None:
        pass

    def on_evaluate(self, trainer, step: int, metrics: dict, grid_path: str | None) -> None:
        pass

    def on_save(self, trainer, step: int, path: str) -> None:
        pass

    def on_train_end(self, trainer, state: str) -> None:
        pass


class CallbackHandler:
    """The trainer's list of callbacks; `call` runs one event on each, in order."""

    def __init__(self, callbacks=()):
        self.callbacks: list = []
        for cb in callbacks:
            self.add(cb)

    def add(self, callback) -> None:
        """A callback object, or a class (instantiated without arguments, as TRL accepts)."""
        cb = callback() if isinstance(callback, type) else callback
        if not any(callable(getattr(cb, e, None)) for e in EVENTS):
            raise TypeError(f"{type(cb).__name__} has none of the callback methods {', '.join(EVENTS)}")
        self.callbacks.append(cb)

    def pop(self, callback):
        """Remove and return the first callback that is `callback` or an instance of that class; None if none."""
        for i, cb in enumerate(self.callbacks):
            if cb is callback or (isinstance(callback, type) and isinstance(cb, callback)):
                return self.callbacks.pop(i)
        return None

    def call(self, event: str, trainer, **payload) -> None:
        assert event in EVENTS, event
        for cb in list(self.callbacks):
            method = getattr(cb, event, None)
            if method is not None:
                method(trainer, **payload)


class StepTimer:
    """Seconds per optimizer step, smoothed over the last `window` step ends (evaluations and checkpoints
    included, since they are part of what the rest of the run will cost), and the ETA it implies."""

    def __init__(self, window: int = 10):
        self.points: collections.deque[tuple[float, int]] = collections.deque(maxlen=window + 1)

    def mark(self, step: int, now: float | None = None) -> None:
        self.points.append((time.monotonic() if now is None else now, int(step)))

    def seconds_per_step(self) -> float | None:
        if len(self.points) < 2 or self.points[-1][1] <= self.points[0][1]:
            return None
        (t0, s0), (t1, s1) = self.points[0], self.points[-1]
        return (t1 - t0) / (s1 - s0)

    def eta_s(self, total_steps: int) -> float | None:
        sps = self.seconds_per_step()
        if sps is None or not self.points:
            return None
        return max(0, total_steps - self.points[-1][1]) * sps


class StatusCallback(TrainerCallback):
    """Live fields of status.json for watchers (the studio): `phase` and `eta_s` (seconds, smoothed)."""

    def __init__(self, window: int = 10):
        self.timer = StepTimer(window)

    def _write(self, trainer, **fields) -> None:
        trainer.run_dir.update_status(**fields)

    def on_train_begin(self, trainer) -> None:
        self.timer.mark(trainer.step)

    def on_phase(self, trainer, phase: str) -> None:
        self._write(trainer, phase=phase, eta_s=self._eta(trainer))

    def on_step_end(self, trainer, step: int, phase: str, metrics: dict) -> None:
        self.timer.mark(step)
        self._write(trainer, eta_s=self._eta(trainer))

    def on_train_end(self, trainer, state: str) -> None:
        self._write(trainer, phase=None, eta_s=None)  # a final state has neither

    def _eta(self, trainer) -> float | None:
        eta = self.timer.eta_s(trainer.cfg.max_train_steps)
        return None if eta is None else round(eta, 1)
