"""Preflight: what a run will meet (rewards, paths, GPUs, dataset), found before any model is loaded, and the
trainer refusing a doomed run before it loads anything."""

from __future__ import annotations

import os

import pytest
import torch

from calligrapher_rl.config_parse import parse_args
from calligrapher_rl.errors import UserError
from calligrapher_rl.training.preflight import preflight, require_ready


def cfg(tmp_path, *extra):
    return parse_args(["--preset", "tiny-grpo", "--output_dir", str(tmp_path / "run"), *extra]).resolved()


def test_the_tiny_preset_is_ready(tmp_path):
    assert preflight(cfg(tmp_path)) == []
    require_ready(cfg(tmp_path))


def test_rewards_are_checked_against_the_registry(tmp_path):
    problems = preflight(cfg(tmp_path, "--rewards", "nonsense:1.0"))
    assert len(problems) == 1 and "unknown reward 'nonsense'" in problems[0] and "ocr" in problems[0]


def test_missing_paths_are_named(tmp_path):
    problems = preflight(cfg(tmp_path, "--pretrained_model_name_or_path", str(tmp_path / "flux"), "--siglip_path",
                             str(tmp_path), "--initial_ip_adapter_path", str(tmp_path / "a.bin")))
    assert problems == [f"--pretrained_model_name_or_path: no such folder: {tmp_path / 'flux'}",
                        f"--siglip_path: expected a SigLIP model folder (with config.json), got {tmp_path}",
                        f"--initial_ip_adapter_path: no such file: {tmp_path / 'a.bin'}"]
    resume = preflight(cfg(tmp_path, "--resume_from_checkpoint", str(tmp_path)))
    assert len(resume) == 1 and "not a checkpoint folder" in resume[0]


def test_requested_gpus_must_exist(tmp_path, monkeypatch):
    n = torch.cuda.device_count()
    problems = preflight(cfg(tmp_path), gpus=f"{n},{n + 1}")
    assert len(problems) == 1 and problems[0].startswith(f"GPUs: {n},{n + 1} requested" if n == 0 else "GPUs: no GPU")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(n + 1)))
    assert problems[0].split(":")[0] == "GPUs" and preflight(cfg(tmp_path))[0].startswith("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # CUDA's own spelling of "no GPU"
    assert preflight(cfg(tmp_path)) == []


def test_the_dataset_file_must_parse(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"source": "a.png", "mask": "m.png", "text": "hi"}\nnot json\n')
    problems = preflight(cfg(tmp_path, "--train_data_json", str(data)))
    assert problems and all(p.startswith("--train_data_json: ") for p in problems)
    assert any("line 2" in p for p in problems) and any("a.png" in p for p in problems)
    many = tmp_path / "many.jsonl"
    many.write_text("x\n" * 20)
    lines = preflight(cfg(tmp_path, "--train_data_json", str(many)))
    assert len(lines) == 6 and "15 more problems" in lines[-1] and "calligrapher_rl.data validate" in lines[-1]


def test_the_trainer_refuses_before_loading_anything(tmp_path):
    from calligrapher_rl.training.trainer import Trainer

    c = cfg(tmp_path, "--rewards", "nonsense:1.0")
    with pytest.raises(UserError, match="unknown reward 'nonsense'"):
        Trainer(c)
    # nothing was loaded (run.json is written once the models are), and the run folder says why it failed
    from calligrapher_rl.training.run_dir import read_status

    assert not os.path.exists(os.path.join(c.output_dir, "run.json"))
    status = read_status(c.output_dir)
    assert status["state"] == "failed" and "nonsense" in status["message"], status


def test_the_cli_says_it_in_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "calligrapher_rl.train", "--preset", "tiny-grpo", "--output_dir",
                        str(tmp_path / "run"), "--rewards", "ocr:1,nonsense:1"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --rewards: unknown reward 'nonsense'")
    assert not os.path.exists(tmp_path / "run" / "run.json")  # refused before any model was loaded
