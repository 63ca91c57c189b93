"""Evaluation without training: the interval and verdict math, checkpoint-0 (pointer and weights, resolved by the
loaders, never pruned), and `python -m calligrapher_rl.evaluate` on the shipped tiny (eval.json's contract shape,
the report, the same samples for every checkpoint). The learning claim (a trained run beats its start, its
permuted control does not) is tests/test_learning_ocr.py's."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from calligrapher_rl.errors import UserError
from calligrapher_rl.models.checkpoints import read_adapter_file
from calligrapher_rl.training.checkpointing import list_checkpoints, save_checkpoint
from calligrapher_rl.training.eval_stats import mean_ci, normalized_edit_distance, paired, verdict
from calligrapher_rl.training.starting_point import write_starting_point


def test_the_interval_covers_the_mean_narrows_with_n_and_drops_failed_samples():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(4), 16)
    small = mean_ci(rng.binomial(1, 0.3, 64).astype(float), groups)
    large = mean_ci(rng.binomial(1, 0.3, 1024).astype(float), np.repeat(np.arange(4), 256))
    assert small["ci95"][0] < small["mean"] < small["ci95"][1] and small["n"] == 64
    assert large["ci95"][1] - large["ci95"][0] < 0.5 * (small["ci95"][1] - small["ci95"][0])
    with_nan = mean_ci([1.0, np.nan, 0.0, 1.0])
    assert with_nan["n"] == 3 and with_nan["mean"] == pytest.approx(2 / 3)
    one_each = mean_ci([0.0, 1.0, 0.0, 1.0] * 8, np.arange(32))  # one noise per example: examples are drawn
    assert one_each["ci95"][0] < 0.5 < one_each["ci95"][1]


def test_paired_differences_and_the_verdict_know_which_way_is_better():
    a = np.zeros(40)
    b = np.r_[np.ones(30), np.zeros(10)]
    d = paired(a, b, np.repeat(np.arange(4), 10))
    assert d["mean"] == pytest.approx(0.75) and d["ci95"][0] > 0
    assert verdict("ocr", "start", "final", d["ci95"]).startswith("final is better")
    assert verdict("preservation_mae", "start", "final", d["ci95"]).startswith("start is better")  # lower is better
    assert verdict("ocr", "start", "final", [-0.1, 0.2]).startswith("no clear difference")
    assert normalized_edit_distance("EH 4h", "eh4h") == 0.0 and normalized_edit_distance("", "ab") == 1.0


def _cfg(**kw):
    base = dict(initial_ip_adapter_path=None, pretrained_model_name_or_path="tiny")
    return SimpleNamespace(**{**base, **kw})


def _adapter(path, value: float) -> dict:
    state = {"image_proj_mlp.proj.0.weight": torch.full((2, 2), value)}
    save_file(state, str(path))
    return state


def test_checkpoint_0_points_at_the_initial_file_and_the_loaders_resolve_it(tmp_path):
    init = tmp_path / "calligrapher.safetensors"
    _adapter(init, 1.0)
    run = tmp_path / "run"
    start = write_starting_point(str(run), _cfg(initial_ip_adapter_path=str(init)), {})
    assert sorted(os.listdir(start)) == ["initial-adapter.json"]  # a pointer, not a 12 GB copy
    record = json.loads((run / "checkpoint-0" / "initial-adapter.json").read_text())
    assert record["path"] == str(init) and record["size"] == os.path.getsize(init) and len(record["fingerprint"]) == 64
    layout, flat = read_adapter_file(start)
    assert layout == "safetensors" and float(flat["image_proj_mlp.proj.0.weight"][0, 0]) == 1.0
    _adapter(init, 2.0)  # the file was replaced since the run started: refused, never used silently
    with pytest.raises(UserError, match="changed since the run started"):
        read_adapter_file(start)
    os.unlink(init)
    with pytest.raises(UserError, match="no longer there"):
        read_adapter_file(start)


def test_checkpoint_0_of_a_random_init_holds_the_weights_and_survives_the_total_limit(tmp_path):
    run = tmp_path / "run"
    weights = {"image_proj_mlp.proj.0.weight": torch.full((2, 2), 3.0)}
    start = write_starting_point(str(run), _cfg(), weights)
    assert float(read_adapter_file(start)[1]["image_proj_mlp.proj.0.weight"][0, 0]) == 3.0
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (2, 4):
        save_checkpoint(str(run), step, adapter=weights, ema=None, old=None, optimizer=opt, scheduler=sched,
                        state={"rl_epoch": 0}, total_limit=1)
    assert [s for s, _ in list_checkpoints(str(run))] == [4]  # not a resume point, not counted
    assert sorted(os.listdir(run)) == ["checkpoint-0", "checkpoint-4"]


def test_evaluate_on_the_tiny_writes_the_contract_shape_and_the_report(tmp_path):
    from calligrapher_rl import evaluate

    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoints", "tiny-pretrained", "base", "--data", "bundled-glyphs", "--noises", "2",
                          "--max_examples", "2", "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert [c["name"] for c in report["checkpoints"]] == ["tiny-pretrained", "base"]
    for c in report["checkpoints"]:
        assert {"name", "path", "rewards"} <= set(c) and c["n"] == 4
        assert {"ocr", "ocr_exact", "ocr_edit_distance", "style", "preservation_mae", "preservation_psnr"} == set(c["rewards"])
        for entry in c["rewards"].values():
            assert set(entry) == {"mean", "ci95"} and entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1]
        assert [(s["example"], s["noise"]) for s in c["samples"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert all((out / s["image"]).is_file() for s in c["samples"]) and (out / c["grid"]).is_file()
    assert {p["reward"] for p in report["paired"]} == set(report["checkpoints"][0]["rewards"])
    for p in report["paired"]:
        assert {"a", "b", "reward", "diff", "ci95"} <= set(p) and (p["a"], p["b"]) == ("tiny-pretrained", "base")
    html = (out / "report.html").read_text()
    assert "mean(B - A)" in html and "images/base/e000-n00.png" in html
    assert "| tiny-pretrained |" in (out / "report.md").read_text()
    with pytest.raises(UserError, match="--checkpoints"):
        evaluate.main(["--checkpoints", str(tmp_path / "missing"), "--out", str(out)])


def test_sample_prompts_are_painted_every_n_steps_and_fill_their_studio_gallery(tmp_path):
    """The user's texts (one with its own reference picture) at step 0 and every 2 steps, with the same noise each
    time, into samples/prompts/; the Runs tab's gallery lists them."""
    from PIL import Image

    from app.monitor_views import MonitorViews
    from calligrapher_rl.config_parse import parse_args
    from calligrapher_rl.training.trainer import train

    ref = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(ref)
    out = tmp_path / "runs" / "prompts"
    flags = ["--preset", "tiny-grpo", "--pretrained_model_name_or_path", "tiny", "--siglip_path", "tiny",
             "--train_data_json", "bundled", "--rewards", "fidelity:1.0", "--resolution", "32", "--num_style_tokens", "8",
             "--rl_num_images_per_prompt", "2", "--train_batch_size", "2", "--rl_warmup_steps", "0", "--max_train_steps",
             "4", "--eval_steps", "0", "--checkpointing_steps", "100", "--report_to", "none",
             "--sample_prompts", "AB|C1", "--sample_references", f"|{ref}", "--sample_prompts_steps", "2",
             "--output_dir", str(out)]
    assert train(parse_args(flags)) == "finished"
    made = sorted(os.listdir(out / "samples" / "prompts"))
    assert made == ["step-000000.png", "step-000002.png", "step-000004.png"]
    with Image.open(out / "samples" / "prompts" / made[0]) as im:
        assert im.size == (2 * 128, 128 + 18)  # one 128 px cell per text, its text under it
    gallery = MonitorViews(str(tmp_path / "runs")).views("prompts")["prompt_grids"]
    assert gallery.visible and [c["caption"] for c in gallery.value] == ["step 4", "step 2", "step 0"]


def test_a_run_can_start_from_another_runs_checkpoint_0(tmp_path):
    """--initial_ip_adapter_path accepts a checkpoint-0 folder (preflight resolves its pointer) and names a
    pointer whose file is gone in one line."""
    from calligrapher_rl.config_parse import parse_args
    from calligrapher_rl.training.preflight import preflight

    init = tmp_path / "a.safetensors"
    _adapter(init, 1.0)
    start = write_starting_point(str(tmp_path / "old"), _cfg(initial_ip_adapter_path=str(init)), {})
    cfg = parse_args(["--preset", "tiny-grpo", "--output_dir", str(tmp_path / "new"), "--initial_ip_adapter_path", start])
    assert not [p for p in preflight(cfg.resolved()) if "initial_ip_adapter_path" in p]
    os.unlink(init)
    assert [p for p in preflight(cfg.resolved()) if "initial_ip_adapter_path" in p and "no longer there" in p]
