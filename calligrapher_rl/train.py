"""python -m calligrapher_rl.train [flags of the guide] [--preset NAME_OR_PATH] ...

The whole training run (supervised warmup, then GRPO or DiffusionNFT), on one process or under
`accelerate launch`. `--help` lists every flag with its default.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys

from .errors import Interrupted, cli_main


def main(argv=None) -> int:
    signals = _EarlySignals()  # a stop signal before the trainer takes over: one line, 128 + signal
    try:
        return _main(argv, signals)
    except Interrupted as exc:  # while loading (status.json says stopped) or before the run began
        print(f"{exc}" + (f": {signals.output_dir}" if signals.output_dir else ""), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + exc.signum)  # at once: the interpreter's teardown of half-loaded models takes seconds


def _main(argv, signals: "_EarlySignals") -> int:
    from .config_parse import parse_args

    cfg = parse_args(argv)
    signals.output_dir = cfg.output_dir
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .training.run_dir import StatusNotRecorded
    from .training.trainer import Trainer

    try:
        trainer = Trainer(cfg, on_reward_failure="wait")  # a reward-failure pause waits for the studio / the user
        outcome = trainer.run()
    except StatusNotRecorded:  # stderr already named the file and the error
        return 1
    except OSError as exc:
        if exc.errno not in _STORAGE_ERRORS:
            raise
        print(f"error: {exc}", file=sys.stderr)  # status.json says failed (or stderr said it could not)
        return 1
    code = 1 if outcome == "failed" else 128 + trainer.stop_signal if trainer.stop_signal else 0
    signals.after_run(f"{outcome}: {cfg.output_dir}", code)
    print(f"{outcome}: {cfg.output_dir}" + (f" (signal {trainer.stop_signal})" if code > 128 else ""))
    return code  # failed: status.json and the log name the cause; stopped by a signal: 128 + it


class _EarlySignals:
    """SIGTERM/SIGINT before the trainer installs its handlers (imports, parsing) end the command with one
    line; after the run has ended (its status is final), one exits at once with the run's own line."""

    def __init__(self):
        self._done: tuple[str, int] | None = None
        self.output_dir: str | None = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self)

    def after_run(self, line: str, code: int) -> None:
        self._done = (line, code)

    def __call__(self, signum, frame):
        if self._done is not None:
            print(f"{self._done[0]} (signal {signum} after the run ended)", flush=True)
            os._exit(self._done[1] or 128 + signum)
        raise Interrupted(signum, "before the run began: nothing trained")


# A full, read-only or failing disk: the environment's fault, one line rather than a traceback.
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


if __name__ == "__main__":
    cli_main(main)
