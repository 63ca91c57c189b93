"""python -m calligrapher_rl.tiny --out DIR [--seed N]: write the offline tiny FLUX-Fill + SigLIP folders.

    python -m calligrapher_rl.tiny --out DIR [--seed N]            the random tiny (for tests)
    python -m calligrapher_rl.tiny pretrain --out DIR [--seed N]   train the tiny that writes (GPU: minutes)
    python -m calligrapher_rl.tiny export --snapshot FILE --out DIR   a pretrain snapshot -> the layout
    python -m calligrapher_rl.tiny eval [--model DIR|tiny-pretrained] [--n 64]   its OCR reward (ODE, 4 steps)
    python -m calligrapher_rl.tiny eval --data bundled-glyphs --images_per_prompt 16 [--ip_adapter FILE]
                                            an adapter's OCR reward on a dataset's prompts, many noises each
"""

from __future__ import annotations

import argparse
import json
import os

from .errors import UserError, cli_main

SUBCOMMANDS = ("pretrain", "export", "eval")


def _random_tiny(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m calligrapher_rl.tiny",
                                description=__doc__.split(":", 1)[1].split("\n")[0].strip(),
                                epilog="commands:\n" + __doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write flux-fill/ and siglip/ into")
    p.add_argument("--seed", type=int, default=0, help="weights are deterministic per seed")
    args = p.parse_args(argv)
    from .models.tiny import write_tiny

    flux, siglip = write_tiny(args.out, args.seed)
    print(f"{flux}\n{siglip}")
    return 0


def _pretrain(argv) -> int:
    import time

    started = time.time()  # --max_minutes counts the imports too
    from .training.tiny_pretrain import PretrainConfig
    from .training.tiny_weights import SAVE_DTYPES

    d = PretrainConfig()
    p = argparse.ArgumentParser(prog="python -m calligrapher_rl.tiny pretrain",
                                description="train the tiny stack on the synthetic glyphs task (docs/tiny.md)")
    p.add_argument("--out", required=True, help="writes flux-fill/, siglip/, ip-adapter.safetensors, pretrain.json")
    p.add_argument("--seed", type=int, default=d.seed, help="the run is deterministic per seed (and device)")
    p.add_argument("--n_data", type=int, default=d.n_data, help="synthetic glyph pictures to train on")
    p.add_argument("--vae_steps", type=int, default=d.vae_steps, help="phase 1: autoencoder steps")
    p.add_argument("--dit_steps", type=int, default=d.dit_steps, help="phase 2: flow-matching steps")
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--vae_lr", type=float, default=d.vae_lr)
    p.add_argument("--dit_lr", type=float, default=d.dit_lr)
    p.add_argument("--snapshot_steps", default="", help="phase-2 steps to write weights-step{N}.safetensors at, "
                   "e.g. 1000,2000")
    p.add_argument("--workers", type=int, default=d.workers, help="processes rendering the data (0 = all cores)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear LR warmup steps of each phase")
    p.add_argument("--max_minutes", type=float, default=0.0,
                   help="time limit of the whole run: after --probe_steps phase-2 steps, plan the phase-2 steps that "
                        "end --reserve_s before it (planned_dit_steps in pretrain.json; the cosine LR reaches ~0 "
                        "there); stop phase 2 (with a snapshot) if it is reached anyway; 0 = no limit")
    p.add_argument("--probe_steps", type=int, default=d.probe_steps,
                   help="phase-2 steps timed for the plan (at most --warmup, so the LR does not depend on the plan)")
    p.add_argument("--reserve_s", type=float, default=d.reserve_s,
                   help="seconds of --max_minutes left for writing the outputs")
    p.add_argument("--heads", type=int, default=d.heads, help="transformer attention heads (head dim 32)")
    p.add_argument("--double_blocks", type=int, default=d.double_blocks, help="transformer double-stream blocks")
    p.add_argument("--single_blocks", type=int, default=d.single_blocks, help="transformer single-stream blocks")
    p.add_argument("--ema_decay", type=float, default=d.ema_decay,
                   help="EMA of the phase-2 weights, which snapshots and the layout hold; 0 = the last weights")
    p.add_argument("--save_dtype", default=d.save_dtype, choices=sorted(SAVE_DTYPES),
                   help="dtype of snapshots and the written FLUX-Fill/adapter (SigLIP stays fp32)")
    p.add_argument("--snapshot_dir", default="",
                   help="where snapshots (one at the end, the ones of --snapshot_steps) and a copy of pretrain.json "
                        "go (default: --out)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    args = p.parse_args(argv)
    for name in ("n_data", "vae_steps", "dit_steps", "batch_size", "heads", "double_blocks", "single_blocks",
                 "probe_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"expected a positive integer, got {getattr(args, name)}", field=f"--{name}")
    for name in ("warmup", "max_minutes", "reserve_s"):
        if getattr(args, name) < 0:
            raise UserError(f"expected a number >= 0, got {getattr(args, name)}", field=f"--{name}")
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"expected 0 (off) or a decay in (0, 1), got {args.ema_decay}", field="--ema_decay")
    try:
        snaps = [int(s) for s in args.snapshot_steps.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated integers, got {args.snapshot_steps!r}",
                        field="--snapshot_steps") from None
    cfg = PretrainConfig(seed=args.seed, n_data=args.n_data, vae_steps=args.vae_steps, dit_steps=args.dit_steps,
                         batch_size=args.batch_size, vae_lr=args.vae_lr, dit_lr=args.dit_lr, snapshot_steps=snaps,
                         workers=args.workers, max_minutes=args.max_minutes, snapshot_dir=args.snapshot_dir,
                         warmup=args.warmup, probe_steps=args.probe_steps, reserve_s=args.reserve_s,
                         heads=args.heads, double_blocks=args.double_blocks, single_blocks=args.single_blocks,
                         ema_decay=args.ema_decay, save_dtype=args.save_dtype)
    from .training.tiny_pretrain import pretrain

    log = pretrain(args.out, cfg, args.device, started=started)
    print(json.dumps({"out": args.out, "times": log["times"], "device": log["device"],
                      "planned_dit_steps": log["planned_dit_steps"], "dit_steps_done": log["dit_steps_done"]}))
    return 0


def _export(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m calligrapher_rl.tiny export",
                                description="write a pretrain snapshot in the layout of tiny")
    p.add_argument("--snapshot", required=True, help="a weights-step{N}.safetensors of `pretrain`")
    p.add_argument("--out", required=True, help="writes flux-fill/, siglip/, ip-adapter.safetensors")
    p.add_argument("--seed", type=int, default=0, help="the seed the snapshot was trained with")
    p.add_argument("--save_dtype", default="fp16", choices=("fp16", "fp32"),
                   help="dtype of the written FLUX-Fill/adapter (SigLIP stays fp32)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.snapshot):
        raise UserError("no such file", where=args.snapshot, field="--snapshot")
    from .training.tiny_weights import load_snapshot, write_layout

    print("\n".join(write_layout(args.out, *load_snapshot(args.snapshot, args.seed), save_dtype=args.save_dtype)))
    return 0


def _eval(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m calligrapher_rl.tiny eval",
                                description="mean OCR reward of a pretrained tiny on unseen glyph examples "
                                            "(synth seed 0), or on the examples of --data")
    p.add_argument("--model", default="tiny-pretrained",
                   help="a folder written by pretrain/export, or tiny-pretrained")
    p.add_argument("--ip_adapter", default=None, help="adapter file (default: the model folder's)")
    p.add_argument("--n", type=int, default=None,
                   help="examples: the first n of synth --task glyphs --seed 0 (default 64), or of --data (default all)")
    p.add_argument("--data", default=None,
                   help="a dataset (bundled-glyphs, a data.jsonl, ...) whose examples are scored instead of synth seed 0")
    p.add_argument("--images_per_prompt", type=int, default=1,
                   help="samples of each example, each from its own initial noise (the same noises for every adapter "
                        "at the same --seed): 16 turns a 4-example set into a 64-sample measurement")
    p.add_argument("--seed", type=int, default=0, help="the initial noises")
    p.add_argument("--steps", type=int, default=4, help="ODE steps (the tiny presets' eval steps)")
    p.add_argument("--grid", default=None, help="also write a PNG grid of the samples here (16 a row)")
    args = p.parse_args(argv)
    for name in ("n", "images_per_prompt", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"expected a positive integer, got {getattr(args, name)}", field=f"--{name}")
    if args.ip_adapter and not os.path.exists(args.ip_adapter) and args.ip_adapter != "tiny-pretrained":
        raise UserError("no such file", where=args.ip_adapter, field="--ip_adapter")
    result = evaluate_ocr(args.model, args.ip_adapter, n=args.n, steps=args.steps, seed=args.seed, grid=args.grid,
                          data=args.data, images_per_prompt=args.images_per_prompt)
    print(json.dumps(result))
    return 0


def evaluate_ocr(model: str = "tiny-pretrained", adapter: str | None = None, *, n: int | None = None, steps: int = 4,
                 seed: int = 0, scale: float = 1.0, grid: str | None = None, data: str | None = None,
                 images_per_prompt: int = 1) -> dict:
    """Mean OCR reward of ODE samples (guidance 30, as the presets) on the first `n` (default 64) glyph examples of
    synth seed 0 (pretraining never sees seed 0), or on the first `n` (default all) examples of `data`; each example
    `images_per_prompt` times, from as many initial noises (drawn from `seed`: the same for every adapter).
    `by_text` is the mean per example text."""
    import numpy as np
    import torch

    from .data import ensure_default_dataset, load_dataset, resolve_dataset_path
    from .models.stack import CalligrapherStack
    from .models.tiny import PRETRAINED_NAME
    from .rewards.base import RewardSample
    from .rewards.ocr import OcrReward
    from .sampling import rollout
    from .training.batches import mask_pil, to_pil

    if model == PRETRAINED_NAME:
        flux, siglip, adapter = PRETRAINED_NAME, PRETRAINED_NAME, adapter or PRETRAINED_NAME
    else:
        flux, siglip = os.path.join(model, "flux-fill"), os.path.join(model, "siglip")
        adapter = adapter or os.path.join(model, "ip-adapter.safetensors")
    stack = CalligrapherStack.from_pretrained(flux, siglip, adapter_path=adapter, num_style_tokens=8)
    if data is None:
        n = 64 if n is None else n
        dataset = load_dataset(ensure_default_dataset(n=max(n, 16), task="glyphs"), resolution=64)  # seed 0: unseen
    else:
        dataset = load_dataset(resolve_dataset_path(data), resolution=64)
        n = len(dataset) if n is None else n
    items = [dataset[i] for i in range(min(n, len(dataset))) for _ in range(images_per_prompt)]
    gen = torch.Generator().manual_seed(seed)
    fill = stack.prepare_fill(torch.stack([it["source"] for it in items]), torch.stack([it["mask"] for it in items]),
                              generator=gen)
    embeds = stack.encode_style([it["reference"] for it in items])
    text = stack.encode_prompts([it["prompt"] for it in items])
    ro = rollout(stack, fill, text, embeds, num_steps=steps, guidance=30.0, generator=gen, scale=scale)
    images = to_pil(stack.decode(ro.final, fill.height, fill.width))
    ocr = OcrReward()
    scores = [ocr.score_one(RewardSample(image=im, mask=mask_pil(it["mask"]), text=it["text"],
                                         reference=it["reference"])) for im, it in zip(images, items)]
    if grid:
        from PIL import Image

        cols = min(16, len(images))
        rows = [images[i:i + cols] for i in range(0, len(images), cols)]
        sheet = Image.new("RGB", (64 * cols, 64 * len(rows)))
        for r, row in enumerate(rows):
            for c, im in enumerate(row):
                sheet.paste(im, (64 * c, 64 * r))
        sheet.save(grid)
    by_text: dict[str, list[float]] = {}
    for it, s in zip(items, scores):
        by_text.setdefault(it["text"], []).append(s)
    return {"ocr": float(np.mean(scores)), "exact": float(np.mean([s == 1.0 for s in scores])), "n": len(scores),
            "by_text": {t: float(np.mean(v)) for t, v in by_text.items()}}


def main(argv=None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return {"pretrain": _pretrain, "export": _export, "eval": _eval}[argv[0]](argv[1:])
    return _random_tiny(argv)


if __name__ == "__main__":
    cli_main(main)
