"""python -m calligrapher_rl.tiny --out DIR [--seed N]: write the offline tiny FLUX-Fill + SigLIP folders."""

from __future__ import annotations

import argparse

from .errors import cli_main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m calligrapher_rl.tiny", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("--out", required=True, help="folder to write flux-fill/ and siglip/ into")
    p.add_argument("--seed", type=int, default=0, help="weights are deterministic per seed")
    args = p.parse_args(argv)
    from .models.tiny import write_tiny

    flux, siglip = write_tiny(args.out, args.seed)
    print(f"{flux}\n{siglip}")
    return 0


if __name__ == "__main__":
    cli_main(main)
