"""Every wait has an end: reward-failure pauses (Python API and command line), reward callables that never
return, a stop signal while the rewards are awaited, a signal that breaks a library while loading."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from test_library import config
from test_reliability import _wait

from calligrapher_rl.training import Trainer
from calligrapher_rl.training.run_dir import Interrupted, read_metrics, read_status

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(rl_warmup_steps=0, eval_steps=0, eval_at_start=False, use_ema=False, checkpointing_steps=1000)


def nothing(images, prompts, metadata):
    return [None] * len(images)


@pytest.mark.timeout(120)  # before: paused forever, waiting for a control file no API user knows
def test_python_api_reward_returning_none_ends_failed_at_once_without_control_files(tmp_path):
    out = tmp_path / "run"
    t0 = time.time()
    state = Trainer(config(out, max_train_steps=3, **FAST), rewards=[nothing]).run()
    status = read_status(str(out))
    assert state == "failed" and status["state"] == "failed" and time.time() - t0 < 100
    assert status["message"].startswith("100% of rewards failed") and "on_reward_failure='fail'" in status["message"]
    assert "\n" not in status["message"] and (out / "checkpoint-0" / "ip-adapter.safetensors").exists()


class HangOnce:
    """A reward whose first call never returns (until released); later calls score 0.5."""

    def __init__(self):
        self.entered, self.release, self.calls = threading.Event(), threading.Event(), 0
        self.__name__ = "hang"

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            self.release.wait()
        return [0.5 + 0.01 * i for i in range(len(images))]


@pytest.mark.timeout(120)  # before: `running` forever on the first call
def test_a_hung_reward_callable_is_cut_at_reward_timeout_and_a_callback_decides_the_pause(tmp_path):
    out, reward, asked = tmp_path / "run", HangOnce(), []

    def decide(trainer, message):  # continue; the hung call returns now, so the next epoch can score
        asked.append(message)
        reward.release.set()
        return True

    state = Trainer(config(out, max_train_steps=2, reward_timeout_s=1, **FAST), rewards=[reward],
                    on_reward_failure=decide).run()
    assert state == "finished" and len(asked) == 1 and asked[0].startswith("100% of rewards failed")
    rows = [r for r in read_metrics(str(out)) if r["phase"] == "rl"]
    steps = [r["step"] for r in rows]
    assert steps == [1, 2] and len(set(steps)) == len(steps)  # the failed epoch has no row of its own
    assert rows[0]["rl/retried_epochs"] == 1 and rows[0]["rl/epoch"] == 2


@pytest.mark.timeout(120)
def test_a_waiting_pause_ends_failed_after_pause_timeout_s(tmp_path):
    """The command line's policy ("wait"): nobody resumes, so the pause ends at --pause_timeout_s."""
    out = tmp_path / "run"
    state = Trainer(config(out, max_train_steps=3, pause_timeout_s=1, **FAST), rewards=[nothing],
                    on_reward_failure="wait").run()
    status = read_status(str(out))
    assert state == "failed" and "no resume within 1 s (--pause_timeout_s)" in status["message"]
    assert "resume (control/resume) or stop within 1 s (--pause_timeout_s)" in (out / "train.log").read_text()
    assert (out / "checkpoint-0" / "ip-adapter.safetensors").exists()


HUNG_SCRIPT = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_library import config
    from calligrapher_rl.training import Trainer

    def hang(images, prompts, metadata):
        Path({marker!r}).write_text("entered")
        threading.Event().wait()  # never returns

    state = Trainer(config({out!r}, max_train_steps=5, reward_timeout_s=600, rl_warmup_steps=1, eval_steps=0,
                           eval_at_start=False, use_ema=False, checkpointing_steps=1000), rewards=[hang]).run()
    print("state", state)
""")


@pytest.mark.timeout(180)  # before: `stopping` forever after the SIGTERM
def test_one_sigterm_ends_a_run_whose_reward_callable_never_returns(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "entered"
    script = HUNG_SCRIPT.format(tests=str(ROOT / "tests"), marker=str(marker), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait(marker.exists, "the reward call", proc)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        stdout, err = proc.communicate(timeout=60)
        assert time.time() - t0 < 60 and "state stopped" in stdout, err[-2000:]
        status = read_status(str(out))
        assert status["state"] == "stopped" and "signal while waiting for rewards" in status["message"]
        assert (out / f"checkpoint-{status['step']}").is_dir() and status["step"] == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class SignalledWhileLoading(list):
    """A dataset whose first read gets a SIGTERM and, like a half-built library object, reports it as its
    own AttributeError (what TensorBoard's tracker did: `'TensorBoardTracker' object has no attribute 'writer'`)."""

    def __getitem__(self, i):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait(30)
        except BaseException:  # noqa: BLE001 - the library under the signal
            raise AttributeError("'Tracker' object has no attribute 'writer'") from None
        raise AssertionError("the signal did not arrive")


def test_a_signal_while_loading_ends_stopped_whatever_error_it_caused(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupted, match="stopped by signal 15 while loading"):
        Trainer(config(out, **FAST), dataset=SignalledWhileLoading([{}]))
    status = read_status(str(out))
    assert status["state"] == "stopped" and status["message"].startswith("stopped by signal 15 while loading")
