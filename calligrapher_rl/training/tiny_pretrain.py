"""Pretraining the tiny Calligrapher on the synthetic `glyphs` task, so the embedded default writes.

The random `tiny` model draws noise, so nothing RL does to it shows. This trains the whole tiny stack
(the real diffusers/transformers classes at toy sizes) the way FLUX.1-Fill and Calligrapher were
trained, in two phases, on pictures of `python -m calligrapher_rl.data synth --task glyphs`:

1. the VAE (8x, 16 latent channels, as FLUX's) as an autoencoder of sources and masked sources, then
   its shift and scale are set from the latents' statistics, as FLUX's VAE config carries them;
2. the transformer, both text encoders and the style adapter together, with the VAE and SigLIP frozen:
   rectified flow matching on the Fill conditioning (masked-image latents + packed mask), the release's
   prompt template, the reference's SigLIP embedding through the adapter, guidance 30 (the value every
   preset samples with). The same `CalligrapherStack` methods the trainer uses build every input.

The result is written in the layout of `tiny` (a FluxFillPipeline folder, a SigLIP folder) plus
`ip-adapter.safetensors`, so loading it goes through the real paths. Everything draws from generators
seeded by `seed`, on the data of synth seed `DATA_SEED + seed` (the bundled glyph set, synth seed 0,
stays unseen). Flat snapshots (`weights-step{N}.safetensors`, float16 by default, the architecture in their
metadata) can be written along the way and one is written at the end; `export` turns one into the layout
(both formats, and the architecture: tiny_weights.py).

Phase 2 encodes the data with the frozen VAE once (`pre_encode`) and draws every step's latents from the stored
posteriors (`sample_batch`), as `CalligrapherStack.encode_images`/`prepare_fill` would draw them. It keeps an EMA
of the trained weights, which the snapshots and the layout hold. With `max_minutes`, a short probe measures the
step time and fixes `planned_dit_steps`, so the cosine reaches ~0 inside the time limit; the schedule depends on
that step count only, so `dit_steps=planned_dit_steps` without a time limit retrains the same weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..models.stack import CalligrapherStack, TextCondition
from ..models.style_adapter import install_style_adapter
from .tiny_latents import _to_unit, pre_encode, sample_batch
from .tiny_weights import DEFAULT_ARCH, build_untrained, parameter_counts, save_snapshot, write_layout

RESOLUTION = 64  # 8x8 latents, 16 image tokens: the CPU presets' size; the glyph task is readable at it
GUIDANCE = 30.0
MAX_TEXT_TOKENS = 32  # the stack's T5 length for narrow text encoders
DATA_SEED = 10_000


@dataclass
class PretrainConfig:
    seed: int = 0
    n_data: int = 20000
    vae_steps: int = 3000
    dit_steps: int = 8000
    batch_size: int = 128
    vae_lr: float = 1e-3
    dit_lr: float = 5e-4
    warmup: int = 200
    mask_weight: float = 4.0  # extra loss weight of tokens under the mask: that is where the text is
    snapshot_steps: list[int] = field(default_factory=list)  # phase-2 steps with a flat snapshot
    workers: int = 0  # processes rendering the data (0 = all cores)
    max_minutes: float = 0.0  # plan phase 2 to end inside this (and stop it, recorded, if reached); 0 = never
    snapshot_dir: str = ""  # where snapshots and a copy of pretrain.json go (default: the output folder)
    heads: int = DEFAULT_ARCH["heads"]
    double_blocks: int = DEFAULT_ARCH["double_blocks"]
    single_blocks: int = DEFAULT_ARCH["single_blocks"]
    ema_decay: float = 0.999  # EMA of the phase-2 weights (what gets written); 0 = write the last weights
    save_dtype: str = "fp16"  # snapshots and the layout (SigLIP, frozen and small, stays fp32)
    probe_steps: int = 50  # phase-2 steps timed to plan the rest under max_minutes (at most `warmup`)
    reserve_s: float = 20.0  # seconds of max_minutes kept for writing the outputs

    @property
    def arch(self) -> dict:
        return {"heads": self.heads, "double_blocks": self.double_blocks, "single_blocks": self.single_blocks}


# ------------------------------------------------------------------ data
def render_data(n: int, seed: int, workers: int = 0):
    """The glyph pictures as uint8 tensors, references as PIL, texts; identical whatever `workers` is.
    The workers run `render_sample` itself, so they import the light synth module only (spawn)."""
    from ..data.synth import render_sample

    jobs = [(i, DATA_SEED + seed, RESOLUTION, "glyphs") for i in range(n)]
    if workers == 1 or n < 256:
        out = [render_sample(*j) for j in jobs]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers or os.cpu_count()) as pool:
            out = pool.starmap(render_sample, jobs, chunksize=256)
    sources = torch.from_numpy(np.stack([np.asarray(o.source) for o in out])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([np.asarray(o.mask) for o in out]) > 127)[:, None].contiguous()
    return sources, masks, [o.reference for o in out], [o.text for o in out]


def _tokens(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids exactly as FluxFillPipeline's _get_clip/_get_t5_prompt_embeds make them."""
    clip = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True,
                          return_tensors="pt").input_ids
    t5 = pipe.tokenizer_2(prompts, padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True,
                          return_tensors="pt").input_ids
    return clip, t5


def encode_text(pipe, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> TextCondition:
    """The pipeline's prompt embeddings, with gradients (the encoders train in phase 2)."""
    embeds = pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0]
    pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output
    ids = torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype)
    return TextCondition(embeds, pooled, ids)


# ------------------------------------------------------------------ training
def _lr(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))


class _Log:
    def __init__(self, out: str, cfg: PretrainConfig, device, started: float | None = None):
        self.paths = [os.path.join(d, "pretrain.json") for d in dict.fromkeys([out, cfg.snapshot_dir or out])]
        self.t0 = started or time.time()  # the time limit and every logged `t` count from here
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.data = {"config": asdict(cfg), "device": name, "torch": torch.__version__, "vae": [], "dit": [],
                     "times": {}}

    def add(self, phase: str, step: int, **vals) -> None:
        self.data[phase].append({"step": step, "t": round(time.time() - self.t0, 1), **vals})
        print(json.dumps({"phase": phase, "step": step, **vals}), flush=True)
        self.flush()

    def flush(self) -> None:
        for path in self.paths:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1)
            os.replace(tmp, path)


def _train_vae(pipe, sources, masks, cfg: PretrainConfig, device, log: _Log, gen: torch.Generator):
    vae = pipe.vae.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    n = sources.shape[0]
    for step in range(cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.vae_lr, cfg.warmup, cfg.vae_steps)
        idx = torch.randint(n, (cfg.batch_size,), generator=gen, device=device)
        x, m = _to_unit(sources[idx]), masks[idx].float()
        blank = (torch.rand(x.shape[0], 1, 1, 1, generator=gen, device=device) < 0.5).float()
        x = x * (1 - m * blank)  # half are masked sources: the fill condition encodes those
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        loss = rec_loss + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log.add("vae", step, loss=round(float(loss.detach()), 5), rec=round(float(rec_loss.detach()), 5))
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # FLUX's VAE config carries a shift and scale that make latents ~N(0, 1)
        idx = torch.arange(min(n, 2048), device=device)
        z = torch.cat([vae.encode(_to_unit(sources[i])).latent_dist.sample(generator=gen)
                       for i in idx.split(256)])
        shift, std = float(z.mean()), float(z.std())
    vae.register_to_config(shift_factor=round(shift, 5), scaling_factor=round(1.0 / std, 5))
    log.data["vae_latent"] = {"shift_factor": shift, "std": std}


# ------------------------------------------------------------------ phase 2
@contextlib.contextmanager
def _ema_weights(ema, params):
    """The EMA weights in the modules for the duration (none kept: the weights as they are)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def _plan(cfg: PretrainConfig, done: int, s_per_step: float, elapsed: float) -> int:
    """Phase-2 steps that end `reserve_s` before `max_minutes` at the probe's speed (3 % slack), at most dit_steps."""
    left = 60 * cfg.max_minutes - cfg.reserve_s - elapsed
    return min(cfg.dit_steps, done + max(0, int(left / (1.03 * s_per_step))))


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_dit(pipe, siglip, processor, adapter, data, cfg, device, log: _Log, gen, out: str):
    from diffusers.training_utils import EMAModel

    from ..data.entries import DEFAULT_PROMPT

    sources, masks, refs, texts = data
    stack = CalligrapherStack(pipe, siglip, processor, adapter, device, torch.float32, MAX_TEXT_TOKENS)
    siglip.to(device).eval().requires_grad_(False)
    t_enc = time.time()
    with torch.no_grad():
        embeds = torch.cat([stack.encode_style(refs[i:i + 512]) for i in range(0, len(refs), 512)])
    latents = pre_encode(stack, sources, masks)
    clip_ids, t5_ids = _tokens(pipe, [DEFAULT_PROMPT.format(text=t) for t in texts])
    clip_ids, t5_ids = clip_ids.to(device), t5_ids.to(device)
    log.data["times"]["pre_encode_s"] = round(time.time() - t_enc, 1)
    trained = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, adapter]
    params = [p for m in trained for p in m.to(device).train().requires_grad_(True).parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.dit_lr, weight_decay=0.0)
    ema = EMAModel(params, decay=cfg.ema_decay, foreach=True) if cfg.ema_decay > 0 else None
    log.data["weights_written"] = (f"EMA (diffusers EMAModel: decay min({cfg.ema_decay}, (1 + n) / (10 + n)) at "
                                   "step n)" if ema else "the last step's")
    probe = min(cfg.probe_steps, cfg.warmup, cfg.dit_steps) if cfg.max_minutes else 0  # LR in warmup: plan-free
    skip = probe // 5  # the first steps pay for allocations and kernel choices
    planned = log.data["planned_dit_steps"] = cfg.dit_steps
    n, t_start, t_skip, step, loss = sources.shape[0], time.time(), time.time(), 0, None
    snapshot_dir = cfg.snapshot_dir or out

    def snapshot(done: int) -> None:
        with _ema_weights(ema, params):
            save_snapshot(os.path.join(snapshot_dir, f"weights-step{done}.safetensors"), pipe, siglip, adapter,
                          {"step": done, "seed": cfg.seed, "ema_decay": cfg.ema_decay if ema else 0.0},
                          cfg.arch, cfg.save_dtype)

    while step < planned:
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.dit_lr, cfg.warmup, planned)
        idx = torch.randint(n, (cfg.batch_size,), generator=gen, device=device)
        x0, fill = sample_batch(stack, latents, idx, gen)
        text = encode_text(pipe, clip_ids[idx], t5_ids[idx])
        b = x0.shape[0]
        t = torch.sigmoid(torch.randn(b, generator=gen, device=device))  # logit-normal, as SD3/FLUX
        eps = torch.randn(x0.shape, generator=gen, device=device)
        x_t = (1 - t.view(b, 1, 1)) * x0 + t.view(b, 1, 1) * eps
        v = stack.velocity(x_t, fill, text, t, embeds[idx], GUIDANCE, 1.0)
        w = 1.0 + cfg.mask_weight * fill.cond[..., 64:].float().mean(-1)  # the token's share of the hole
        per_token = ((v - (eps - x0)) ** 2).mean(-1)
        loss = (w * per_token).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            ema.step(params)
        step = done = step + 1
        if done == skip:
            _sync(device)
            t_skip = time.time()
        if done == probe:
            _sync(device)
            s_step = (time.time() - t_skip) / max(1, done - skip)
            planned = log.data["planned_dit_steps"] = _plan(cfg, done, s_step, time.time() - log.t0)
            log.data["probe"] = {"steps": done, "s_per_step": round(s_step, 5), "at_s": round(time.time() - log.t0, 1)}
        if step % 100 == 1 or done == planned:
            log.add("dit", step - 1, loss=round(float(loss.detach()), 5), lr=float(opt.param_groups[0]["lr"]),
                    s_per_step=round((time.time() - t_start) / done, 4))
        over = cfg.max_minutes and time.time() - log.t0 > 60 * cfg.max_minutes
        if done in cfg.snapshot_steps or over or done == planned:
            snapshot(done)
        if over:
            log.data["stopped_early_at"] = done
            break
    log.data["dit_steps_done"] = step
    if ema is not None:
        ema.copy_to(params)  # the layout holds what the snapshots hold
    for m in trained:
        m.eval().requires_grad_(False)


def pretrain(out: str, cfg: PretrainConfig, device: str | None = None, started: float | None = None) -> dict:
    """Train the tiny stack and write it under `out` in the layout of `tiny`; returns the log dict.
    `started` (a time.time()) is when the time limit began (default: now), e.g. before the imports."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # its backward fails on FLUX shapes on torch 2.11/cu130
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for folder in (out, cfg.snapshot_dir or out):
        os.makedirs(folder, exist_ok=True)
    log = _Log(out, cfg, device, started)
    data = render_data(cfg.n_data, cfg.seed, cfg.workers)
    log.data["times"]["data_s"] = round(time.time() - log.t0, 1)
    pipe, siglip, processor, adapter = build_untrained(cfg.seed, cfg.arch)
    log.data["parameters"] = parameter_counts(pipe, siglip, adapter)
    install_style_adapter(pipe.transformer, adapter)
    pipe.to(device), siglip.to(device), adapter.to(device)
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, siglip, adapter):
        module.requires_grad_(False)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    sources, masks = data[0].to(device), data[1].to(device)
    _train_vae(pipe, sources, masks, cfg, device, log, gen)
    log.data["times"]["vae_s"] = round(time.time() - log.t0, 1)
    _train_dit(pipe, siglip, processor, adapter, (sources, masks, data[2], data[3]), cfg, device, log, gen, out)
    log.data["times"]["dit_s"] = round(time.time() - log.t0, 1)
    if device.type == "cuda":
        log.data["cuda_max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    pipe.to("cpu"), siglip.to("cpu"), adapter.to("cpu")
    write_layout(out, pipe, siglip, processor, adapter, cfg.save_dtype)
    log.data["times"]["total_s"] = round(time.time() - log.t0, 1)
    log.flush()
    return log.data
