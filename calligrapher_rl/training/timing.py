"""Where each second of a run goes: wall time per phase, and the transformer's achieved TFLOP/s.

`PhaseClock` times nested phases (an optimizer step inside the update counts as `optimizer`, not twice):
entering a phase pauses its parent. On CUDA it waits for queued kernels at each boundary, so a phase is
charged for its own GPU work rather than for whatever the next host sync happens to wait on; a boundary
costs one `synchronize` (microseconds next to a phase of seconds). The trainer logs `time/<phase>_s` in
each row and `perf/*_tflops` from the forward counts that `CalligrapherStack.velocity` keeps.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


class PhaseClock:
    def __init__(self, device=None):
        cuda = torch.device(device).type == "cuda" if device is not None else False
        self._sync = torch.cuda.synchronize if cuda and torch.cuda.is_available() else (lambda: None)
        self.totals: dict[str, float] = defaultdict(float)
        self._open: list[list] = []  # [name, start of its current stretch]
        self.spans: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        now = time.perf_counter()
        if self._open:  # the parent pauses
            parent = self._open[-1]
            self.totals[parent[0]] += now - parent[1]
        self._open.append([name, now])
        try:
            yield
        finally:
            self._sync()
            now = time.perf_counter()
            self.totals[name] += now - self._open.pop()[1]
            if self._open:
                self._open[-1][1] = now

    @contextlib.contextmanager
    def span(self, name: str):
        """Time a stretch inside the open phase without pausing it (the phase is still charged for it): e.g.
        the sampler's own share of the rollout phase. `take_span(name)` returns and resets its total."""
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.spans[name] += time.perf_counter() - start

    def take_span(self, name: str) -> float:
        return self.spans.pop(name, 0.0)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] += seconds

    def take(self) -> dict[str, float]:
        """`time/<phase>_s` of everything timed since the last take, and reset."""
        out = {f"time/{k}_s": v for k, v in self.totals.items()}
        self.totals.clear()
        return out


def transformer_flops_per_image(transformer: torch.nn.Module, image_tokens: int, text_tokens: int) -> float:
    """FLOPs of one forward of the transformer for one image, counted by torch's FlopCounterMode on a
    copy built on the meta device (no memory, no time): matmuls and attention at the run's shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = transformer.config
    with torch.device("meta"):
        model = type(transformer).from_config(cfg)
        x = torch.zeros(1, image_tokens, cfg.in_channels)
        kwargs = dict(hidden_states=x, timestep=torch.ones(1),
                      pooled_projections=torch.zeros(1, cfg.pooled_projection_dim),
                      encoder_hidden_states=torch.zeros(1, text_tokens, cfg.joint_attention_dim),
                      txt_ids=torch.zeros(text_tokens, 3), img_ids=torch.zeros(image_tokens, 3), return_dict=False)
        if cfg.guidance_embeds:
            kwargs["guidance"] = torch.ones(1)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(**kwargs)
    return float(counter.get_total_flops())


class Throughput:
    """Achieved transformer TFLOP/s per phase from forward counts: a no-gradient forward is 1 unit of the
    per-image FLOPs, a gradient forward + backward 3 (backward ~ 2 forwards; the recomputation of
    gradient checkpointing is not counted, as MFU conventions do not count it)."""

    def __init__(self, flops_per_image: float):
        self.flops = flops_per_image

    def tflops(self, images_no_grad: int, images_grad: int, seconds: float) -> float:
        if seconds <= 0:
            return float("nan")
        return (images_no_grad + 3 * images_grad) * self.flops / seconds / 1e12


def since_process_start() -> float:
    """Seconds since this process started (the command's start, imports and model loading included)."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or the process table unreadable
        return float("nan")


def timed_phase(name: str):
    """Decorator: charge a method's time to phase `name` of `self.clock` (the trainer's, or a part's: the same clock)."""
    import functools

    def wrap(method):
        @functools.wraps(method)
        def inner(self, *args, **kwargs):
            with self.clock(name):
                return method(self, *args, **kwargs)

        return inner

    return wrap
