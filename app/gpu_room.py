"""May the studio load a model onto its GPU now? The Inference and Compare tabs share the card with the runs the
studio started, and a training run near an 80 GB card's edge must never be pushed out of memory by them.

So, before a model stack goes onto a CUDA card (InferenceService._stack, with models.footprint.estimated_bytes of
what it will load), `GpuRoom.check` answers in one line:
- a live run on that card that has not finished its first optimizer step has not reached its peak memory yet
  (its first update and optimizer step allocate what its allocator then keeps): loading beside it is refused;
- otherwise the stack must fit in what the driver reports free, with headroom for sampling's activations:
  FLUX.1-Fill with the adapter is ~45 GB, so beside a flux run on an 80 GB card the answer is to wait or stop it.
A run that has just ended (stopped, finished) still holds the card for a while: the trainer writes its final
state, then its process exits, and only then are its CUDA memory (~55 GiB for flux) and its compile workers freed.
The studio shows it ended at once (runs.run_info: not live, `exiting` while its process is there), so a user who
pressed stop and then Generate would be told that another process holds the card. The pid alone does not say when
the memory is back: the driver tears a process's CUDA context down as it exits and gives ~50 GiB back seconds
after the pid is gone or a zombie (measured on an H100: 2.8 s after `stopped`, no process left, the run's 53 GiB
still held). So when what is free is not enough and a run on the card ended recently (its process still exiting,
or its final status written less than EXIT_WAIT_S ago), `check` waits: first for those processes to end, then for
the memory, reading the free memory until the stack fits or nothing more has been released for RELEASE_SETTLE_S,
all within EXIT_WAIT_S; then it decides once, on the last reading. Past the bound it names the run whose process
is still exiting, or the run whose memory was still held. A run that ended longer ago than the bound has had all
the time the wait would give it, and a live run releases nothing: neither makes `check` wait, and "another
process holds the rest" is left for memory no run of the studio's holds.
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
EXIT_WAIT_S = 90.0  # an ended run's process and the driver free its memory within seconds, far less than this
EXIT_POLL_S = 0.2  # how often the wait reads the exiting runs' state and the free memory
# The driver frees a context's memory over seconds (how it spreads them is not measured); once the free memory
# has not grown for this long, nothing more is on its way. It errs long: a refusal costs these seconds more, a
# false refusal a retry by hand.
RELEASE_SETTLE_S = 5.0


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
    wait for ended runs' processes to exit and their memory to come back, and is how recently a run must have
    ended for it to be waited on (default EXIT_WAIT_S); `settle_s`: how long the free memory must stop growing for
    the wait to end early (default RELEASE_SETTLE_S)."""

    def __init__(self, runs_dir: str, mem_info=None, gpu: int | None = None, exit_wait_s: float | None = None,
                 settle_s: float | None = None):
        self.runs_dir = runs_dir
        self._mem_info = mem_info
        self.gpu = studio_gpu() if gpu is None else gpu
        self.exit_wait_s = EXIT_WAIT_S if exit_wait_s is None else exit_wait_s
        self.settle_s = RELEASE_SETTLE_S if settle_s is None else settle_s

    def mem_info(self) -> tuple[int, int]:
        if self._mem_info is not None:
            return self._mem_info()
        import torch

        return torch.cuda.mem_get_info()

    def check(self, need_bytes: int, what: str = "Inference") -> None:
        self._check(need_bytes, what)

    def _check(self, need_bytes: int, what: str, mem: tuple[int, int] | None = None, waited: float | None = None,
               ended: list[dict] | None = None) -> None:
        """One decision. After a wait (`waited` seconds, on the `ended` runs) `mem` is the wait's last reading."""
        on_card = _on_card(self.runs_dir, self.gpu)
        held = [info for info in on_card if info["live"]]
        young = [h["name"] for h in held if h["state"] in ("launching", "starting") or not h.get("step")]
        if young:
            raise UserError(f"{what}: run {young[0]!r} is starting on GPU {self.gpu} and has not reached its peak "
                            f"memory (its first optimizer step); loading ~{_gib(need_bytes)} GiB beside it could "
                            "push it out of memory. Try again after its first step, or stop it in the Runs tab")
        need = need_bytes + HEADROOM_GIB * GIB
        free, total = mem or self.mem_info()
        if need <= free:
            return
        if waited is None:
            ended = [info for info in on_card if info["exiting"] or self._just_ended(info)]
            if ended:
                waited, mem = self._wait_for_release(ended, need, (free, total))
                return self._check(need_bytes, what, mem, waited, ended)  # on the last reading (no second wait)
        needs = f"{what}: needs ~{_gib(need)} GiB on GPU {self.gpu} and {free / GIB:.1f} of {total / GIB:.0f} GiB " \
                "is free"
        exiting = [info for info in on_card if info["exiting"]]
        if exiting:
            names = ", ".join(f"{h['name']!r} ({h['state']}, pid {h['pid'] or h['launch_pid']})" for h in exiting)
            raise UserError(f"{needs}; run {names} has ended but its process is still exiting and holds memory "
                            f"there (waited {waited:.1f} s): try again shortly")
        why = []
        if held:
            why.append(f"run {', '.join(repr(h['name']) for h in held)} trains on it: wait for it to end or stop it "
                       "in the Runs tab")
        names = {h["name"] for h in ended or []}
        gone = [h for h in on_card if h["name"] in names and not h["live"]]  # not resumed meanwhile
        if gone:  # its process is gone, yet the free memory did not come back while we waited
            runs_ended = ", ".join(f"{h['name']!r} ({h['state']}" + (
                f" {time.time() - h['updated']:.0f} s ago)" if h.get("updated") else ")") for h in gone)
            why.append(f"run {runs_ended} has ended but its memory was not released: still held after waiting "
                       f"{waited:.1f} s; try again shortly, nvidia-smi shows what holds the card")
        raise UserError(f"{needs}; {'; '.join(why) or 'another process holds the rest'} (or start the studio on a "
                        "free card with CUDA_VISIBLE_DEVICES)")

    def _just_ended(self, info: dict) -> bool:
        """Did this run end (its process gone) recently enough that the driver may still be freeing its memory?
        Within exit_wait_s of its final status: one that ended earlier has had all the time the wait would give.
        A run with no process recorded (taken off the queue) never held the card, nor does a run on another host."""
        updated = info.get("updated")
        return (not info["live"] and not info["remote"] and bool(info["pid"] or info["launch_pid"])
                and updated is not None and time.time() - updated < self.exit_wait_s)

    def _wait_for_release(self, ended: list[dict], need: float, mem: tuple[int, int]) -> tuple[float, tuple[int, int]]:
        """Wait, exit_wait_s at most in all, for these ended runs' processes to be gone (reading their state on each
        poll: a run resumed meanwhile is live again and leaves the wait; the decision after sees it live), then for
        the driver to give their memory back: read the free memory until `need` fits or it has not grown for
        settle_s. Returns (seconds waited, the last (free, total) reading)."""
        start = time.monotonic()
        deadline = start + self.exit_wait_s
        exiting = [info for info in ended if info["exiting"]]
        while exiting and time.monotonic() < deadline:
            time.sleep(EXIT_POLL_S)
            exiting = [info for info in (runs.run_info(h["path"]) for h in exiting) if info["exiting"]]
        if exiting:  # past the bound with a process still there: the decision names it
            return time.monotonic() - start, mem
        most, grew = mem[0], time.monotonic()
        # `mem` was read before any wait: within the bound at least one fresh reading follows (it was short)
        while mem[0] < need and time.monotonic() < deadline and time.monotonic() - grew < self.settle_s:
            time.sleep(max(0.0, min(EXIT_POLL_S, deadline - time.monotonic())))
            mem = self.mem_info()
            if mem[0] > most:  # still being released: the settle interval starts again
                most, grew = mem[0], time.monotonic()
        return time.monotonic() - start, mem


def make_room_for_run(service, gpus: str) -> str:
    """Drop the studio's cached model stacks when a run is about to start on the studio's card; returns a note
    for the start message ('' when nothing was dropped)."""
    if service is None or not service.loaded_on_gpu():
        return ""
    if studio_gpu() not in procs.held_gpus(gpus):
        return ""
    service.unload()
    return f" The studio's inference model was unloaded from GPU {studio_gpu()} to leave the card to the run."
