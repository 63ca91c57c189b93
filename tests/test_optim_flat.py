"""optim.FlatOptimizer: LoRA's many small tensors stepped as one flat tensor give per-tensor AdamW's result
bit for bit, resume exactly from their state dict, and the moments can be reset. CPU, deterministic, seconds."""

from __future__ import annotations

import io

import pytest
import torch

from calligrapher_rl.config_parse import parse_args
from calligrapher_rl.training.optim import (
    FlatOptimizer,
    consolidated_state_dict,
    flat_state_dict,
    is_sharded,
    make_optimizer,
    reset_state,
    with_restart_warmup,
)
from calligrapher_rl.training.setup import build_optimizer

SHAPES = [(3, 5), (7,), (4, 4, 2), (1,), (33, 9), (16, 64), (5, 1, 3)]  # odd sizes: views start mid-vector
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-8)
NONE_AT = {1: {2}, 3: {0, 5}}  # step -> parameters with no gradient on that step (each has one, zero, below)
NO_GRAD_STEP = 4  # a step where no parameter has a gradient: nothing moves, as with per-tensor AdamW


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _flat_opt(params):
    return make_optimizer(params, **HYPER, use_8bit=False, shard=False, flat=True)


def _schedule(opt):
    """A LambdaLR that changes lr every step (diffusers' schedules are LambdaLRs), with optim.py's RL ramp."""
    return with_restart_warmup(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s) + 0.1 * (s % 3)), 3)


def _run(params, opt, sched, steps, *, per_tensor: bool, start: int = 0, swap: bool = True):
    """`steps` optimizer steps from step `start`. The per-tensor reference gets a zero gradient where the flat
    run's parameter has None (the flat optimizer's documented semantics for a partial step)."""
    for step in range(start, start + steps):
        if swap and step == 2:  # weights written from outside between steps (a policy swap, a checkpoint load)
            with torch.no_grad():
                params[1].mul_(0.5)
        g = torch.Generator().manual_seed(100 + step)
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g)
            if step == NO_GRAD_STEP:
                p.grad = None
            elif i in NONE_AT.get(step, ()):
                p.grad = torch.zeros_like(p) if per_tensor else None
            else:
                p.grad = grad
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def test_flat_adamw_is_bit_identical_to_per_tensor_adamw():
    ref, flat = _params(), _params()
    ref_opt = torch.optim.AdamW(ref, **HYPER)
    flat_opt = _flat_opt(flat)
    assert isinstance(flat_opt, FlatOptimizer) and flat_opt.param_groups is flat_opt.inner.param_groups
    ref_sched, flat_sched = _schedule(ref_opt), _schedule(flat_opt)
    _run(ref, ref_opt, ref_sched, 6, per_tensor=True)
    _run(flat, flat_opt, flat_sched, 6, per_tensor=False)
    assert flat_sched.get_last_lr() == ref_sched.get_last_lr()
    assert flat_opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] != HYPER["lr"]
    for a, b in zip(ref, flat):
        assert torch.equal(a, b)
    # the model's parameters are never views of the flat buffer, and no flat gradient outlives the step
    lo, hi = flat_opt.flat.data_ptr(), flat_opt.flat.data_ptr() + flat_opt.flat.numel() * 4
    assert all(not lo <= p.data_ptr() < hi for p in flat)
    assert flat_opt.flat_grad is None and all(c.grad is None for c in flat_opt.chunks)
    assert all(p.grad is None for p in flat)


def test_a_step_without_any_gradient_moves_nothing():
    params = _params()
    opt = _flat_opt(params)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert opt.state == {} and all(torch.equal(a, b) for a, b in zip(before, params))


def test_flat_state_dict_resumes_exactly():
    straight, first = _params(), _params()
    opt, sched = _flat_opt(straight), None
    sched = _schedule(opt)
    _run(straight, opt, sched, 6, per_tensor=False)

    opt1 = _flat_opt(first)
    sched1 = _schedule(opt1)
    _run(first, opt1, sched1, 3, per_tensor=False)
    buf = io.BytesIO()
    torch.save({"optimizer": consolidated_state_dict(opt1), "scheduler": sched1.state_dict(),
                "params": [p.detach().clone() for p in first]}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)  # as checkpointing.py reads it back
    assert not is_sharded(opt1) and len(ck["optimizer"]["state"]) == 1  # one flat tensor's moments

    resumed = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    opt2 = _flat_opt(resumed)
    sched2 = _schedule(opt2)
    with torch.no_grad():
        for p, v in zip(resumed, ck["params"]):
            p.copy_(v)
    opt2.load_state_dict(ck["optimizer"])
    sched2.load_state_dict(ck["scheduler"])
    assert opt2.state is opt2.inner.state and opt2.param_groups is opt2.inner.param_groups  # re-shared
    _run(resumed, opt2, sched2, 3, per_tensor=False, start=3)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_a_per_tensor_checkpoint_of_an_older_version_resumes_exactly():
    """LoRA checkpoints written before FlatOptimizer hold per-tensor AdamW state: flat_state_dict concatenates it,
    and the steps after the resume equal per-tensor AdamW's continued run."""
    ref, flat = _params(), _params()
    ref_opt = torch.optim.AdamW(ref, **HYPER)
    ref_sched = _schedule(ref_opt)
    _run(ref, ref_opt, ref_sched, 3, per_tensor=True, swap=False)
    old_sd = ref_opt.state_dict()
    with torch.no_grad():
        for p, q in zip(flat, ref):
            p.copy_(q)
    opt = _flat_opt(flat)
    sched = _schedule(opt)
    sched.load_state_dict(ref_sched.state_dict())
    converted = flat_state_dict(opt, old_sd)
    assert len(converted["state"]) == 1 and flat_state_dict(opt, converted) is converted  # flat stays as it is
    opt.load_state_dict(converted)
    _run(ref, ref_opt, ref_sched, 3, per_tensor=True, start=5)  # steps without a None gradient
    _run(flat, opt, sched, 3, per_tensor=False, start=5)
    for a, b in zip(ref, flat):
        assert torch.equal(a, b)


def test_reset_state_clears_the_moments():
    params, fresh = _params(), _params()
    opt = _flat_opt(params)
    sched = _schedule(opt)
    _run(params, opt, sched, 3, per_tensor=False, swap=False)
    (moments,) = opt.state.values()
    assert int(moments["step"]) == 3 and moments["exp_avg"].abs().sum() > 0
    reset_state(opt)
    assert opt.state == {} and opt.inner.state == {}
    # the next step is a first step again: the same as a new optimizer's from the same weights and lr
    with torch.no_grad():
        for p, q in zip(fresh, params):
            p.copy_(q)
    other = _flat_opt(fresh)
    other.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
    for ps, o in ((params, opt), (fresh, other)):
        g = torch.Generator().manual_seed(7)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        o.step()
    assert int(next(iter(opt.state.values()))["step"]) == 1
    assert all(torch.equal(a, b) for a, b in zip(params, fresh))


@pytest.mark.parametrize("extra, flat", [(["--trainable", "lora"], True), ([], False), (["--trainable", "attn"], False),
                                         (["--trainable", "lora", "--mixed_precision", "fp16"], False)])
def test_build_optimizer_flattens_only_lora_without_fp16(tmp_path, extra, flat):
    cfg = parse_args(["--preset", "tiny-grpo", "--output_dir", str(tmp_path / "x"), "--use_8bit_adam", "true", *extra])
    opt, _ = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(5))])
    assert isinstance(opt, FlatOptimizer) == flat
    inner = opt.inner if flat else opt
    assert type(inner) is torch.optim.AdamW  # torchao's 8-bit AdamW falls back to fp32 AdamW on CPU
