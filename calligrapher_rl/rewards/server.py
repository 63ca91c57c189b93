"""HTTP reward server: ``python -m calligrapher_rl.rewards.server --port P --rewards ocr,style``.

Runs reward models next to their accelerator and lets several trainers (or trainer processes) share
them. It binds 127.0.0.1 by default. With a shared secret (``--token`` or the environment's
``CALLIGRAPHER_REWARD_TOKEN``) every request must carry ``Authorization: Bearer TOKEN`` (the client sends
the same variable), compared in constant time; without one, anyone who can reach the port can use it.
One client (address) has at most --max_per_client requests waiting; beyond, 429 (the client retries).

API: ``GET /health`` -> {"status": "ok", "rewards": [...], "queue": {"pending", "busy", limits}};
``POST /score`` {"rewards": [names]?, "samples": [{"image", "mask", "text", "reference"?, "source"?}]}
(images as base64 PNG, JPEG or WebP) -> {"scores": {name: [float | null]}} with null for a failed sample
(NaN, infinite, or beyond +-REWARD_ABS_LIMIT).
Errors, each a JSON {"detail": one line}: body over the byte cap, an image over the pixel cap or a
request over the total pixel cap (checked from the image headers, before anything is decoded) -> 413;
a body not received within --body_timeout_s -> 408; malformed payload (not JSON, nested too deeply, bad
fields, not an image) -> 422; unknown reward -> 400; more than --max_pending requests waiting -> 503;
a missing or wrong token -> 401; a client over its share -> 429.

Staying responsive: parsing, decoding and scoring run in worker threads (at most --max_busy requests at
a time), so the event loop only moves bytes and ``/health`` answers at once under load. Slow clients:
uvicorn has no deadline for a request's headers, so ``GuardedH11Protocol`` adds one (--header_timeout_s)
and caps open connections (--max_connections), evicting the oldest connection still waiting for its
headers when a new one arrives: a slow-loris flood cannot exhaust the file descriptors, and the server
recovers as soon as the flood stops.
"""

# No `from __future__ import annotations` here: FastAPI resolves handler annotations at runtime, and
# `Request` is imported inside create_app (so the CLI stays light).
import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import os
import time

from PIL import Image, UnidentifiedImageError

from ..errors import UserError, cli_main
from .base import Reward, RewardSample, nan_to_none, sanitize_scores

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
TOKEN_ENV = "CALLIGRAPHER_REWARD_TOKEN"  # the shared secret, for the server and every client
LIMITS = {  # defaults of create_app and of the command's flags
    "max_request_bytes": 64 << 20,
    "max_image_pixels": 4096 * 4096,
    "max_request_pixels": 64 << 20,  # ~200 MB of decoded RGB per request
    "max_busy": 2,
    "max_pending": 16,  # bodies held while waiting: at most this many x max_request_bytes
    "max_per_client": 8,  # one client's share of max_pending: a burst from one cannot starve the others
    "body_timeout_s": 60.0,
}


class ArgParser(argparse.ArgumentParser):
    """argparse whose errors are a UserError: one line and exit 2 through cli_main, no usage dump."""

    def error(self, message):
        raise UserError(message)


class BadPayload(ValueError):
    pass


class TooLarge(ValueError):
    pass


def open_image(value, where: str) -> Image.Image:
    """The image's header only (nothing is decoded yet): its size can be checked against the caps."""
    if not isinstance(value, str):
        raise BadPayload(f"{where}: expected a base64 PNG string")
    try:
        return Image.open(io.BytesIO(base64.b64decode(value, validate=True)), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"{where}: {str(exc).splitlines()[0]}") from None
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadPayload(f"{where}: not a base64-encoded image ({type(exc).__name__})") from None


def decode(im: Image.Image, where: str, mode: str) -> Image.Image:
    try:
        im.load()
        return im.convert(mode)
    except (OSError, ValueError, SyntaxError) as exc:  # truncated data, bad chunks (PIL raises SyntaxError too)
        raise BadPayload(f"{where}: not a decodable image ({type(exc).__name__}: {str(exc)[:80]})") from None


def decode_samples(body, max_image_pixels: int = LIMITS["max_image_pixels"],
                   max_request_pixels: int = LIMITS["max_request_pixels"]) -> tuple[list[str] | None, list[RewardSample]]:
    if not isinstance(body, dict) or not isinstance(body.get("samples"), list):
        raise BadPayload("body: expected a JSON object with a 'samples' list")
    names = body.get("rewards")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise BadPayload("rewards: expected a list of reward names")
    opened, total = [], 0
    for i, s in enumerate(body["samples"]):  # every header first: nothing is decoded past a cap
        if not isinstance(s, dict):
            raise BadPayload(f"samples[{i}]: expected an object")
        if not isinstance(s.get("text"), str):
            raise BadPayload(f"samples[{i}].text: expected a string")
        ims = {}
        for k in ("image", "mask", "reference", "source"):
            if k in ("image", "mask") or s.get(k) is not None:
                where = f"samples[{i}].{k}"
                im = ims[k] = open_image(s.get(k), where)
                pixels = im.size[0] * im.size[1]
                if pixels > max_image_pixels:
                    raise TooLarge(f"{where}: {im.size[0]}x{im.size[1]} = {pixels} pixels exceeds the cap of "
                                   f"{max_image_pixels} per image")
                total += pixels
                if total > max_request_pixels:
                    raise TooLarge(f"{where}: the request's images exceed the cap of {max_request_pixels} pixels")
        opened.append((i, s, ims))
    samples = []
    for i, s, ims in opened:
        got = {k: decode(im, f"samples[{i}].{k}", "L" if k == "mask" else "RGB") for k, im in ims.items()}
        if got["mask"].size != got["image"].size:
            raise BadPayload(f"samples[{i}].mask: size {got['mask'].size} != image size {got['image'].size}")
        samples.append(RewardSample(image=got["image"], mask=got["mask"], text=s["text"],
                                    reference=got.get("reference"), source=got.get("source")))
    return names, samples


def parse_body(raw: bytes, **caps):
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadPayload(f"body: not JSON ({exc.msg})") from None
    except RecursionError:
        raise BadPayload("body: JSON nested too deeply") from None
    return decode_samples(body, **caps)


def create_app(rewards: dict[str, Reward], max_request_bytes: int = LIMITS["max_request_bytes"], *,
               max_image_pixels: int = LIMITS["max_image_pixels"], max_request_pixels: int = LIMITS["max_request_pixels"],
               max_busy: int = LIMITS["max_busy"], max_pending: int = LIMITS["max_pending"],
               body_timeout_s: float = LIMITS["body_timeout_s"], token: str | None = None,
               max_per_client: int = LIMITS["max_per_client"]):
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    app = FastAPI(title="calligrapher-rl rewards")
    busy = asyncio.Semaphore(max_busy)  # created unbound; binds to the server's loop on first use
    pending, scoring, per_client = [0], [0], {}
    expected = f"Bearer {token}".encode() if token else None

    def error(status: int, msg: str):
        return JSONResponse({"detail": msg}, status_code=status)

    def refused(request):
        if expected is None:
            return None
        got = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(got, expected):  # constant time: the answer's timing tells nothing of the token
            return None
        return error(401, "missing or wrong token: send 'Authorization: Bearer TOKEN' (the trainer sends "
                          "CALLIGRAPHER_REWARD_TOKEN)")

    @app.get("/health")
    async def health(request: Request):  # async: answered on the loop itself, never queued behind worker threads
        return refused(request) or {
            "status": "ok", "rewards": list(rewards),
            "queue": {"pending": pending[0], "busy": scoring[0], "max_pending": max_pending, "max_busy": max_busy,
                      "max_per_client": max_per_client}}

    async def read_body(request) -> bytes | None:
        chunks, size = [], 0
        async for chunk in request.stream():  # also caps chunked bodies that declare no length
            size += len(chunk)
            if size > max_request_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/score")
    async def score(request: Request):
        denied = refused(request)
        if denied is not None:
            return denied
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_request_bytes:
            return error(413, f"request of {declared} bytes exceeds the {max_request_bytes}-byte cap")
        if pending[0] >= max_pending:
            return error(503, f"busy: {pending[0]} requests are waiting; retry later")
        client = request.client.host if request.client else "?"
        if per_client.get(client, 0) >= max_per_client:
            return error(429, f"client {client} has {per_client[client]} requests waiting (limit {max_per_client}, "
                              "--max_per_client); retry later")
        pending[0] += 1
        per_client[client] = per_client.get(client, 0) + 1
        try:
            try:
                raw = await asyncio.wait_for(read_body(request), body_timeout_s)
            except asyncio.TimeoutError:
                return error(408, f"the body was not received within {body_timeout_s:g} s")
            if raw is None:
                return error(413, f"request exceeds the {max_request_bytes}-byte cap")
            async with busy, _counted(scoring):
                try:
                    names, samples = await run_in_threadpool(parse_body, raw, max_image_pixels=max_image_pixels,
                                                             max_request_pixels=max_request_pixels)
                except TooLarge as exc:
                    return error(413, str(exc))
                except BadPayload as exc:
                    return error(422, str(exc))
                names = list(rewards) if names is None else names
                unknown = [n for n in names if n not in rewards]
                if unknown:
                    return error(400, f"unknown reward(s) {', '.join(unknown)}; this server has {', '.join(rewards)}")

                def run():
                    return {n: nan_to_none(sanitize_scores(rewards[n].score(samples), n)) for n in names}

                try:
                    scores = await run_in_threadpool(run)
                except Exception as exc:  # noqa: BLE001 - a whole-batch failure: 500, the client retries/NaNs
                    logging.getLogger("calligrapher_rl.rewards").exception("scoring failed")
                    return error(500, f"scoring failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                                 if str(exc) else f"scoring failed: {type(exc).__name__}")
            return {"scores": scores}
        finally:
            pending[0] -= 1
            per_client[client] -= 1
            if not per_client[client]:
                del per_client[client]

    return app


@contextlib.asynccontextmanager
async def _counted(box: list):
    """box[0] counts the requests inside the block (the queue depth /health reports)."""
    box[0] += 1
    try:
        yield
    finally:
        box[0] -= 1


def guarded_protocol(header_timeout_s: float, max_connections: int):
    """uvicorn's h11 protocol plus a deadline for each request's headers and a cap on open connections."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _timer = None
        _opened = 0.0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._opened = time.monotonic()
            live = [c for c in self.connections if not c.transport.is_closing()]  # closed ones leave a bit later
            if len(live) > max_connections:  # evict the oldest one that has not even sent a request
                idle = [c for c in live if c is not self and getattr(c, "waiting_for_headers", None)
                        and c.waiting_for_headers()]
                victim = min(idle, key=lambda c: c._opened) if idle else self
                victim.transport.close()
            self._arm()

        def waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(header_timeout_s, self._deadline)

        def _deadline(self) -> None:
            if self.waiting_for_headers() and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this keep-alive connection has the same deadline

        def connection_lost(self, exc) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


def _raise_fd_limit() -> int:
    """Soft open-file limit raised to the hard one; returns the soft limit now in force."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        return soft
    except (ImportError, ValueError, OSError):
        return 1024


def main(argv=None) -> int:
    p = ArgParser(prog="python -m calligrapher_rl.rewards.server", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--rewards", required=True, help="NAME[,NAME]: rewards this server computes")
    p.add_argument("--siglip_path", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max_request_mb", type=float, default=LIMITS["max_request_bytes"] / (1 << 20),
                   help="413 for a larger body")
    p.add_argument("--max_image_pixels", type=int, default=LIMITS["max_image_pixels"],
                   help="413 for a larger image (read from its header, before decoding)")
    p.add_argument("--max_request_pixels", type=int, default=LIMITS["max_request_pixels"],
                   help="413 for a request whose images hold more pixels in all")
    p.add_argument("--max_busy", type=int, default=LIMITS["max_busy"], help="requests decoded/scored at once")
    p.add_argument("--max_pending", type=int, default=LIMITS["max_pending"],
                   help="requests received or waiting at once; 503 beyond (the client retries)")
    p.add_argument("--max_per_client", type=int, default=LIMITS["max_per_client"],
                   help="requests one client address may have waiting; 429 beyond (the client retries)")
    p.add_argument("--token", default=None,
                   help="shared secret every request must send as 'Authorization: Bearer TOKEN' (default: the "
                        "environment's CALLIGRAPHER_REWARD_TOKEN; the trainer sends that variable); a flag is "
                        "visible in the process list, the variable is not")
    p.add_argument("--body_timeout_s", type=float, default=LIMITS["body_timeout_s"],
                   help="408 for a body not received in time")
    p.add_argument("--header_timeout_s", type=float, default=10.0,
                   help="close a connection that has not sent a request's headers in time (slow clients)")
    p.add_argument("--max_connections", type=int, default=512,
                   help="open connections; beyond, the oldest one still waiting for headers is closed")
    p.add_argument("--keep_alive_s", type=float, default=5.0, help="uvicorn's idle keep-alive timeout")
    p.add_argument("--log_level", default="info")
    args = p.parse_args(argv)
    from .registry import make_reward, parse_spec

    spec = parse_spec(args.rewards)
    if ":" in args.rewards:
        raise UserError("a server takes reward names only (weights belong to the trainer)", field="--rewards")
    for flag in ("max_request_mb", "max_image_pixels", "max_request_pixels", "max_busy", "max_pending", "max_per_client",
                 "body_timeout_s", "header_timeout_s", "max_connections", "keep_alive_s"):
        if not getattr(args, flag) > 0:
            raise UserError(f"expected a positive number, got {getattr(args, flag)}", field=f"--{flag}")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("calligrapher_rl.rewards").warning(
            "--host %s without a token (--token or %s): anyone who reaches the port can use the server",
            args.host, TOKEN_ENV)
    rewards = {n: make_reward(n, siglip_path=args.siglip_path, device=args.device) for n in spec}
    import uvicorn

    fds = _raise_fd_limit()
    max_connections = min(args.max_connections, max(16, fds - 64))  # room for the models' own files
    app = create_app(rewards, int(args.max_request_mb * (1 << 20)), max_image_pixels=args.max_image_pixels,
                     max_request_pixels=args.max_request_pixels, max_busy=args.max_busy,
                     max_pending=args.max_pending, body_timeout_s=args.body_timeout_s, token=token,
                     max_per_client=args.max_per_client)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=args.keep_alive_s,
                http=guarded_protocol(args.header_timeout_s, max_connections))
    return 0


if __name__ == "__main__":
    cli_main(main)
