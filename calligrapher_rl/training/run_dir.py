"""The run directory: where the trainer and the studio (or any other watcher) meet.

    metrics.jsonl      one JSON object per logged step (append-only)
    logs/              TensorBoard events: the same scalars and the sample grids
    samples/           step-{step:06d}.png evaluation grids
    checkpoint-{step}/ see checkpointing.py
    run.json           the resolved configuration and the package version
    status.json        state (starting|running|paused|stopping|stopped|finished|failed), pid, step, message
    control/stop       created by anyone who wants the run to save a checkpoint and end
    control/resume     created to continue a run paused by reward failures
    train.log          the human-readable log (the studio tails it)

Only the main process writes. Every write is atomic (temp + rename) or an append of whole lines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time

import numpy as np
from PIL import Image

from ..atomic import atomic_path, write_json

logger = logging.getLogger("calligrapher_rl.training")

STATES = ("starting", "running", "paused", "stopping", "stopped", "finished", "failed")


def sample_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "samples", f"step-{step:06d}.png")


def _request(run_dir: str, name: str) -> None:
    os.makedirs(os.path.join(run_dir, "control"), exist_ok=True)
    with open(os.path.join(run_dir, "control", name), "w") as fh:
        fh.write(str(time.time()))


def request_stop(run_dir: str) -> None:
    """Ask a run (this process or another) to checkpoint and end at the next safe point."""
    _request(run_dir, "stop")


def request_resume(run_dir: str) -> None:
    """Let a run paused by reward failures continue."""
    _request(run_dir, "resume")


def read_status(run_dir: str) -> dict | None:
    try:
        with open(os.path.join(run_dir, "status.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def read_metrics(run_dir: str) -> list[dict]:
    """All complete lines of metrics.jsonl (a line being written is skipped)."""
    rows = []
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
            for line in fh:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return rows


class RunDir:
    """The trainer's writer side. On non-main processes every method is a no-op."""

    def __init__(self, path: str, *, is_main: bool = True, logging_dir: str = "logs", accelerator=None):
        """`accelerator`: an accelerate.Accelerator whose trackers (started with `init_trackers`, see
        setup.start_trackers) also get the scalars and sample grids; None = metrics.jsonl and samples/ only."""
        self.path, self.is_main = path, is_main
        self.accelerator = accelerator
        self.status_fields: dict = {}  # live fields (phase, eta_s) added to every status.json write
        self._last_status: tuple | None = None
        self._started = time.time()
        if not is_main:
            return
        for sub in ("samples", "control", logging_dir):
            os.makedirs(os.path.join(path, sub), exist_ok=True)
        self._log_handler = logging.FileHandler(os.path.join(path, "train.log"), encoding="utf-8")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("calligrapher_rl").addHandler(self._log_handler)

    # ------------------------------------------------------------ status and control
    def set_status(self, state: str, step: int, message: str = "", **extra) -> None:
        if not self.is_main:
            return
        assert state in STATES, state
        self._last_status = (state, step, message)
        write_json(os.path.join(self.path, "status.json"), {
            "state": state, "step": step, "message": message, "pid": os.getpid(), "host": socket.gethostname(),
            "started": self._started, "updated": time.time(), **self.status_fields, **extra,
        })

    def update_status(self, **fields) -> None:
        """Set live fields (None removes one) and rewrite status.json with the last state, step and message."""
        for k, v in fields.items():
            if v is None:
                self.status_fields.pop(k, None)
            else:
                self.status_fields[k] = v
        if self._last_status is not None:
            self.set_status(*self._last_status)

    def _control(self, name: str) -> str:
        return os.path.join(self.path, "control", name)

    def stop_requested(self) -> bool:
        return os.path.exists(self._control("stop"))

    def consume_resume(self) -> bool:
        if os.path.exists(self._control("resume")):
            os.unlink(self._control("resume"))
            return True
        return False

    def clear_control(self) -> None:
        for name in ("stop", "resume"):
            if self.is_main and os.path.exists(self._control(name)):
                os.unlink(self._control(name))

    # ------------------------------------------------------------ metrics
    def log_metrics(self, step: int, phase: str, metrics: dict[str, float]) -> dict:
        row = {"step": int(step), "phase": phase, "time": time.time()}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else None  # JSON has no NaN; null = not available
        if self.is_main:
            with open(os.path.join(self.path, "metrics.jsonl"), "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()
            if self._trackers():
                self.accelerator.log({k: v for k, v in row.items()
                                      if k not in ("step", "phase", "time") and v is not None}, step=int(step))
        return row

    def truncate_metrics(self, after_step: int) -> None:
        """On resume: drop rows a killed run logged past its last checkpoint (they will be redone)."""
        if not self.is_main:
            return
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= after_step]
        with atomic_path(os.path.join(self.path, "metrics.jsonl")) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)

    def save_grid(self, step: int, grid: Image.Image) -> str | None:
        if not self.is_main:
            return None
        path = sample_path(self.path, step)
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")
        image = np.asarray(grid.convert("RGB"))
        for tracker in self._trackers():
            if tracker.name == "tensorboard":  # its log_images wants NCHW batches; one HWC grid goes straight in
                tracker.writer.add_image("samples", image, step, dataformats="HWC")
                tracker.writer.flush()
            else:
                tracker.log_images({"samples": [image]}, step=step)
        return path

    def _trackers(self) -> list:
        return list(self.accelerator.trackers) if self.accelerator is not None and self.is_main else []

    def close(self) -> None:
        for tracker in self._trackers():
            tracker.finish()  # not accelerator.end_training(): that also tears down the process group
        if self.accelerator is not None:
            self.accelerator.trackers.clear()
        if self.is_main:
            logging.getLogger("calligrapher_rl").removeHandler(self._log_handler)
            self._log_handler.close()


def make_grid(rows: list[list[Image.Image]], cell: int | None = None) -> Image.Image:
    """Rows of equally sized images -> one picture (columns = samples, rows = input/output/target/ref)."""
    cell = cell or rows[0][0].width
    n_cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cell * n_cols, cell * len(rows)), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((cell, cell)), (x * cell, y * cell))
    return grid
