"""Signals against a run stuck on a reward server, and while it loads.

The first SIGTERM/SIGINT finishes the current step (its hung reward call ends at --reward_timeout_s),
saves and stops; a second one exits at once without saving and without waiting for the call.
Either way status.json ends `stopped`, never `running` with a dead pid."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from test_reliability import _wait  # the one wait-on-state helper of the run tests
from test_rewards_server import Served

from calligrapher_rl.training.run_dir import read_metrics, read_status

ROOT = Path(__file__).resolve().parents[1]


class HungServer:
    """Healthy at start. hang="score": every /score blocks until released; "first": only the first one
    does, the others (the client's retries included) answer at once; "health": /health blocks. Every
    answered score is 1e308: a broken scorer whose numbers look finite."""

    def __init__(self, hang: str = "score"):
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls = 0
        app = FastAPI()

        @app.get("/health")
        def health():
            if hang == "health":
                self.entered.set()
                self.release.wait(120)
            return {"status": "ok", "rewards": ["fidelity"]}

        @app.post("/score")
        async def score(request: Request):
            n = len((await request.json())["samples"])
            self.calls += 1
            if hang == "score" or (hang == "first" and self.calls == 1):
                self.entered.set()
                while not self.release.is_set():  # async: the server keeps answering while this one hangs
                    await _sleep(0.05)
            return {"scores": {"fidelity": [1e308] * n}}

        self.served = Served(app)
        self.url = self.served.url

    def stop(self):
        self.release.set()
        self.served.stop()


async def _sleep(s):
    import asyncio

    await asyncio.sleep(s)


def _start(out, url, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "calligrapher_rl.train", "--preset", "tiny-grpo", "--output_dir", str(out),
         "--resolution", "32", "--rl_num_inference_steps", "4", "--num_style_tokens", "8", "--eval_steps", "0",
         "--rl_warmup_steps", "1", "--max_train_steps", "1000", "--checkpointing_steps", "1000",
         "--rewards", "fidelity", "--reward_server_url", url, *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _state(out):
    return (read_status(str(out)) or {}).get("state")


def test_hung_reward_first_signal_stops_after_the_step_and_failed_scores_pause(tmp_path):
    """The first reward call never returns: it is cut at --reward_timeout_s, retried, and the retries get
    1e308 for every sample. Those count as failed, so the epoch pauses instead of training on them, and
    the pending stop request ends the run with a checkpoint."""
    server, out = HungServer(hang="first"), tmp_path / "run"
    proc = _start(out, server.url, "--reward_timeout_s", "1")
    try:
        _wait(server.entered.is_set, "the first reward call", proc)
        proc.send_signal(signal.SIGTERM)
        _wait(lambda: _state(out) == "stopping", "status stopping", proc)
        assert "signal 15: stopping after the current step" in read_status(str(out))["message"]
        _, err = proc.communicate(timeout=120)  # the hung call is never released: its timeout ends it
        assert proc.returncode == 0, err[-2000:]
        status = read_status(str(out))
        assert status["state"] == "stopped" and "100% of rewards failed" in status["message"]  # 1e308 = failed
        assert (out / f"checkpoint-{status['step']}" / "ip-adapter.safetensors").exists()
        assert not [r for r in read_metrics(str(out)) if r["phase"] == "rl"]  # nothing trained on them
        assert server.calls > 1 and not server.release.is_set()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()


def test_hung_reward_second_signal_exits_at_once_with_a_final_status(tmp_path):
    server, out = HungServer(), tmp_path / "run"
    proc = _start(out, server.url)
    try:
        _wait(server.entered.is_set, "the first reward call", proc)
        proc.send_signal(signal.SIGTERM)
        _wait(lambda: _state(out) == "stopping", "status stopping", proc)
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert time.time() - t0 < 30 and proc.returncode == 128 + signal.SIGINT
        status = read_status(str(out))
        assert status["state"] == "stopped" and "second signal (2) without saving" in status["message"]
        assert "no checkpoint yet" in status["message"]  # checkpoint-0 (the start) is not one to resume from
        assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-0"]
        assert not server.release.is_set()  # it was still hung: nothing waited for it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()


def test_sigterm_while_loading_ends_at_once_with_status_stopped(tmp_path):
    server, out = HungServer(hang="health"), tmp_path / "run"  # the health check is part of loading
    proc = _start(out, server.url)
    try:
        _wait(lambda: server.entered.is_set() and _state(out) == "starting", "loading", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
        assert err.strip().splitlines()[-1].startswith("stopped by signal 15 while loading")
        status = read_status(str(out))
        assert status["state"] == "stopped" and status["message"].startswith("stopped by signal 15 while loading")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()
