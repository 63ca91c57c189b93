"""Failures a long run meets: reward servers that fail mid-run, a deployment that is not ready."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from test_rewards_server import Served

from calligrapher_rl.training.run_dir import read_metrics, read_status, request_resume, request_stop

ROOT = Path(__file__).resolve().parents[1]


def _failing_reward_server():
    """Healthy at start (so the run starts), then every /score is a server error."""
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok", "rewards": ["fidelity"]}

    @app.post("/score")
    def score():
        return JSONResponse({"detail": "scorer crashed"}, status_code=500)

    return Served(app)


def _wait(cond, what, proc, timeout=240):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"run exited while waiting for {what}: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_failed_rewards_pause_the_run_never_score_zero_and_stop_keeps_a_checkpoint(tmp_path):
    server = _failing_reward_server()
    out = tmp_path / "run"
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "calligrapher_rl.train", "--preset", "tiny-grpo", "--output_dir", str(out),
             "--resolution", "32", "--rl_num_inference_steps", "4", "--num_style_tokens", "8", "--eval_steps", "0",
             "--rl_warmup_steps", "1", "--rewards", "fidelity", "--reward_server_url", server.url,
             "--reward_timeout_s", "5"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _wait(lambda: (read_status(str(out)) or {}).get("state") == "paused", "the pause", proc)
        status = read_status(str(out))
        assert "rewards failed" in status["message"] and "resume" in status["message"]
        rl_rows = [r for r in read_metrics(str(out)) if r["phase"] == "rl"]
        assert rl_rows == []  # nothing was trained on the failed epoch, and no 0 entered any statistic

        request_resume(str(out))  # still failing: it pauses again rather than training on zeros
        _wait(lambda: (read_status(str(out)) or {}).get("message", "").startswith("resumed"), "the resume", proc)
        _wait(lambda: (read_status(str(out)) or {}).get("state") == "paused", "the second pause", proc)
        request_stop(str(out))
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        final = read_status(str(out))
        assert final["state"] == "stopped" and (out / f"checkpoint-{final['step']}" / "ip-adapter.safetensors").exists()
    finally:
        server.stop()


def _doctor(*args):
    return subprocess.run([sys.executable, "-m", "calligrapher_rl.doctor", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_doctor_passes_on_the_embedded_default_and_names_what_is_missing(tmp_path):
    ok = _doctor("--pretrained_model_name_or_path", "tiny", "--siglip_path", "tiny", "--train_data_json", "bundled")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = ok.stdout.strip().splitlines()
    assert all(ln.startswith(("[ok]", "[warn]")) for ln in lines)
    assert any("diffusers 0.42" in ln for ln in lines) and any("OCR engine" in ln for ln in lines)
    assert any("bundled: 16 entries" in ln for ln in lines)

    bad = _doctor("--pretrained_model_name_or_path", str(tmp_path / "nope"), "--siglip_path", "tiny", "--skip_ocr",
                  "--reward_server_url", "http://127.0.0.1:9")
    assert bad.returncode == 1
    fails = [ln for ln in bad.stdout.splitlines() if ln.startswith("[FAIL]")]
    assert len(fails) == 2 and "model_index.json" in fails[0] and "127.0.0.1:9" in fails[1]
