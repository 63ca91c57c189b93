"""Reward server + client end to end on loopback, against the local rewards: the server scores as they do
(through the trainer's `build_rewards` too), its health check names a reward it lacks, chunks fail over from a
dead URL to it, NaN travels as null; what it answers a hostile request (an oversized body or image, a PNG bomb,
deep JSON, a bad payload: 4xx, not retried by the client) or one without its token (401); and the server command.
Every server is a real uvicorn on 127.0.0.1, on a socket we bound: `Served`, which the other tests that serve
one import from here (as test_rewards_server_client.py and test_rewards_server_load.py do `dead_url`, `samples`,
`_b64png`)."""

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
from PIL import Image, ImageDraw, ImageFont

from calligrapher_rl.rewards import RewardError, RewardSample, build_rewards, make_reward
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
    health = httpx.get(f"{good.url}/health").json()
    assert health["status"] == "ok" and health["rewards"] == NAMES and health["queue"]["pending"] == 0
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

def test_health_check_names_a_reward_the_server_lacks(good):
    with pytest.raises(RewardError, match="does not serve style"):
        RemoteRewards([good.url], ["ocr", "style"]).check_health()


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


# ---------------------------------------------------------------- hostile clients

def _b64png(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _bomb_header(width: int, height: int) -> str:
    """A PNG whose header declares width x height; its few bytes of data decompress to nothing useful."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    raw += chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


class Counted:
    """ASGI wrapper counting POST /score requests (to see whether a client retried)."""

    def __init__(self, app):
        self.app, self.posts = app, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/score":
            self.posts += 1
        await self.app(scope, receive, send)


def test_pixel_caps_deep_json_and_bombs_are_4xx_with_one_line_and_not_retried(local):
    counted = Counted(create_app({"brightness": local["brightness"]}, max_request_bytes=16 << 20))
    srv = Served(counted)
    try:
        small = Image.new("L", (8, 8), 255)
        big = Image.new("L", (8000, 8000))  # 64 Mpx of zeros: a 60 KB PNG that decodes to 192 MB of RGB
        r = httpx.post(f"{srv.url}/score", json={"samples": [{"image": _b64png(big), "mask": _b64png(big),
                                                              "text": "x"}]}, timeout=60)
        assert r.status_code == 413 and "8000x8000" in r.json()["detail"] and "\n" not in r.json()["detail"]
        bomb = {"samples": [{"image": _bomb_header(30000, 30000), "mask": _b64png(small), "text": "x"}]}
        r = httpx.post(f"{srv.url}/score", json=bomb)  # beyond PIL's own bomb limit: refused from the header
        assert r.status_code == 413 and "pixels" in r.json()["detail"]
        many = {"samples": [{"image": _b64png(Image.new("RGB", (4000, 4000))), "mask": _b64png(Image.new("L", (4000, 4000))),
                             "text": "x"}] * 3}  # each image under the cap, the request over it
        r = httpx.post(f"{srv.url}/score", json=many, timeout=60)
        assert r.status_code == 413 and "request's images" in r.json()["detail"]
        deep = httpx.post(f"{srv.url}/score", content=b"[" * 50_000 + b"]" * 50_000)
        assert deep.status_code == 422 and deep.json()["detail"] == "body: JSON nested too deeply"
        assert httpx.get(f"{srv.url}/health").status_code == 200

        before = counted.posts  # the client: a 4xx is the request's fault, asked once, then NaN
        counted_tight = Counted(create_app({"brightness": local["brightness"]}, max_image_pixels=100))
        srv2 = Served(counted_tight)
        try:
            t0 = time.time()
            out = RemoteRewards([srv2.url], ["brightness"], retries=3, backoff_s=2).score(samples(1))
            assert np.isnan(out["brightness"]).all() and counted_tight.posts == 1 and time.time() - t0 < 2
        finally:
            srv2.stop()
        assert counted.posts == before
    finally:
        srv.stop()


def test_a_token_is_required_and_compared_and_the_client_sends_the_environment_s(local, monkeypatch):
    """Before: no authentication, any local user could use (and keep busy) the OCR server."""
    monkeypatch.delenv("CALLIGRAPHER_REWARD_TOKEN", raising=False)
    served = Served(create_app({"fidelity": local["fidelity"]}, token="s3cret-token"))
    try:
        assert httpx.get(f"{served.url}/health").status_code == 401
        assert httpx.get(f"{served.url}/health", headers={"Authorization": "Bearer s3cret-tokeN"}).status_code == 401
        body = {"samples": [encode_sample(s) for s in samples(1)]}
        denied = httpx.post(f"{served.url}/score", json=body)
        assert denied.status_code == 401 and "token" in denied.json()["detail"]
        anonymous = RemoteRewards(served.url, ["fidelity"], retries=2)
        with pytest.raises(RewardError, match="refused the token: set CALLIGRAPHER_REWARD_TOKEN"):
            anonymous.check_health()
        assert np.isnan(anonymous.score(samples(2))["fidelity"]).all()  # 401: not retried, NaN
        monkeypatch.setenv("CALLIGRAPHER_REWARD_TOKEN", "s3cret-token")
        client = RemoteRewards(served.url, ["fidelity"])
        client.check_health()
        assert np.isfinite(client.score(samples(2))["fidelity"]).all()
        assert client.client.get(f"{served.url}/health").json()["queue"]["pending"] == 0
    finally:
        served.stop()


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
