"""python -m calligrapher_rl.train [flags of the guide] [--preset NAME_OR_PATH] ...

The whole training run (supervised warmup, then GRPO or DiffusionNFT), on one process or under
`accelerate launch`. `--help` lists every flag with its default.
"""

from __future__ import annotations

import logging
import sys

from .errors import cli_main


def main(argv=None) -> int:
    from .config import parse_args

    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .training.trainer import train

    outcome = train(cfg)
    print(f"{outcome}: {cfg.output_dir}")
    return 1 if outcome == "failed" else 0  # failed: status.json and the log name the cause


if __name__ == "__main__":
    cli_main(main)
