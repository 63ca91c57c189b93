"""Does a tiny preset learn the OCR reward within a wall budget? Seeds 1-3, each with a paired control.

    python bench/tiny_learning.py --preset tiny-grpo [--seeds 1,2,3] [--minutes 5] [--jobs 2] [-- FLAGS...]

For every seed it runs the preset (plus FLAGS, plus `--rl_warmup_steps 0` so every gain is RL's: the
supervised warmup alone would raise the reward of the control too) and the same run with each epoch's
advantages permuted across its samples (`PermutedAdvantages` of tests/test_learning.py: the update
machinery runs, the link between an image and its reward is cut). With `--borrowed_control` the control
permutes the real run's advantages instead of its own and scores nothing (`BorrowedEpoch`, the control of
tests/test_learning_ocr.py): each seed's control then runs after its real run. Each run is one process with one torch
thread; `--jobs` of them run at once. A run stops at the preset's `max_train_steps` or at `--minutes` of
wall time (counted from the process start, imports included), whichever comes first.

Then it evaluates, with ODE samples at the preset's eval steps and adapter scale, the step-0 adapter (the
pretrained one) and the final adapter (the EMA one when the preset uses EMA, and the live one too) on the
training prompts, `--images_per_prompt` initial noises each (the same noises before and after), and reads
the training curve (`reward/mean` per RL epoch in metrics.jsonl). It writes a JSON (rewritten after
every run) and prints a table. It reports numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

K = 5  # epochs averaged at each end of the training curve


def _trainer_class(spec: dict, deadline: float):
    from calligrapher_rl.training.trainer import Trainer

    base = Trainer
    if spec["control"] or spec["borrowed"]:
        found = importlib.util.spec_from_file_location("learning_tests", os.path.join(ROOT, "tests", "test_learning.py"))
        mod = importlib.util.module_from_spec(found)
        found.loader.exec_module(mod)
        if not spec["borrowed"]:
            base = mod.PermutedAdvantages
        elif not spec["control"]:
            base = mod.RecordingAdvantages  # the real run, which writes its advantages for its control (run_one)
        else:
            import torch

            base = mod.borrowed_advantages(torch.load(_advantages_file(spec["real_out"]), weights_only=True))

    class Timed(base):
        """Stops (saving, as a user's stop does) once the wall budget is spent."""

        def _stop_requested(self) -> bool:
            if time.time() >= deadline:
                self._stop = True
                return True
            return super()._stop_requested()

    return Timed


def run_one(spec: dict) -> dict:
    """One training run and its before/after evaluation (in this process, one torch thread)."""
    started = spec["started"]
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from calligrapher_rl.config_parse import parse_args
    from calligrapher_rl.tiny import evaluate_ocr
    from calligrapher_rl.training.run_dir import read_metrics

    out = spec["out"]
    cfg = parse_args(["--preset", spec["preset"], "--rl_warmup_steps", "0", "--report_to", "none",
                      "--checkpointing_steps", "100000", *spec["flags"], "--seed", str(spec["seed"]),
                      "--output_dir", out, "--overwrite_output_dir", "true"])
    trainer = _trainer_class(spec, started + 60 * spec["minutes"])(cfg)
    status = trainer.run()
    if spec["borrowed"] and not spec["control"]:
        torch.save(trainer.rl_epoch_part.recorded, _advantages_file(out))
    train_wall = time.time() - started
    rows = [r for r in read_metrics(out) if r.get("phase") == "rl" and "reward/mean" in r]
    curve = [round(float(r["reward/mean"]), 4) for r in rows]
    ckpts = sorted((d for d in os.listdir(out) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))
    last = os.path.join(out, ckpts[-1])
    model = cfg.pretrained_model_name_or_path
    ev = dict(n=None, steps=cfg.rl_eval_num_inference_steps, seed=spec["eval_seed"], scale=cfg.ip_adapter_scale,
              data=cfg.train_data_json, images_per_prompt=spec["images_per_prompt"])
    t0 = time.time()
    before = evaluate_ocr(model, cfg.initial_ip_adapter_path, **ev, grid=os.path.join(out, "eval-step0.png"))
    lora = os.path.isfile(os.path.join(last, "lora.json"))  # a LoRA checkpoint loads as its folder (raw) or ema/
    after_live = evaluate_ocr(model, last if lora else os.path.join(last, "ip-adapter.safetensors"), **ev,
                              grid=os.path.join(out, "eval-final.png"))
    after_ema = None
    if cfg.use_ema:
        after_ema = evaluate_ocr(model, os.path.join(last, "ema" if lora else "ip-adapter-ema.safetensors"), **ev,
                                 grid=os.path.join(out, "eval-final-ema.png"))
    after = after_ema or after_live
    verdict = _verdict(out, last, spec["verdict_noises"]) if spec.get("verdict_noises") else None
    c = np.array(curve)
    # the run's own periodic evaluation (the studio's eval curve): step, mean and its 95% interval
    evals = [[r["step"], round(r["eval/reward/mean"], 4), round(r.get("eval/reward/mean_lo", float("nan")), 4),
              round(r.get("eval/reward/mean_hi", float("nan")), 4)] for r in read_metrics(out) if "eval/reward/mean" in r]
    return {"seed": spec["seed"], "control": spec["control"], "status": status, "epochs": len(curve),
            "train_wall_s": round(train_wall, 1), "eval_wall_s": round(time.time() - t0, 1),
            "cpu_s": round(time.process_time(), 1), "adapter": "ema" if after_ema else "live",
            "eval_before": before, "eval_after": after, "eval_after_live": after_live,
            "gain": round(after["ocr"] - before["ocr"], 4), "gain_live": round(after_live["ocr"] - before["ocr"], 4),
            "curve": curve, "curve_first": round(float(c[:K].mean()), 4), "curve_last": round(float(c[-K:].mean()), 4),
            "curve_gain": round(float(c[-K:].mean() - c[:K].mean()), 4), "eval_curve": evals, "verdict": verdict,
            "out": out}


def _advantages_file(out: str) -> str:
    return out + ".advantages.pt"


def _verdict(out: str, last: str, noises: int) -> dict:
    """`python -m calligrapher_rl.evaluate` of checkpoint-0 against the final checkpoint (its EMA adapter) on the
    training prompts x `noises` noises: the paired OCR difference, its 95% interval and the verdict sentence."""
    from calligrapher_rl import evaluate

    folder = os.path.join(out, "verdict")
    if evaluate.main(["--checkpoints", os.path.join(out, "checkpoint-0"), last, "--noises", str(noises),
                      "--out", folder]) != 0:
        return {"error": f"evaluate failed (see {folder})"}
    with open(os.path.join(folder, "eval.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    ocr = next(p for p in report["paired"] if p["reward"] == "ocr")
    return {"noises": noises, "n": ocr["n"], "diff": round(ocr["diff"], 4), "ci95": [round(x, 4) for x in ocr["ci95"]],
            "verdict": ocr["verdict"]}


def _spawn(spec: dict) -> dict:
    """A run in its own process (one thread): its wall time is its own and a crash is one row."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    os.makedirs(spec["out"], exist_ok=True)
    log = os.path.join(spec["out"] + ".log")
    with open(log, "w") as fh:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--_one", json.dumps(spec)], env=env,
                           stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    result_file = spec["out"] + ".json"
    if r.returncode != 0 or not os.path.exists(result_file):
        return {"seed": spec["seed"], "control": spec["control"], "status": f"crashed (rc {r.returncode}, see {log})"}
    with open(result_file) as fh:
        return json.load(fh)


def table(results: list[dict]) -> str:
    rows = {(r["seed"], r["control"]): r for r in results}
    lines = ["| seed | eval step 0 | eval final | gain | control gain | training reward first 5 -> last 5 | "
             "control first 5 -> last 5 | epochs | wall s (real / control) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for seed in sorted({r["seed"] for r in results}):
        real, ctl = rows.get((seed, False), {}), rows.get((seed, True), {})
        f = lambda r, k: "-" if k not in r else f"{r[k]:+.3f}"  # noqa: E731
        ev = lambda r, k: "-" if k not in r else f"{r[k]['ocr']:.3f}"  # noqa: E731
        cv = lambda r: "-" if "curve" not in r else f"{r['curve_first']:.3f} -> {r['curve_last']:.3f}"  # noqa: E731
        lines.append(f"| {seed} | {ev(real, 'eval_before')} | {ev(real, 'eval_after')} | {f(real, 'gain')} | "
                     f"{f(ctl, 'gain')} | {cv(real)} | {cv(ctl)} | {real.get('epochs', '-')} | "
                     f"{real.get('train_wall_s', '-')} / {ctl.get('train_wall_s', '-')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_one"]:
        spec = json.loads(argv[1])
        result = run_one(spec)
        tmp = spec["out"] + ".json.tmp"
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(tmp, spec["out"] + ".json")
        return 0
    flags = []
    if "--" in argv:
        argv, flags = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, help="tiny-grpo, tiny-nft, tiny-awm, tiny-grpo-fast or a preset file")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--minutes", type=float, default=5.0, help="wall budget of each run (it also stops at the "
                   "preset's max_train_steps)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each one process, one thread)")
    p.add_argument("--no_control", action="store_true", help="skip the permuted-advantage runs")
    p.add_argument("--only_control", action="store_true", help="only the permuted-advantage runs")
    p.add_argument("--borrowed_control", action="store_true",
                   help="the control permutes the real run's advantages and scores nothing (tests/test_learning_ocr.py); "
                        "each real run must reach max_train_steps within --minutes, or its control ends crashed "
                        "saying so")
    p.add_argument("--images_per_prompt", type=int, default=16, help="eval samples per training prompt")
    p.add_argument("--verdict_noises", type=int, default=0,
                   help="also run `python -m calligrapher_rl.evaluate` (checkpoint-0 against the final one) at this many "
                        "noises per prompt and record its paired interval and verdict (GRPO's needs 64: docs/learning.md)")
    p.add_argument("--eval_seed", type=int, default=0, help="the eval's initial noises (the same before and after)")
    p.add_argument("--work", default="/tmp/tiny_learning", help="run folders go here")
    p.add_argument("--out", default=None, help="JSON result (default: bench/results/tiny_learning-PRESET.json)")
    args = p.parse_args(argv)
    name = os.path.splitext(os.path.basename(args.preset))[0]
    out = args.out or os.path.join(ROOT, "bench", "results", f"tiny_learning-{name}.json")
    started = time.time()
    if args.borrowed_control and (args.no_control or args.only_control):
        p.error("--borrowed_control runs each seed's real run and then its control")
    specs = [{"preset": args.preset, "flags": flags, "seed": int(s), "control": control, "minutes": args.minutes,
              "images_per_prompt": args.images_per_prompt, "eval_seed": args.eval_seed,
              "verdict_noises": args.verdict_noises, "borrowed": args.borrowed_control,
              "real_out": os.path.join(args.work, f"{name}-s{s}"),
              "out": os.path.join(args.work, f"{name}-s{s}{'-control' if control else ''}")}
             for s in args.seeds.split(",") for control in ((False,) if args.no_control else (True,) if args.only_control else (False, True))]
    results: list[dict] = []

    def launch(spec):
        spec = {**spec, "started": time.time()}
        r = _spawn(spec)
        results.append(r)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".tmp", "w") as fh:
            json.dump({"preset": args.preset, "flags": flags, "minutes": args.minutes, "jobs": args.jobs,
                       "images_per_prompt": args.images_per_prompt, "results": results}, fh, indent=1)
        os.replace(out + ".tmp", out)
        print(json.dumps({k: r.get(k) for k in ("seed", "control", "status", "epochs", "gain", "gain_live",
                                                 "curve_gain", "train_wall_s")}), flush=True)
        return r

    # a borrowed control needs its real run's advantages: each seed's pair runs as one chain, in order
    chains = ([[sp for sp in specs if sp["seed"] == seed] for seed in dict.fromkeys(sp["seed"] for sp in specs)]
              if args.borrowed_control else [[sp] for sp in specs])
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda chain: [launch(sp) for sp in chain], chains))
    print(f"{args.preset} {' '.join(flags)} (warmup 0; eval: {args.images_per_prompt} noises per prompt, "
          f"{results[0].get('adapter', '?') if results else '?'} adapter; {time.time() - started:.0f} s in all)")
    print(table([r for r in results if "curve" in r or "status" in r]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
