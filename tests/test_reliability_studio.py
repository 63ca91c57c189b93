"""The studio's Stop touches only its own run: a trainer started from a user's shell script shares that
script's process group, and Stop must leave the script (and whatever else it runs) alive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from test_reliability_signals import HungServer

from app import runs
from calligrapher_rl.training.run_dir import read_status

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """\
sleep 300 &
echo $! > "$1/sleep.pid"
"$2" -m calligrapher_rl.train --preset tiny-grpo --output_dir "$1/run" --resolution 32 --num_style_tokens 8 \\
    --rl_num_inference_steps 4 --eval_steps 0 --rewards fidelity --reward_server_url "$3"
echo $? > "$1/trainer.rc"
wait
"""


def test_studio_stop_of_a_shell_started_run_leaves_the_shell_and_its_other_processes_alive(tmp_path):
    """Before: the studio signalled the trainer's whole process group, i.e. the user's script and its
    `sleep`; the page then said 'only a dead run can be marked stopped'."""
    server, out = HungServer(hang="health"), tmp_path / "run"  # its health check keeps the run `starting`
    (tmp_path / "train.sh").write_text(SCRIPT)
    log = tmp_path / "shell.log"  # a file, not a pipe: nobody reads it while the trainer writes
    with open(log, "wb") as fh:
        shell = subprocess.Popen(["bash", str(tmp_path / "train.sh"), str(tmp_path), sys.executable, server.url],
                                 cwd=ROOT, start_new_session=True, stdout=fh, stderr=subprocess.STDOUT)

    def wait(cond, what, timeout=180):
        deadline = time.time() + timeout
        while not cond():
            assert shell.poll() is None, f"the script ended while waiting for {what}: {log.read_text()[-2000:]}"
            assert time.time() < deadline, f"timed out waiting for {what}: {log.read_text()[-2000:]}"
            time.sleep(0.1)

    try:
        wait(lambda: server.entered.is_set() and (read_status(str(out)) or {}).get("state") == "starting",
             "the run loading")
        assert runs.run_info(str(out))["state"] == "starting"
        assert runs.stop_run(str(out)) == "stopped while loading"
        wait((tmp_path / "trainer.rc").exists, "the trainer's exit")
        assert (tmp_path / "trainer.rc").read_text().strip() == str(128 + signal.SIGTERM)
        status = read_status(str(out))
        assert status["state"] == "stopped" and status["message"].startswith("stopped by signal 15 while loading")
        assert runs.run_info(str(out))["state"] == "stopped"
        sleeper = int((tmp_path / "sleep.pid").read_text())
        assert shell.poll() is None and psutil.pid_exists(sleeper) and psutil.Process(sleeper).status() != "zombie"
    finally:
        try:
            os.killpg(shell.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shell.wait()
        server.stop()
