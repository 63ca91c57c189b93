"""Managing ended runs: delete (into runs_dir/.archive, nothing is lost) and rename."""

from __future__ import annotations

import os
import time

from calligrapher_rl.atomic import write_json
from calligrapher_rl.errors import UserError

from .procs import read_json
from .runs import display_state, run_info, run_path

ARCHIVE = ".archive"


def archive_run(run_dir: str) -> str:
    """Move a run that is not live into runs_dir/.archive/NAME-TIME (nothing is deleted); returns that path."""
    info = run_info(run_dir)
    if info["live"] or info["state"] == "dead":
        raise UserError(f"run {info['name']!r} is {display_state(info)}: "
                        + ("mark it stopped first" if info["state"] == "dead" else "stop it first"))
    folder = os.path.join(os.path.dirname(os.path.normpath(run_dir)), ARCHIVE)
    os.makedirs(folder, exist_ok=True)
    dest = os.path.join(folder, f"{info['name']}-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while os.path.exists(dest):
        dest, n = f"{dest.rsplit('~', 1)[0]}~{n}", n + 1
    os.rename(run_dir, dest)
    return dest


def rename_run(run_dir: str, new_name: str) -> str:
    """Rename a run that is not live (its folder; run.json's output_dir follows). Returns the new folder."""
    info = run_info(run_dir)
    if info["live"] or info["state"] in ("dead", "queued"):
        raise UserError(f"run {info['name']!r} is {display_state(info)}: only an ended run can be renamed")
    runs_dir = os.path.dirname(os.path.normpath(run_dir))
    dest = run_path(runs_dir, new_name)
    if os.path.exists(dest):
        raise UserError(f"a run named {new_name.strip()!r} already exists")
    os.rename(run_dir, dest)
    cfg_path = os.path.join(dest, "run.json")
    cfg = read_json(cfg_path)
    if cfg.get("output_dir"):
        write_json(cfg_path, {**cfg, "output_dir": dest})
    return dest
