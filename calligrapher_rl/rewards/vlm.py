"""``vlm`` (optional): a vision-language judge behind an OpenAI-compatible chat-completions endpoint.

Any server speaking ``POST {base}/v1/chat/completions`` works (vLLM, SGLang, llama.cpp, ...). The
judge sees the repainted region (and the style reference when there is one) as base64 PNG data URLs
and is asked for one 0-10 rating of text correctness and style match; the first number in its answer,
divided by 10, is the reward. An answer without a number in [0, 10], an HTTP error or a timeout is NaN
(after ``retries``), never 0. Configuration: constructor args or CALLIGRAPHER_VLM_URL /
CALLIGRAPHER_VLM_MODEL (and optional CALLIGRAPHER_VLM_API_KEY for a server that wants a bearer token).
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import math
import os
import re
import time

from ..errors import UserError
from .base import NAN, Reward, RewardSample, logger, region_square
from .registry import register_reward

PROMPT = (
    "The first image shows text that should read exactly: \"{text}\".{style} "
    "Rate from 0 to 10 how correct the text is{and_style}. Answer with the number only."
)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def parse_rating(answer: str) -> float:
    """First number in the answer mapped from [0, 10] to [0, 1]; NaN when absent or out of range."""
    m = _NUMBER.search(answer or "")
    if not m:
        return NAN
    v = float(m.group())
    return v / 10.0 if 0.0 <= v <= 10.0 else NAN


def completions_url(base: str) -> str:
    base = base.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


@register_reward("vlm")
class VlmReward(Reward):
    name = "vlm"

    def __init__(self, url=None, model=None, api_key=None, timeout_s=60.0, retries=2, backoff_s=0.5,
                 concurrency=4):
        url = url or os.environ.get("CALLIGRAPHER_VLM_URL")
        model = model or os.environ.get("CALLIGRAPHER_VLM_MODEL")
        if not url:
            raise UserError("the vlm reward needs the judge's base URL", field="CALLIGRAPHER_VLM_URL")
        if not model:
            raise UserError("the vlm reward needs the judge's model name", field="CALLIGRAPHER_VLM_MODEL")
        import httpx

        self.url, self.model = completions_url(url), model
        key = api_key or os.environ.get("CALLIGRAPHER_VLM_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers)
        self.retries, self.backoff_s, self.concurrency = retries, backoff_s, concurrency

    def payload(self, sample: RewardSample) -> dict:
        has_ref = sample.reference is not None
        text = PROMPT.format(
            text=sample.text,
            style=" The second image is the style reference." if has_ref else "",
            and_style=" and how well its lettering matches the reference's style" if has_ref else "",
        )
        content = [{"type": "text", "text": text},
                   {"type": "image_url", "image_url": {"url": png_data_url(region_square(sample))}}]
        if has_ref:
            content.append({"type": "image_url", "image_url": {"url": png_data_url(sample.reference)}})
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": 0.0, "max_tokens": 16}

    def score_one(self, index: int, sample: RewardSample) -> float:
        try:
            payload = self.payload(sample)
        except Exception as exc:  # noqa: BLE001
            logger.warning("reward vlm: sample %d failed: %s: %s", index, type(exc).__name__, exc)
            return NAN
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                resp = self.client.post(self.url, json=payload)
                resp.raise_for_status()
                answer = resp.json()["choices"][0]["message"]["content"]
            except Exception as exc:  # noqa: BLE001 - HTTP/transport/shape errors: retry, then NaN
                last = f"{type(exc).__name__}: {exc}"
                continue
            value = parse_rating(answer if isinstance(answer, str) else "")
            if not math.isnan(value):
                return value
            last = f"unparsable answer {answer!r:.80}"
        logger.warning("reward vlm: sample %d -> NaN after %d tries (%s)", index, self.retries + 1, last)
        return NAN

    def score(self, samples: list[RewardSample]) -> list[float]:
        with cf.ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(self.score_one, range(len(samples)), samples))

    def close(self) -> None:
        self.client.close()
