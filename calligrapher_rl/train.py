"""python -m calligrapher_rl.train [flags of the guide] [--preset NAME_OR_PATH] ...

The whole training run (supervised warmup, then GRPO or DiffusionNFT), on one process or under
`accelerate launch`. `--help` lists every flag with its default.
"""

from __future__ import annotations

import errno
import logging
import os
import sys

from .errors import cli_main


def main(argv=None) -> int:
    from .config import parse_args

    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .training.run_dir import Interrupted, StatusNotRecorded
    from .training.trainer import train

    try:
        outcome = train(cfg)
    except Interrupted as exc:  # a stop signal while loading: status.json says stopped
        print(f"{exc}: {cfg.output_dir}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + exc.signum)  # at once: the interpreter's teardown of half-loaded models takes seconds
    except StatusNotRecorded:  # stderr already named the file and the error
        return 1
    except OSError as exc:
        if exc.errno not in _STORAGE_ERRORS:
            raise
        print(f"error: {exc}", file=sys.stderr)  # status.json says failed (or stderr said it could not)
        return 1
    print(f"{outcome}: {cfg.output_dir}")
    return 1 if outcome == "failed" else 0  # failed: status.json and the log name the cause


# A full, read-only or failing disk: the environment's fault, one line rather than a traceback.
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


if __name__ == "__main__":
    cli_main(main)
