"""What crosses processes: rewards before advantages, gradients before the optimizer step.

Only the adapter trains, and its forward runs inside the frozen transformer's attention processors. The
module that holds both (`CalligrapherModel`) is therefore what goes through `accelerator.prepare`: DDP sees
the adapter's forward, registers only the parameters that require grad, and all-reduces their gradients in
buckets while the backward is still running. The 12 B frozen transformer is told to DDP as "ignored", so it
is neither broadcast at start nor part of any bucket.
"""

from __future__ import annotations

import contextlib

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


def prepare_data_parallel(accelerator, stack) -> bool:
    """Wrap the stack's trainable module in accelerate's DDP (several processes only); returns whether it
    did. Call after the trainable set is chosen: DDP registers the parameters that require grad then."""
    if accelerator is None or accelerator.num_processes == 1:
        return False
    from accelerate.utils import DistributedDataParallelKwargs
    from torch.nn.parallel import DistributedDataParallel

    model = stack.model
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    # gradient_as_bucket_view: the gradients live in DDP's buckets, no second full-size copy of them
    accelerator.ddp_handler = DistributedDataParallelKwargs(gradient_as_bucket_view=True, bucket_cap_mb=100)
    stack.train_model = accelerator.prepare_model(model, device_placement=False)
    return True


def gradient_sync(stack, sync: bool):
    """Context for a forward+backward: `sync=False` accumulates locally (DDP's no_sync); the first synced
    backward after it all-reduces the accumulated sum. Without DDP it does nothing."""
    model = stack.train_model
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


@contextlib.contextmanager
def sync_on_last_backward(stack, backward, calls: int, sync: bool):
    """Context for one batch trained by `calls` forward+backward pairs (GRPO's steps, NFT's timesteps);
    yields the backward to use. DDP all-reduces on the last pair only, and only when `sync` (the batch that
    ends its accumulation group): one all-reduce per optimizer step, not one per trained timestep. DDP
    decides at the forward whether the next backward reduces, so the flag turns on right after the
    next-to-last backward. Without DDP it yields `backward` unchanged."""
    model = stack.train_model
    if not hasattr(model, "require_backward_grad_sync"):
        yield backward
        return
    before, done = model.require_backward_grad_sync, 0

    def counted(loss):
        nonlocal done
        backward(loss)
        done += 1
        model.require_backward_grad_sync = sync and done == calls - 1

    model.require_backward_grad_sync = sync and calls == 1
    try:
        yield counted
    finally:
        model.require_backward_grad_sync = before


def average_gradients(params: list[torch.nn.Parameter], accelerator, stack=None) -> None:
    """The fallback for a run whose trainable module is not DDP-wrapped (DDP already averaged otherwise)."""
    if accelerator is None or accelerator.num_processes == 1:
        return
    if stack is not None and hasattr(stack.train_model, "no_sync"):
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


def end_process_group(accelerator, synchronize: bool = True) -> None:
    """Tear torch.distributed down while the interpreter is fully alive, every rank together: call it last,
    after dropping the trainer. Left to the interpreter's exit, the gloo process group (kept alive by DDP's
    reducer, which accelerate's list of prepared models and the ZeRO optimizer reference) is destroyed during
    finalization: its worker threads still hold work objects with tensors whose release needs the GIL of an
    interpreter being torn down, and the process aborts ("terminate called without an active exception",
    SIGABRT) after a run that succeeded. `synchronize`: a barrier first, so that no rank closes its
    connections while another still uses them (only where every rank gets here)."""
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize:
        dist.barrier()
    if accelerator is not None:
        accelerator.free_memory()  # its list of prepared models holds the DDP wrapper (and gc-collects)
    gc.collect()  # the reducer and the ZeRO optimizer go before their process group
    dist.destroy_process_group()
    gc.collect()
