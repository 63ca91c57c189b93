"""Processes: launching a detached training run and telling whether a recorded pid is still that run.

Used by runs.py (which owns the run-folder side: status, start, stop, resume).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time

from calligrapher_rl.atomic import write_json
from calligrapher_rl.errors import UserError

STUDIO_FILE = "studio.json"
CONSOLE = "console.log"
_children: list[subprocess.Popen] = []  # processes this studio started (reaped so they never linger as zombies)


def _reap() -> None:
    for p in list(_children):
        if p.poll() is not None:
            _children.remove(p)


def _proc_start_time(pid: int) -> float | None:
    """Unix start time of a process (Linux /proc), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/stat", encoding="utf-8") as fh:
            btime = next(float(line.split()[1]) for line in fh if line.startswith("btime"))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def pid_alive(pid, started: float | None = None) -> bool:
    """True if the process exists, is not a zombie, and (when `started` is known) is not a newer process
    that reused the pid: a run's process starts before it writes its first status."""
    _reap()
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
    except (OSError, IndexError):
        pass
    if started:
        t0 = _proc_start_time(pid)
        if t0 is not None and t0 > started + 2.0:
            return False
    return True


def train_command(argv: list[str], gpus: str = "") -> list[str]:
    n = len([g for g in gpus.split(",") if g.strip()]) if gpus else 0
    if n > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n), "-m",
                "calligrapher_rl.train", *argv]
    return [sys.executable, "-m", "calligrapher_rl.train", *argv]


def command_line(argv: list[str], gpus: str = "") -> str:
    cmd = train_command(argv, gpus)
    cmd[0] = "python"
    return (f"CUDA_VISIBLE_DEVICES={gpus.strip()} " if gpus and gpus.strip() else "") + shlex.join(cmd)


def _launch(run_dir: str, argv: list[str], gpus: str = "") -> int:
    os.makedirs(run_dir, exist_ok=True)
    cmd = train_command(argv, gpus)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gpus and gpus.strip():
        if not re.match(r"^\s*\d+(\s*,\s*\d+)*\s*$", gpus):
            raise UserError(f"GPUs: expected indices like 0 or 0,1, got {gpus!r}")
        env["CUDA_VISIBLE_DEVICES"] = gpus.replace(" ", "")
    launched = time.time()
    with open(os.path.join(run_dir, CONSOLE), "ab") as log:
        log.write(f"\n$ {command_line(argv, gpus)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, close_fds=True)
    _children.append(proc)
    write_json(os.path.join(run_dir, STUDIO_FILE), {"pid": proc.pid, "argv": cmd, "launched": launched,
                                                    "gpus": gpus, "host": socket.gethostname()})
    return proc.pid
