"""Exponential moving average of the trainable parameters (Flow-GRPO style).

RL updates are noisy; the EMA of the adapter weights is what gets evaluated and released. The decay
warms up as ``min((1 + step) / (10 + step), decay)`` so the average is not dominated by the initial
weights early on. Folding only every k-th step (``update_interval``) keeps the horizon in optimizer steps:
one fold uses the product of the k per-step decays it stands for (``decay^k`` once the ramp is past),
so the average spans ``1 / (1 - decay)`` steps whatever k is. The shadow copy is float32 even when the parameters are bf16, so that updates of
size ``(1 - d)`` are not rounded away.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

__all__ = ["ParamEMA", "ema_decay_at", "fold_decay"]


def ema_decay_at(step: int, decay: float) -> float:
    """Effective decay at optimisation step ``step`` (0-based)."""
    return min((1.0 + step) / (10.0 + step), decay)


def fold_decay(step: int, decay: float, interval: int) -> float:
    """The decay of one fold at ``step`` that stands for the ``interval`` steps ending there: the product
    of their per-step decays, so that folding every k steps has the horizon of folding every step."""
    out = 1.0
    for s in range(max(0, step - interval + 1), step + 1):
        out *= ema_decay_at(s, decay)
    return out


class ParamEMA:
    """EMA of a fixed list of parameters (pass the trainable ones only).

    ``step(params, global_step)`` updates when ``(global_step + 1) % update_interval == 0``, i.e. on
    the last step of every interval, with ``ema += (1 - d)(p - ema)``,
    ``d = fold_decay(global_step, decay, update_interval)`` (``ema_decay_at(global_step)`` for interval 1).
    """

    def __init__(self, params: Iterable[torch.Tensor], decay: float = 0.9999, update_interval: int = 1,
                 device: str | torch.device | None = None):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if int(update_interval) < 1:
            raise ValueError(f"update_interval must be >= 1, got {update_interval}")
        self.decay = float(decay)
        self.update_interval = int(update_interval)
        # `device="cpu"` keeps the float32 shadow in host memory (12 GB for the full adapter): each update
        # then copies the weights over PCIe, so pair it with an update_interval > 1 on big adapters.
        self.shadow = [p.detach().to(device=device or p.device, dtype=torch.float32, copy=True) for p in params]
        self.num_updates = 0

    def _check(self, params: list[torch.Tensor]) -> None:
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA holds {len(self.shadow)} tensors, got {len(params)} parameters")
        for e, p in zip(self.shadow, params):
            if e.shape != p.shape:
                raise ValueError(f"EMA shape {tuple(e.shape)} does not match parameter {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, params: Iterable[torch.Tensor], global_step: int) -> bool:
        """Fold the current parameters into the average; returns whether an update happened."""
        params = list(params)
        self._check(params)
        if (global_step + 1) % self.update_interval != 0:
            return False
        one_minus_d = 1.0 - fold_decay(global_step, self.decay, self.update_interval)
        for e, p in zip(self.shadow, params):
            e.add_(p.detach().to(device=e.device, dtype=torch.float32) - e, alpha=one_minus_d)
        self.num_updates += 1
        return True

    @torch.no_grad()
    def copy_to(self, params: Iterable[torch.Tensor]) -> None:
        """Write the averaged weights into ``params`` (cast to each parameter's dtype)."""
        params = list(params)
        self._check(params)
        for e, p in zip(self.shadow, params):
            p.copy_(e.to(device=p.device, dtype=p.dtype))

    @contextlib.contextmanager
    def swapped_in(self, params: Iterable[torch.Tensor]) -> Iterator[None]:
        """Evaluate with the EMA weights; the raw weights are restored bit for bit afterwards,
        even when the body raises. The raw weights wait on the shadow's device (host memory for an EMA
        kept there): no second copy of them on the GPU."""
        params = list(params)
        self._check(params)
        with torch.no_grad():
            backup = [p.detach().to(e.device, copy=True) for p, e in zip(params, self.shadow)]
        self.copy_to(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        """``{"tensors": {"ema.<i>": float32 tensor}, "meta": {ints/floats}}`` — the tensors can go
        straight into a safetensors file and the meta into its metadata or a JSON file."""
        return {
            "tensors": {f"ema.{i}": e.detach().clone() for i, e in enumerate(self.shadow)},
            "meta": {"num_params": len(self.shadow), "num_updates": int(self.num_updates),
                     "update_interval": int(self.update_interval), "decay": float(self.decay)},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        tensors, meta = state["tensors"], state["meta"]
        if int(meta["num_params"]) != len(self.shadow) or len(tensors) != len(self.shadow):
            raise ValueError(f"EMA state holds {meta['num_params']} tensors, expected {len(self.shadow)}")
        for i, e in enumerate(self.shadow):
            t = tensors[f"ema.{i}"]
            if t.shape != e.shape:
                raise ValueError(f"EMA tensor {i}: shape {tuple(t.shape)} vs {tuple(e.shape)}")
            e.copy_(t.to(device=e.device, dtype=torch.float32))
        self.num_updates = int(meta["num_updates"])
        self.update_interval = int(meta["update_interval"])
        self.decay = float(meta["decay"])
