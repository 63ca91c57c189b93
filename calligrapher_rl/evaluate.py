"""Which checkpoint is better, and how sure: the same eval set and noises for every checkpoint.

    python -m calligrapher_rl.evaluate --checkpoints A [B ...] [--data NAME_OR_PATH] [--noises K] [--out DIR]

A checkpoint: an adapter file (release .bin, fork, ours), a checkpoint folder (its EMA file when it has one),
a run's checkpoint-0 (its starting point), a run folder (its newest checkpoint), tiny-pretrained, or base (no
adapter). The model, the data and the sampling settings default to those of the first checkpoint's run
(run.json). Writes DIR/eval.json, DIR/report.md and DIR/report.html (docs/evaluation.md), and prints the
verdict of every checkpoint against the first.
"""

from __future__ import annotations

import argparse
import json
import os

from .errors import UserError, cli_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calligrapher_rl.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", required=True, help="A [B ...]; every other one is compared with A")
    p.add_argument("--data", default=None, help="a dataset file/folder, bundled, bundled-glyphs, or glyphs-unseen "
                                                "(64 glyph texts the tiny never trained on); default: the run's data")
    p.add_argument("--noises", type=int, default=16, help="initial noises per example (the same for every checkpoint)")
    p.add_argument("--max_examples", type=int, default=None, help="the first N examples only")
    p.add_argument("--seed", type=int, default=0, help="seed of the noises")
    p.add_argument("--out", default="eval", help="folder for eval.json and the report")
    p.add_argument("--pretrained_model_name_or_path", default=None, help="default: the run's (run.json)")
    p.add_argument("--siglip_path", default=None, help="default: the run's; also the style similarity's encoder")
    p.add_argument("--resolution", type=int, default=None, help="default: the run's, else 64")
    p.add_argument("--steps", type=int, default=None, help="ODE steps; default: the run's eval steps, else 4")
    p.add_argument("--guidance", type=float, default=None, help="default: the run's, else 30")
    p.add_argument("--scale", type=float, default=None, help="style strength; default: the run's, else 1")
    p.add_argument("--batch_size", type=int, default=64, help="samples per rollout")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p


def _run_config(refs) -> dict:
    for ref in refs:
        if ref.run_dir:
            try:
                with open(os.path.join(ref.run_dir, "run.json"), encoding="utf-8") as fh:
                    return json.load(fh)
            except (OSError, ValueError):
                continue
    return {}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("noises", "batch_size", "max_examples", "steps", "resolution"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"expected a positive integer, got {value}", field=f"--{name}")
    import torch

    from .models.tiny import PRETRAINED_NAME
    from .training.eval_checkpoints import dataset_for, evaluate_checkpoints, resolve_checkpoint
    from .training.eval_core import EvalSettings
    from .training.eval_report import headline

    refs = [resolve_checkpoint(c) for c in args.checkpoints]
    run = _run_config(refs)
    tiny = any(c.strip() == PRETRAINED_NAME for c in args.checkpoints)
    flux = args.pretrained_model_name_or_path or run.get("pretrained_model_name_or_path") or (
        PRETRAINED_NAME if tiny else None)
    siglip = args.siglip_path or run.get("siglip_path") or (PRETRAINED_NAME if tiny else None)
    data = args.data or run.get("train_data_json")
    for value, flag in ((flux, "--pretrained_model_name_or_path"), (siglip, "--siglip_path"), (data, "--data")):
        if not value:
            raise UserError("required: no checkpoint belongs to a run whose run.json names it", field=flag)
    settings = EvalSettings(noises=args.noises, seed=args.seed, max_examples=args.max_examples,
                            steps=args.steps or run.get("rl_eval_num_inference_steps") or 4,
                            guidance=args.guidance if args.guidance is not None else run.get("rl_guidance_scale", 30.0),
                            scale=args.scale if args.scale is not None else run.get("ip_adapter_scale", 1.0),
                            batch_size=args.batch_size)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    from .models.stack import CalligrapherStack, resolve_model_paths

    first = next((r.path for r in refs if r.path), None)
    stack = CalligrapherStack.from_pretrained(flux, siglip, adapter_path=first, device=device, dtype=dtype)
    dataset = dataset_for(data, args.resolution or run.get("resolution") or 64)
    report = evaluate_checkpoints(refs, stack=stack, dataset=dataset, settings=settings, out_dir=args.out,
                                  siglip_path=resolve_model_paths(flux, siglip)[1], device=device,
                                  progress=lambda i, n, name: print(f"[{i + 1}/{n}] {name}", flush=True))
    for c in report["checkpoints"]:
        print(f"{c['name']}: OCR {c['rewards']['ocr']['mean']:.3f} {c['rewards']['ocr']['ci95']}")
    if report["paired"]:
        print(headline(report))
    print(os.path.join(args.out, "report.html"))
    return 0


if __name__ == "__main__":
    cli_main(main)
