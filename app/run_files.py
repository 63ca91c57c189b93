"""What the studio reads from a run folder's files: the console's tail, metrics.jsonl (read incrementally),
the sample grids and the checkpoints' adapter files.

Pure readers, no process or status logic (that is runs.py, whose run_info builds on these): a missing file or
folder reads as empty, and a metrics line still being written is left for the next read.
"""

from __future__ import annotations

import os
import re

from calligrapher_rl.training.checkpointing import list_checkpoints

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def tail(path: str, n: int = 40, max_bytes: int = 65536) -> str:
    """The last n lines of a text file (progress-bar carriage returns collapsed)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    # a progress bar redraws its line after a carriage return: keep what it shows last; no terminal escapes
    # (str.splitlines would cut at every \r and keep each redraw as a line of its own)
    lines = [ln.rstrip("\r").rsplit("\r", 1)[-1] for ln in _ANSI.sub("", data).split("\n")]
    if lines and not lines[-1]:
        lines.pop()
    if size > max_bytes:
        lines = lines[1:]
    return "\n".join(lines[-n:])


_metrics_cache: dict[str, tuple[int, int, list[dict]]] = {}  # path -> (inode, bytes read, rows)


def metrics(run_dir: str) -> list[dict]:
    """metrics.jsonl rows; a growing file is read from where the last call stopped (whole lines only),
    a replaced one (a resume truncates it atomically) from the start."""
    import json

    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        st = os.stat(path)
    except OSError:
        return []
    ino, done, rows = _metrics_cache.get(path, (None, 0, []))
    if ino != st.st_ino or st.st_size < done:
        ino, done, rows = st.st_ino, 0, []
    if st.st_size > done:
        with open(path, "rb") as fh:
            fh.seek(done)
            chunk = fh.read(st.st_size - done)
        end = chunk.rfind(b"\n") + 1  # a line being written is left for the next call
        rows = list(rows)
        for line in chunk[:end].decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
        done += end
    _metrics_cache[path] = (ino, done, rows)
    return rows


def metrics_frame(run_dir: str):
    """metrics.jsonl as a pandas DataFrame (one row per logged line; NaN where a key is absent)."""
    import pandas as pd

    return pd.DataFrame(metrics(run_dir))


def last_value(rows: list[dict], key: str):
    for row in reversed(rows):
        if row.get(key) is not None:
            return row[key]
    return None


def seconds_per_step(rows: list[dict], window: int = 10) -> float | None:
    """Wall time per optimizer step over the last `window` steps of training rows."""
    pts = {}
    for row in rows:
        if any(not k.startswith("eval/") for k in row if k not in ("step", "phase", "time")):
            pts[row["step"]] = row["time"]
    steps = sorted(pts)[-window:]
    if len(steps) < 2 or steps[-1] == steps[0]:
        return None
    return (pts[steps[-1]] - pts[steps[0]]) / (steps[-1] - steps[0])


def samples(run_dir: str, sub: str = "") -> list[tuple[int, str]]:
    """(step, path) of the sample grids (`sub` = "prompts": of the sample prompts), oldest first."""
    folder = os.path.join(run_dir, "samples", sub)
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = re.match(r"^step-(\d+)\.png$", name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


def checkpoint_files(run_dir: str) -> list[tuple[str, str]]:
    """(label, path) of every adapter file, newest checkpoint first, EMA before raw. A LoRA checkpoint's entries
    are its folder (raw) and its ema/ folder: the loaders take them as they take an adapter file. The starting
    point (`checkpoint-0/`, a folder the loaders resolve) comes last."""
    out = []
    for step, path in reversed(list_checkpoints(run_dir)):
        if os.path.isfile(os.path.join(path, "lora.json")):
            out += [(f"checkpoint-{step} · {kind} LoRA", p) for kind, p in (("EMA", os.path.join(path, "ema")),
                                                                            ("raw", path)) if os.path.isdir(p)]
            continue
        for fname, kind in (("ip-adapter-ema.safetensors", "EMA"), ("ip-adapter.safetensors", "raw")):
            if os.path.isfile(os.path.join(path, fname)):
                out.append((f"checkpoint-{step} · {kind}", os.path.join(path, fname)))
    start = os.path.join(run_dir, "checkpoint-0")  # the starting point (training/starting_point.py)
    if os.path.isdir(start) and not any(p == start for _, p in out):
        out.append(("checkpoint-0 · start", start))
    return out
