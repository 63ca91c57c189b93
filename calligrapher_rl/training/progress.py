"""Console progress of a run, like diffusers' training scripts, and the system metrics of a metrics row.

On a terminal: a tqdm bar with step, live phase, reward, loss, s/step and ETA (log records are printed
above the bar, not through it). Otherwise (a log file, the studio's detached runs, CI): one plain line
through python logging every N steps, e.g.

    step 12/30 phase rl reward 0.512 loss 0.031 kl 0.0004 2.1 s/step eta 38 s
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys

from .callbacks import StepTimer, TrainerCallback

logger = logging.getLogger("calligrapher_rl.training")


def default_every(total_steps: int) -> int:
    """Every step for short runs; about 100 lines for long ones."""
    return max(1, total_steps // 100)


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _num(value) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.3g}"


def progress_fields(step: int, total: int, phase: str, row: dict | None, timer: StepTimer) -> str:
    """`step 12/30 phase rl reward 0.512 loss 0.031 kl 0.0004 2.1 s/step eta 38 s` (absent values left out)."""
    parts = [f"step {step}/{total}", f"phase {phase}"]
    row = row or {}
    for label, key in (("reward", "reward/mean"), ("loss", "loss"), ("kl", "kl")):
        if key in row:
            parts.append(f"{label} {_num(row[key])}")
    sps = timer.seconds_per_step()
    if sps is not None:
        parts.append(f"{sps:.1f} s/step" if sps >= 1 else f"{sps:.2f} s/step")
        parts.append(f"eta {format_duration(timer.eta_s(total))}")
    return " ".join(parts)


class ProgressCallback(TrainerCallback):
    """The console progress. `tty=None` asks the stream; `every=None` picks `default_every(max_train_steps)`
    (non-TTY lines only). Only the main process shows anything."""

    def __init__(self, every: int | None = None, tty: bool | None = None, stream=None, window: int = 10):
        self.every, self.tty, self.stream = every, tty, stream
        self.timer = StepTimer(window)
        self.bar, self.active = None, False
        self.phase = ""
        self.row: dict | None = None
        self._last_line_step = -1
        self._redirect = contextlib.ExitStack()

    def on_train_begin(self, trainer) -> None:
        self.active = trainer.is_main
        if not self.active:
            return
        self.total = trainer.cfg.max_train_steps
        self.every = self.every or default_every(self.total)
        stream = self.stream if self.stream is not None else sys.stderr
        self.tty = self.tty if self.tty is not None else bool(getattr(stream, "isatty", lambda: False)())
        self.timer.mark(trainer.step)
        self._last_line_step = trainer.step
        if self.tty:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # the fields go in tqdm's `desc` slot: its `postfix` slot would prefix them with ", "
            self.bar = tqdm(total=self.total, initial=trainer.step, file=stream, unit="step", dynamic_ncols=True,
                            bar_format="train {percentage:3.0f}%|{bar}| {desc}",
                            desc=progress_fields(trainer.step, self.total, "starting", None, self.timer))
            self._redirect.enter_context(logging_redirect_tqdm())  # log records print above the bar

    def on_phase(self, trainer, phase: str) -> None:
        self.phase = phase
        if self.bar is not None:
            self.bar.set_description_str(progress_fields(trainer.step, self.total, phase, self.row, self.timer))

    def on_log(self, trainer, step: int, phase: str, logs: dict) -> None:
        if not any(k.startswith("eval/") for k in logs):
            self.row = logs

    def on_step_end(self, trainer, step: int, phase: str, metrics: dict) -> None:
        if not self.active:
            return
        self.timer.mark(step)
        if self.bar is not None:
            self.bar.set_description_str(progress_fields(step, self.total, self.phase, self.row, self.timer),
                                         refresh=False)
            self.bar.update(step - self.bar.n)
        elif step // self.every > self._last_line_step // self.every or step >= self.total:
            self._last_line_step = step
            logger.info(progress_fields(step, self.total, phase, self.row, self.timer))

    def on_train_end(self, trainer, state: str) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._redirect.close()


def system_metrics(device) -> dict[str, float]:
    """`sys/gpu_mem_gib` (peak allocated by this process, whole run), `sys/gpu_reserved_gib` (peak held by its
    allocator), `sys/alloc_retries` and `sys/gpu_util` (percent; only where NVML answers) on CUDA; nothing on
    the CPU. On every device, host memory: `sys/host_peak_rss_gib` (this process's peak resident set: at real size
    the EMA, the parked snapshots, T5-XXL and checkpoint buffers live there) and `sys/host_available_gib` (what
    the machine has left now, a run folder in /dev/shm included) -- a run killed by the kernel for host
    memory leaves these as its last words."""
    import resource

    import psutil
    import torch

    host = {"sys/host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
            "sys/host_available_gib": psutil.virtual_memory().available / 2**30}
    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return host
    stats = torch.cuda.memory_stats(device)
    out = {**host, "sys/gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
           "sys/gpu_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
           # cudaMalloc failures the allocator answered by freeing its cache and retrying (each a device sync):
           # a run that keeps retrying is at the edge of the card's memory and slow for it
           "sys/alloc_retries": float(stats.get("num_alloc_retries", 0))}
    try:
        out["sys/gpu_util"] = float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 - no pynvml / no NVML: the field is left out, not faked
        pass
    return out
