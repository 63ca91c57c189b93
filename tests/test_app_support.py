"""Shared helpers of the studio tests (no tests here): one real short training run per session, ports, waits.

pytest fixtures cannot be shared between test files without conftest.py, so the run is cached at module
level: every test_app* file that asks for it gets the same folder, trained once.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--max_train_steps", "4", "--eval_steps", "2", "--checkpointing_steps", "2",
         "--num_eval_noises", "2"]  # 8 eval samples: the preset's 64 cost ~5 s of OCR per evaluation
_cache: dict[str, tuple[str, str]] = {}
# Training processes of these tests run one OpenMP thread each: on a 2-core machine shared with the studio,
# the test process and a browser, two spinning threads per run made the tiny run up to 5x slower.
RUN_ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def single_thread_runs():
    """Runs launched while a test module uses this (by the studio, which passes its environment on) get
    RUN_ENV; the environment is restored afterwards."""
    old = {k: os.environ.get(k) for k in RUN_ENV}
    os.environ.update(RUN_ENV)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def trained_run() -> tuple[str, str]:
    """(runs_dir, run_dir) of a finished real run: `python -m calligrapher_rl.train --preset tiny-grpo`, 4 steps,
    grids at 0/2/4, checkpoints at 2 and 4. Built once per test session."""
    if "run" not in _cache:
        runs_dir = tempfile.mkdtemp(prefix="studio-test-runs-")
        atexit.register(shutil.rmtree, runs_dir, True)
        run_dir = os.path.join(runs_dir, "base")
        os.makedirs(run_dir)
        with open(os.path.join(run_dir, "console.log"), "wb") as log:
            subprocess.run([sys.executable, "-m", "calligrapher_rl.train", "--preset", "tiny-grpo", "--output_dir",
                            run_dir, *SHORT], stdout=log, stderr=subprocess.STDOUT, check=True, timeout=240, cwd=REPO,
                           env={**os.environ, **RUN_ENV})
        _cache["run"] = (runs_dir, run_dir)
    return _cache["run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 120.0, every: float = 0.3, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def kill_run(run_dir: str) -> None:
    """Test clean-up: end a run the studio launched if it is still alive (its own process group, and only if
    that pid is still the launched process by its start time, so a reused pid is never touched)."""
    from app.procs import launch_alive, launch_record

    launch = launch_record(run_dir)
    try:
        if launch_alive(launch) and os.getpgid(launch["pid"]) == launch["pid"]:
            os.killpg(launch["pid"], signal.SIGKILL)
    except (OSError, KeyError, TypeError):
        pass
