"""``python -m calligrapher_rl.rewards score --reward NAME --image IMG --text TEXT [...]``.

Scores one image with one reward and prints exactly one JSON object ``{NAME: score}`` on stdout (null
when the reward failed on it), so scripts can parse it; logs and progress bars go to stderr. Without
``--mask`` the whole image is the region. A user mistake is one line on stderr and exit 2.
"""

from __future__ import annotations

import json
import sys

from PIL import Image

from ..errors import UserError, cli_main
from ..images import load_image, load_mask
from .server import ArgParser


def main(argv=None) -> int:
    p = ArgParser(prog="python -m calligrapher_rl.rewards")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgParser)
    s = sub.add_parser("score", help="score one image with one reward")
    s.add_argument("--reward", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--text", required=True)
    s.add_argument("--reference")
    s.add_argument("--mask")
    s.add_argument("--source")
    s.add_argument("--siglip_path")
    s.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    from . import RewardSample, available_rewards, make_reward
    from .base import nan_to_none

    if args.reward not in available_rewards():
        raise UserError(f"unknown reward '{args.reward}' (valid: {', '.join(available_rewards())})", field="--reward")
    if not args.text.strip():
        raise UserError("expected a non-empty target text", field="--text")
    image = load_image(args.image, field="--image")
    if args.mask:
        mask = load_mask(args.mask, field="--mask")
        if mask.size != image.size:
            raise UserError(f"size {mask.size[0]}x{mask.size[1]} does not match the image's "
                            f"{image.size[0]}x{image.size[1]}", where=args.mask, field="--mask")
    else:
        mask = Image.new("L", image.size, 255)
    reference = load_image(args.reference, field="--reference") if args.reference else None
    source = load_image(args.source, field="--source") if args.source else None
    if source is not None and source.size != image.size:
        raise UserError(f"size {source.size[0]}x{source.size[1]} does not match the image's "
                        f"{image.size[0]}x{image.size[1]}", where=args.source, field="--source")
    reward = make_reward(args.reward, siglip_path=args.siglip_path, device=args.device)
    for field in reward.requires:
        if {"reference": reference, "source": source}.get(field) is None:
            raise UserError(f"the {args.reward} reward needs this image", field=f"--{field}")
    sample = RewardSample(image=image, mask=mask, text=args.text, reference=reference, source=source)
    value = reward.score([sample])[0]
    print(json.dumps({args.reward: nan_to_none([value])[0]}))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    cli_main(main)
