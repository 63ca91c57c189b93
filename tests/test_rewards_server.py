"""Reward server + client end to end on loopback, failure modes included, and the VLM judge against a
fake OpenAI-compatible server. Every server is a real uvicorn on 127.0.0.1, on a socket we bound."""

from __future__ import annotations

import base64
import io
import json
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


# ---------------------------------------------------------------- hostile clients and broken servers

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


def test_health_answers_within_100_ms_while_big_requests_decode():
    """Three clients keep posting 6 images of 1400x1400 each; /health stays fast because parsing and
    decoding run in worker threads. The server is a separate process, as in use (no shared GIL with the
    load generator)."""
    size = 1400
    a = (np.add.outer(np.arange(size), np.arange(size)) % 251).astype(np.uint8)
    a = np.stack([a, a.T, a // 2], -1)
    a[::7] = np.random.default_rng(0).integers(0, 255, a[::7].shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=1)
    sample = {"image": base64.b64encode(buf.getvalue()).decode(), "mask": _b64png(Image.new("L", (size, size), 255)),
              "text": "x"}
    raw = json.dumps({"rewards": ["brightness"], "samples": [sample] * 6}).encode()
    proc, url = _server_process("brightness")
    stop, errors, latencies = threading.Event(), [], []

    def load():
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                r = c.post(f"{url}/score", content=raw, headers={"content-type": "application/json"})
                if r.status_code != 200:
                    errors.append(r.text)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        with httpx.Client(timeout=30) as c:
            while len(latencies) < 60:
                t0 = time.perf_counter()
                assert c.get(f"{url}/health").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.03)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        proc.terminate()
        proc.wait(timeout=10)
    assert not errors, errors[:1]
    latencies.sort()
    assert latencies[len(latencies) // 2] < 0.1 and latencies[int(0.9 * len(latencies))] < 0.25, latencies


def _server_process(rewards: str, *extra, nofile: int | None = None):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    url = dead_url()

    def limit():
        if nofile:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = subprocess.Popen([sys.executable, "-m", "calligrapher_rl.rewards.server", "--port", url.rsplit(":", 1)[1],
                             "--rewards", rewards, "--log_level", "critical", *extra], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=limit)
    deadline = time.time() + 60
    while True:
        try:
            httpx.get(f"{url}/health", timeout=2)
            return proc, url
        except httpx.HTTPError:
            assert proc.poll() is None and time.time() < deadline, "the reward server did not start"
            time.sleep(0.1)


def test_server_survives_1030_slow_loris_connections_under_a_1024_file_limit():
    """1,030 connections that never finish their headers, against a server allowed 1,024 open files: it
    evicts the oldest header-less connections (so /health is answered during the flood), closes every
    one of them at the header deadline (10 s by default), and answers at once afterwards."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
        except (ValueError, OSError):
            pytest.skip(f"this test process may open only {soft} files; the flood needs 1,030")
    proc, url = _server_process("brightness", nofile=1024)
    port = int(url.rsplit(":", 1)[1])
    flood = []
    try:
        for _ in range(1030):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # ...and never the blank line that ends the headers
            flood.append(s)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # during the flood
        for s in flood:
            s.setblocking(False)
        deadline = time.time() + 40
        while True:
            open_ = 0
            for s in flood:
                try:
                    open_ += s.recv(1) != b""
                except BlockingIOError:
                    open_ += 1
                except OSError:
                    pass
            if not open_:
                break
            assert time.time() < deadline, f"{open_} slow connections still open"
            time.sleep(0.5)
        t0 = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert time.perf_counter() - t0 < 1.0
        assert proc.poll() is None
    finally:
        for s in flood:
            s.close()
        proc.terminate()
        proc.wait(timeout=10)


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


class Gate(Reward):
    """Scores 1.0 once the gate opens; counts the calls that entered."""

    def __init__(self):
        self.open, self.entered = threading.Event(), 0

    def score(self, samples):
        self.entered += 1
        self.open.wait(60)
        return [1.0] * len(samples)


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


def test_one_client_cannot_fill_the_queue_and_health_shows_its_depth():
    """Before: one client's burst took every --max_pending slot and the others got 503s."""
    gate = Gate()
    served = Served(create_app({"fidelity": gate}, max_busy=1, max_pending=8, max_per_client=2))
    body = {"samples": [encode_sample(s) for s in samples(1)]}
    answers = []

    def post(local_address="127.0.0.1"):
        with httpx.Client(transport=httpx.HTTPTransport(local_address=local_address), timeout=60) as c:
            answers.append((local_address, c.post(f"{served.url}/score", json=body).status_code))

    def queue():
        return httpx.get(f"{served.url}/health").json()["queue"]

    threads = [threading.Thread(target=post) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while queue()["pending"] < 2 or gate.entered < 1:  # both waiting, one of them inside the scorer
            assert time.time() < deadline, queue()
            time.sleep(0.02)
        assert queue() == {"pending": 2, "busy": 1, "max_pending": 8, "max_busy": 1, "max_per_client": 2}
        third = httpx.post(f"{served.url}/score", json=body)  # the same client, over its share: at once
        assert third.status_code == 429 and "limit 2, --max_per_client" in third.json()["detail"]
        other = threading.Thread(target=post, args=("127.0.0.2",))  # another client still gets in
        other.start()
        threads.append(other)
        while queue()["pending"] < 3:
            assert time.time() < deadline, queue()
            time.sleep(0.02)
        gate.open.set()
        for t in threads:
            t.join(60)
        assert sorted(answers) == [("127.0.0.1", 200), ("127.0.0.1", 200), ("127.0.0.2", 200)]
        assert queue()["pending"] == 0 and queue()["busy"] == 0
    finally:
        gate.open.set()
        served.stop()
