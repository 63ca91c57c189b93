"""What crosses processes: rewards before advantages, gradients before the optimizer step.

Only the adapter trains and its forward runs inside the frozen transformer's attention processors, so
wrapping it in DDP would not see its own forward; instead gradients are averaged explicitly, flattened
into one buffer (one all-reduce per optimizer step).
"""

from __future__ import annotations

import numpy as np
import torch


def gather_rewards(accelerator, group_keys: list[int], rewards: np.ndarray) -> tuple[list[int], np.ndarray]:
    """All processes' (group key, reward) in rank order; every process gets the same arrays."""
    if accelerator is None or accelerator.num_processes == 1:
        return list(group_keys), np.asarray(rewards, dtype=np.float64)
    device = accelerator.device
    keys = accelerator.gather(torch.as_tensor(group_keys, dtype=torch.long, device=device))
    vals = accelerator.gather(torch.as_tensor(rewards, dtype=torch.float64, device=device))
    return keys.cpu().tolist(), vals.cpu().numpy()


def own_slice(values: np.ndarray, accelerator, per_process: int) -> np.ndarray:
    rank = 0 if accelerator is None else accelerator.process_index
    return values[rank * per_process:(rank + 1) * per_process]


def average_gradients(params: list[torch.nn.Parameter], accelerator) -> None:
    if accelerator is None or accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def mean_across(accelerator, stats: dict[str, float]) -> dict[str, float]:
    """Average float stats over processes (for logging only)."""
    if accelerator is None or accelerator.num_processes == 1 or not stats:
        return stats
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.cpu().tolist()))
