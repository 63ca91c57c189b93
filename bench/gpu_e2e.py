"""The product run whole at real size, through its own CLI: train each preset as shipped, resume it, infer.

    python bench/gpu_e2e.py --models /tmp/realsize --runs /dev/shm/e2e --presets flux-grpo,flux-nft

Only the four paths, a short --max_train_steps and --rewards style:1 differ from the shipped presets (the OCR
reward's wheels do not fit a device call; the style reward runs SigLIP on the same card). Per preset:
  train    `python -m calligrapher_rl.train --preset P ...` for --epochs epochs, a checkpoint at --resume_at epochs
  resume   a second run from that checkpoint to the same end: its losses must match the first run's
  infer    `python -m calligrapher_rl.infer` with the checkpoint's EMA adapter
  studio   the studio's paths with a run on the card: start as the Train tab does, Inference and Compare beside
           it (fit or a one-line refusal, the run unharmed), stop as the Runs tab does, infer from that checkpoint
           (bench/e2e_studio.py)
Results go to bench/results/e2e.json (keys in docs/benchmarks.md), rewritten after every stage so a timeout
keeps what was measured. Where the card has more than 80 GB, the trainer is capped at 78 GiB
(CALLIGRAPHER_GPU_MEMORY_GIB) so that "fits" means fits an 80 GB H100; the cap is recorded. `--tiny` runs the
same stages on the CPU with the tiny model (a smoke test of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

H100_GIB = 78.0


class GpuPeak(threading.Thread):
    """Peak memory.used of GPU 0 by nvidia-smi, polled every 0.5 s (what the driver sees: the allocator's
    cache, the CUDA context and other processes included)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mib, self._stop = 0.0, threading.Event()

    def run(self):
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=10).stdout
                self.peak_mib = max(self.peak_mib, float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return

    def stop(self) -> float:
        self._stop.set()
        return self.peak_mib / 1024


def card() -> tuple[str, float | None]:
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return p.name, p.total_memory / 2**30
    except ImportError:
        pass
    return "cpu", None


class Results:
    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, encoding="utf-8") as fh:
                self.data = json.load(fh)
        except (OSError, ValueError):
            self.data = {}
        self.data.setdefault("runs", {})

    def put(self, preset: str, **values) -> None:
        run = self.data["runs"].setdefault(preset, {"exit": {}})
        for k, v in values.items():
            if k == "exit":
                run["exit"].update(v)
            else:
                run[k] = v
        self.flush()
        print(f"[e2e] {preset}: {json.dumps(values)}", flush=True)

    def flush(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.data, fh, indent=2)
        os.replace(tmp, self.path)


def host_room(*folders: str) -> dict:
    """The host's memory and the free room where models and runs go (GB): what bounds a full-rank checkpoint."""
    import psutil

    room = {"ram_total_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "ram_available_gb": round(psutil.virtual_memory().available / 1e9, 1)}
    for f in folders:
        os.makedirs(f, exist_ok=True)
        room[f"free_gb:{f}"] = round(shutil.disk_usage(f).free / 1e9, 1)
    return room


DEADLINE = [float("inf")]  # time.time() by which every command must have ended (--deadline_s)


def command(args: list[str], log: str, env: dict) -> tuple[int, float, float]:
    """(exit code, seconds, nvidia-smi peak GiB) of one CLI command, its output in `log`. A command still
    running at the deadline is killed and its exit is 124 (timeout's code): what it logged until then is still read."""
    peak = GpuPeak()
    if shutil.which("nvidia-smi"):
        peak.start()
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as fh:
        try:
            code = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                  timeout=max(1.0, DEADLINE[0] - t0)).returncode
        except subprocess.TimeoutExpired:
            code = 124
    seconds = time.time() - t0
    smi = peak.stop() if peak.is_alive() else None
    with open(log, encoding="utf-8", errors="replace") as fh:
        tail = [line.rstrip() for line in fh.readlines()[-4:]]
    print(f"[e2e] {' '.join(args[:4])} ... exit {code} in {seconds:.0f} s; log tail: {tail}", flush=True)
    return code, seconds, smi


def rows(run_dir: str) -> list[dict]:
    from calligrapher_rl.training.run_dir import read_metrics

    return read_metrics(run_dir) if os.path.isdir(run_dir) else []


SAVED = re.compile(r"saved \S+ \(([\d.]+) GB in ([\d.]+) s\)")  # training/lifecycle.py's line for each checkpoint


def save_seconds(log_path: str) -> list[float]:
    """The seconds of every checkpoint a train command saved, from its log."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            return [float(m.group(2)) for m in SAVED.finditer(fh.read())]
    except OSError:
        return []


def file_sizes_gb(folder: str) -> dict:
    """GB of each file of a checkpoint of 1 MB or more, by its path in the folder."""
    sizes = {}
    for d, _, files in os.walk(folder):
        for f in files:
            size = os.path.getsize(os.path.join(d, f))
            if size >= 1e6:
                sizes[os.path.relpath(os.path.join(d, f), folder)] = round(size / 1e9, 3)
    return dict(sorted(sizes.items()))


def summarize(metrics: list[dict]) -> dict:
    """Per-phase seconds (summed over the run), steady epoch seconds, images/s, peaks, from metrics.jsonl."""
    epochs = [r for r in metrics if "time/epoch_s" in r]
    phase_s: dict[str, float] = {}
    for r in metrics:
        for k, v in r.items():
            if k.startswith("time/") and k.endswith("_s") and k not in ("time/epoch_s", "time/first_step_s", "time/step_s") \
                    and isinstance(v, (int, float)):
                phase_s[k[5:-2]] = round(phase_s.get(k[5:-2], 0.0) + v, 2)
    steady = [r["time/epoch_s"] for r in epochs[1:]]
    first = next((r["time/first_step_s"] for r in metrics if "time/first_step_s" in r), None)
    peak = max((r.get("sys/gpu_mem_gib", 0.0) for r in metrics), default=None)
    per_epoch = {k: [r.get(f"time/{k}_s") for r in epochs] for k in ("rollout", "reward", "update", "optimizer", "ema")}
    return {"phase_s": phase_s, "steady_epoch_s": round(statistics.median(steady), 2) if steady else None,
            "epoch_s": [round(r["time/epoch_s"], 2) for r in epochs], "first_step_s": first,
            "images_per_s": round(statistics.median(r["perf/images_per_s"] for r in epochs[1:]), 3) if steady else None,
            "peak_gib": peak,
            "host_peak_rss_gib": max((r.get("sys/host_peak_rss_gib", 0.0) for r in metrics), default=None),
            "host_available_min_gib": min((r["sys/host_available_gib"] for r in metrics if "sys/host_available_gib" in r),
                                          default=None),
            "alloc_retries": max((r.get("sys/alloc_retries", 0) for r in metrics), default=None),
            "rollout_tflops": [r.get("perf/rollout_tflops") for r in epochs],
            "rollout_ms_per_image_step": [r.get("perf/rollout_ms_per_image_step") for r in epochs],
            "sampler_ms_per_image_step": [r.get("perf/sampler_ms_per_image_step") for r in epochs],
            "update_tflops": [r.get("perf/update_tflops") for r in epochs], "per_epoch_s": per_epoch,
            "reward_mean": [r.get("reward/mean") for r in epochs]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", required=True, help="folder of `python -m calligrapher_rl.realsize` (built if missing)")
    ap.add_argument("--runs", required=True, help="where run folders go (one checkpoint of trainable all ~30 GB)")
    ap.add_argument("--presets", default="flux-grpo,flux-nft")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--resume_at", type=int, default=2, help="epoch whose checkpoint the resume stage starts from")
    ap.add_argument("--stages", default="train,resume,infer")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "e2e.json"))
    ap.add_argument("--logs", default=None, help="folder for the commands' logs (default: beside --out)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny model")
    ap.add_argument("--extra", default="", help="more flags for every train command (e.g. for --tiny)")
    ap.add_argument("--deadline_s", type=float, default=None,
                    help="end every command this many seconds after the start (a device call's limit), keeping what "
                         "it measured; its exit reads 124")
    args = ap.parse_args()
    if args.deadline_s:
        DEADLINE[0] = time.time() + args.deadline_s

    name, total = card()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cap = None
    if total is not None and total > 100:  # an H200 stands in for an H100: cap the trainer at an H100's memory
        cap = H100_GIB
        env["CALLIGRAPHER_GPU_MEMORY_GIB"] = str(cap)
    res = Results(args.out)
    res.data.update(card=name, memory_cap_gib=cap, date=time.strftime("%Y-%m-%d"), tiny=args.tiny)
    versions = {}
    for mod in ("torch", "diffusers", "transformers", "accelerate", "torchao", "peft"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - recorded as missing
            versions[mod] = None
    res.data["versions"] = versions
    res.data["host"] = host_room(args.models, args.runs)
    res.flush()
    logs = args.logs or os.path.dirname(os.path.abspath(args.out))
    os.makedirs(logs, exist_ok=True)

    if args.tiny:
        paths = {"flux": "tiny-pretrained", "siglip": "tiny-pretrained", "adapter": "tiny-pretrained"}
    else:
        paths = {"flux": os.path.join(args.models, "flux-fill"), "siglip": os.path.join(args.models, "siglip"),
                 "adapter": os.path.join(args.models, "calligrapher-random.safetensors")}
        if not all(os.path.exists(p) for p in paths.values()):
            t0 = time.time()  # in its own process: the card must be empty when the trainer starts
            subprocess.run([sys.executable, "-m", "calligrapher_rl.realsize", "--out", args.models, "--device", "cuda"],
                           cwd=ROOT, check=True)
            res.data["build_models_s"] = round(time.time() - t0, 1)
            res.flush()
    stages = args.stages.split(",")
    if "studio" in stages:
        try:  # before any model is built or run started: the stage drives the studio's own tabs
            import gradio  # noqa: F401
        except ImportError:
            print("gpu_e2e.py: --stages studio needs gradio importable here (pip install -r requirements.txt; on a "
                  "machine without network, carry its wheels beside .gpu_wheels)", file=sys.stderr)
            return 2
    for preset in args.presets.split(","):
        from calligrapher_rl.config_parse import parse_args

        shipped = parse_args(["--preset", preset])
        steps_per_epoch = max(1, shipped.rl_num_batches_per_epoch // shipped.gradient_accumulation_steps)
        end, ckpt = args.epochs * steps_per_epoch, args.resume_at * steps_per_epoch
        run_a, run_b = os.path.join(args.runs, preset), os.path.join(args.runs, preset + "-resumed")
        base = ["-m", "calligrapher_rl.train", "--preset", preset, "--pretrained_model_name_or_path", paths["flux"],
                "--siglip_path", paths["siglip"], "--initial_ip_adapter_path", paths["adapter"],
                "--train_data_json", "bundled", "--rewards", "style:1", "--checkpointing_steps", str(ckpt),
                *args.extra.split()]
        res.put(preset, card=name, memory_cap_gib=cap, date=time.strftime("%Y-%m-%d"), compile=bool(shipped.compile),
                trainable=shipped.trainable, epochs=args.epochs, extra_flags=args.extra or None,
                trained_timesteps_per_image=shipped.resolved().num_trained_timesteps(),
                images_per_epoch=shipped.rl_num_batches_per_epoch * shipped.train_batch_size
                * shipped.rl_num_images_per_prompt)
        if "train" in stages:
            shutil.rmtree(run_a, ignore_errors=True)
            code, secs, smi = command([*base, "--output_dir", run_a, "--max_train_steps", str(end)],
                                      os.path.join(logs, f"e2e-{preset}-train.log"), env)
            from calligrapher_rl.training.checkpointing import folder_bytes

            ck = os.path.join(run_a, f"checkpoint-{ckpt}")
            summary = summarize(rows(run_a))
            # every save's seconds, the run's last one included (metrics rows charge a save to the epoch after it)
            saves = save_seconds(os.path.join(logs, f"e2e-{preset}-train.log")) or [
                r["time/checkpoint_save_s"] for r in rows(run_a) if "time/checkpoint_save_s" in r]
            res.put(preset, exit={"train": code}, train_s=round(secs, 1), peak_gib_nvidia_smi=smi, **summary,
                    checkpoint_gb=round(folder_bytes(ck) / 1e9, 3) if os.path.isdir(ck) else None,  # MB: LoRA
                    checkpoint_files_gb=file_sizes_gb(ck) if os.path.isdir(ck) else None,
                    checkpoint_save_s=round(statistics.median(saves), 2) if saves else None)
            final = os.path.join(run_a, f"checkpoint-{end}")
            if end != ckpt and os.path.isdir(final):  # measured; its room is needed by the resume
                shutil.rmtree(final)
        if "resume" in stages:
            shutil.rmtree(run_b, ignore_errors=True)
            code, secs, _ = command([*base, "--output_dir", run_b, "--max_train_steps", str(end),
                                     "--resume_from_checkpoint", os.path.join(run_a, f"checkpoint-{ckpt}")],
                                    os.path.join(logs, f"e2e-{preset}-resume.log"), env)
            a = {r["step"]: r for r in rows(run_a) if "loss" in r and r["step"] > ckpt}
            b = {r["step"]: r for r in rows(run_b) if "loss" in r and r["step"] > ckpt}
            diffs = {s: abs(b[s]["loss"] - a[s]["loss"]) / max(abs(a[s]["loss"]), 1e-12) for s in a if s in b}
            load = next((r["time/resume_load_s"] for r in rows(run_b) if "time/resume_load_s" in r), None)
            res.put(preset, exit={"resume": code}, resume_s=round(secs, 1), resume_load_s=load,
                    resume_loss_rel_diff={str(k): v for k, v in diffs.items()},
                    resume_steps_compared=len(diffs))
            shutil.rmtree(run_b, ignore_errors=True)
        if "infer" in stages:
            from e2e_studio import bundled_item

            folder, item = bundled_item(shipped.resolution)
            # the EMA weights: a full adapter's file, or a LoRA checkpoint's ema/ folder (docs/lora.md)
            ema = os.path.join(run_a, f"checkpoint-{ckpt}",
                               "ema" if shipped.trainable == "lora" else "ip-adapter-ema.safetensors")
            code, secs, _ = command(["-m", "calligrapher_rl.infer", "--pretrained_model_name_or_path", paths["flux"],
                                     "--siglip_path", paths["siglip"], "--ip_adapter", ema,
                                     "--source", os.path.join(folder, item["source"]),
                                     "--mask", os.path.join(folder, item["mask"]),
                                     "--reference", os.path.join(folder, item.get("reference", item["source"])),
                                     "--text", "Hello", "--out", os.path.join(logs, f"e2e-{preset}-infer.png"),
                                     "--steps", "30" if not args.tiny else "2"],
                                    os.path.join(logs, f"e2e-{preset}-infer.log"), env)
            res.put(preset, exit={"infer": code}, infer_s=round(secs, 1))
        if "studio" in stages:
            from e2e_studio import run_studio_stage

            got = run_studio_stage(preset, [*base[2:], "--max_train_steps", "1000"], args.runs, paths,
                                   [] if args.tiny else [os.path.abspath(args.models)], "" if args.tiny else "0",
                                   shipped.resolution, DEADLINE[0], text="ab" if args.tiny else "Hello")
            res.put(preset, **got)
    return 0


if __name__ == "__main__":
    sys.exit(main())
