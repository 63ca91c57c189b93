"""Reward server + client end to end on loopback, failure modes included, and the VLM judge against a
fake OpenAI-compatible server. Every server is a real uvicorn on 127.0.0.1, on a socket we bound."""

from __future__ import annotations

import base64
import io
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from PIL import Image, ImageDraw, ImageFont

from calligrapher_rl.errors import UserError
from calligrapher_rl.rewards import Reward, RewardError, RewardSample, build_rewards, make_reward
from calligrapher_rl.rewards.client import RemoteRewards, encode_sample
from calligrapher_rl.rewards.server import create_app

NAMES = ["brightness", "fidelity", "ocr"]


class Served:
    """uvicorn in a daemon thread on a pre-bound free port (no race for the port)."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=5)


def dead_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here: connection refused
    return f"http://127.0.0.1:{port}"


def samples(n=5):
    out = []
    for i in range(n):
        word = ["garden", "Sunset", "coffee", "neon", "market"][i % 5]
        im = Image.new("RGB", (320, 120), (235 - 10 * i, 235, 235))
        ImageDraw.Draw(im).text((30, 30), word, font=ImageFont.load_default(size=40), fill=(20, 20, 20))
        mask = Image.new("L", im.size, 0)
        ImageDraw.Draw(mask).rectangle((20, 20, 260, 90), fill=255)
        out.append(RewardSample(im, mask, word, source=Image.new("RGB", im.size, (200, 200, 200))))
    return out


@pytest.fixture(scope="module")
def local():
    return {n: make_reward(n) for n in NAMES}


@pytest.fixture(scope="module")
def good(local):
    srv = Served(create_app(local, max_request_bytes=4 << 20))
    yield srv
    srv.stop()


def test_healthy_server_scores_equal_local_scores(good, local):
    batch = samples(5)
    assert httpx.get(f"{good.url}/health").json() == {"status": "ok", "rewards": NAMES}
    remote = RemoteRewards([good.url], NAMES, chunk_size=2)
    remote.check_health()
    got = remote.score(batch)
    for n in NAMES:
        np.testing.assert_allclose(got[n], local[n].score(batch), rtol=0, atol=1e-12)
    assert got["ocr"].tolist() == [1.0] * 5
    with build_rewards("ocr:0.5,fidelity:0.5", server_urls=good.url) as rs:  # the trainer's path
        rs.check_health()
        out = rs.score(batch)
    np.testing.assert_allclose(out["total"], 0.5 * got["ocr"] + 0.5 * got["fidelity"])


def test_down_server_fails_health_check_and_scores_nan(caplog):
    url = dead_url()
    remote = RemoteRewards([url], ["ocr"], timeout_s=2, retries=2, backoff_s=0.01)
    with pytest.raises(RewardError, match=f"reward server {url} is not reachable") as exc:
        remote.check_health()
    assert "\n" not in str(exc.value)
    out = remote.score(samples(3))
    assert np.isnan(out["ocr"]).all()
    assert "-> NaN" in caplog.text and url in caplog.text


def test_health_check_names_a_reward_the_server_lacks(good):
    with pytest.raises(RewardError, match="does not serve style"):
        RemoteRewards([good.url], ["ocr", "style"]).check_health()


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


def test_failover_to_the_live_server(good, local):
    batch = samples(5)
    remote = RemoteRewards([dead_url(), good.url], NAMES, chunk_size=1, retries=1, backoff_s=0.01)
    got = remote.score(batch)
    for n in NAMES:
        np.testing.assert_allclose(got[n], local[n].score(batch), atol=1e-12)


def test_request_too_large_is_413_and_bad_payloads_are_4xx(local):
    srv = Served(create_app({"brightness": local["brightness"]}, max_request_bytes=2000))
    try:
        body = {"samples": [encode_sample(s) for s in samples(1)]}
        assert httpx.post(f"{srv.url}/score", json=body).status_code == 413
        chunked = httpx.post(f"{srv.url}/score", content=iter([b"x" * 1500, b"y" * 1500]))
        assert chunked.status_code == 413  # no Content-Length: counted while streaming
        out = RemoteRewards([srv.url], ["brightness"], retries=3, backoff_s=5).score(samples(1))
        assert np.isnan(out["brightness"]).all()  # a 4xx is not retried (backoff_s=5 would show)
        bad = httpx.post(f"{srv.url}/score", json={"samples": [{"image": "!!", "mask": "", "text": "x"}]})
        assert bad.status_code == 422 and "samples[0].image" in bad.json()["detail"]
        assert httpx.post(f"{srv.url}/score", content=b"{").status_code == 422
        small = Image.new("RGB", (8, 8))
        sample = encode_sample(RewardSample(small, Image.new("L", (8, 8), 255), "x"))
        unknown = httpx.post(f"{srv.url}/score", json={"rewards": ["ocr"], "samples": [sample]})
        assert unknown.status_code == 400 and "ocr" in unknown.json()["detail"]
        ok = httpx.post(f"{srv.url}/score", json={"samples": [sample]})
        assert ok.json() == {"scores": {"brightness": [0.0]}}
    finally:
        srv.stop()


def test_nan_travels_as_null(good):
    s = samples(1)[0]
    s.source = None  # fidelity without a source: NaN on the server, null on the wire, NaN here
    body = {"rewards": ["fidelity"], "samples": [encode_sample(s)]}
    assert httpx.post(f"{good.url}/score", json=body).json() == {"scores": {"fidelity": [None]}}
    assert math.isnan(RemoteRewards([good.url], ["fidelity"]).score([s])["fidelity"][0])


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


# ---------------------------------------------------------------- the server command

def test_server_command_serves_and_rejects_bad_flags(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "calligrapher_rl.rewards.server"]
    bad = subprocess.run([*cmd, "--rewards", "ocr:0.5"], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--rewards" in bad.stderr
    bad = subprocess.run([*cmd, "--rewards", "nope"], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown reward 'nope'" in bad.stderr
    url = dead_url()
    port = url.rsplit(":", 1)[1]
    proc = subprocess.Popen([*cmd, "--port", port, "--rewards", "brightness,fidelity", "--log_level", "warning"],
                            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        remote = RemoteRewards([url], ["brightness", "fidelity"])
        deadline = time.time() + 30
        while True:
            try:
                remote.check_health()
                break
            except RewardError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
                time.sleep(0.1)
        out = remote.score(samples(2))
        assert np.isfinite(out["brightness"]).all() and np.isfinite(out["fidelity"]).all()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
