"""Runs as processes and folders: list, status (with dead-process detection), start, stop, resume.

Pure functions over run directories (see calligrapher_rl/training/run_dir.py); procs.py launches processes,
run_files.py reads a run's files (console tail, metrics.jsonl, sample grids, checkpoint files).
A run is a detached `python -m calligrapher_rl.train` process (own session, output in console.log):
it outlives the browser tab and the studio. The studio adds one file of its own, `studio.json`
(the launch command, pid and time), so a process that dies before writing status.json is still seen.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from datetime import datetime

from calligrapher_rl.atomic import write_json
from calligrapher_rl.errors import UserError
from calligrapher_rl.training.checkpointing import list_checkpoints
from calligrapher_rl.training.run_dir import read_status, request_resume, request_stop

from .procs import (
    CONSOLE,
    STUDIO_FILE,
    _launch,
    launch_alive,
    launch_record,
    pid_alive,
    read_json,
    same_process,
    signal_run,
)
from .run_files import last_value, metrics, seconds_per_step, tail

LIVE = ("launching", "starting", "running", "paused", "stopping")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
RESERVED = {"presets"}


# ---------------------------------------------------------------------------------------------- paths
def confine(path: str, roots: list[str], what: str = "path") -> str:
    """The real path of `path` if it lies inside one of `roots`; otherwise a one-line UserError."""
    real = os.path.realpath(os.path.expanduser(str(path)))
    for root in roots:
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return real
    raise UserError(f"{what} must lie inside {' or '.join(roots)}", where=str(path))


def check_name(name: str, what: str = "run name") -> str:
    name = (name or "").strip()
    if not NAME_RE.match(name) or name in RESERVED:
        raise UserError(f"{what} {name!r}: use letters, digits, '.', '_' or '-' (at most 80, not 'presets')")
    return name


def run_path(runs_dir: str, name: str) -> str:
    return confine(os.path.join(runs_dir, check_name(name)), [runs_dir], "run folder")


# ---------------------------------------------------------------------------------------------- status
def run_config(run_dir: str) -> dict:
    return read_json(os.path.join(run_dir, "run.json"))


def run_info(run_dir: str) -> dict:
    """Everything the list and the monitor show about one run, with the effective state:
    `dead` when the status says live but the process is gone (`was` keeps the recorded state),
    `launching` while a process the studio started has not written its status yet,
    `stopping` as soon as a stop was requested, `failed` when it died before writing any status.
    `exiting`: it has ended but its process still exists (a trainer frees its CUDA memory only as it exits)."""
    status = read_status(run_dir) or {}
    launch = launch_record(run_dir)
    cfg = run_config(run_dir)
    recorded = status.get("state")
    state, message = recorded, status.get("message", "")
    here = status.get("host") in (None, socket.gethostname())
    launched_alive = launch_alive(launch)
    waiting = os.path.exists(os.path.join(run_dir, "queued.json"))
    if waiting and not status and not launched_alive:
        state, message = "queued", "waits for its GPUs (a run holds them); starts when they are free"
    elif launch and launched_alive and (not status or status.get("updated", 0) < launch.get("launched", 0)):
        state, message = "launching", "process started, loading"
    elif recorded is None:
        state = "failed" if launch else "unknown"
        message = (tail(os.path.join(run_dir, CONSOLE), 1) or "no status.json") if launch else "no status.json"
    elif recorded in LIVE and here and not pid_alive(status.get("pid"), status.get("started")) \
            and not launched_alive:
        last = tail(os.path.join(run_dir, CONSOLE), 1).strip()
        state = "failed" if last.startswith("error:") else "dead"  # the trainer's one-line user error
        message = last[:300] if state == "failed" else (
            f"the process (pid {status.get('pid')}) is gone without writing a final state"
            + (f"; its last output: {last[:300]}" if last else ": killed, out of memory, or a reboot"))
    elif recorded in ("running", "paused") and os.path.exists(os.path.join(run_dir, "control", "stop")):
        state, message = "stopping", "stop requested: the run saves a checkpoint after the current step"
    rows = metrics(run_dir)
    ckpts = list_checkpoints(run_dir)
    started = status.get("started") or launch.get("launched")
    return {
        "name": os.path.basename(os.path.normpath(run_dir)), "path": run_dir, "state": state, "was": recorded,
        "message": message or "", "step": status.get("step", 0), "max_steps": cfg.get("max_train_steps"),
        "method": cfg.get("rl_method") if cfg.get("use_rl", True) else "supervised", "pid": status.get("pid"),
        "host": status.get("host"), "remote": not here, "started": started, "updated": status.get("updated"),
        "reward": last_value(rows, "reward/mean"), "eval_reward": last_value(rows, "eval/reward/mean"),
        "sec_per_step": seconds_per_step(rows), "checkpoints": [s for s, _ in ckpts],
        "launch_pid": launch.get("pid"), "live": state in LIVE, "gpus": launch.get("gpus") or "",
        "phase": status.get("phase") if state in ("running", "stopping") else None,
        "eta_s": status.get("eta_s") if state in ("running", "stopping") else None,
        "trained": status.get("trained"),  # what trains and how many parameters (lora_policies.describe)
        "exiting": state not in LIVE and (launched_alive or (
            here and same_process(status.get("pid"), started=status.get("started")) is True)),
    }


def list_runs(runs_dir: str) -> list[dict]:
    """run_info of every run folder in runs_dir, newest first."""
    out = []
    if not os.path.isdir(runs_dir):
        return out
    for name in os.listdir(runs_dir):
        path = os.path.join(runs_dir, name)
        if name in RESERVED or name.startswith(".") or not NAME_RE.match(name) or not os.path.isdir(path):
            continue
        if any(os.path.exists(os.path.join(path, f))
               for f in ("status.json", "run.json", STUDIO_FILE, "metrics.jsonl", "queued.json")):
            out.append(run_info(path))
    return sorted(out, key=lambda r: r["started"] or 0, reverse=True)


def fmt_time(t) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else ""


def display_state(info: dict) -> str:
    if info["state"] == "dead":
        return f"dead (was {info['was']})"
    return info["state"] + (f" (on {info['host']})" if info.get("remote") else "")


# ---------------------------------------------------------------------------------------------- checks
PATH_FLAGS_READ = ("pretrained_model_name_or_path", "siglip_path", "initial_ip_adapter_path", "train_data_json")
SPECIAL = {"pretrained_model_name_or_path": ("tiny", "tiny-pretrained"), "siglip_path": ("tiny", "tiny-pretrained"),
           "train_data_json": ("bundled", "bundled-glyphs"), "initial_ip_adapter_path": ("tiny-pretrained",)}


def confine_paths(cfg, run_dir: str, read_roots: list[str]) -> None:
    """Every path flag of a run started from the page stays where the studio allows: what the run writes
    (--output_dir, --logging_dir) inside its own folder, what it reads inside `read_roots`."""
    confine(cfg.output_dir, [run_dir], "--output_dir")
    logs = cfg.logging_dir if os.path.isabs(os.path.expanduser(cfg.logging_dir)) else os.path.join(run_dir, cfg.logging_dir)
    confine(logs, [run_dir], "--logging_dir (TensorBoard files)")
    for flag in PATH_FLAGS_READ:
        value = getattr(cfg, flag)
        if value and value.strip().lower() not in SPECIAL.get(flag, ()):
            confine(value, read_roots, f"--{flag} (add its folder with python app.py --allow_read DIR)")
    resume = cfg.resume_from_checkpoint
    if resume and resume != "latest":
        confine(resume, [run_dir], "--resume_from_checkpoint")


def plan_start(runs_dir: str, name: str, argv: list[str], gpus: str = "", read_roots: list[str] | None = None,
               ) -> tuple[str, list[str], list[str]]:
    """(run dir, full argv, problems): the name, the flags (the trainer's own parser and validation), the
    paths the page may use, then the trainer's preflight (rewards, paths, GPUs, dataset). A UserError for
    what stops the check itself; `problems` lists everything preflight found."""
    from calligrapher_rl.training.preflight import preflight

    from .procs import parse_gpus

    run_dir = run_path(runs_dir, name)
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        info = run_info(run_dir)
        if info["live"] or info["state"] == "queued":
            raise UserError(f"run {name!r} is {info['state']}: stop it first or pick another name")
        raise UserError(f"a run named {name!r} already exists ({display_state(info)}): resume it from the Runs tab "
                        "or pick another name")
    for flag in ("--output_dir", "--resume_from_checkpoint"):
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise UserError(f"{flag} is set by the studio (the run folder is runs_dir/NAME)")
    full = [*argv, "--output_dir", run_dir]
    from calligrapher_rl.config_parse import parse_args

    cfg = parse_args(full)
    confine_paths(cfg, run_dir, read_roots if read_roots is not None else default_read_roots(runs_dir))
    parse_gpus(gpus)
    return run_dir, full, preflight(cfg.resolved(), gpus=gpus or "")


def prepare_start(runs_dir: str, name: str, argv: list[str], gpus: str = "", read_roots: list[str] | None = None,
                  ) -> tuple[str, list[str]]:
    """plan_start, with the first problem raised (and the count of the others)."""
    run_dir, full, problems = plan_start(runs_dir, name, argv, gpus, read_roots)
    if problems:
        raise UserError(problems[0] + (f" (and {len(problems) - 1} more: press Check)" if len(problems) > 1 else ""))
    return run_dir, full


def default_read_roots(runs_dir: str) -> list[str]:
    """Where runs started from the page may read models and data unless `python app.py --allow_read` adds
    more: runs_dir, this repository, the project's cache and the Hugging Face cache."""
    from calligrapher_rl.cache import cache_dir

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hf = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return [runs_dir, repo, str(cache_dir()), hf]


# ---------------------------------------------------------------------------------------------- actions
def start_run(runs_dir: str, name: str, argv: list[str], gpus: str = "", read_roots: list[str] | None = None) -> str:
    """Launch a detached training run into runs_dir/NAME; returns the run folder."""
    run_dir, full = prepare_start(runs_dir, name, argv, gpus, read_roots)
    _launch(run_dir, full, gpus)
    return run_dir


def resume_run(run_dir: str, extra: list[str] | None = None, gpus: str = "", read_roots: list[str] | None = None) -> str:
    """Continue a paused run (control/resume) or relaunch a stopped/failed/dead one from its latest checkpoint."""
    info = run_info(run_dir)
    if info["state"] == "paused":
        request_resume(run_dir)
        return "resume requested: the run continues with the next epoch"
    if info["live"] or info["state"] == "dead":
        raise UserError(f"run {info['name']!r} is {display_state(info)}: "
                        + ("mark it stopped first" if info["state"] == "dead" else "nothing to resume"))
    if not info["checkpoints"]:
        raise UserError(f"run {info['name']!r} has no checkpoint yet: start a new run instead")
    if not os.path.isfile(os.path.join(run_dir, "run.json")):
        raise UserError("no run.json: cannot tell the run's configuration", where=run_dir)
    for flag in ("--output_dir", "--resume_from_checkpoint", "--preset"):
        if any(a == flag or a.startswith(flag + "=") for a in extra or []):
            raise UserError(f"{flag} is set by the studio when it resumes a run")
    argv = ["--preset", os.path.join(run_dir, "run.json"), *(extra or []), "--resume_from_checkpoint", "latest",
            "--output_dir", run_dir]
    from calligrapher_rl.config_parse import parse_args
    from calligrapher_rl.training.preflight import preflight

    from .procs import parse_gpus

    cfg = parse_args(argv)
    if info["checkpoints"][-1] >= cfg.max_train_steps:
        raise UserError(f"run {info['name']!r} already reached max_train_steps={cfg.max_train_steps}; "
                        "add e.g. --max_train_steps N (larger) to the resume flags to train longer")
    runs_dir = os.path.dirname(os.path.normpath(run_dir))
    confine_paths(cfg, run_dir, read_roots if read_roots is not None else default_read_roots(runs_dir))
    parse_gpus(gpus)
    problems = preflight(cfg.resolved(), gpus=gpus or "")
    if problems:
        raise UserError(problems[0])
    for name in ("stop", "resume"):  # a stale request must not end the new process at once
        try:
            os.unlink(os.path.join(run_dir, "control", name))
        except OSError:
            pass
    _launch(run_dir, argv, gpus)
    return f"relaunched from checkpoint-{info['checkpoints'][-1]}"


def stop_run(run_dir: str, wait_s: float = 10.0) -> str:
    """Ask the run to save a checkpoint and end. While it is still loading (its stop file would be cleared
    when the loop starts) it gets SIGTERM instead: nothing is trained yet, so nothing is lost. A signal goes
    only to a process whose start time shows it is still that run (UserError otherwise)."""
    from .procs import launch_created

    info = run_info(run_dir)
    if info["state"] == "queued":
        os.unlink(os.path.join(run_dir, "queued.json"))
        mark_unqueued(run_dir)
        return "removed from the queue (it never started)"
    if info["state"] in ("running", "paused", "stopping"):
        request_stop(run_dir)
        return "stop requested: the run saves a checkpoint after the current step, then ends"
    if info["state"] in ("launching", "starting"):
        request_stop(run_dir)
        status = read_status(run_dir) or {}
        if info["state"] == "launching" or not info["pid"]:
            pid, check = info["launch_pid"], {"created": launch_created(launch_record(run_dir))}
            if check["created"] is None:
                check = {"started": launch_record(run_dir).get("launched")}
        else:
            pid, check = info["pid"], {"started": status.get("started")}
        signal_run(pid, signal.SIGTERM, what=f"run {info['name']!r}", **check)
        deadline = time.time() + wait_s
        while time.time() < deadline and pid_alive(pid, **check):
            time.sleep(0.2)
        after = run_info(run_dir)
        if after["state"] in ("dead", "failed", "starting", "launching") and not pid_alive(pid, **check):
            mark_stopped(run_dir, f"stopped in the studio while {info['state']}")
        return "stopped while loading"
    raise UserError(f"run {info['name']!r} is {display_state(info)}: nothing to stop")


def mark_stopped(run_dir: str, message: str | None = None) -> str:
    """Record a run whose process died as stopped (its checkpoints stay; Resume continues from the latest)."""
    info = run_info(run_dir)
    if not (info["state"] == "dead" or (info["state"] == "failed" and info["was"] is None)):
        raise UserError(f"run {info['name']!r} is {display_state(info)}: only a dead run can be marked stopped")
    status = read_status(run_dir) or {}
    ck = info["checkpoints"]
    write_json(os.path.join(run_dir, "status.json"), {
        **status, "state": "stopped", "step": status.get("step", ck[-1] if ck else 0),
        "message": message or (f"marked stopped in the studio: the process had died while {info['was'] or 'starting'}"
                               + (f"; resume continues from checkpoint-{ck[-1]}" if ck else "; no checkpoint")),
        "updated": time.time(), "pid": status.get("pid") or info["launch_pid"], "host": socket.gethostname(),
    })
    return "marked stopped"


def mark_unqueued(run_dir: str) -> None:
    write_json(os.path.join(run_dir, "status.json"), {"state": "stopped", "step": 0, "updated": time.time(),
                                                      "message": "removed from the queue before it started"})
