"""Data-parallel scaling of a GRPO / NFT iteration with the full adapter, through accelerate.

    python bench/multi_gpu_bench.py --out DIR                                   # one GPU
    accelerate launch --multi_gpu --num_processes 2 bench/multi_gpu_bench.py --out DIR   # two, ...

Each process rolls out its own group of 8 at 512^2 (real-size stack, random weights, identical on every rank
by seed), updates the whole adapter (`trainable all`, 3.0 B) through the DDP-wrapped module with 8-bit AdamW
whose state is sharded over the processes (ZeroRedundancyOptimizer), and steps. Rank 0 writes
`DIR/scaling-w{world}.json` (images/s per GPU, per-GPU peak memory) and `DIR/grad-w{world}.pt`: the first
update's gradient on a fixed global batch of `--global_batches` micro-batches (each process takes every W-th),
so that the W-process gradient can be compared with the one-process gradient of the same samples (accumulated
over all of them). `--iters 0` writes the gradients only (the equivalence tests).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from common import build_stack, synthetic_batch  # noqa: I001 (bench/ is the script dir)

from calligrapher_rl.sampling import SDEWindow, rollout
from calligrapher_rl.training.batches import Batch
from calligrapher_rl.training.distributed import end_process_group, gradient_sync, prepare_data_parallel
from calligrapher_rl.training.optim import make_optimizer
from calligrapher_rl.training.policies import Policies
from calligrapher_rl.training.updates import grpo_backward, nft_backward

GROUP = 8


def global_inputs(stack, res, index: int):
    """The inputs of global micro-batch `index`: the same on any world size."""
    torch.manual_seed(1000 + index)
    fill, text, embeds = synthetic_batch(stack, GROUP, res)
    adv = torch.randn(GROUP, generator=torch.Generator().manual_seed(2000 + index)).to(stack.device)
    return fill, text, embeds, adv


def one_update(stack, pol, method, res, index, autocast, steps=6, loss_scale=0.5):
    fill, text, embeds, adv = global_inputs(stack, res, index)
    gen = torch.Generator().manual_seed(3000 + index)
    window = SDEWindow(1, 2)
    with torch.no_grad(), autocast():
        ro = rollout(stack, fill, text, embeds, num_steps=steps, guidance=30.0, noise_level=0.7 if method == "grpo" else 0.0,
                     window=window, generator=gen, params=pol.old if method == "nft" else None)
    batch = Batch(list(range(GROUP)), [{} for _ in range(GROUP)], fill, text, embeds)
    common = dict(policies=pol, guidance=30.0, scale=1.0, kl_beta=1e-4, adv_clip_max=5.0, autocast=autocast)
    if method == "grpo":
        return grpo_backward(stack, batch, ro, adv, window.steps(), noise_level=0.7, sde_type="sde", clip_range=1e-4,
                             loss_scale=loss_scale, **common)
    return nft_backward(stack, batch, ro, adv, 2, beta=0.1, adv_mode="normal",
                        generator=torch.Generator().manual_seed(4000 + index), loss_scale=loss_scale, **common)


def main():
    from accelerate import Accelerator

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", default="grpo,nft")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--trainable", default="all")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--global_batches", type=int, default=2,
                    help="micro-batches of the compared first update; a multiple of the number of processes")
    args = ap.parse_args()
    acc = Accelerator(mixed_precision="no" if args.tiny else "bf16", cpu=args.tiny)
    cuda = acc.device.type == "cuda"
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)
    world, rank = acc.num_processes, acc.process_index
    if args.global_batches % world:
        raise SystemExit(f"--global_batches {args.global_batches}: must be a multiple of the {world} processes")
    torch.manual_seed(0)  # identical random weights on every rank
    stack = build_stack(args.tiny, acc.device, torch.bfloat16 if cuda else torch.float32)
    stack.pipe.text_encoder_2.to("cpu")
    stack.pipe.transformer.enable_gradient_checkpointing()
    res = 64 if args.tiny else 512
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else acc.autocast
    os.makedirs(args.out, exist_ok=True)
    report = {"world": world, "card": torch.cuda.get_device_name(0) if cuda else "cpu", "trainable": args.trainable,
              "group_per_gpu": GROUP, "settings": "512^2, 6-step rollouts, 2 trained steps (GRPO window / NFT "
              "timesteps), KL on, gradient checkpointing, bf16 snapshots, no EMA, eager"}
    pol = Policies(stack.adapter, args.trainable, use_ema=False, ema_decay=0.999, ema_update_interval=1,
                   snapshot_dtype=torch.bfloat16 if cuda else torch.float32)
    prepare_data_parallel(acc, stack)  # once: the trainable set is fixed
    methods = args.methods.split(",")
    for method in methods:  # before any optimizer step, so every world size starts from the same weights
        pol.begin_rl(with_old=method == "nft")
        # equivalence: global micro-batches 0..G-1 on 1 process (accumulated) == G/W each on W processes
        mine = list(range(rank, args.global_batches, world))
        for k, index in enumerate(mine):
            with gradient_sync(stack, sync=k == len(mine) - 1):
                # DDP averages over W processes: each of the G micro-batches weighs 1/G on any world size
                one_update(stack, pol, method, res, index, autocast, loss_scale=0.5 * world / args.global_batches)
        if rank == 0:
            grads = {n: p.grad.detach().float().flatten()[:200_000].cpu() for n, p in pol.named[:4] + pol.named[-4:]}
            torch.save(grads, os.path.join(args.out, f"grad-{method}-w{world}.pt"))
        for p in stack.adapter.parameters():
            p.grad = None
    for method in methods if args.iters > 0 else []:
        pol.begin_rl(with_old=method == "nft")
        try:
            opt = make_optimizer(pol.params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8,
                                 use_8bit=cuda, shard=world > 1)
            opt_kind = f"{type(opt).__name__}" + (f"({opt.optim.__class__.__name__})" if world > 1 else "")
        except Exception as exc:  # record and fall back to fp32 AdamW moments
            opt = make_optimizer(pol.params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8,
                                 use_8bit=False, shard=world > 1)
            opt_kind = f"fp32 AdamW (8-bit failed: {type(exc).__name__}: {str(exc)[:120]})"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for it in range(args.iters):
            if cuda:
                torch.cuda.synchronize()
            acc.wait_for_everyone()
            t0 = time.perf_counter()
            one_update(stack, pol, method, res, 100 + it * world + rank, autocast)
            torch.nn.utils.clip_grad_norm_(pol.params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            acc.wait_for_everyone()
            times.append(time.perf_counter() - t0)
        steady = min(times[1:]) if len(times) > 1 else times[0]
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        peaks = acc.gather(torch.tensor([peak], device=acc.device)).cpu().tolist()
        report[method] = {"images_per_s_per_gpu": round(GROUP / steady, 4), "iteration_s": [round(t, 3) for t in times],
                          "peak_gib_per_gpu": [round(p, 2) for p in peaks], "optimizer": opt_kind}
        if rank == 0:
            print(json.dumps({method: report[method]}), flush=True)
            with open(os.path.join(args.out, f"scaling-w{world}.json"), "w") as fh:
                json.dump(report, fh, indent=2)
        del opt
        pol.reference = pol.old = None
        for p in stack.adapter.parameters():
            p.grad = None
        if cuda:
            torch.cuda.empty_cache()
    del stack, pol
    end_process_group(acc)  # before the interpreter's exit, which would abort tearing gloo down


if __name__ == "__main__":
    main()
