"""May the studio load a model onto its GPU now? The Inference and Compare tabs share the card with the runs the
studio started, and a training run near an 80 GB card's edge must never be pushed out of memory by them.

So, before a model stack goes onto a CUDA card (InferenceService._stack, with models.footprint.estimated_bytes of
what it will load), `GpuRoom.check` answers in one line:
- a live run on that card that has not finished its first optimizer step has not reached its peak memory yet
  (its first update and optimizer step allocate what its allocator then keeps): loading beside it is refused;
- otherwise the stack must fit in what the driver reports free, with headroom for sampling's activations:
  FLUX.1-Fill with the adapter is ~45 GB, so beside a flux run on an 80 GB card the answer is to wait or stop it.
A run that has just ended (stopped, finished) still holds the card for a while: the trainer writes its final
state, then its process exits, and only then are its CUDA memory (~55 GiB for flux) and its compile workers freed,
seconds later. The studio shows it ended at once (runs.run_info: not live, `exiting`), so a user who pressed stop
and then Generate would be told that another process holds the card. So when what is free is not enough and runs
on the card have ended with their processes still there, `check` waits for those processes to end (EXIT_WAIT_S at
most, polling their state), then reads the free memory again and decides; past the bound it names the run whose
process is still exiting. "Another process holds the rest" is left for memory no run of the studio's holds.
The other direction (a run started on the card while the studio holds a model) is `make_room_for_run`: the
studio's cached stacks are a cache, so they are dropped before the run starts.

Which card a run holds: `procs.held_gpus`, the rule the run queue follows too: the GPUs the studio launched it on;
a run launched with none takes the environment's first card, the one the studio itself uses.
"""

from __future__ import annotations

import time

from calligrapher_rl.errors import UserError

from . import procs, runs

GIB = 2**30
HEADROOM_GIB = 3.0  # sampling's activations at 1024² and the CUDA context, beyond the weights
EXIT_WAIT_S = 90.0  # an ended run's process frees its memory as it exits: seconds, far less than this
EXIT_POLL_S = 0.2  # how often the wait reads the exiting runs' state


def studio_gpu() -> int:
    """The physical index of the card the studio's own `cuda` device is."""
    return procs.default_gpu()


def holders(runs_dir: str, gpu: int) -> list[dict]:
    """The live runs that hold card `gpu` (`procs.held_gpus`: a run launched with no GPUs holds the environment's
    first card, the studio's own)."""
    return [info for info in _on_card(runs_dir, gpu) if info["live"]]


def _on_card(runs_dir: str, gpu: int) -> list[dict]:
    """Every run, live or ended, that holds or held card `gpu` (procs.held_gpus)."""
    return [info for info in runs.list_runs(runs_dir) if gpu in procs.held_gpus(info.get("gpus") or "")]


def _gib(n: float) -> str:
    return f"{n / GIB:.0f}" if n >= 10 * GIB else f"{n / GIB:.1f}"


class GpuRoom:
    """`check(need_bytes, what)` raises a one-line UserError when `what` may not load onto the studio's card.

    `mem_info` returns (free, total) bytes of that card (torch.cuda.mem_get_info by default: what the driver
    sees, every process included); `gpu` is its physical index (default: studio_gpu()); `exit_wait_s` bounds the
    wait for ended runs' processes to exit (default EXIT_WAIT_S)."""

    def __init__(self, runs_dir: str, mem_info=None, gpu: int | None = None, exit_wait_s: float | None = None):
        self.runs_dir = runs_dir
        self._mem_info = mem_info
        self.gpu = studio_gpu() if gpu is None else gpu
        self.exit_wait_s = EXIT_WAIT_S if exit_wait_s is None else exit_wait_s

    def mem_info(self) -> tuple[int, int]:
        if self._mem_info is not None:
            return self._mem_info()
        import torch

        return torch.cuda.mem_get_info()

    def check(self, need_bytes: int, what: str = "Inference") -> None:
        self._check(need_bytes, what, wait=True)

    def _check(self, need_bytes: int, what: str, wait: bool) -> None:
        on_card = _on_card(self.runs_dir, self.gpu)
        held = [info for info in on_card if info["live"]]
        young = [h["name"] for h in held if h["state"] in ("launching", "starting") or not h.get("step")]
        if young:
            raise UserError(f"{what}: run {young[0]!r} is starting on GPU {self.gpu} and has not reached its peak "
                            f"memory (its first optimizer step); loading ~{_gib(need_bytes)} GiB beside it could "
                            "push it out of memory. Try again after its first step, or stop it in the Runs tab")
        free, total = self.mem_info()
        if need_bytes + HEADROOM_GIB * GIB <= free:
            return
        exiting = [info for info in on_card if info["exiting"]]
        if exiting and wait:
            self._wait_for_exit(exiting)
            return self._check(need_bytes, what, wait=False)  # on what is free now (no second wait)
        needs = f"{what}: needs ~{_gib(need_bytes + HEADROOM_GIB * GIB)} GiB on GPU {self.gpu} and " \
                f"{free / GIB:.1f} of {total / GIB:.0f} GiB is free"
        if exiting:
            names = ", ".join(f"{h['name']!r} ({h['state']}, pid {h['pid'] or h['launch_pid']})" for h in exiting)
            raise UserError(f"{needs}; run {names} has ended but its process is still exiting and holds memory "
                            f"there (waited {self.exit_wait_s:g} s): try again shortly")
        who = (f"run {', '.join(repr(h['name']) for h in held)} trains on it: wait for it to end or stop it in the "
               "Runs tab" if held else "another process holds the rest")
        raise UserError(f"{needs}; {who} (or start the studio on a free card with CUDA_VISIBLE_DEVICES)")

    def _wait_for_exit(self, exiting: list[dict]) -> None:
        """Wait (exit_wait_s at most) until the processes of these ended runs are gone, reading their state on each
        poll (a run resumed meanwhile is live again: it leaves the wait, and the decision after sees it live)."""
        deadline = time.monotonic() + self.exit_wait_s
        while exiting and time.monotonic() < deadline:
            time.sleep(EXIT_POLL_S)
            exiting = [info for info in (runs.run_info(h["path"]) for h in exiting) if info["exiting"]]


def make_room_for_run(service, gpus: str) -> str:
    """Drop the studio's cached model stacks when a run is about to start on the studio's card; returns a note
    for the start message ('' when nothing was dropped)."""
    if service is None or not service.loaded_on_gpu():
        return ""
    if studio_gpu() not in procs.held_gpus(gpus):
        return ""
    service.unload()
    return f" The studio's inference model was unloaded from GPU {studio_gpu()} to leave the card to the run."
