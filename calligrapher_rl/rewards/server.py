"""HTTP reward server: ``python -m calligrapher_rl.rewards.server --port P --rewards ocr,style``.

Runs reward models next to their accelerator and lets several trainers (or trainer processes) share
them. It binds 127.0.0.1 by default: the API has no authentication, so exposing it is a deliberate
``--host 0.0.0.0`` choice. Scoring runs in a worker thread so ``/health`` stays responsive.

API: ``GET /health`` -> {"status": "ok", "rewards": [...]};
``POST /score`` {"rewards": [names]?, "samples": [{"image", "mask", "text", "reference"?, "source"?}]}
(images as base64 PNG) -> {"scores": {name: [float | null]}} with null for a failed (NaN) sample.
Errors: body over the cap -> 413, malformed payload -> 422 with the reason, unknown reward -> 400.
"""

# No `from __future__ import annotations` here: FastAPI resolves handler annotations at runtime, and
# `Request` is imported inside create_app (so the CLI stays light).
import argparse
import base64
import binascii
import io
import json
import logging

from PIL import Image, UnidentifiedImageError

from ..errors import UserError, cli_main
from .base import Reward, RewardSample, nan_to_none


class ArgParser(argparse.ArgumentParser):
    """argparse whose errors are a UserError: one line and exit 2 through cli_main, no usage dump."""

    def error(self, message):
        raise UserError(message)


class BadPayload(ValueError):
    pass


def decode_image(value, where: str, mode: str) -> Image.Image:
    if not isinstance(value, str):
        raise BadPayload(f"{where}: expected a base64 PNG string")
    try:
        im = Image.open(io.BytesIO(base64.b64decode(value, validate=True)))
        im.load()
        return im.convert(mode)
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadPayload(f"{where}: not a base64-encoded image ({type(exc).__name__})") from None


def decode_samples(body) -> tuple[list[str] | None, list[RewardSample]]:
    if not isinstance(body, dict) or not isinstance(body.get("samples"), list):
        raise BadPayload("body: expected a JSON object with a 'samples' list")
    names = body.get("rewards")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise BadPayload("rewards: expected a list of reward names")
    samples = []
    for i, s in enumerate(body["samples"]):
        if not isinstance(s, dict):
            raise BadPayload(f"samples[{i}]: expected an object")
        if not isinstance(s.get("text"), str):
            raise BadPayload(f"samples[{i}].text: expected a string")
        opt = {k: decode_image(s[k], f"samples[{i}].{k}", "RGB") if s.get(k) is not None else None
               for k in ("reference", "source")}
        image = decode_image(s.get("image"), f"samples[{i}].image", "RGB")
        mask = decode_image(s.get("mask"), f"samples[{i}].mask", "L")
        if mask.size != image.size:
            raise BadPayload(f"samples[{i}].mask: size {mask.size} != image size {image.size}")
        samples.append(RewardSample(image=image, mask=mask, text=s["text"], **opt))
    return names, samples


def create_app(rewards: dict[str, Reward], max_request_bytes: int = 64 << 20):
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    app = FastAPI(title="calligrapher-rl rewards")

    def error(status: int, msg: str):
        return JSONResponse({"detail": msg}, status_code=status)

    @app.get("/health")
    def health():
        return {"status": "ok", "rewards": list(rewards)}

    @app.post("/score")
    async def score(request: Request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_request_bytes:
            return error(413, f"request of {declared} bytes exceeds the {max_request_bytes}-byte cap")
        chunks, size = [], 0
        async for chunk in request.stream():  # also caps chunked bodies that declare no length
            size += len(chunk)
            if size > max_request_bytes:
                return error(413, f"request exceeds the {max_request_bytes}-byte cap")
            chunks.append(chunk)
        try:
            names, samples = decode_samples(json.loads(b"".join(chunks)))
        except json.JSONDecodeError as exc:
            return error(422, f"body: not JSON ({exc.msg})")
        except BadPayload as exc:
            return error(422, str(exc))
        names = list(rewards) if names is None else names
        unknown = [n for n in names if n not in rewards]
        if unknown:
            return error(400, f"unknown reward(s) {', '.join(unknown)}; this server has {', '.join(rewards)}")

        def run():
            return {n: nan_to_none(rewards[n].score(samples)) for n in names}

        try:
            scores = await run_in_threadpool(run)
        except Exception as exc:  # noqa: BLE001 - a whole-batch failure: 500, the client retries/NaNs
            logging.getLogger("calligrapher_rl.rewards").exception("scoring failed")
            return error(500, f"scoring failed: {type(exc).__name__}: {exc}")
        return {"scores": scores}

    return app


def main(argv=None) -> int:
    p = ArgParser(prog="python -m calligrapher_rl.rewards.server", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--rewards", required=True, help="NAME[,NAME]: rewards this server computes")
    p.add_argument("--siglip_path", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max_request_mb", type=float, default=64)
    p.add_argument("--log_level", default="info")
    args = p.parse_args(argv)
    from .registry import make_reward, parse_spec

    spec = parse_spec(args.rewards)
    if ":" in args.rewards:
        raise UserError("a server takes reward names only (weights belong to the trainer)", field="--rewards")
    if args.max_request_mb <= 0:
        raise UserError("expected a positive size in MB", field="--max_request_mb")
    rewards = {n: make_reward(n, siglip_path=args.siglip_path, device=args.device) for n in spec}
    import uvicorn

    app = create_app(rewards, int(args.max_request_mb * (1 << 20)))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    cli_main(main)
