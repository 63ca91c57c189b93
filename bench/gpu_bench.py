"""GPU benchmark of the real-size Calligrapher stack (random weights; speed and memory do not depend on them).

    python bench/gpu_bench.py --out bench/results/latest.json          # on a GPU
    python bench/gpu_bench.py --tiny --out /tmp/bench.json               # a CPU dry run of the same code

Measures, in one process:
- rollout_ms_per_image_step: our SDE rollout (style tokens projected once, 57 style attentions) per batch size;
- baseline_ms_per_image_step: diffusers' eager FluxFill transformer + FlowMatchEuler step, no adapter, same run;
- update_ms_per_image_step: GRPO (forward+backward, reference forward for the KL) and NFT (current, old and
  reference forwards, one backward) per image and trained timestep;
- peak_gib: one full iteration (rollout, update, optimizer step) with the flux-grpo / flux-nft presets'
  trainable set, EMA and snapshots, per trainable set that was tried;
- overhead_fraction: share of a whole RL iteration (text + VAE + SigLIP encoders, rollout, decode, reward,
  update) spent outside the transformer.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from calligrapher_rl.models.stack import CalligrapherStack, FillCondition, TextCondition  # noqa: E402
from calligrapher_rl.models.style_adapter import StyleAdapter, install_style_adapter  # noqa: E402


def real_components(tiny: bool):
    """FLUX.1-Fill-dev / SigLIP so400m configs (or the tiny ones), built directly on the device."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        T5Config,
        T5EncoderModel,
    )

    from calligrapher_rl.models import tiny as t

    if tiny:
        pipe = t.build_tiny_pipeline(0)
        siglip, proc = t.build_tiny_siglip(0)
        return pipe, siglip, proc, 32
    transformer = FluxTransformer2DModel(in_channels=384, out_channels=64, num_layers=19, num_single_layers=38,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                         pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                        layers_per_block=2, latent_channels=16, norm_num_groups=32, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                                        hidden_act="quick_gelu"))
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxFillPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=t._clip_tokenizer(),
                            text_encoder_2=t5, tokenizer_2=t._t5_tokenizer(), transformer=transformer)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                  num_attention_heads=16, image_size=384, patch_size=14))
    try:
        from transformers import SiglipImageProcessorPil as Processor
    except ImportError:
        from transformers import SiglipImageProcessor as Processor
    return pipe, siglip, Processor(size={"height": 384, "width": 384}), 512


def build_stack(tiny: bool, device, dtype):
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            pipe, siglip, proc, seq = real_components(tiny)
        finally:
            torch.set_default_dtype(prev)
        adapter = StyleAdapter.for_transformer(pipe.transformer, siglip.config.hidden_size, num_style_tokens=128)
    install_style_adapter(pipe.transformer, adapter)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, siglip):
        m.requires_grad_(False).eval()
    adapter.float().requires_grad_(True)
    return CalligrapherStack(pipe, siglip, proc, adapter, device, dtype, seq)


def synthetic_batch(stack, b: int, res: int):
    lh = stack.latent_hw(res, res)[0]
    L, dev, dt = (lh // 2) ** 2, stack.device, stack.dtype
    fill = FillCondition(torch.randn(b, L, 320, device=dev, dtype=dt),
                         stack.pipe._prepare_latent_image_ids(b, lh // 2, lh // 2, dev, dt), res, res)
    t5_dim = stack.pipe.text_encoder_2.config.d_model
    pooled = stack.pipe.text_encoder.config.hidden_size
    text = TextCondition(torch.randn(b, stack.max_sequence_length, t5_dim, device=dev, dtype=dt),
                         torch.randn(b, pooled, device=dev, dtype=dt), torch.zeros(stack.max_sequence_length, 3, device=dev, dtype=dt))
    embeds = torch.randn(b, stack.siglip.config.hidden_size, device=dev)
    return fill, text, embeds


def timed(fn, repeat: int = 2) -> float:
    """Seconds of the fastest of `repeat` calls after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_rollout(stack, res, batches, steps, autocast):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from calligrapher_rl.sampling import flux_sigmas, rollout

    ours, base = {}, {}
    for b in batches:
        fill, text, embeds = synthetic_batch(stack, b, res)
        with torch.no_grad(), autocast():  # as the trainer's rollouts (mixed precision bf16)
            ours[str(b)] = 1000 * timed(lambda: rollout(stack, fill, text, embeds, num_steps=steps, guidance=30.0,
                                                        noise_level=0.7)) / (b * steps)
        # baseline: the plain transformer and scheduler loop of FluxFillPipeline
        procs = stack.pipe.transformer.attn_processors
        stack.pipe.transformer.set_attn_processor(FluxAttnProcessor())
        sched = stack.pipe.scheduler

        def plain():
            flux_sigmas(steps, fill.seq_len, sched)
            x = torch.randn(b, fill.seq_len, 64, device=stack.device, dtype=stack.dtype)
            g = torch.full((b,), 30.0, device=stack.device)
            for t in sched.timesteps:
                v = stack.pipe.transformer(hidden_states=torch.cat([x, fill.cond], 2), timestep=(t / 1000).expand(b).to(x.device, x.dtype),
                                           guidance=g, pooled_projections=text.pooled, encoder_hidden_states=text.prompt_embeds,
                                           txt_ids=text.text_ids, img_ids=fill.img_ids, return_dict=False)[0]
                x = sched.step(v, t, x, return_dict=False)[0]
        with torch.no_grad():
            base[str(b)] = 1000 * timed(plain) / (b * steps)
        stack.pipe.transformer.set_attn_processor(procs)
        print(f"rollout b={b}: ours {ours[str(b)]:.1f} ms/img-step, baseline {base[str(b)]:.1f}", flush=True)
    return ours, base


def make_rollout(stack, fill, text, embeds, steps):
    from calligrapher_rl.sampling import rollout

    with torch.no_grad():
        return rollout(stack, fill, text, embeds, num_steps=steps, guidance=30.0, noise_level=0.7)


def bench_update(stack, res, b, steps, trainable, autocast):
    from calligrapher_rl.training.policies import Policies
    from calligrapher_rl.training.updates import grpo_backward, nft_backward

    fill, text, embeds = synthetic_batch(stack, b, res)
    ro = make_rollout(stack, fill, text, embeds, steps)
    from calligrapher_rl.training.batches import Batch

    batch = Batch(list(range(b)), [{} for _ in range(b)], fill, text, embeds)
    pol = Policies(stack.adapter, trainable, use_ema=False, ema_decay=0.99, ema_update_interval=1)
    pol.begin_rl(with_old=True)
    adv = torch.randn(b, device=stack.device)
    common = dict(policies=pol, guidance=30.0, scale=1.0, kl_beta=0.04, adv_clip_max=5.0, autocast=autocast)
    trained = [0, 1]
    grpo = lambda: grpo_backward(stack, batch, ro, adv, trained, noise_level=0.7, sde_type="sde", clip_range=1e-4,  # noqa: E731
                                 loss_scale=0.5, **common)
    nft = lambda: nft_backward(stack, batch, ro, adv, 2, beta=0.1, adv_mode="normal",  # noqa: E731
                               generator=torch.Generator().manual_seed(0), loss_scale=0.5, **common)
    out = {"grpo": 1000 * timed(grpo, 1) / (b * len(trained)), "nft": 1000 * timed(nft, 1) / (b * 2)}
    for p in stack.adapter.parameters():
        p.grad = None
    pol.reference = pol.old = None
    return out


def peak_for_preset(stack, res, preset: str, trainable: str, autocast) -> float | str:
    """One iteration of the preset's shape: rollout of its batch, update, optimizer step, EMA."""
    from calligrapher_rl.config import load_preset
    from calligrapher_rl.training.batches import Batch
    from calligrapher_rl.training.policies import Policies
    from calligrapher_rl.training.updates import grpo_backward, nft_backward

    p = load_preset(preset)
    b = p.get("train_batch_size", 1) * p.get("rl_num_images_per_prompt", 1)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    pol = opt = None
    try:
        stack.pipe.transformer.enable_gradient_checkpointing()
        pol = Policies(stack.adapter, trainable, use_ema=p.get("use_ema", False), ema_decay=0.999, ema_update_interval=1)
        pol.begin_rl(with_old=p.get("rl_method") == "nft")
        opt = torch.optim.AdamW(pol.params, lr=1e-5)
        fill, text, embeds = synthetic_batch(stack, b, res)
        ro = make_rollout(stack, fill, text, embeds, 4)
        batch = Batch(list(range(b)), [{} for _ in range(b)], fill, text, embeds)
        adv = torch.randn(b, device=stack.device)
        common = dict(policies=pol, guidance=30.0, scale=1.0, kl_beta=1e-4, adv_clip_max=5.0, autocast=autocast)
        if p.get("rl_method") == "nft":
            nft_backward(stack, batch, ro, adv, 1, beta=0.1, adv_mode="normal", generator=torch.Generator().manual_seed(0),
                         loss_scale=1.0, **common)
        else:
            grpo_backward(stack, batch, ro, adv, [0], noise_level=0.7, sde_type="sde", clip_range=1e-4, loss_scale=1.0, **common)
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


def overhead_fraction(stack, res, b, steps, autocast) -> float:
    """Whole RL iteration (GRPO) vs time inside the transformer, measured with CUDA events on its forward."""
    from PIL import Image

    from calligrapher_rl.rewards.base import RewardSample
    from calligrapher_rl.rewards.toy import BrightnessReward
    from calligrapher_rl.training.batches import Batch, to_pil
    from calligrapher_rl.training.policies import Policies
    from calligrapher_rl.training.updates import grpo_backward

    events = []
    tr = stack.pipe.transformer
    cuda = torch.cuda.is_available()

    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def mark():
        if cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    h1 = tr.register_forward_pre_hook(lambda m, a: events.append([mark()]))

    def post(m, a, o):
        events[-1].append(mark())

    h2 = tr.register_forward_hook(post)
    reward = BrightnessReward()
    pol = Policies(stack.adapter, "attn", use_ema=False, ema_decay=0.99, ema_update_interval=1)
    pol.begin_rl(with_old=False)
    src = torch.rand(b, 3, res, res, device=stack.device) * 2 - 1
    mask = torch.zeros(b, 1, res, res, device=stack.device)
    mask[:, :, res // 4: res // 2, res // 4: 3 * res // 4] = 1  # a text line's box
    refs = [Image.new("RGB", (200, 60), (200, 30, 30))] * b

    phases: dict[str, float] = {}
    rollout_events: list = []

    def phase(name, fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return out

    def iteration():  # prompts are cached after the warm-up call, as in a run (T5 then leaves the GPU)
        text = phase("encode", lambda: stack.encode_prompts([f"The text is 'word{i}'." for i in range(b)]))
        fill = phase("encode", lambda: stack.prepare_fill(src, mask))
        embeds = phase("encode", lambda: stack.encode_style(refs))
        with autocast():
            ro = phase("rollout", lambda: make_rollout(stack, fill, text, embeds, steps))
        images = phase("decode", lambda: to_pil(stack.decode(ro.final, res, res)))
        m = Image.new("L", (res, res), 255)
        scores = phase("reward", lambda: reward.score([RewardSample(im, m, "x") for im in images]))
        adv = torch.tensor(scores, device=stack.device) - sum(scores) / len(scores)
        batch = Batch(list(range(b)), [{} for _ in range(b)], fill, text, embeds)
        rollout_events[:] = events  # the rollout's transformer calls; the update is timed as a whole
        events.clear()
        phase("update", lambda: grpo_backward(stack, batch, ro, adv, ro.sde_steps[:2], policies=pol, guidance=30.0,
                                              scale=1.0, noise_level=0.7, sde_type="sde", clip_range=1e-4,
                                              adv_clip_max=5.0, kl_beta=0.04, loss_scale=0.5, autocast=autocast))

    tr.enable_gradient_checkpointing()  # as the flux presets
    iteration()  # warm-up; encodes and caches the prompts, after which T5 can leave the GPU
    stack.pipe.text_encoder_2.to("cpu")
    if cuda:
        torch.cuda.empty_cache()
    phases.clear()
    events.clear()
    t0 = time.perf_counter()
    iteration()
    sync()
    total = time.perf_counter() - t0
    in_rollout = sum((s.elapsed_time(e) / 1000) if cuda else (e - s) for s, e in rollout_events)
    # the update is transformer forward+backward (+ the reference forward) almost entirely
    inside = in_rollout + phases["update"]
    print("phases (s):", {k: round(v, 3) for k, v in phases.items()}, flush=True)
    h1.remove(), h2.remove()
    tr.disable_gradient_checkpointing()
    for p in stack.adapter.parameters():
        p.grad = None
    print(f"iteration {total:.2f} s, transformer {inside:.2f} s", flush=True)
    return round(1 - inside / total, 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: rollout,update,peak,overhead")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN SDPA backward crashes on these shapes (docs/gpu-notes.md)
    skip = set(args.skip.split(","))
    t0 = time.time()
    stack = build_stack(args.tiny, device, dtype)
    res = 64 if args.tiny else 512
    print(f"built stack in {time.time() - t0:.1f} s", flush=True)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    import diffusers
    import transformers

    result = {"card": torch.cuda.get_device_name(0) if cuda else "cpu (tiny dry run)",
              "date": datetime.date.today().isoformat(),
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "transformers": transformers.__version__},
              "resolution": res, "rollout_steps_timed": args.steps}
    if "rollout" not in skip:
        ours, base = bench_rollout(stack, res, [int(x) for x in args.batches.split(",")], args.steps, autocast)
        result["rollout_ms_per_image_step"], result["baseline_ms_per_image_step"] = ours, base
    if "overhead" not in skip:
        result["overhead_fraction"] = overhead_fraction(stack, res, 4, args.steps, autocast)
    stack.pipe.text_encoder_2.to("cpu")  # as the flux presets: T5 offloaded, prompt embeddings cached
    if cuda:
        torch.cuda.empty_cache()
    if "update" not in skip:
        stack.pipe.transformer.enable_gradient_checkpointing()  # as the flux presets
        result["update_ms_per_image_step"] = bench_update(stack, res, 4, args.steps, "attn", autocast)
        result["update_settings"] = "batch 4, trainable attn, gradient checkpointing, bf16 autocast, KL on"
        stack.pipe.transformer.disable_gradient_checkpointing()
        print("update", result["update_ms_per_image_step"], flush=True)
    if "peak" not in skip:
        result["peak_gib"], result["peak_gib_by_trainable"] = {}, {}
        for preset in ("flux-grpo", "flux-nft"):
            by = {t: peak_for_preset(stack, res, preset, t, autocast) for t in ("attn", "all")}
            result["peak_gib_by_trainable"][preset] = by
            result["peak_gib"][preset] = by["attn"]
            print(preset, by, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
