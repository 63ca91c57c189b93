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
stays unseen). Flat snapshots (`weights-step{N}.safetensors`) can be written along the way; `export`
turns one into the layout.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .stack import CalligrapherStack, TextCondition
from .style_adapter import StyleAdapter, install_style_adapter
from .tiny import build_tiny_pipeline, build_tiny_siglip

RESOLUTION = 64  # 8x8 latents, 16 image tokens: the CPU presets' size; the glyph task is readable at it
GUIDANCE = 30.0
NUM_STYLE_TOKENS = 8
MAX_TEXT_TOKENS = 32  # the stack's T5 length for narrow text encoders
DATA_SEED = 10_000
ARCH = {
    "text_dim": 64, "pooled_dim": 64,
    "transformer": {"num_layers": 2, "num_single_layers": 3, "attention_head_dim": 32, "num_attention_heads": 4,
                    "axes_dims_rope": (8, 12, 12)},
    "vae": {"block_out_channels": [16, 32, 64, 64]},
}
COMPONENTS = ("vae", "transformer", "text_encoder", "text_encoder_2")


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
    max_minutes: float = 0.0  # stop phase 2 early (recorded) if the whole run reaches this; 0 = never
    snapshot_dir: str = ""  # where snapshots and a copy of pretrain.json go (default: the output folder)


# ------------------------------------------------------------------ data
def _render(args) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    from ..data.synth import render_sample

    index, seed = args
    s = render_sample(index, seed, RESOLUTION, "glyphs")
    return np.asarray(s.source), np.asarray(s.mask), np.asarray(s.reference), s.text


def render_data(n: int, seed: int, workers: int = 0):
    """The glyph pictures as uint8 tensors, references as PIL, texts; identical whatever `workers` is."""
    from PIL import Image

    jobs = [(i, DATA_SEED + seed) for i in range(n)]
    if workers == 1 or n < 256:
        out = [_render(j) for j in jobs]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers or os.cpu_count()) as pool:
            out = pool.map(_render, jobs, chunksize=256)
    sources = torch.from_numpy(np.stack([o[0] for o in out])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([o[1] for o in out]) > 127)[:, None].contiguous()
    refs = [Image.fromarray(o[2]) for o in out]
    return sources, masks, refs, [o[3] for o in out]


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


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


# ------------------------------------------------------------------ model
def build_untrained(seed: int):
    pipe = build_tiny_pipeline(seed, **ARCH)
    siglip, processor = build_tiny_siglip(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        adapter = StyleAdapter.for_transformer(pipe.transformer, siglip.config.hidden_size,
                                               num_style_tokens=NUM_STYLE_TOKENS, use_qformer=True)
    return pipe, siglip, processor, adapter


def flat_state(pipe, siglip, adapter) -> dict[str, torch.Tensor]:
    """Every weight under `component.` keys, cloned (tied weights must not share storage in safetensors)."""
    state = {}
    for name in COMPONENTS:
        for k, v in getattr(pipe, name).state_dict().items():
            state[f"{name}.{k}"] = v.detach().float().cpu().contiguous().clone()
    for prefix, module in (("siglip", siglip), ("adapter", adapter)):
        for k, v in module.state_dict().items():
            state[f"{prefix}.{k}"] = v.detach().float().cpu().contiguous().clone()
    return state


def save_snapshot(path: str, pipe, siglip, adapter, meta: dict) -> None:
    from safetensors.torch import save_file

    tmp = f"{path}.tmp"
    vae = pipe.vae.config
    info = {"shift_factor": str(vae.shift_factor), "scaling_factor": str(vae.scaling_factor)}
    save_file(flat_state(pipe, siglip, adapter), tmp, metadata=info | {k: str(v) for k, v in meta.items()})
    os.replace(tmp, path)


def load_snapshot(path: str, seed: int = 0):
    from safetensors import safe_open
    from safetensors.torch import load_file

    pipe, siglip, processor, adapter = build_untrained(seed)
    state = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    for name in COMPONENTS:
        getattr(pipe, name).load_state_dict({k[len(name) + 1:]: v for k, v in state.items()
                                             if k.startswith(name + ".")})
    siglip.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("siglip.")})
    adapter.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("adapter.")})
    pipe.vae.register_to_config(shift_factor=float(meta["shift_factor"]), scaling_factor=float(meta["scaling_factor"]))
    return pipe, siglip, processor, adapter


def write_layout(out: str, pipe, siglip, processor, adapter) -> tuple[str, str, str]:
    """`out/flux-fill`, `out/siglip`, `out/ip-adapter.safetensors` (the release's names, flattened)."""
    from safetensors.torch import save_file

    flux_dir, siglip_dir = os.path.join(out, "flux-fill"), os.path.join(out, "siglip")
    pipe.save_pretrained(flux_dir, safe_serialization=True)
    siglip.save_pretrained(siglip_dir, safe_serialization=True)
    processor.save_pretrained(siglip_dir)
    adapter_file = os.path.join(out, "ip-adapter.safetensors")
    state = {k: v.detach().float().cpu().contiguous() for k, v in adapter.state_dict().items()}
    save_file(state, adapter_file, metadata={"format": "pt", "layout": "calligrapher-rl/flat"})
    return flux_dir, siglip_dir, adapter_file


# ------------------------------------------------------------------ training
def _lr(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))


class _Log:
    def __init__(self, out: str, cfg: PretrainConfig, device):
        self.paths = [os.path.join(d, "pretrain.json") for d in dict.fromkeys([out, cfg.snapshot_dir or out])]
        self.t0 = time.time()
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


def _train_dit(pipe, siglip, processor, adapter, data, cfg, device, log: _Log, gen, out: str):
    sources, masks, refs, texts = data
    from ..data.entries import DEFAULT_PROMPT

    stack = CalligrapherStack(pipe, siglip, processor, adapter, device, torch.float32, MAX_TEXT_TOKENS)
    siglip.to(device).eval().requires_grad_(False)
    with torch.no_grad():
        embeds = torch.cat([stack.encode_style(refs[i:i + 512]) for i in range(0, len(refs), 512)])
    clip_ids, t5_ids = _tokens(pipe, [DEFAULT_PROMPT.format(text=t) for t in texts])
    clip_ids, t5_ids = clip_ids.to(device), t5_ids.to(device)
    trained = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, adapter]
    params = [p for m in trained for p in m.to(device).train().requires_grad_(True).parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.dit_lr, weight_decay=0.0)
    n, t_start = sources.shape[0], time.time()
    for step in range(cfg.dit_steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.dit_lr, cfg.warmup, cfg.dit_steps)
        idx = torch.randint(n, (cfg.batch_size,), generator=gen, device=device)
        x, m = _to_unit(sources[idx]), masks[idx].float()
        with torch.no_grad():
            x0 = stack.encode_images(x, generator=gen).float()
            fill = stack.prepare_fill(x, m, generator=gen)
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
        done = step + 1
        if step % 100 == 0 or done == cfg.dit_steps:
            log.add("dit", step, loss=round(float(loss.detach()), 5),
                    s_per_step=round((time.time() - t_start) / done, 4))
        over = cfg.max_minutes and time.time() - log.t0 > 60 * cfg.max_minutes
        if done in cfg.snapshot_steps or over:
            save_snapshot(os.path.join(cfg.snapshot_dir or out, f"weights-step{done}.safetensors"), pipe, siglip,
                          adapter, {"step": done, "seed": cfg.seed})
        if over:
            log.data["stopped_early_at"] = done
            break
    for m in trained:
        m.eval().requires_grad_(False)


def pretrain(out: str, cfg: PretrainConfig, device: str | None = None) -> dict:
    """Train the tiny stack and write it under `out` in the layout of `tiny`; returns the log dict."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # its backward fails on FLUX shapes on torch 2.11/cu130
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for folder in (out, cfg.snapshot_dir or out):
        os.makedirs(folder, exist_ok=True)
    log = _Log(out, cfg, device)
    data = render_data(cfg.n_data, cfg.seed, cfg.workers)
    log.data["times"]["data_s"] = round(time.time() - log.t0, 1)
    pipe, siglip, processor, adapter = build_untrained(cfg.seed)
    install_style_adapter(pipe.transformer, adapter)
    pipe.to(device), siglip.to(device), adapter.to(device)
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, siglip, adapter):
        module.requires_grad_(False)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    sources, masks = data[0].to(device), data[1].to(device)
    _train_vae(pipe, sources, masks, cfg, device, log, gen)
    log.data["times"]["vae_s"] = round(time.time() - log.t0, 1)
    _train_dit(pipe, siglip, processor, adapter, (sources, masks, data[2], data[3]), cfg, device, log, gen, out)
    log.data["times"]["total_s"] = round(time.time() - log.t0, 1)
    pipe.to("cpu"), siglip.to("cpu"), adapter.to("cpu")
    write_layout(out, pipe, siglip, processor, adapter)
    log.flush()
    return log.data

