"""Processes: launching a detached training run, and telling whether a recorded pid is still that run.

A pid is only ever trusted together with a time: the launch record keeps the process's own start time
(psutil's create_time), a trainer's status.json keeps when it started. A process whose start time does
not fit is another process that reused the pid; one whose start time cannot be told is unknown, and the
studio refuses to signal it (and says so) rather than guess.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import psutil

from calligrapher_rl.atomic import write_json
from calligrapher_rl.errors import UserError

STUDIO_FILE = "studio.json"
CONSOLE = "console.log"
_children: list[subprocess.Popen] = []  # processes this studio started (reaped so they never linger as zombies)
SAME_PROCESS_S = 1.0  # create_time of one process read twice differs by clock-tick rounding only
TRAINER_START_SLACK_S = 2.0  # a trainer writes its first status this long after its process was created, at most


def _reap() -> None:
    for p in list(_children):
        if p.poll() is not None:
            _children.remove(p)


def proc_start_time(pid) -> float | None:
    """Unix start time of a live, non-zombie process; None when there is none (or it cannot be read)."""
    _reap()
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        return proc.create_time()
    except (psutil.Error, OSError):
        return None


def same_process(pid, created: float | None = None, started: float | None = None) -> bool | None:
    """Is `pid` still the process that was recorded?  `created`: its own start time (launch record);
    `started`: when it began its run (status.json; the process is at most a little older).
    True / False, or None when it is alive but nothing recorded tells whether it is the same one."""
    t0 = proc_start_time(pid)
    if t0 is None:
        return False
    if created is not None:
        return abs(t0 - created) <= SAME_PROCESS_S
    if started is not None:
        return t0 <= started + TRAINER_START_SLACK_S
    return None


def pid_alive(pid, started: float | None = None, created: float | None = None) -> bool:
    """True if `pid` runs and is (as far as can be told) the recorded process; an unknown one counts as alive,
    so a run is never declared dead on a guess (signals check with same_process, which refuses unknowns)."""
    return same_process(pid, created, started) is not False


def signal_run(pid, sig: int = signal.SIGTERM, *, created: float | None = None, started: float | None = None,
               what: str = "the run's process") -> None:
    """Send `sig` to the recorded process (after checking it is that process) and to the processes it
    started. Its process group only when it leads one (a run the studio launched: start_new_session):
    a trainer started from a user's shell script shares that script's group, and the script and anything
    else in it must live on. UserError when it is another process (pid reused) or that cannot be told."""
    same = same_process(pid, created, started)
    if same is None:
        raise UserError(f"not signalling pid {pid}: no start time was recorded for {what}, so the studio "
                        "cannot tell whether that pid is still it")
    if not same:
        raise UserError(f"not signalling pid {pid}: it is no longer {what} (gone, or the pid now belongs to "
                        "another process)")
    try:
        if os.getpgid(pid) == pid:  # a group of its own: the run and every process it started
            os.killpg(pid, sig)
            return
        proc = psutil.Process(pid)
        started_by_it = proc.children(recursive=True)  # read before the signal: they are re-parented after
        proc.send_signal(sig)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return
    for child in started_by_it:
        try:
            child.send_signal(sig)
        except psutil.Error:  # gone meanwhile
            pass


def read_json(path: str) -> dict:
    """The object a JSON file holds; {} when it is missing, unreadable or not an object."""
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def launch_record(run_dir: str) -> dict:
    return read_json(os.path.join(run_dir, STUDIO_FILE))


def launch_created(launch: dict) -> float | None:
    """The launched process's own start time: recorded at launch; for older records, the Popen call's time
    brackets it (the process is created during that call)."""
    if isinstance(launch.get("created"), (int, float)):
        return float(launch["created"])
    return None


def launch_alive(launch: dict) -> bool:
    """The process in a launch record is still running (and is that process)."""
    if not launch:
        return False
    created = launch_created(launch)
    if created is not None:
        return same_process(launch.get("pid"), created=created) is True
    t0 = proc_start_time(launch.get("pid"))
    launched = launch.get("launched")
    # an old record without `created`: the process was created within the launching call
    return t0 is not None and isinstance(launched, (int, float)) and launched - SAME_PROCESS_S <= t0 <= launched + 30


def train_command(argv: list[str], gpus: str = "") -> list[str]:
    n = len(parse_gpus(gpus))
    if n > 1:
        # port 0: a free rendezvous port, so runs on different GPU sets never collide on accelerate's 29500
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
                "--main_process_port", "0", "-m", "calligrapher_rl.train", *argv]
    return [sys.executable, "-m", "calligrapher_rl.train", *argv]


def parse_gpus(gpus: str | None) -> list[int]:
    """'0,1' -> [0, 1]; '' -> [] (CPU, or whatever the environment gives)."""
    if not gpus or not gpus.strip():
        return []
    if not re.match(r"^\s*\d+(\s*,\s*\d+)*\s*$", gpus):
        raise UserError(f"GPUs: expected indices like 0 or 0,1, got {gpus!r}")
    out = [int(g) for g in gpus.split(",")]
    if len(set(out)) != len(out):
        raise UserError(f"GPUs: an index is repeated in {gpus!r}")
    return out


def default_gpu() -> int:
    """The physical index of the card a process started without CUDA_VISIBLE_DEVICES changes uses as `cuda`: the
    environment's first visible card (the studio's own, and that of a run launched with no GPUs)."""
    first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def machine_has_gpu() -> bool:
    """Whether this machine has a CUDA card (what decides where a run launched with no GPUs trains)."""
    import torch

    return torch.cuda.is_available()


def held_gpus(gpus: str | None) -> list[int]:
    """The cards a run launched with `gpus` holds: those given; with none given, the environment's first card when
    the machine has one (the trainer's default device is `cuda` there), else none (a CPU run). The queue and the
    studio's Inference tab ask this one rule."""
    given = parse_gpus(gpus)
    if given:
        return given
    return [default_gpu()] if machine_has_gpu() else []


def command_line(argv: list[str], gpus: str = "") -> str:
    cmd = train_command(argv, gpus)
    cmd[0] = "python"
    return (f"CUDA_VISIBLE_DEVICES={gpus.strip()} " if gpus and gpus.strip() else "") + shlex.join(cmd)


def _launch(run_dir: str, argv: list[str], gpus: str = "") -> int:
    os.makedirs(run_dir, exist_ok=True)
    cmd = train_command(argv, gpus)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if parse_gpus(gpus):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, parse_gpus(gpus)))
    launched = time.time()
    with open(os.path.join(run_dir, CONSOLE), "ab") as log:
        log.write(f"\n$ {command_line(argv, gpus)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, close_fds=True)
    _children.append(proc)
    created = proc_start_time(proc.pid)
    write_json(os.path.join(run_dir, STUDIO_FILE), {"pid": proc.pid, "created": created, "argv": cmd,
                                                    "launched": launched, "gpus": gpus, "host": socket.gethostname()})
    return proc.pid
