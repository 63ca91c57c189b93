"""Every wait of the training loop has an end.

- A pause for reward failures: the command line waits for control/resume or control/stop (the studio's
  Continue and Stop), at most --pause_timeout_s, then ends `failed`; the Python API never waits on control
  files unless asked to (`Trainer(..., on_reward_failure=...)`: "fail", the default there; "wait", the
  command line's; or a function that decides).
- Waiting for an epoch's scores: a stop signal ends the wait at once (the epoch's rollouts are dropped;
  nothing was trained on them), so a reward call that never returns cannot hold a SIGTERM. The call
  itself is cut at --reward_timeout_s (client.py for servers, rewards/worker.py in this process).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time

logger = logging.getLogger("calligrapher_rl.training")

POLICIES = ("fail", "wait")
POLL_S = 0.2  # how often a wait looks at the stop flag / control files


class RewardFailure(RuntimeError):
    """The run ends because of reward failures: `state` is its final state (stopped keeps the work on a
    stop request; failed when no one continued it)."""

    def __init__(self, message: str, state: str = "stopped"):
        super().__init__(message)
        self.state = state


def check_policy(policy):
    from ..errors import UserError

    if not (callable(policy) or policy in POLICIES):
        raise UserError(f"expected 'fail', 'wait' or a function (trainer, message) -> bool, got {policy!r}",
                        field="on_reward_failure")
    return policy


def pause_for_rewards(trainer, failed: float) -> None:
    """Returns when the run continues; raises RewardFailure when it ends."""
    cfg, policy = trainer.cfg, trainer.on_reward_failure
    cause = (f"{failed:.0%} of rewards failed this epoch (limit {cfg.rl_reward_failure_limit:.0%}; "
             "check the reward servers or reward functions)")
    if policy == "fail":
        raise RewardFailure(f"{cause}; the run ends (Trainer(on_reward_failure='fail'))", "failed")
    if callable(policy):
        if policy(trainer, cause):
            _continue(trainer, "continued after reward failures (on_reward_failure)")
            return
        raise RewardFailure(f"{cause}; stopped by on_reward_failure")
    limit = cfg.pause_timeout_s
    msg = f"{cause}; resume (control/resume) or stop" + (f" within {limit:g} s (--pause_timeout_s)" if limit else "")
    logger.error(msg)
    trainer.run_dir.set_status("paused", trainer.step, msg)
    deadline = time.monotonic() + limit if limit else None
    while True:
        stop, resume = trainer._control(resume=True)
        if stop:
            trainer.state.stop = True
            raise RewardFailure(msg)
        if resume:
            _continue(trainer, "resumed after reward failures")
            return
        if deadline is not None and _all_past(trainer, deadline):
            raise RewardFailure(f"{cause}; no resume within {limit:g} s (--pause_timeout_s): the run ends, its "
                                "checkpoint kept", "failed")
        time.sleep(1.0 if limit == 0 or limit > 10 else POLL_S)


def _all_past(trainer, deadline: float) -> bool:
    """Every process ends its pause at the same poll (the main process's clock decides)."""
    past = time.monotonic() >= deadline
    if trainer.acc.num_processes == 1:
        return past
    import torch

    flag = torch.tensor([float(past and trainer.is_main)], device=trainer.acc.device)
    return bool(trainer.acc.reduce(flag, reduction="sum").item() > 0)


def _continue(trainer, note: str) -> None:
    trainer.state.status_note = note
    trainer.run_dir.set_status("running", trainer.step, note)


class StopWhileScoring(RewardFailure):
    """A stop signal arrived while the epoch's rewards were awaited."""


def await_scores(futures: list[cf.Future], state, acc) -> list:
    """The results of the epoch's reward futures. On one process, a stop signal (`state.signals`, the run
    state's count that the trainer's handler raises) ends the wait at once; with several, every process waits
    for its scores (bounded by the reward timeouts), since they must leave the epoch together."""
    out = []
    for f in futures:
        while True:
            try:
                out.append(f.result(timeout=POLL_S))
                break
            except cf.TimeoutError:
                if state.signals and acc.num_processes == 1:
                    raise StopWhileScoring(f"stopped by a signal while waiting for rewards at step {state.step}: "
                                           "the epoch's rollouts were dropped (nothing trained on them)") from None
    return out
