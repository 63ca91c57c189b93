"""Share of a whole RL iteration (encoders, rollout, decode, reward, update) spent outside the transformer,
measured with CUDA events around its forward (eager or compiled)."""

from __future__ import annotations

import time

import torch

from calligrapher_rl.sampling import rollout


def make_rollout(stack, fill, text, embeds, steps):
    with torch.no_grad():
        return rollout(stack, fill, text, embeds, num_steps=steps, guidance=30.0, noise_level=0.7)


def overhead_fraction(stack, res, b, steps, autocast, checkpointing: bool = True) -> float:
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

    # hooks on the uncompiled wrapper around the transformer (hooks on a compiled module would be traced
    # into its graph); its own work beside the transformer call is an input concat and casts
    h1 = stack.model.register_forward_pre_hook(lambda m, a: events.append([mark()]))

    def post(m, a, o):
        events[-1].append(mark())

    h2 = stack.model.register_forward_hook(post)
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

    if checkpointing:  # as the flux presets (eager)
        tr.enable_gradient_checkpointing()
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
    if checkpointing:
        tr.disable_gradient_checkpointing()
    for p in stack.adapter.parameters():
        p.grad = None
    print(f"iteration {total:.2f} s, transformer {inside:.2f} s", flush=True)
    return round(1 - inside / total, 4)
