"""Training runs end to end on the tiny model, as a user starts them (the command, or `train()`): the run
directory and its files, checkpoints that inference reads, exact resume after kill -9, stop, one-line flag errors
(and every guide flag used), fp16, and two processes (the group sampler across them, rewards gathered, a reward
pause resumed). The in-process Trainer driven step by step is test_training_steps.py, which takes its flags from
here (`_args`)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from calligrapher_rl.config import SEED_GUIDE_FLAGS
from calligrapher_rl.config_parse import parse_args
from calligrapher_rl.training.batches import GroupSampler
from calligrapher_rl.training.run_dir import read_metrics, read_status, request_stop
from calligrapher_rl.training.trainer import train

# The random tiny and the cheap fidelity reward at toy sizes (the tiny presets now run the pretrained tiny on OCR):
# what these tests check is the plumbing, in seconds.
RANDOM_TINY = ["--pretrained_model_name_or_path", "tiny", "--siglip_path", "tiny", "--train_data_json", "bundled",
               "--rewards", "fidelity:1.0", "--rl_num_images_per_prompt", "4", "--train_batch_size", "16",
               "--ip_adapter_scale", "2.0", "--learning_rate", "2e-2", "--ema_decay", "0.99", "--eval_steps", "10"]
FAST = [*RANDOM_TINY, "--resolution", "32", "--rl_num_inference_steps", "4", "--rl_eval_num_inference_steps", "4",
        "--num_eval_samples", "2", "--num_style_tokens", "8"]
ROOT = Path(__file__).resolve().parents[1]


def _args(out, *extra, preset="tiny-grpo"):
    return ["--preset", preset, "--output_dir", str(out), *FAST, *extra]


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "calligrapher_rl.train", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _comparable(rows):
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith(("time/", "perf/", "sys/"))} for r in rows]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "run"
    assert train(parse_args(_args(out, "--max_train_steps", "6", "--checkpointing_steps", "3", "--eval_steps", "3"))) == "finished"
    return out


def test_a_run_writes_every_documented_file(grpo_run):
    rows = read_metrics(str(grpo_run))
    rl = [r for r in rows if r["phase"] == "rl" and "reward/mean" in r]
    assert {r["phase"] for r in rows} == {"warmup", "rl"} and len(rl) == 4  # 2 warmup steps + 4 RL epochs
    for key in ("step", "phase", "time", "reward/mean", "reward/std", "reward/fidelity", "kl", "loss", "clipfrac",
                "ratio/mean"):
        assert key in rl[0], key
    assert isinstance(rl[0]["step"], int) and abs(rl[0]["ratio/mean"] - 1) < 1e-5 and rl[0]["clipfrac"] == 0

    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(grpo_run / "logs"), size_guidance={SCALARS: 0})
    acc.Reload()
    assert {"reward/mean", "kl", "loss", "clipfrac"} <= set(acc.Tags()["scalars"]) and acc.Tags()["images"]
    assert [e.value for e in acc.Scalars("reward/mean")] == pytest.approx([r["reward/mean"] for r in rl])

    assert sorted(p.name for p in (grpo_run / "samples").iterdir()) == ["step-000000.png", "step-000003.png",
                                                                         "step-000006.png"]
    for step in (3, 6):
        ck = grpo_run / f"checkpoint-{step}"
        assert {"ip-adapter.safetensors", "ip-adapter-ema.safetensors", "ip-adapter.bin"} <= set(os.listdir(ck))
        release = torch.load(ck / "ip-adapter.bin", map_location="cpu", weights_only=True)
        assert set(release) == {"image_proj_mlp", "image_proj_qformer", "attn_adapter"}
        assert "0.to_k_ip.weight" in release["attn_adapter"]
    run = json.loads((grpo_run / "run.json").read_text())
    assert run["rl_method"] == "grpo" and run["rl_kl_beta"] == 0.01 and "calligrapher_rl_version" in run
    assert read_status(str(grpo_run))["state"] == "finished"


def test_checkpoints_work_with_infer(grpo_run, tmp_path):
    from calligrapher_rl.infer import main as infer_main

    ds = json.loads(Path(read_dataset_line()).read_text().splitlines()[0])
    base = Path(read_dataset_line()).parent
    for name in ("ip-adapter.safetensors", "ip-adapter-ema.safetensors", "ip-adapter.bin"):
        out = tmp_path / f"{name}.png"
        assert infer_main(["--pretrained_model_name_or_path", "tiny", "--siglip_path", "tiny", "--ip_adapter",
                           str(grpo_run / "checkpoint-6" / name), "--source", str(base / ds["source"]), "--mask",
                           str(base / ds["mask"]), "--text", "Hello", "--out", str(out), "--steps", "2"]) == 0
        assert out.exists()


def read_dataset_line():
    from calligrapher_rl.data import ensure_default_dataset

    return ensure_default_dataset()


def test_kill_and_resume_reproduces_the_uninterrupted_run(grpo_run, tmp_path):
    """Kill -9 a run after its first checkpoint; `--resume_from_checkpoint latest` then logs exactly
    the metrics the uninterrupted run logged (same adapter, optimizer, EMA, reference, data, noise)."""
    out = tmp_path / "run"
    args = _args(out, "--max_train_steps", "6", "--checkpointing_steps", "3", "--eval_steps", "3",
                 "--checkpoints_total_limit", "1")
    proc = subprocess.Popen([sys.executable, "-m", "calligrapher_rl.train", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-3" / "trainer_state" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = _cli(*args, "--resume_from_checkpoint", "latest")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _comparable(read_metrics(str(out))) == _comparable(read_metrics(str(grpo_run)))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0", "checkpoint-6"]  # pruned to the limit;
    # the starting point is kept


def test_stop_request_saves_a_checkpoint_and_ends(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "calligrapher_rl.train",
                             *_args(out, "--max_train_steps", "1000", "--checkpointing_steps", "1000", "--eval_steps", "0")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(r.get("phase") == "rl" for r in read_metrics(str(out))):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    request_stop(str(out))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    status = read_status(str(out))
    assert status["state"] == "stopped" and (out / f"checkpoint-{status['step']}").is_dir()


def test_bad_flags_are_one_line_errors(tmp_path):
    for args, expect in ((["--rl_method", "ppo"], "--rl_method"), (["--resolution", "50"], "--resolution"),
                         (["--train_data_json", str(tmp_path / "none.jsonl")], "none.jsonl"),
                         (["--rewards", "nosuch:1"], "--rewards")):
        r = _cli(*_args(tmp_path / "x", *args))
        assert r.returncode == 2, (args, r.stderr)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and expect in errors[0] and "Traceback" not in r.stderr, r.stderr


def test_every_seed_guide_flag_is_used_by_the_code():
    """Each flag of the user's guide is read by the run (directly, or through the config helper named here)."""
    via_helper = {"rl_timestep_fraction": "num_trained_timesteps", "rewards": "build_rewards"}
    sources = "".join(p.read_text() for p in (ROOT / "calligrapher_rl").rglob("*.py") if "config" not in p.name)
    for flag in SEED_GUIDE_FLAGS:
        used = re.search(rf"cfg\.{flag}\b", sources) or (flag in via_helper and via_helper[flag] in sources)
        assert used, f"--{flag} is parsed but never used"


def test_group_sampler_spans_processes_and_matches_one_process():
    one = GroupSampler(16, 4, 3, seed=5)
    two = [GroupSampler(16, 2, 3, num_processes=2, rank=r, seed=5) for r in range(2)]
    for k in range(3):
        joined = two[0].batch(1, k) + two[1].batch(1, k)
        assert sorted(joined) == sorted(two[0].global_batch(1, k)) and len(joined) == 12
        assert all(joined.count(i) == 3 for i in set(joined))  # whole groups of 3, wherever they landed
    assert one.batch(1, 0) == one.batch(1, 0)  # a pure function of (seed, stream, k)


@pytest.mark.timeout(600)
def test_two_process_run_gathers_rewards(tmp_path):
    """accelerate launch with 2 CPU processes (gloo; `--multi_gpu` is accelerate's torchrun launcher): rewards of both processes are gathered before the
    advantages, only rank 0 writes, one gradient all-reduce per optimizer step although each batch trains
    several timesteps (a DDP comm hook counts them; tests/two_process_run.py), and the first update is the
    one-process run's (for NFT too: test_learning.py::test_one_process_step_equals_two_process_step)."""
    out2, out1 = tmp_path / "two", tmp_path / "one"
    common = ["--max_train_steps", "2", "--checkpointing_steps", "2", "--eval_steps", "0", "--train_batch_size", "1",
              "--rl_warmup_steps", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
                        str(ROOT / "tests" / "two_process_run.py"), *_args(out2, *common)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):  # DDP all-reduces the gradients once per optimizer step, not once per trained timestep
        count = json.loads((out2 / f"allreduce-rank{rank}.json").read_text())
        assert count["steps"] == 2 and count["calls"] == count["steps"] * count["buckets"], count
    r1 = _cli(*_args(out1, *common, "--train_batch_size", "2"))
    assert r1.returncode == 0, r1.stderr[-2000:]
    two = [x for x in read_metrics(str(out2)) if "reward/mean" in x]
    one = [x for x in read_metrics(str(out1)) if "reward/mean" in x]
    assert len(two) == len(one) == 2  # one writer: no duplicated rows
    assert [x["reward/count"] for x in two + one] == [8.0] * 4, (two, one)  # 2 processes x 1 prompt x 4 images, gathered
    for a, b in zip(two, one):
        assert 0 < a["reward/mean"] < 1 and abs(a["reward/mean"] - b["reward/mean"]) < 0.1
        assert abs(a["ratio/mean"] - 1) < 1e-5
    for key in ("reward/mean", "loss", "grad_norm"):  # the first RL epoch: the same samples, the same update
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-4), (key, two[0], one[0])
    assert (out2 / "checkpoint-2" / "ip-adapter.safetensors").exists()


def test_fp16_trains_with_loss_scaling(tmp_path):
    """fp16 (the guide's examples use it) trains through a GradScaler: the loss is scaled before backward,
    gradients unscaled before clipping, overflowing steps skipped while the scale drops, the rest applied.
    (A subprocess: accelerate's mixed-precision state is one per process.)"""
    out = tmp_path / "run"
    r = _cli(*_args(out, "--rl_warmup_steps", "4", "--max_train_steps", "4", "--mixed_precision", "fp16",
                    "--eval_steps", "0", "--eval_at_start", "false"))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_metrics(str(out))
    assert len(rows) == 4 and all(r["train/loss_scale"] >= 1 for r in rows), rows
    applied = [r for r in rows if r["train/skipped"] == 0]
    assert applied and all(np.isfinite(r["grad_norm"]) and np.isfinite(r["loss"]) for r in applied), rows
    assert read_status(str(out))["state"] == "finished"


@pytest.mark.timeout(600)
def test_two_processes_pause_resume_and_finish(tmp_path):
    """2 gloo processes; the rewards fail, the run pauses; once the reward server is back, control/resume
    (read and consumed by the main process only, the decision shared by a collective) lets both
    processes go on in step to the end. The failed epoch makes no optimizer step."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from test_rewards_server import Served

    from calligrapher_rl.training.run_dir import request_resume

    failing = {"on": True}
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok", "rewards": ["fidelity"]}

    @app.post("/score")
    def score(body: dict):
        if failing["on"]:
            return JSONResponse({"detail": "scorer down"}, status_code=500)
        return {"scores": {"fidelity": [0.2 + 0.1 * (i % 4) for i in range(len(body["samples"]))]}}

    server = Served(app)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
         "calligrapher_rl.train", *_args(out, "--max_train_steps", "2", "--rl_warmup_steps", "0", "--eval_steps", "0",
                                         "--eval_at_start", "false", "--train_batch_size", "1", "--rewards", "fidelity",
                                         "--reward_server_url", server.url, "--reward_timeout_s", "5",
                                         "--checkpointing_steps", "1000")],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def wait(cond, what, timeout=300):
        deadline = time.time() + timeout
        while not cond():
            assert proc.poll() is None, f"run exited while waiting for {what}: {proc.stderr.read()[-3000:]}"
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)

    try:
        wait(lambda: (read_status(str(out)) or {}).get("state") == "paused", "the pause")
        failing["on"] = False
        request_resume(str(out))
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    finally:
        if proc.poll() is None:  # the launcher and both workers (their own process group)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        server.stop()
    assert read_status(str(out))["state"] == "finished"
    assert not (out / "control" / "resume").exists()  # consumed once, by the main process
    rows = [r for r in read_metrics(str(out)) if "reward/failed" in r]
    # the failed epoch trained nothing: no row of its own (no repeated step), counted in rl/retried_epochs
    assert [r["reward/failed"] for r in rows] == [0.0, 0.0] and [r["rl/optimizer_steps"] for r in rows] == [1, 1]
    assert [r["rl/retried_epochs"] for r in rows] == [1.0, 1.0] and [r["step"] for r in rows] == [1, 2]
    assert [r["reward/count"] for r in rows] == [8.0] * 2  # both processes' samples every epoch
