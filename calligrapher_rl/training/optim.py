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


def optimizer_class(params: list[torch.nn.Parameter], *, lr: float, betas: tuple[float, float], weight_decay: float,
                    eps: float, use_8bit: bool) -> tuple[type, dict]:
    """The AdamW class (and its keyword arguments) for parameters on `params[0]`'s device."""
    opt_cls = adamw_8bit_class() if use_8bit else torch.optim.AdamW
    kwargs = dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if use_8bit and params and params[0].device.type == "cpu" and opt_cls.__module__.startswith("torchao"):
        # torchao's 8-bit state has no CPU kernels worth using; plain AdamW keeps CPU runs (tests) exact
        logger.warning("--use_8bit_adam: CPU parameters, using fp32 AdamW")
        opt_cls = torch.optim.AdamW
    if opt_cls is torch.optim.AdamW and params and params[0].device.type == "cuda":
        kwargs["fused"] = True  # one kernel over all parameters instead of several per tensor (same math)
    return opt_cls, kwargs


def make_optimizer(params: list[torch.nn.Parameter], *, lr: float, betas: tuple[float, float], weight_decay: float,
                   eps: float, use_8bit: bool, shard: bool, flat: bool = False) -> torch.optim.Optimizer:
    """AdamW over `params`; 8-bit moments when `use_8bit`; moments sharded over processes when `shard`
    (needs an initialised torch.distributed process group); the parameters updated as one flat tensor when
    `flat` (FlatOptimizer: for many small tensors, e.g. LoRA's)."""
    opt_cls, kwargs = optimizer_class(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, use_8bit=use_8bit)

    def build(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if shard:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            return ZeroRedundancyOptimizer(ps, optimizer_class=opt_cls, **kwargs)
        return opt_cls(ps, **kwargs)

    if flat:
        import torch.distributed as dist

        return FlatOptimizer(params, build, chunks=dist.get_world_size() if shard else 1)
    return build(params)


class FlatOptimizer(torch.optim.Optimizer):
    """Many small trainable tensors (LoRA: 768-920 of them, ~100-137 M parameters) updated as ONE flat fp32
    tensor by an inner optimizer. torchao's AdamW8bit runs one compiled call per tensor (~0.75 ms of Python and
    dynamo each, ~0.6-0.9 s a step for LoRA, and one compile per distinct shape); over one flat tensor it is
    one call. The model's parameters stay the truth (policies swap weights in and out of them, checkpoints
    load into them, the EMA reads them), so they never alias the flat buffer: `step` copies them in, steps,
    and copies the result back (one foreach copy each way: LoRA-sized, cheap next to the step).

    With `chunks` > 1 (ZeRO-1 over that many processes) the flat buffer is split into that many equal,
    contiguous Parameters (views of it): ZeroRedundancyOptimizer gives each rank one chunk, so each rank
    keeps 1/N of the moments, and its broadcast of the updated chunks writes straight into the buffer.
    `param_groups`, `state`, `state_dict` and `load_state_dict` are the inner optimizer's: the LR scheduler
    writes its groups' lr, and checkpoints hold its (flat) state.

    A parameter whose `.grad` is None while others have one steps with a zero gradient (its moments decay,
    weight decay applies, the step count is shared), where per-tensor AdamW would skip it; when no parameter
    has a gradient nothing moves, as with per-tensor AdamW."""

    ALIGN = 256  # each chunk a multiple of torchao's quantization block: otherwise it keeps fp32 moments

    def __init__(self, params: list[torch.nn.Parameter], build, *, chunks: int = 1):
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        if len({(p.device, p.dtype) for p in params}) != 1:
            raise ValueError("FlatOptimizer: every parameter must have the same device and dtype")
        self.params = params
        total = sum(p.numel() for p in params)
        unit = self.ALIGN * chunks
        padded = -(-total // unit) * unit  # the padding's values and gradients are zero: AdamW leaves it at 0
        self.flat = torch.zeros(padded, device=params[0].device, dtype=params[0].dtype)
        self.offsets = [0]
        for p in params[:-1]:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.views = self._split(self.flat)
        size = padded // chunks
        self.chunks = [torch.nn.Parameter(self.flat[i * size:(i + 1) * size]) for i in range(chunks)]
        self.flat_grad = None
        self.inner = build(self.chunks)
        # ZeRO's bucket views would re-point the chunks away from the buffer that the copy back reads
        assert all(c.data_ptr() == self.flat.data_ptr() + i * size * self.flat.element_size()
                   for i, c in enumerate(self.chunks)), "the chunks must stay views of the flat buffer"
        super().__init__(self.chunks, self.inner.defaults)  # hooks and step profiling, as any optimizer
        self._share_inner()

    def _split(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat buffer shaped as the parameters."""
        return [buffer[o:o + p.numel()].view_as(p) for o, p in zip(self.offsets, self.params)]

    def _share_inner(self) -> None:
        # The inner's own lists and dicts (not copies): the scheduler's lr writes, reset_state's clear and
        # the checkpoint act on the optimizer that steps. Re-shared after load_state_dict, which rebinds them.
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for p in self.params]
        if all(g is None for g in grads):
            return loss
        torch._foreach_copy_(self.views, [p.detach() for p in self.params])  # the weights may have been swapped
        self.flat_grad = torch.zeros_like(self.flat)
        have = [i for i, g in enumerate(grads) if g is not None]
        grad_views = self._split(self.flat_grad)
        torch._foreach_copy_([grad_views[i] for i in have], [grads[i] for i in have])
        size = self.chunks[0].numel()
        for i, c in enumerate(self.chunks):
            c.grad = self.flat_grad[i * size:(i + 1) * size]
        self.inner.step()
        torch._foreach_copy_([p.detach() for p in self.params], self.views)
        for c in self.chunks:  # the flat gradient is the step's only: not kept through the rollouts
            c.grad = None
        self.flat_grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict)
        self._share_inner()


def flat_state_dict(optimizer, state_dict: dict) -> dict:
    """A checkpoint's optimizer state in the layout of `optimizer`: LoRA checkpoints written before
    FlatOptimizer hold one state per tensor; their moments are concatenated into the flat layout (torchao's
    8-bit ones dequantized and quantized again in the flat blocks). Anything else is returned as it is."""
    groups = state_dict.get("param_groups")
    if not isinstance(optimizer, FlatOptimizer) or not isinstance(groups, list) or len(groups) != 1 or \
            len(groups[0].get("params", ())) != len(optimizer.params) or len(optimizer.params) == len(optimizer.chunks):
        return state_dict
    old = [state_dict["state"].get(pid, {}) for pid in groups[0]["params"]]
    names = sorted({k for st in old for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() > 0})
    size = optimizer.chunks[0].numel()
    state = {}
    known = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}  # AdamW's (torch, torchao); bitsandbytes' are its own
    fits = all(st[n].numel() == p.numel() for st, p in zip(old, optimizer.params) for n in names if n in st)
    if old and all(old) and names and set(names) <= known and fits:
        new_buffer = getattr(optimizer.inner, "_new_buffer", None)  # torchao: a zero 8-bit buffer (fp32 under ZeRO)
        flat = {}
        for name in names:
            parts = [getattr(st[name], "dequantize", st[name].float)().float().reshape(-1) for st in old]
            whole = torch.zeros(size * len(optimizer.chunks))
            whole[:sum(t.numel() for t in parts)] = torch.cat(parts)
            flat[name] = whole
        for i, chunk in enumerate(optimizer.chunks):
            step = old[0]["step"]  # every tensor's, unless some had no gradient; a copy: AdamW adds to it in place
            st = {"step": step.clone() if isinstance(step, torch.Tensor) else step}
            for name, whole in flat.items():
                part = whole[i * size:(i + 1) * size].to(chunk.device)
                st[name] = new_buffer(chunk, name == "exp_avg").copy_(part) if new_buffer else part
            state[i] = st
    elif any(old):  # e.g. bitsandbytes' quantized state, or some tensors without state: fresh moments
        logger.warning("the checkpoint's optimizer state has no moments this version can read: they start afresh")
    return {"state": state, "param_groups": [{**groups[0], "params": list(range(len(optimizer.chunks)))}]}


def _inner(optimizer):
    return optimizer.inner if isinstance(optimizer, FlatOptimizer) else optimizer


def is_sharded(optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(_inner(optimizer), ZeroRedundancyOptimizer)


def consolidated_state_dict(optimizer) -> dict | None:
    """The whole optimizer state on the main process (None elsewhere). Every process must call it:
    with sharded state it is a collective."""
    optimizer = _inner(optimizer)
    if not is_sharded(optimizer):
        return optimizer.state_dict()
    import torch.distributed as dist

    optimizer.consolidate_state_dict(to=0)
    return optimizer.state_dict() if dist.get_rank() == 0 else None


def reset_state(optimizer) -> None:
    """Forget the moments (e.g. when RL begins after a supervised warmup); the sharded optimizer keeps
    its rank's moments in an inner optimizer (and the flat one in its inner)."""
    optimizer = _inner(optimizer)
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
        if isinstance(group["lr"], torch.Tensor):  # torchao's optimizers keep lr as a tensor and refuse a float
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    scheduler._last_lr = lrs
