"""The adapter's optimizer: AdamW, 8-bit AdamW, and its state sharded across processes.

Memory of the full official adapter (3.0 B parameters, fp32 master weights) on one card:
weights 12 GB + gradients 12 GB + AdamW's two moments 24 GB. 8-bit AdamW (torchao, block-wise quantized
moments, or bitsandbytes) keeps the moments in 6 GB. On several processes the moments are sharded with
`ZeroRedundancyOptimizer` (ZeRO stage 1): each rank keeps and updates 1/N of them and broadcasts its
slice of the new weights, so adding GPUs adds room. The checkpoint always holds the consolidated state.
"""

from __future__ import annotations

import logging

import torch

from ..errors import UserError

logger = logging.getLogger("calligrapher_rl.training")


def adamw_8bit_class():
    """torchao's AdamW8bit when importable (pure PyTorch + Triton, no extra binary), else bitsandbytes'."""
    try:
        from torchao.optim import AdamW8bit

        return AdamW8bit
    except ImportError:
        pass
    try:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit
    except ImportError:
        raise UserError("needs torchao or bitsandbytes (pip install torchao)", field="--use_8bit_adam") from None


def make_optimizer(params: list[torch.nn.Parameter], *, lr: float, betas: tuple[float, float], weight_decay: float,
                   eps: float, use_8bit: bool, shard: bool) -> torch.optim.Optimizer:
    """AdamW over `params`; 8-bit moments when `use_8bit`; moments sharded over processes when `shard`
    (needs an initialised torch.distributed process group)."""
    opt_cls = adamw_8bit_class() if use_8bit else torch.optim.AdamW
    kwargs = dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if use_8bit and params and params[0].device.type == "cpu" and opt_cls.__module__.startswith("torchao"):
        # torchao's 8-bit state has no CPU kernels worth using; plain AdamW keeps CPU runs (tests) exact
        logger.warning("--use_8bit_adam: CPU parameters, using fp32 AdamW")
        opt_cls = torch.optim.AdamW
    if opt_cls is torch.optim.AdamW and params and params[0].device.type == "cuda":
        kwargs["fused"] = True  # one kernel over all parameters instead of several per tensor (same math)
    if shard:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=opt_cls, **kwargs)
    return opt_cls(params, **kwargs)


def is_sharded(optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def consolidated_state_dict(optimizer) -> dict | None:
    """The whole optimizer state on the main process (None elsewhere). Every process must call it:
    with sharded state it is a collective."""
    if not is_sharded(optimizer):
        return optimizer.state_dict()
    import torch.distributed as dist

    optimizer.consolidate_state_dict(to=0)
    return optimizer.state_dict() if dist.get_rank() == 0 else None


def reset_state(optimizer) -> None:
    """Forget the moments (e.g. when RL begins after a supervised warmup); the sharded optimizer keeps
    its rank's moments in an inner optimizer."""
    optimizer.state.clear()
    if is_sharded(optimizer):
        optimizer.optim.state.clear()


def with_restart_warmup(scheduler, steps: int):
    """Give a LambdaLR (diffusers' schedules are) a second, linear warmup over `steps` optimizer steps that
    `restart_warmup` starts: when RL resets AdamW's moments, its first steps would otherwise be sign-like
    steps of size lr on every weight of an already trained adapter. The step it started at is an attribute of
    the scheduler, so it is in the scheduler's state_dict and a resumed run continues the same ramp."""
    scheduler.rl_lr_start = None

    def warmed(base):
        def factor(count: int) -> float:
            start = scheduler.rl_lr_start
            ramp = 1.0 if start is None or steps <= 0 else min(1.0, max(0, count - start + 1) / steps)
            return base(count) * ramp
        return factor

    scheduler.lr_lambdas = [warmed(f) for f in scheduler.lr_lambdas]
    return scheduler


def restart_warmup(scheduler) -> None:
    """Start the scheduler's second warmup (see `with_restart_warmup`) at its current step: the next
    optimizer step already uses the first rung of the ramp."""
    scheduler.rl_lr_start = scheduler.last_epoch
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
