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
    .trainer.lock      flock'd by the one trainer that owns the folder (its pid and start time inside)

Only the main process writes. Every write is atomic (temp + rename) or an append of whole lines.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time

import numpy as np
from PIL import Image

from ..atomic import atomic_path, overwrite_in_place, write_json
from ..disk import DiskFull, as_disk_full, writing
from ..errors import Interrupted, UserError

logger = logging.getLogger("calligrapher_rl.training")

STATES = ("starting", "running", "paused", "stopping", "stopped", "finished", "failed")
LOCK_FILE = ".trainer.lock"
# A launcher (the studio) writes its console log and launch record into the folder before the trainer
# starts; they do not make the folder "a run".
LAUNCHER_FILES = ("console.log", "studio.json")
# What a run writes at the top of its folder; --overwrite_output_dir removes these (and nothing else).
RUN_FILES = ("metrics.jsonl", "status.json", "run.json", "train.log", "samples", "control", "logs")


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


# ---------------------------------------------------------------------------------------------- endings
class StatusNotRecorded(RuntimeError):
    """The run ended but its final status could not be written (stderr already says so)."""


def ending(exc: BaseException, step: int) -> tuple[str, int, str]:
    """(state, step, message) of the final status of a run ended by `exc`."""
    if isinstance(exc, Interrupted):
        return "stopped", step, str(exc)
    if isinstance(exc, UserError):
        return "failed", step, str(exc)[:500]
    exc = as_disk_full(exc, getattr(exc, "filename", None) or os.getcwd())
    if isinstance(exc, DiskFull):
        return "failed", step, str(exc)
    return "failed", step, f"{type(exc).__name__}: {str(exc)[:300]}"


# ---------------------------------------------------------------------------------------------- ownership
class RunLock:
    """One trainer per run folder: an exclusive flock on DIR/.trainer.lock, held for the run's life.

    The kernel drops the lock when its process ends, however it ends (kill -9 included), so a stale lock
    never blocks a resume and no pid can be mistaken for a live holder. The pid and start time written
    inside only name the holder in the refusal."""

    def __init__(self, run_dir: str):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, LOCK_FILE)
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                fh.close()
                raise
            holder = self._holder(fh)
            fh.close()
            raise UserError(f"another trainer ({holder}) is running in this folder: stop it first or choose "
                            "another --output_dir", where=run_dir, field="--output_dir") from None
        self._fh = fh
        self.removed: list[str] = []  # what --overwrite_output_dir deleted
        try:
            import psutil

            started = psutil.Process().create_time()
        except Exception:  # noqa: BLE001 - the start time only decorates the message
            started = None
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"pid": os.getpid(), "started": started, "host": socket.gethostname()}) + "\n")
            fh.flush()
        except OSError as exc:  # a full disk: the lock holds all the same, only its label is missing
            logger.warning("could not label the run lock %s: %s", self.path, exc)

    @staticmethod
    def _holder(fh) -> str:
        deadline = time.time() + 2.0  # the holder may be between its flock and writing its pid
        while True:
            fh.seek(0)
            try:
                info = json.loads(fh.read() or "null")
            except ValueError:
                info = None
            if isinstance(info, dict) and info.get("pid"):
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if info.get("started") else "?"
                return f"pid {info['pid']} on {info.get('host', '?')}, started {when}"
            if time.time() > deadline:
                return "pid unknown"
            time.sleep(0.1)

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor drops the flock; the file stays (deleting it would race)
            self._fh = None


def claim_run_dir(path: str, *, resume: bool, overwrite: bool, logging_dir: str = "logs") -> RunLock:
    """Lock the folder, then refuse to mix a new run into an earlier one's files.

    A new run into a folder holding an earlier run's results or anyone's files (see run_results) is refused
    unless it resumes (--resume_from_checkpoint) or replaces it (--overwrite_output_dir: the earlier run's
    files go). Nothing
    is written or removed before the lock is ours, so a refused trainer leaves the folder untouched."""
    lock = RunLock(path)
    try:
        present = run_results(path, logging_dir)
        if present and not resume and not overwrite:
            shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
            raise UserError(f"not empty ({shown}): pass --resume_from_checkpoint latest to continue that run or "
                            "--overwrite_output_dir to replace it", where=path, field="--output_dir")
        if present and overwrite and not resume:  # the trainer logs them once train.log is open again
            lock.removed = remove_run_files(path, logging_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def run_results(path: str, logging_dir: str = "logs") -> list[str]:
    """What in the folder is an earlier run's work or someone's file: everything but the bookkeeping an
    attempt that recorded nothing leaves (status, run.json, train.log, control/, the TensorBoard folder, an
    empty metrics.jsonl or samples/, a launcher's files, temporaries). Rerunning a command that failed while
    loading (a typo in a path) is then not refused; mixing into a run with metrics or checkpoints is."""
    bookkeeping = {"status.json", "run.json", "train.log", "control", LOCK_FILE, *LAUNCHER_FILES, _top(logging_dir)}
    found = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name in bookkeeping or (name.startswith(".") and ".tmp" in name):
            continue
        if name == "metrics.jsonl" and os.path.isfile(full) and not read_metrics(path):
            continue
        if name == "samples" and os.path.isdir(full) and not [n for n in os.listdir(full) if not n.startswith(".")]:
            continue
        found.append(name)
    return found


def _top(logging_dir: str) -> str:
    """The run folder's entry holding --logging_dir ('' when it lies outside the folder)."""
    top = os.path.normpath(logging_dir).split(os.sep)[0]
    return "" if os.path.isabs(logging_dir) or top in ("", ".", "..") else top


def remove_run_files(path: str, logging_dir: str = "logs") -> list[str]:
    """Delete what a run writes (metrics, status, logs, samples, checkpoints, temporaries); keep the rest."""
    from .checkpointing import CHECKPOINT_RE

    names = set(RUN_FILES) | ({_top(logging_dir)} - {""})
    removed = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name in names or CHECKPOINT_RE.match(name) or (name.startswith(".") and ".tmp" in name):
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.unlink(full)
            removed.append(name)
    return removed


class _LogFile(logging.FileHandler):
    """train.log. A write that fails (a full disk) is said once, in one line, and the file is then left
    alone: logging's default is a traceback on stderr for every line, burying the run's own error."""

    def handleError(self, record) -> None:  # noqa: N802 - logging's name
        if not getattr(self, "_broken", False):
            self._broken = True
            exc = sys.exc_info()[1]
            print(f"warning: {self.baseFilename}: cannot write ({exc}); the log continues on stderr only",
                  file=sys.stderr, flush=True)

    def emit(self, record) -> None:
        if not getattr(self, "_broken", False):
            super().emit(record)


class RunDir:
    """The trainer's writer side. On non-main processes every method is a no-op."""

    def __init__(self, path: str, *, is_main: bool = True, logging_dir: str = "logs", accelerator=None):
        """`accelerator`: an accelerate.Accelerator whose trackers (started with `init_trackers`, see
        setup.start_trackers) also get the scalars and sample grids; None = metrics.jsonl and samples/ only."""
        self.path, self.is_main = path, is_main
        self.accelerator = accelerator
        self.status_fields: dict = {}  # live fields (phase, eta_s) added to every status.json write
        self._last_status: tuple | None = None
        self._log_handler: logging.Handler | None = None
        self._started = time.time()
        if not is_main:
            return
        for sub in ("samples", "control", logging_dir):
            os.makedirs(os.path.join(path, sub), exist_ok=True)
        self._log_handler = _LogFile(os.path.join(path, "train.log"), encoding="utf-8")
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

    def final_status(self, state: str, step: int, message: str = "") -> bool:
        """The last status of this process, on every exit path. When the atomic write fails (a full disk),
        status.json is rewritten in place; when even that fails, stderr says so. False then: the caller
        must exit non-zero, since nothing on disk tells the truth."""
        if not self.is_main:
            return True
        try:
            self.set_status(state, step, message)
            return True
        except OSError as first:
            path = os.path.join(self.path, "status.json")
            record = {"state": state, "step": step, "message": message, "pid": os.getpid(),
                      "host": socket.gethostname(), "started": self._started, "updated": time.time()}
            try:
                overwrite_in_place(path, json.dumps(record, sort_keys=True) + "\n")
                return True
            except OSError as second:
                print(f"error: could not record the final status {state!r} in {path} ({first}; in place: {second}); "
                      f"the run ended {state}: {message}", file=sys.stderr, flush=True)
                return False

    def update_status(self, **fields) -> None:
        """Set live fields (None removes one) and rewrite status.json with the last state, step and message."""
        for k, v in fields.items():
            if v is None:
                self.status_fields.pop(k, None)
            else:
                self.status_fields[k] = v
        if self._last_status is not None:
            try:
                self.set_status(*self._last_status)
            except OSError as exc:  # live fields only: a full disk is reported by the state writes themselves
                logger.warning("could not refresh status.json: %s", exc)

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
            row[k] = float(v)  # non-finite values as they are (Python's json writes NaN/Infinity): never dropped
        if self.is_main:
            path = os.path.join(self.path, "metrics.jsonl")
            with writing(path), open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()
            if self._trackers():
                self.accelerator.log({k: v for k, v in row.items()
                                      if k not in ("step", "phase", "time")}, step=int(step))
        return row

    def truncate_metrics(self, after_step: int) -> int:
        """On resume: drop rows a killed run logged past its last checkpoint (they will be redone); -1
        drops every row (a restart from scratch). Returns the number of rows dropped."""
        if not self.is_main:
            return 0
        rows = read_metrics(self.path)
        kept = [r for r in rows if r.get("step", 0) <= after_step]
        if len(kept) == len(rows):
            return 0
        with atomic_path(os.path.join(self.path, "metrics.jsonl")) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in kept)
        return len(rows) - len(kept)

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
            try:
                tracker.finish()  # not accelerator.end_training(): that also tears down the process group
            except Exception as exc:  # noqa: BLE001 - a full disk, or a tracker half-built when a signal came,
                logger.warning("could not close the %s tracker: %s", tracker.name, exc)  # must not hide the outcome
        if self.accelerator is not None:
            self.accelerator.trackers.clear()
        if self.is_main and self._log_handler is not None:
            logging.getLogger("calligrapher_rl").removeHandler(self._log_handler)
            try:
                self._log_handler.close()
            except OSError:  # its last flush on a full disk: already said once (_LogFile), never the outcome
                pass
            self._log_handler = None


def make_grid(rows: list[list[Image.Image]], cell: int | None = None) -> Image.Image:
    """Rows of equally sized images -> one picture (columns = samples, rows = input/output/target/ref)."""
    cell = cell or rows[0][0].width
    n_cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cell * n_cols, cell * len(rows)), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((cell, cell)), (x * cell, y * cell))
    return grid
