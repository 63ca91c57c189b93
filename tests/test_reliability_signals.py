"""Signals against a run stuck on a reward server, in a step, and while it loads.

The first SIGTERM/SIGINT ends a wait for rewards at once (the epoch's rollouts are dropped), else finishes
the current step; then it saves and stops (exit 128 + signal). A second one exits at once without saving.
Either way status.json ends `stopped`, never `running` with a dead pid. A hung reward call alone is cut at
--reward_timeout_s."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from test_reliability import _wait  # the one wait-on-state helper of the run tests
from test_rewards_server import Served

from calligrapher_rl.training.run_dir import read_metrics, read_status, request_stop

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


def test_a_hung_reward_call_is_cut_at_reward_timeout_and_1e308_scores_pause(tmp_path):
    """The first reward call never returns: it is cut at --reward_timeout_s, retried, and the retries get
    1e308 for every sample. Those count as failed, so the epoch pauses instead of training on them; a stop
    request ends the run with a checkpoint."""
    server, out = HungServer(hang="first"), tmp_path / "run"
    proc = _start(out, server.url, "--reward_timeout_s", "1")
    try:
        _wait(lambda: _state(out) == "paused", "the pause", proc)
        assert "100% of rewards failed" in read_status(str(out))["message"]  # 1e308 = failed
        request_stop(str(out))
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        status = read_status(str(out))
        assert status["state"] == "stopped" and (out / f"checkpoint-{status['step']}" / "ip-adapter.safetensors").exists()
        assert not [r for r in read_metrics(str(out)) if r["phase"] == "rl"]  # nothing trained on them
        assert server.calls > 1 and not server.release.is_set()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()


def test_hung_reward_first_signal_ends_the_wait_at_once_with_a_checkpoint(tmp_path):
    """Before: `stopping` until the hung call's timeout (a minute by default; forever for a Python callable)."""
    server, out = HungServer(), tmp_path / "run"
    proc = _start(out, server.url)  # --reward_timeout_s 60 (the default)
    try:
        _wait(server.entered.is_set, "the first reward call", proc)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=50)
        assert time.time() - t0 < 50 and proc.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
        status = read_status(str(out))
        assert status["state"] == "stopped" and "signal while waiting for rewards" in status["message"]
        assert (out / f"checkpoint-{status['step']}" / "ip-adapter.safetensors").exists()
        assert not server.release.is_set()  # it was still hung: nothing waited for it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()


BLOCKED_SCRIPT = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_library import config
    from calligrapher_rl.training import Trainer, TrainerCallback

    class Block(TrainerCallback):  # a step that does not end (here: a callback that hangs)
        def on_step_end(self, trainer, step, phase, metrics):
            Path({marker!r}).write_text("blocked")
            threading.Event().wait()

    Trainer(config({out!r}, max_train_steps=5, rl_warmup_steps=1, eval_steps=0, eval_at_start=False),
            rewards=["fidelity"], callbacks=[Block()]).run()
""")


def test_a_second_signal_exits_at_once_with_a_final_status(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "blocked"
    script = BLOCKED_SCRIPT.format(tests=str(ROOT / "tests"), marker=str(marker), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait(marker.exists, "the blocked step", proc)
        proc.send_signal(signal.SIGTERM)
        _wait(lambda: _state(out) == "stopping", "status stopping", proc)
        assert "signal 15: stopping after the current step" in read_status(str(out))["message"]
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert time.time() - t0 < 30 and proc.returncode == 128 + signal.SIGINT
        status = read_status(str(out))
        assert status["state"] == "stopped" and "second signal (2) without saving" in status["message"]
        assert "no checkpoint yet" in status["message"]  # checkpoint-0 (the start) is not one to resume from
        assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-0"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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
