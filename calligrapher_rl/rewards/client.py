"""``RemoteRewards``: score batches on one or more reward servers (``server.py``) over HTTP.

Why it is built this way: reward models (OCR, SigLIP, a VLM judge) can live on other machines or GPUs
than the trainer. A batch is cut into chunks dealt round-robin over the URLs and sent concurrently. A
chunk that fails (connection error, timeout, 5xx, or a garbage answer: not JSON, missing names, wrong
length, non-numbers) is retried with exponential backoff, each retry on the next URL, so one dead
server costs only latency. After the last retry its samples are NaN, never 0, with a logged warning.
A 4xx answer is our request's fault (too large, invalid, a wrong token) and is not retried: the same
request would get the same answer; but 429 (this client's share of the server's queue is full) is. A score that is non-finite or out of range (base.sanitize_scores: 1e308 from a
broken server) is a failed sample (NaN), so the trainer's failure count and pause see it.
"""

from __future__ import annotations

import base64
import io
import math
import os
import time

import numpy as np

from .base import RewardError, RewardSample, logger, sanitize_scores
from .worker import map_daemon


def encode_image(image, mode: str = "RGB") -> str | None:
    """Base64 PNG (lossless, so the server scores exactly the pixels the trainer generated)."""
    if image is None:
        return None
    buf = io.BytesIO()
    image.convert(mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_sample(s: RewardSample) -> dict:
    return {"image": encode_image(s.image), "mask": encode_image(s.mask, "L"), "text": s.text,
            "reference": encode_image(s.reference), "source": encode_image(s.source)}


class _Garbage(Exception):
    """The server answered, but not with usable scores."""


class _NotRetryable(Exception):
    pass


class RemoteRewards:
    """`token`: the servers' shared secret, sent as `Authorization: Bearer TOKEN`; None = the environment's
    CALLIGRAPHER_REWARD_TOKEN (never a flag of the trainer: run.json and the process list would show it)."""

    def __init__(self, urls, names, timeout_s=30.0, retries=3, backoff_s=0.5, concurrency=4, chunk_size=8,
                 token: str | None = None):
        import httpx

        self.urls = [u.rstrip("/") for u in ([urls] if isinstance(urls, str) else urls)]
        if not self.urls:
            raise ValueError("RemoteRewards needs at least one URL")
        self.names = list(names)
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.concurrency, self.chunk_size = max(1, int(concurrency)), max(1, int(chunk_size))
        self._httpx = httpx
        token = token or os.environ.get("CALLIGRAPHER_REWARD_TOKEN") or None
        self.client = httpx.Client(timeout=httpx.Timeout(self.timeout_s),
                                   limits=httpx.Limits(max_connections=self.concurrency * 2),
                                   headers={"Authorization": f"Bearer {token}"} if token else None)

    def check_health(self) -> None:
        """Every URL must answer /health and serve every requested reward, else one-line RewardError."""
        for url in self.urls:
            try:
                resp = self.client.get(f"{url}/health", timeout=min(self.timeout_s, 10.0))
                if resp.status_code == 401:
                    raise RewardError(f"reward server {url} refused the token: set CALLIGRAPHER_REWARD_TOKEN to the "
                                      "server's --token")
                resp.raise_for_status()
                served = resp.json().get("rewards", [])
            except RewardError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
                raise RewardError(f"reward server {url} is not reachable or not healthy "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
            missing = [n for n in self.names if n not in served]
            if missing:
                raise RewardError(f"reward server {url} does not serve {', '.join(missing)} (serves: "
                                  f"{', '.join(map(str, served)) or 'nothing'})")

    def _post(self, url: str, body: dict, n: int) -> dict[str, list[float]]:
        resp = self.client.post(f"{url}/score", json=body)
        if 400 <= resp.status_code < 500 and resp.status_code != 429:  # 429: over this client's share, retried
            raise _NotRetryable(f"HTTP {resp.status_code}: {resp.text[:200]}")
        resp.raise_for_status()
        try:
            scores = resp.json()["scores"]
        except Exception as exc:  # noqa: BLE001
            raise _Garbage(f"not a JSON object with 'scores' ({type(exc).__name__})") from None
        out = {}
        for name in self.names:
            vals = scores.get(name) if isinstance(scores, dict) else None
            if not isinstance(vals, list) or len(vals) != n:
                raise _Garbage(f"'{name}' missing or not {n} values")
            if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in vals):
                raise _Garbage(f"'{name}' has non-numeric values")
            out[name] = sanitize_scores(vals, f"{name} from {url}")
        return out

    def _score_chunk(self, k: int, payload: list[dict]) -> dict[str, list[float]]:
        body = {"rewards": self.names, "samples": payload}
        last = ""
        for attempt in range(self.retries + 1):
            url = self.urls[(k + attempt) % len(self.urls)]  # failover: each retry tries the next URL
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return self._post(url, body, len(payload))
            except _NotRetryable as exc:
                last = f"{url}: {exc}"
                break
            except (self._httpx.HTTPError, _Garbage) as exc:
                last = f"{url}: {type(exc).__name__}: {exc}"
                logger.info("reward chunk %d attempt %d failed: %s", k, attempt + 1, last)
        logger.warning("reward server: %d samples -> NaN for %s after %d attempt(s); last error: %s",
                       len(payload), ", ".join(self.names), attempt + 1, last)
        return {name: [math.nan] * len(payload) for name in self.names}

    def score(self, samples: list[RewardSample]) -> dict[str, np.ndarray]:
        payload = [encode_sample(s) for s in samples]
        chunks = [payload[i:i + self.chunk_size] for i in range(0, len(payload), self.chunk_size)]
        out = {name: [] for name in self.names}
        if not chunks:
            return {name: np.zeros(0) for name in self.names}
        for res in map_daemon(self._score_chunk, chunks, self.concurrency):  # keeps chunk order
            for name in self.names:
                out[name].extend(res[name])
        return {name: np.asarray(v, dtype=np.float64) for name, v in out.items()}

    def close(self) -> None:
        self.client.close()
