"""The run queue: one run per GPU set unless forced; a run that asks for busy GPUs waits in its own folder
(`queued.json`: the command and the GPUs) and starts when they are free.

The studio's queue thread (server.py) calls `start_ready` every few seconds, so queued runs start while no
page is open; they wait while the studio itself is not running (start it again and they go). A run given no
GPUs holds the environment's first card on a GPU machine (`procs.held_gpus`) and never waits on a CPU one.
"""

from __future__ import annotations

import json
import os
import time

from calligrapher_rl.atomic import write_json
from calligrapher_rl.errors import UserError

from . import procs, runs

QUEUE_FILE = "queued.json"


def busy_gpus(runs_dir: str, skip: str | None = None) -> dict[int, str]:
    """GPU index -> the live run that holds it (by the GPUs the studio launched it on)."""
    out = {}
    for info in runs.list_runs(runs_dir):
        if info["live"] and info["name"] != skip:
            for g in procs.held_gpus(info.get("gpus") or ""):
                out[g] = info["name"]
    return out


def conflicts(runs_dir: str, gpus: str, skip: str | None = None) -> dict[int, str]:
    """The asked GPUs that a live run holds (empty: free, or a CPU run)."""
    held = busy_gpus(runs_dir, skip)
    return {g: held[g] for g in procs.held_gpus(gpus) if g in held}


def enqueue(run_dir: str, argv: list[str], gpus: str) -> str:
    os.makedirs(run_dir, exist_ok=True)
    write_json(os.path.join(run_dir, QUEUE_FILE), {"argv": argv, "gpus": gpus, "queued": time.time()})
    return run_dir


def queued(runs_dir: str) -> list[tuple[float, str, dict]]:
    """(queued time, run folder, record) of the waiting runs, oldest first."""
    out = []
    for info in runs.list_runs(runs_dir):
        if info["state"] == "queued":
            try:
                with open(os.path.join(info["path"], QUEUE_FILE), encoding="utf-8") as fh:
                    rec = json.load(fh)
                out.append((float(rec["queued"]), info["path"], rec))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return sorted(out, key=lambda t: t[0])


def start_ready(runs_dir: str, launch=None) -> list[str]:
    """Start every queued run whose GPUs are free, oldest first (a later run never jumps an earlier one
    that wants the same GPUs). Returns the started run folders."""
    launch = launch or procs._launch
    started, claimed = [], set()
    for _, run_dir, rec in queued(runs_dir):
        wanted = set(procs.held_gpus(rec.get("gpus") or ""))
        if wanted & claimed or conflicts(runs_dir, rec.get("gpus") or ""):
            claimed |= wanted  # keeps its place: GPUs it waits for are not given to a younger run
            continue
        taken = os.path.join(run_dir, QUEUE_FILE + ".taken")
        try:
            os.rename(os.path.join(run_dir, QUEUE_FILE), taken)  # a second studio on this runs_dir skips it
        except OSError:
            continue
        launch(run_dir, list(rec["argv"]), rec.get("gpus") or "")
        os.unlink(taken)
        claimed |= wanted
        started.append(run_dir)
    return started


def cancel(run_dir: str) -> str:
    path = os.path.join(run_dir, QUEUE_FILE)
    if not os.path.exists(path):
        raise UserError("this run is not waiting in the queue", where=run_dir)
    os.unlink(path)
    runs.mark_unqueued(run_dir)
    return "removed from the queue"
