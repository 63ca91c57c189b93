"""The reward server under load: /health answers within 100 ms while big requests decode (in worker threads),
a slow-loris flood of 1,030 connections under a 1,024-file limit is survived, and one client's burst cannot fill
the queue (429 beyond its share; /health shows the queue's depth). The flood tests run the server as its own
process, as in use (`_server_process`)."""

from __future__ import annotations

import base64
import io
import json
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
from PIL import Image
from test_rewards_server import Served, _b64png, dead_url, samples

from calligrapher_rl.rewards import Reward
from calligrapher_rl.rewards.client import encode_sample
from calligrapher_rl.rewards.server import create_app


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


class Gate(Reward):
    """Scores 1.0 once the gate opens; counts the calls that entered."""

    def __init__(self):
        self.open, self.entered = threading.Event(), 0

    def score(self, samples):
        self.entered += 1
        self.open.wait(60)
        return [1.0] * len(samples)


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
