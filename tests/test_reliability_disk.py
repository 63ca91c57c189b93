"""A disk that fills up, or turns read-only, under a running trainer (a small tmpfs; needs root).

Full: the failure handler's own atomic write gets no space, so status.json is rewritten in place and
says `failed` with the cause; the command exits non-zero with one line. When not even that works (no
status.json left to rewrite, the disk full), stderr says the final status could not be recorded,
and the exit code is non-zero."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calligrapher_rl.training.run_dir import read_metrics, read_status

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _run_until_first_step(out):
    proc = subprocess.Popen(
        [sys.executable, "-m", "calligrapher_rl.train", "--preset", "tiny-grpo", "--output_dir", str(out),
         "--resolution", "32", "--rl_num_inference_steps", "4", "--num_style_tokens", "8", "--eval_steps", "0",
         "--rl_warmup_steps", "1", "--max_train_steps", "100000", "--checkpointing_steps", "100000"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not read_metrics(str(out)):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "no step within 180 s"
        time.sleep(0.1)
    return proc


def _fill(folder: Path) -> None:
    with open(folder / f"filler-{len(list(folder.glob('filler-*')))}", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 16))
                fh.flush()
        except OSError:
            pass


def test_disk_full_mid_run_leaves_status_failed_and_one_line(small_disk):
    out = small_disk / "run"
    proc = _run_until_first_step(out)
    try:
        _fill(small_disk)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err[-2000:]
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in err, err[-3000:]
        status = read_status(str(out))
        assert status["state"] == "failed" and "No space left on device" in status["message"]
        assert status["pid"] == proc.pid
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_when_even_the_in_place_status_write_fails_stderr_says_so(small_disk):
    out = small_disk / "run"
    proc = _run_until_first_step(out)
    try:
        proc.send_signal(signal.SIGSTOP)  # hold it still while the disk is taken from under it
        try:
            _fill(small_disk)
            # nothing left to rewrite in place: a folder where status.json was. (Unlinking it and filling the
            # freed page was a race: a temporary file the run removes after a failed write frees pages again.)
            (out / "status.json").unlink()
            (out / "status.json").mkdir()
            _fill(small_disk)
        finally:
            proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err[-2000:]
        assert "could not record the final status 'failed'" in err and "No space left on device" in err, err[-3000:]
        assert (out / "status.json").is_dir() and not any((out / "status.json").iterdir())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
