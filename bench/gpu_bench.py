"""GPU benchmark of the real-size Calligrapher stack (random weights; speed and memory do not depend on them).

    python bench/gpu_bench.py --out bench/results/latest.json          # on a GPU (~8 minutes)
    python bench/gpu_bench.py --tiny --out /tmp/bench.json               # a CPU dry run of the same code

Measures in one process, writing the JSON after every measurement, baselines beside ours, in the order of
what matters most (a section that would start after --budget_s is skipped, and says so):
- baseline_ms_per_image_step / rollout_eager_ms_per_image_step: diffusers' FluxFill transformer +
  FlowMatchEuler loop without the adapter, and our SDE rollout (style tokens projected once, every block's
  style keys/values precomputed once), both eager;
- rollout_ms_per_image_step / compiled_baseline_ms_per_image_step: the same two under torch.compile (whole
  model, default mode, static shapes; compile_s = first call minus a steady one);
- rollout_fp8_ms_per_image_step: our rollout on the compiled float8 transformer copy (NFT rollouts,
  evaluation), and fp8_vs_bf16: how far its samples are from bf16's on the same noise; with several
  --fp8_variants (scales per row or tensor, attention on cuDNN or not, q/k/v fused or not), each one's under
  fp8_variants;
- update_ms_per_image_step: GRPO and NFT per image and trained timestep, compiled (KL on: GRPO's reference
  forward, NFT's old and reference forwards);
- first_ratio_max_abs_dev: max |ratio - 1| of the first GRPO update (the compiled rollout's stored log-probs
  against the compiled training forward, bf16);
- overhead_fraction: share of a whole RL iteration spent outside the transformer (compiled);
- peak_gib_by_trainable (--sections peak): one iteration of flux-grpo / flux-nft at group 8, 512^2, with
  trainable `attn` and `all` and the presets' memory savings (8-bit AdamW, bf16 snapshots, EMA in host memory).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import time

import torch
from common import Results, build_stack, synthetic_batch, timed, timed_with_first  # noqa: I001 (bench/ is the script dir)

from calligrapher_rl.models.acceleration import compile_transformer
from calligrapher_rl.rl.sde import sde_step_with_logprob
from calligrapher_rl.sampling import flux_sigmas, rollout
from calligrapher_rl.training.batches import Batch
from calligrapher_rl.training.optim import make_optimizer
from calligrapher_rl.training.policies import Policies
from calligrapher_rl.training.updates import grpo_backward, nft_backward

T0 = time.time()


def elapsed() -> float:
    return time.time() - T0


# ---------------------------------------------------------------------------------------------- rollouts
def plain_loop(stack, fill, text, b, steps):
    """FluxFillPipeline's denoising loop, adapter off: the cost floor of FLUX-Fill itself."""
    sched = stack.pipe.scheduler
    flux_sigmas(steps, fill.seq_len, sched)
    x = torch.randn(b, fill.seq_len, 64, device=stack.device, dtype=stack.dtype)
    g = torch.full((b,), 30.0, device=stack.device)
    for t in sched.timesteps:
        v = stack.pipe.transformer(hidden_states=torch.cat([x, fill.cond], 2), timestep=(t / 1000).expand(b).to(x.device, x.dtype),
                                   guidance=g, pooled_projections=text.pooled, encoder_hidden_states=text.prompt_embeds,
                                   txt_ids=text.text_ids, img_ids=fill.img_ids, return_dict=False)[0]
        x = sched.step(v, t, x, return_dict=False)[0]
    return x


@contextlib.contextmanager
def plain_processors(stack):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    procs = stack.pipe.transformer.attn_processors
    stack.pipe.transformer.set_attn_processor(FluxAttnProcessor())
    try:
        yield
    finally:
        stack.pipe.transformer.set_attn_processor(procs)


def bench_rollouts(stack, res, batches, steps, autocast, out: Results, ours_key, base_key, quantized=False,
                   budget_s=1e9):
    """ms per image and sampler step of our rollout (and of the plain loop), per batch; the first call's extra
    seconds (compilation, when compiled) go to `compile_s`."""
    ours, base = out.get(ours_key, {}), out.get(base_key, {}) if base_key else {}
    compile_s = out.get("compile_s", {})
    for b in batches:
        if elapsed() > budget_s:
            print(f"skip b={b} ({ours_key}): time budget", flush=True)
            break
        fill, text, embeds = synthetic_batch(stack, b, res)
        runs = [(ours_key, ours, lambda: rollout(stack, fill, text, embeds, num_steps=steps, guidance=30.0,
                                                 noise_level=0.7, quantized=quantized), contextlib.nullcontext)]
        if base_key:
            runs.append((base_key, base, lambda: plain_loop(stack, fill, text, b, steps),
                         lambda: plain_processors(stack)))
        for key, table, fn, ctx in runs:
            with torch.no_grad(), autocast(), ctx():  # as the trainer's rollouts
                first, best = timed_with_first(fn)
            table[str(b)] = round(1000 * best / (b * steps), 2)
            compile_s[f"{key}[{b}]"] = round(first - best, 1)
            out.put(key, table)
            out.put("compile_s", compile_s)
    return ours, base


def first_ratio(stack, res, b, steps, autocast, checkpointing: bool) -> dict:
    """Roll out with SDE steps and stored log-probs (no grad, precomputed style keys/values), then evaluate the same
    transitions through the training forward (grad on): before any update every ratio must be 1."""
    fill, text, embeds = synthetic_batch(stack, b, res)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), autocast():
        ro = rollout(stack, fill, text, embeds, num_steps=steps, guidance=30.0, noise_level=0.7, generator=gen)
    stored, recomputed = 0.0, 0.0
    if checkpointing:  # as the flux presets' training forward
        stack.pipe.transformer.enable_gradient_checkpointing()
    for j in ro.sde_steps[:2]:
        s, s_next = float(ro.sigmas[j]), float(ro.sigmas[j + 1])
        x_j, x_next = ro.latents[:, j], ro.latents[:, j + 1]
        with autocast():
            v = stack.velocity(x_j, fill, text, s, embeds, 30.0)
        _, logp, _, _ = sde_step_with_logprob(v, s, s_next, x_j, 0.7, prev_sample=x_next)
        with torch.no_grad(), autocast():
            v0 = stack.velocity(x_j, fill, text, s, embeds, 30.0)
        _, logp0, _, _ = sde_step_with_logprob(v0, s, s_next, x_j, 0.7, prev_sample=x_next)
        stored = max(stored, float((torch.exp(logp.detach() - ro.log_probs[:, j]) - 1).abs().max()))
        recomputed = max(recomputed, float((torch.exp(logp.detach() - logp0) - 1).abs().max()))
        del v, logp
    if checkpointing:
        stack.pipe.transformer.disable_gradient_checkpointing()
    return {"stored": stored, "recomputed_no_grad": recomputed}


# ---------------------------------------------------------------------------------------------- updates
def bench_update(stack, res, b, steps, autocast) -> dict:
    fill, text, embeds = synthetic_batch(stack, b, res)
    with torch.no_grad(), autocast():
        ro = rollout(stack, fill, text, embeds, num_steps=steps, guidance=30.0, noise_level=0.7)
    batch = Batch(list(range(b)), [{} for _ in range(b)], fill, text, embeds)
    pol = Policies(stack.adapter, "attn", use_ema=False, ema_decay=0.99, ema_update_interval=1,
                   snapshot_dtype=torch.bfloat16)
    pol.begin_rl(with_old=True)
    adv = torch.randn(b, device=stack.device)
    common = dict(policies=pol, guidance=30.0, scale=1.0, kl_beta=0.04, adv_clip_max=5.0, autocast=autocast)
    trained = ro.sde_steps[:2]
    out = {
        "grpo": 1000 * timed(lambda: grpo_backward(stack, batch, ro, adv, trained, noise_level=0.7, sde_type="sde",
                                                   clip_range=1e-4, loss_scale=0.5, **common), 1) / (b * len(trained)),
        "nft": 1000 * timed(lambda: nft_backward(stack, batch, ro, adv, 2, beta=0.1, adv_mode="normal",
                                                 generator=torch.Generator().manual_seed(0), loss_scale=0.5, **common),
                            1) / (b * 2),
    }
    for p in stack.adapter.parameters():
        p.grad = None
    return {k: round(v, 1) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- memory
def peak_iteration(stack, res, method: str, trainable: str, autocast, group: int = 8) -> float | str:
    """One iteration as the flux presets run it: rollout of a group of 8, update (KL on), 8-bit AdamW step,
    EMA (fp32, host memory), reference (and for NFT old) snapshots in bf16, gradient checkpointing."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    pol = opt = None
    try:
        stack.pipe.transformer.enable_gradient_checkpointing()
        pol = Policies(stack.adapter, trainable, use_ema=True, ema_decay=0.999, ema_update_interval=1,
                       snapshot_dtype=torch.bfloat16, ema_device="cpu" if cuda else None)
        pol.begin_rl(with_old=method == "nft")
        opt = make_optimizer(pol.params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8, use_8bit=True,
                             shard=False)
        fill, text, embeds = synthetic_batch(stack, group, res)
        with torch.no_grad(), autocast():
            ro = rollout(stack, fill, text, embeds, num_steps=4, guidance=30.0, noise_level=0.7)
        batch = Batch(list(range(group)), [{} for _ in range(group)], fill, text, embeds)
        adv = torch.randn(group, device=stack.device)
        common = dict(policies=pol, guidance=30.0, scale=1.0, kl_beta=1e-4, adv_clip_max=5.0, autocast=autocast)
        if method == "nft":
            nft_backward(stack, batch, ro, adv, 1, beta=0.1, adv_mode="normal",
                         generator=torch.Generator().manual_seed(0), loss_scale=1.0, **common)
        else:
            grpo_backward(stack, batch, ro, adv, ro.sde_steps[:1], noise_level=0.7, sde_type="sde", clip_range=1e-4,
                          loss_scale=1.0, **common)
        opt.step()
        pol.ema_step(0)
        if not cuda:
            return 0.0
        torch.cuda.synchronize()
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    except torch.OutOfMemoryError:
        return "OOM"
    finally:
        del opt, pol
        for prm in stack.adapter.parameters():
            prm.grad = None
        stack.pipe.transformer.disable_gradient_checkpointing()
        if cuda:
            torch.cuda.empty_cache()


def fp8_difference(stack, res, b, steps, autocast) -> dict:
    """bf16 vs float8 ODE samples from the same noise: relative L2 of the final latents and the mean
    absolute pixel difference (0-255) of the decoded images."""
    fill, text, embeds = synthetic_batch(stack, b, res)
    noise = torch.randn(b, fill.seq_len, 64, generator=torch.Generator().manual_seed(1)).to(stack.device)
    with torch.no_grad(), autocast():
        a = rollout(stack, fill, text, embeds, num_steps=steps, guidance=30.0, initial_noise=noise).final
        q = rollout(stack, fill, text, embeds, num_steps=steps, guidance=30.0, initial_noise=noise, quantized=True).final
        ia, iq = stack.decode(a, res, res), stack.decode(q, res, res)
    return {"latent_rel_l2": round(float((q - a).norm() / a.norm()), 4),
            "pixel_mae_0_255": round(float((iq - ia).abs().mean() * 127.5), 2)}


def parse_fp8_variant(text: str) -> tuple[str, str, bool, bool]:
    """SCALES[+cudnn][+qkv][+tuned] -> (scales, attention, fused q/k/v, coordinate-descent tuned)."""
    scales, *extras = text.split("+")
    if scales not in ("row", "tensor") or len(set(extras)) != len(extras) or set(extras) - {"cudnn", "qkv", "tuned"}:
        raise SystemExit(f"error: --fp8_variants: {text!r} is not SCALES[+cudnn][+qkv][+tuned] with SCALES row or "
                         "tensor")
    return scales, "cudnn" if "cudnn" in extras else "default", "qkv" in extras, "tuned" in extras


def bench_fp8_variants(stack, res, batches, args, autocast, out: Results) -> None:
    """Each float8 copy in turn: made, compiled, timed per batch (first call = compilation), its samples held
    against bf16's on the same noise, then dropped (its ~6 GB of float8 weights go)."""
    variants = out.get("fp8_variants", {})
    for i, text in enumerate(v for v in args.fp8_variants.split(",") if v):
        if elapsed() > args.budget_s:
            print(f"skip fp8 variant {text}: time budget", flush=True)
            continue
        scales, attention, fused_qkv, tuned = parse_fp8_variant(text)
        # dynamo guards on the weights' types, not on the SDPA backend flags: without a reset a later variant of
        # the same scales would reuse the earlier one's graphs (and its attention kernel)
        torch._dynamo.reset()
        stack.enable_fp8_rollouts(scales, attention, fused_qkv)
        compile_transformer(stack.quantized_model.transformer, os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                            scope=args.fp8_compile_scope)
        key = "rollout_fp8_ms_per_image_step" if i == 0 else f"rollout_fp8[{text}]_ms_per_image_step"
        if i == 0:
            out.put("fp8_settings", {"scales": scales, "attention": attention, "fused_qkv": fused_qkv,
                                     "tuned": tuned, "compile_scope": args.fp8_compile_scope})
        # +tuned: inductor's coordinate-descent tuning (what torchao turns on process-wide by default) for this
        # copy's graphs only; the compile is lazy, so the setting must hold through the first calls
        import torch._inductor.config as inductor_config

        with (inductor_config.patch(coordinate_descent_tuning=True, coordinate_descent_check_all_directions=True)
              if tuned else contextlib.nullcontext()):
            ms, _ = bench_rollouts(stack, res, batches, args.steps, autocast, out, key, None, quantized=True,
                                   budget_s=args.budget_s)
            diff = fp8_difference(stack, res, batches[0], args.steps, autocast)
        variants[text] = {"ms_per_image_step": dict(ms), "compile_s": out["compile_s"].get(f"{key}[{batches[0]}]"),
                          "vs_bf16": diff, "compile_scope": args.fp8_compile_scope}
        out.put("fp8_variants", variants)
        if i == 0:
            out.put("fp8_vs_bf16", variants[text]["vs_bf16"])
        stack.quantized_model = None  # its weights go; the rest runs bf16
        torch.cuda.empty_cache()


def overhead_fraction(stack, res, b, steps, autocast, checkpointing) -> float:
    from overhead import overhead_fraction as measure

    return measure(stack, res, b, steps, autocast, checkpointing)


# ---------------------------------------------------------------------------------------------- main
SECTIONS = ("eager", "compile", "compiled", "fp8", "update", "update_ckpt", "ratio", "overhead", "peak")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="8", help="rollout batch sizes timed (eager, compiled and FP8)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--budget_s", type=float, default=520, help="skip what would start after this many seconds")
    ap.add_argument("--sections", default="eager,compiled,fp8,update,ratio,overhead",
                    help=f"comma list, run in this order: {','.join(SECTIONS)}")
    ap.add_argument("--compile_scope", default="whole", choices=("whole", "blocks"),
                    help="what a compiled graph holds: the whole transformer, or one block of each kind")
    ap.add_argument("--fp8_variants", default="row",
                    help="the fp8 section's float8 copies, timed one after another: comma list of "
                         "SCALES[+cudnn][+qkv][+tuned], SCALES row or tensor (--rollout_fp8_scales), +cudnn its "
                         "attention on cuDNN (--rollout_fp8_attention cudnn), +qkv its q/k/v projections fused "
                         "(acceleration.fuse_qkv), +tuned its graphs compiled with inductor's coordinate-descent "
                         "tuning; the first is rollout_fp8_ms_per_image_step")
    ap.add_argument("--no_baseline", action="store_true",
                    help="the compiled section times ours only (no compile of the plain FluxFill loop)")
    ap.add_argument("--fp8_compile_scope", default="whole", choices=("whole", "blocks"),
                    help="the fp8 section's graphs (--rollout_fp8 compiles its copy in the run's --compile_scope)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN SDPA backward crashes on these shapes (docs/gpu-notes.md)
    sections = [x for x in args.sections.split(",") if x]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"error: --sections: unknown {sorted(unknown)}; expected some of {SECTIONS}")
    batches = [int(x) for x in args.batches.split(",")]
    for text in (v for v in args.fp8_variants.split(",") if v):  # a typo ends the call now, not minutes in
        parse_fp8_variant(text)
    stack = build_stack(args.tiny, device, dtype)
    res = 64 if args.tiny else 512
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    import diffusers
    import transformers

    out = Results(args.out, card=torch.cuda.get_device_name(0) if cuda else "cpu (tiny dry run)",
                  date=datetime.date.today().isoformat(),
                  versions={"torch": torch.__version__, "diffusers": diffusers.__version__,
                            "transformers": transformers.__version__},
                  resolution=res, rollout_steps_timed=args.steps)
    print(f"built stack in {elapsed():.1f} s", flush=True)
    compiled = False

    def ensure_compiled():
        nonlocal compiled
        if not compiled:
            compile_transformer(stack.pipe.transformer, os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                                scope=args.compile_scope)
            compiled = True
            what = ("the whole transformer (nn.Module.compile)" if args.compile_scope == "whole" else
                    "each repeated block (one graph per block kind, shared by all blocks of that kind)")
            out.put("compile_settings", f"torch.compile of {what}, default mode, dynamic=False; adapter "
                                        "processors inside the graph")

    for section in sections:
        if elapsed() > args.budget_s:
            print(f"skip {section}: time budget ({elapsed():.0f} s)", flush=True)
            out.setdefault("skipped", []).append(section)
            out.flush()
            continue
        t = time.time()
        if section == "eager":
            bench_rollouts(stack, res, batches, args.steps, autocast, out, "rollout_eager_ms_per_image_step",
                           "baseline_ms_per_image_step")
        elif section == "compile":  # only that: the sections after it (e.g. peak) run compiled
            ensure_compiled()
        elif section == "compiled":
            ensure_compiled()
            bench_rollouts(stack, res, batches, args.steps, autocast, out, "rollout_ms_per_image_step",
                           None if args.no_baseline else "compiled_baseline_ms_per_image_step", budget_s=args.budget_s)
        elif section == "fp8" and cuda:
            bench_fp8_variants(stack, res, batches, args, autocast, out)
        elif section == "update":
            ensure_compiled()
            out.put("update_ms_per_image_step", bench_update(stack, res, 4, args.steps, autocast))
            out.put("update_settings", "batch 4, trainable attn, compiled, no activation checkpointing, bf16 "
                                       "autocast, KL on (GRPO reference forward; NFT old + reference forwards)")
        elif section == "update_ckpt":  # as the flux presets train: activations recomputed in backward
            ensure_compiled()
            stack.pipe.transformer.enable_gradient_checkpointing()
            out.put("update_checkpointed_ms_per_image_step", bench_update(stack, res, 4, args.steps, autocast))
            stack.pipe.transformer.disable_gradient_checkpointing()
        elif section == "ratio":  # batch 4 without checkpointing: the update's compiled graphs
            ensure_compiled()
            r = first_ratio(stack, res, 4, args.steps, autocast, checkpointing=False)
            out.put("first_ratio_max_abs_dev", r["stored"])
            out.put("first_ratio_detail", {**r, "settings": f"batch 4, {args.steps} steps, noise 0.7, bf16, "
                                                            "compiled rollout and training forward, first 2 SDE steps"})
        elif section == "overhead":
            out.put("overhead_fraction", overhead_fraction(stack, res, 4, args.steps, autocast,
                                                           checkpointing=not compiled))
            out.put("overhead_settings", f"GRPO iteration at batch 4, {args.steps} steps, "
                                         + ("compiled" if compiled else "eager, gradient checkpointing"))
        elif section == "peak":  # eager unless a compile section came first
            by = {}
            for trainable in ("all", "attn"):  # the presets' set first
                for method in ("grpo", "nft"):
                    if elapsed() > args.budget_s:
                        print(f"skip peak {method}/{trainable}: time budget", flush=True)
                        continue
                    by.setdefault(f"flux-{method}", {})[trainable] = peak_iteration(stack, res, method, trainable,
                                                                                  autocast)
                    out.put("peak_gib_by_trainable", by)
            out.put("peak_gib", {k: v.get("all", v.get("attn")) for k, v in by.items()})
            out.put("peak_settings", "group 8, 512^2, 4-step rollout, KL on, gradient checkpointing, 8-bit AdamW "
                                     "(torchao), bf16 reference/old snapshots, fp32 EMA in host memory, "
                                     + ("compiled" if compiled else "eager"))
        out.setdefault("section_s", {})[section] = round(time.time() - t, 1)
        out.flush()
        print(f"section {section}: {time.time() - t:.0f} s (elapsed {elapsed():.0f} s)", flush=True)
        if section == "eager":  # as the flux presets: T5 offloaded, prompt embeddings cached
            stack.pipe.text_encoder_2.to("cpu")
            if cuda:
                torch.cuda.empty_cache()
    out.put("total_s", round(elapsed(), 1))
    for key in ("rollout_ms_per_image_step", "rollout_eager_ms_per_image_step"):
        assert all(math.isfinite(v) for v in out.get(key, {}).values())


if __name__ == "__main__":
    main()
