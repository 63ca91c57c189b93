"""The optimizer step over LoRA-shaped parameters on one GPU: torchao's AdamW8bit per tensor (one compiled
call per tensor) against optim.FlatOptimizer (one call over one flat tensor), with a LambdaLR and the RL
warmup ramp writing lr, a state_dict round trip and reset_state.

    python bench/flat_optimizer_bench.py [--tensors 920] [--rank 32] [--steps 10]

Prints one JSON line: seconds to the end of the first step (compiles included), steady seconds per step,
and the largest relative difference between the two runs' weights (8-bit moments are quantized per block,
and the blocks differ between the two layouts: close, not equal)."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from calligrapher_rl.training.optim import (  # noqa: E402
    FlatOptimizer,
    flat_state_dict,
    make_optimizer,
    reset_state,
    restart_warmup,
    with_restart_warmup,
)


def lora_params(n: int, rank: int, device) -> list[torch.nn.Parameter]:
    """n tensors as peft makes them: A (rank, in) and B (out, rank) pairs over FLUX's widths."""
    widths = [3072, 12288, 3072, 4096]
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for i in range(n // 2):
        w_in, w_out = widths[i % len(widths)], widths[(i + 1) % len(widths)]
        out.append(torch.nn.Parameter(torch.randn(rank, w_in, device=device, generator=g) * 0.01))
        out.append(torch.nn.Parameter(torch.randn(w_out, rank, device=device, generator=g) * 0.01))
    return out


def run(flat: bool, args, device) -> dict:
    params = lora_params(args.tensors, args.rank, device)
    opt = make_optimizer(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, use_8bit=True,
                         shard=False, flat=flat)
    sched = with_restart_warmup(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4)), 3)
    inner = opt.inner if isinstance(opt, FlatOptimizer) else opt
    g = torch.Generator(device=device).manual_seed(1)
    grads = [[torch.randn(p.shape, device=device, generator=g) * 1e-3 for p in params] for _ in range(2)]
    times = []
    for step in range(args.steps):
        for p, gr in zip(params, grads[step % 2]):
            p.grad = gr.clone()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step == 2:
            restart_warmup(sched)  # writes lr: torchao keeps it as a tensor
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=False)
    opt.load_state_dict(sd)
    moments = next(iter(opt.state.values()))
    kind = type(moments["exp_avg"]).__name__
    reset_state(opt)
    return {"params": params, "state_dict": sd, "first_s": times[0], "step_s": sorted(times[2:])[len(times[2:]) // 2],
            "inner": type(inner).__name__, "moment_type": kind, "state_after_reset": len(opt.state),
            "lr": float(opt.param_groups[0]["lr"]), "tensors": len(params),
            "numel": sum(p.numel() for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=920)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    device = torch.device("cuda")
    flat = run(True, args, device)
    per_tensor = run(False, args, device)
    rel = max(float((a - b).norm() / b.norm()) for a, b in zip(flat.pop("params"), per_tensor.pop("params")))
    # a per-tensor 8-bit state (a LoRA checkpoint of an older version) in the flat layout, then one step
    flat.pop("state_dict")
    params = lora_params(args.tensors, args.rank, device)
    opt = make_optimizer(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, use_8bit=True,
                         shard=False, flat=True)
    opt.load_state_dict(flat_state_dict(opt, per_tensor.pop("state_dict")))
    for p in params:
        p.grad = torch.ones_like(p) * 1e-3
    opt.step()
    converted = {k: type(v).__name__ for k, v in next(iter(opt.state.values())).items()}
    print(json.dumps({"device": torch.cuda.get_device_name(), "flat": flat, "per_tensor": per_tensor,
                      "max_rel_weight_diff": rel, "converted_state": converted}))


if __name__ == "__main__":
    main()
