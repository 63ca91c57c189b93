"""Where a run stands: the counters and flags the trainer's pieces (the loop, the RL epoch, the optimizer step,
checkpoints, evaluation, the stop and pause handling) read and move. They live in one object that the trainer
owns and hands to each piece, so that what a piece changes is written `state.x`, not an attribute another
piece happens to set; the trainer still answers the names callbacks and tests use (`trainer.step`, ...)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RunState:
    # what a checkpoint restores
    step: int = 0  # optimizer steps taken (warmup and skipped ones included): the run's clock
    rl_epoch: int = 0
    rl_steps: int = 0  # RL optimizer steps applied (warmup and skipped steps not counted): NFT's/AWM's decay clock
    skipped_nonfinite: int = 0  # in all, this run
    reference_source: str | dict | None = None  # where the KL reference comes from (a checkpoint's state.json)
    # how healthy this life of the run is: persisting trouble ends it
    nonfinite_streak: int = 0  # skipped updates in a row
    nonfinite_failure: str | None = None  # why those ended the run (raised once the step is logged)
    rollout_streak: int = 0  # epochs in a row with non-finite samples
    retried_epochs: int = 0  # RL epochs that trained nothing (every reward failed); in all, this run
    diverged: bool = False  # the run ended Diverged: save() refuses its weights
    # what watchers see
    phase: str = ""
    last_row: dict = dataclasses.field(default_factory=lambda: {"phase": ""})  # the last training metrics row
    status_note: str = ""  # said with the next "running" status, then dropped
    # stop requests: control/stop, trainer.stop(), SIGTERM/SIGINT
    stop: bool = False
    signals: int = 0
    stop_signal: int | None = None  # the first signal: the command exits 128 + it
    # what is already done at this step (not again when the run ends on it)
    saved_step: int = -1
    evaluated_step: int = -1


class StateField:
    """A trainer attribute kept in its `RunState` under another name: the names callbacks, tests and the
    studio have always read (`trainer.step`, `trainer.rl_epoch`, ...) stay theirs."""

    def __init__(self, field: str):
        self.field = field

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj.state, self.field)

    def __set__(self, obj, value) -> None:
        setattr(obj.state, self.field, value)
