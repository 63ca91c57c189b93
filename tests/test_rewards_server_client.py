"""The reward client against broken servers on loopback: a dead server fails the health check in one line, a
dead, hanging or garbage-answering one gives NaN after the retries (and within the timeout budget), non-finite or
out-of-range scores count as failed; and the VLM judge against a fake OpenAI-compatible server."""

from __future__ import annotations

import base64
import io
import math
import threading
import time

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from PIL import Image
from test_rewards_server import Served, dead_url, samples

from calligrapher_rl.errors import UserError
from calligrapher_rl.rewards import Reward, RewardError, build_rewards, make_reward
from calligrapher_rl.rewards.client import RemoteRewards
from calligrapher_rl.rewards.server import create_app


def test_down_server_fails_health_check_and_scores_nan(caplog):
    url = dead_url()
    remote = RemoteRewards([url], ["ocr"], timeout_s=2, retries=2, backoff_s=0.01)
    with pytest.raises(RewardError, match=f"reward server {url} is not reachable") as exc:
        remote.check_health()
    assert "\n" not in str(exc.value)
    out = remote.score(samples(3))
    assert np.isnan(out["ocr"]).all()
    assert "-> NaN" in caplog.text and url in caplog.text


def test_hanging_server_gives_nan_within_the_timeout_budget():
    release = threading.Event()

    class Hang(Reward):
        def score(self, batch):
            release.wait(10)
            return [1.0] * len(batch)

    srv = Served(create_app({"hang": Hang()}))
    try:
        remote = RemoteRewards([srv.url], ["hang"], timeout_s=0.5, retries=1, backoff_s=0.05)
        t0 = time.time()
        out = remote.score(samples(2))
        elapsed = time.time() - t0
        assert np.isnan(out["hang"]).all()
        assert elapsed < 2 * 0.5 + 0.05 + 1.0, elapsed  # 2 attempts x timeout + backoff + slack
    finally:
        release.set()
        srv.stop()


@pytest.mark.parametrize("answer", ["not json", '{"nope": 1}', '{"scores": {"ocr": [1.0]}}',
                                    '{"scores": {"ocr": ["a", "b"]}}', '{"scores": [1, 2]}'])
def test_garbage_answers_give_nan(answer):
    app = FastAPI()
    calls = []

    @app.post("/score")
    def score():
        calls.append(1)
        return PlainTextResponse(answer)

    srv = Served(app)
    try:
        out = RemoteRewards([srv.url], ["ocr"], retries=2, backoff_s=0.01).score(samples(2))
        assert np.isnan(out["ocr"]).all() and len(calls) == 3  # garbage is retried, then NaN
    finally:
        srv.stop()


def test_non_finite_and_out_of_range_scores_count_as_failed(caplog):
    app = FastAPI()

    @app.post("/score")
    def score():  # what a broken scorer sends: Python's json reads Infinity and 1e400 as inf
        return PlainTextResponse('{"scores": {"ocr": [1e308, Infinity, -1e7, null, 0.5, 1e400, -0.25]}}')

    srv = Served(app)
    try:
        out = RemoteRewards([srv.url], ["ocr"], retries=0).score(samples(7))["ocr"]
        assert np.isnan(out[:4]).all() and out[4] == 0.5 and np.isnan(out[5]) and out[6] == -0.25
        assert "4 score(s) non-finite or beyond" in caplog.text
    finally:
        srv.stop()
    with build_rewards("fidelity") as rs:  # a local per-sample reward is held to the same range
        rs.rewards["fidelity"].score_one = lambda s: 1e308
        assert np.isnan(rs.score(samples(2))["total"]).all()


# ---------------------------------------------------------------- VLM judge

def test_vlm_judge_against_a_fake_openai_server(monkeypatch):
    app = FastAPI()
    seen = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        prompt = body["messages"][0]["content"][0]["text"]
        url = body["messages"][0]["content"][1]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).load()
        if "boom" in prompt:
            return PlainTextResponse("overloaded", status_code=503)
        answer = {"good": "Rating: 8", "meh": "3.5/10", "huh": "I cannot tell", "big": "42"}
        key = next(k for k in answer if f'"{k}"' in prompt)
        return {"choices": [{"message": {"role": "assistant", "content": answer[key]}}]}

    srv = Served(app)
    try:
        monkeypatch.setenv("CALLIGRAPHER_VLM_URL", srv.url)
        monkeypatch.setenv("CALLIGRAPHER_VLM_MODEL", "judge-7b")
        vlm = make_reward("vlm")
        vlm.retries, vlm.backoff_s = 1, 0.01
        batch = samples(5)
        for s, text in zip(batch, ["good", "meh", "huh", "big", "boom"]):
            s.text = text
        batch[0].reference = batch[1].image
        out = vlm.score(batch)
        assert out[:2] == [0.8, 0.35] and all(math.isnan(v) for v in out[2:])
        assert {b["model"] for b in seen} == {"judge-7b"}
        assert max(len(b["messages"][0]["content"]) for b in seen) == 3  # with the reference image
        vlm.close()
    finally:
        srv.stop()


def test_vlm_needs_url_and_model(monkeypatch):
    monkeypatch.delenv("CALLIGRAPHER_VLM_URL", raising=False)
    monkeypatch.delenv("CALLIGRAPHER_VLM_MODEL", raising=False)
    with pytest.raises(UserError, match="CALLIGRAPHER_VLM_URL"):
        make_reward("vlm")
