"""Data parallel through accelerate on two CPU (gloo) processes: what does not need a GPU.

The bench script `bench/multi_gpu_bench.py` is the same code the GPU measurement ran; in `--tiny` mode it
runs the tiny stack on CPU. One process accumulating two micro-batches (weight 1/2 each) must give the same
first-update gradient as two DDP processes holding one micro-batch each.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "multi_gpu_bench.py")


def _run(args: list[str], out: str, timeout: int = 420) -> None:  # 300 s was hit at load average ~60 on 2 cores
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(args + [BENCH, "--tiny", "--out", out, "--iters", "1"], cwd=os.path.dirname(BENCH), env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_update_equals_the_one_process_update(tmp_path):
    out = str(tmp_path)
    _run([sys.executable], out)
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--main_process_port", "0"], out)
    for method in ("grpo", "nft"):
        one = torch.load(os.path.join(out, f"grad-{method}-w1.pt"), weights_only=True)
        two = torch.load(os.path.join(out, f"grad-{method}-w2.pt"), weights_only=True)
        assert one.keys() == two.keys() and len(one) == 8
        for name in one:
            assert one[name].norm() > 0, f"{method}: no gradient reached {name}"
            rel = float((one[name] - two[name]).norm() / one[name].norm())
            assert rel < 1e-5, f"{method} {name}: 2-process gradient differs by {rel:.2e}"
    import json

    report = json.load(open(os.path.join(out, "scaling-w2.json")))
    assert report["world"] == 2 and "ZeroRedundancyOptimizer" in report["grpo"]["optimizer"]


def _launch_two(out, *flags, timeout=600):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
                           "--dynamo_backend", "no", "-m", "calligrapher_rl.train", "--output_dir", str(out), *flags],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("preset", ["tiny-grpo", "tiny-grpo-lora"])
def test_two_process_resume_with_sharded_optimizer_is_exact(tmp_path, preset):
    """Two processes, DDP + ZeRO-1 (the default on several processes): the checkpoint holds the whole
    consolidated optimizer state, and a run resumed from checkpoint-2 repeats step 3 of the uninterrupted run.
    LoRA's flat optimizer (optim.FlatOptimizer) shards as one chunk of the flat tensor per rank (~45 s)."""
    import shutil

    from calligrapher_rl.training.run_dir import read_metrics

    flags = ["--preset", preset, "--pretrained_model_name_or_path", "tiny", "--siglip_path", "tiny",
             "--train_data_json", "bundled", "--rewards", "brightness:1", "--resolution", "32",
             "--num_style_tokens", "8", "--rl_num_inference_steps", "3", "--rl_num_images_per_prompt", "2",
             "--train_batch_size", "1", "--rl_num_batches_per_epoch", "1", "--rl_warmup_steps", "0",
             "--max_train_steps", "3", "--checkpointing_steps", "2", "--eval_steps", "0", "--eval_at_start", "false",
             "--use_ema", "true", "--ema_update_interval", "1"]
    full = tmp_path / "full"
    r = _launch_two(full, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    opt = torch.load(full / "checkpoint-2" / "trainer_state" / "optimizer.pt", weights_only=True)
    n_trainable = len(opt["param_groups"][0]["params"])
    assert n_trainable > 0 and len(opt["state"]) == n_trainable, "the checkpoint must hold every rank's moments"
    if preset.endswith("lora"):  # two equal chunks, one per rank, each with its own moments
        sizes = {tuple(st["exp_avg"].shape) for st in opt["state"].values()}
        assert n_trainable == 2 and len(sizes) == 1, sizes
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoint-3")
    r = _launch_two(resumed, *flags, "--resume_from_checkpoint", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    a = {m["step"]: m for m in read_metrics(str(full)) if "loss" in m}
    b = {m["step"]: m for m in read_metrics(str(resumed)) if "loss" in m}
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for key in ("loss", "grad_norm", "reward/mean"):
        assert b[3][key] == pytest.approx(a[3][key], rel=1e-5, abs=1e-9), key
