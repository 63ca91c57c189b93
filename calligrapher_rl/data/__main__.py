"""Command line: `synth` builds a synthetic text dataset, `validate` checks one.

    python -m calligrapher_rl.data synth --out DIR --n N [--resolution R] [--seed N] [--task words|glyphs]
    python -m calligrapher_rl.data validate PATH

Both go through errors.cli_main, so a user mistake prints one line, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import cli_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calligrapher_rl.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="render a synthetic text dataset (deterministic per seed)")
    p.add_argument("--out", required=True, help="output folder (images/ and data.jsonl are written there)")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--resolution", type=int, default=512, help="square side in pixels (multiple of 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="words", help="words (varied text and styles) or glyphs (1-4 digits and "
                   "capitals, plain fonts, flat backgrounds: the pretrained tiny's task)")
    v = sub.add_parser("validate", help="check every entry of a dataset; exit 1 if any problem")
    v.add_argument("path", help='a .json/.jsonl file, a folder holding one or self_bench.txt, or "bundled"')
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a path with odd characters must not crash the report
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")

    if args.command == "synth":
        from .synth import synthesize

        target = synthesize(args.out, n=args.n, resolution=args.resolution, seed=args.seed, task=args.task)
        print(f"wrote {args.n} samples at {args.resolution}x{args.resolution} to {target}")
        return 0

    from .validate import check_dataset

    lines, count = check_dataset(args.path)
    for line in lines:
        print(line)
    if lines:
        print(f"{len(lines)} problem(s) found in {args.path}", file=sys.stderr)
        return 1
    print(f"ok: {count} entries checked in {args.path}, no problems")
    return 0


if __name__ == "__main__":
    cli_main(main)
