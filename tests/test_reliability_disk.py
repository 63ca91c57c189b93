"""A disk that fills up, or turns read-only, under a running trainer (a small tmpfs; needs root).

Full: the failure handler's own atomic write gets no space, so status.json is rewritten in place and
says `failed` with the cause; the command exits non-zero with one line. When not even that works (no
status.json left to rewrite, the disk full), stderr says the final status could not be recorded,
and the exit code is non-zero."""

from __future__ import annotations

import os
import re
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


def _run_until_first_step(out, *extra):
    proc = subprocess.Popen(
        [sys.executable, "-m", "calligrapher_rl.train", "--preset", "tiny-grpo", "--output_dir", str(out),
         "--resolution", "32", "--rl_num_inference_steps", "4", "--num_style_tokens", "8", "--eval_steps", "0",
         "--rl_warmup_steps", "1", "--max_train_steps", "100000", "--checkpointing_steps", "100000", *extra],
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
        assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
        assert re.match(rf"error: no space left on tmpfs {out}/\S+, needs ~[\d.]+ GB \([\d.]+ GB free on {small_disk}\)$",
                        errors[0]), errors[0]
        status = read_status(str(out))
        assert status["state"] == "failed" and status["message"] == errors[0][len("error: "):]
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
        assert "could not record the final status 'failed'" in err and "no space left on" in err, err[-3000:]
        assert (out / "status.json").is_dir() and not any((out / "status.json").iterdir())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _leave_free(folder: Path, free_bytes: int) -> None:
    """Fill the disk, then give `free_bytes` back."""
    _fill(folder)
    filler = max(folder.glob("filler-*"), key=lambda p: p.stat().st_size)
    os.truncate(filler, max(0, filler.stat().st_size - free_bytes))


def test_disk_full_while_saving_a_checkpoint_names_the_disk_not_torch(small_disk):
    """Room for metrics and status, none for the ~6 MB checkpoint: before, torch's `RuntimeError: [enforce
    fail at inline_container.cc:672] ... file write failed` (or safetensors' IoError) with a traceback."""
    out = small_disk / "run"
    proc = _run_until_first_step(out, "--checkpointing_steps", "2")
    try:
        proc.send_signal(signal.SIGSTOP)  # the disk is filled between two steps
        try:
            _leave_free(small_disk, 1 << 20)
        finally:
            proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "Traceback" not in err and "enforce fail" not in err, err[-3000:]
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: no space left on tmpfs {out}/checkpoint-2, needs ~")
        status = read_status(str(out))
        assert status["state"] == "failed" and status["message"].startswith("no space left on tmpfs")
        assert not (out / "checkpoint-2").exists() and not list(out.glob(".checkpoint-2*"))  # no half checkpoint
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_torch_and_safetensors_write_failures_are_translated(small_disk):
    import torch
    from safetensors.torch import save_file

    from calligrapher_rl.disk import DiskFull, writing

    big = torch.zeros(5 << 20)  # 20 MB on a 16 MB disk
    for name, save in (("t.pt", lambda p: torch.save(big, p)), ("t.safetensors", lambda p: save_file({"w": big}, p))):
        path = small_disk / name
        with pytest.raises(DiskFull, match=rf"^no space left on tmpfs {path}, needs ~0.02 GB \(0.\d\d GB free on "):
            with writing(str(path), big.numel() * 4):
                save(str(path))
        path.unlink(missing_ok=True)


def test_a_checkpoint_that_would_not_fit_in_ram_on_tmpfs_fails_in_one_line_before_writing(tmp_path, monkeypatch):
    """A run folder on tmpfs (/dev/shm) is RAM: a checkpoint larger than the memory the machine has available
    would get the process killed mid-write (SIGKILL, no status). It is refused before writing instead, in one
    line naming the RAM; the run ends `failed`. (The available memory is set low: this machine has plenty.)"""
    import psutil

    from calligrapher_rl.config_parse import parse_args
    from calligrapher_rl.disk import DiskFull, check_memory_backed_room, fstype_of
    from calligrapher_rl.training.trainer import Trainer

    if fstype_of("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    with pytest.raises(DiskFull, match=r"needs ~42\.00 GB, 20\.50 GB available"):
        check_memory_backed_room("/dev/shm/run/checkpoint-6", 30e9, 12e9, available=20.5e9)
    check_memory_backed_room(str(tmp_path / "checkpoint-6"), 30e9, 12e9, available=20.5e9)  # a disk: not RAM

    out = Path("/dev/shm") / f"calligrapher-test-{os.getpid()}-{tmp_path.name}"
    try:
        low = psutil.virtual_memory()._replace(available=1000)
        monkeypatch.setattr(psutil, "virtual_memory", lambda: low)
        tr = Trainer(parse_args(["--preset", "tiny-grpo", "--output_dir", str(out), "--resolution", "32",
                                 "--rl_num_inference_steps", "4", "--num_style_tokens", "8", "--eval_steps", "0",
                                 "--eval_at_start", "false", "--rl_warmup_steps", "1", "--max_train_steps", "1",
                                 "--report_to", "none"]))
        with pytest.raises(DiskFull):  # the CLI turns it into its one `error:` line
            tr.run()
        status = read_status(str(out))
        assert status["state"] == "failed"
        assert re.match(rf"not enough memory to write {out}/checkpoint-1 into tmpfs \(RAM\): needs ~0\.01 GB, "
                        r"0\.00 GB available; put --output_dir on a disk or free memory$", status["message"]), status
        assert not list(out.glob("checkpoint-1*"))  # nothing half-written
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
