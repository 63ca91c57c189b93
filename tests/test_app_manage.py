"""Studio: the GPU queue, run-finished notices, several runs on one chart, CSV export, chart labels, the
Dataset tab. Units on run folders (one real short run, and hand-written status files for live ones)."""

from __future__ import annotations

import csv
import json
import os
import socket
import time

import pytest
from test_app_support import (
    kill_run,
    single_thread_runs,  # noqa: F401  (a module fixture, used below)
    trained_run,
    wait_for,
)

from app import charts, gpu_queue, procs, run_files, runs
from app.data_views import DataViews
from app.monitor_views import MonitorViews

pytestmark = [pytest.mark.usefixtures("single_thread_runs"),
              pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")]


def live_run(runs_dir: str, name: str, gpus: str) -> str:
    """A run this test process plays: running, launched by the studio on `gpus`."""
    run_dir = os.path.join(runs_dir, name)
    os.makedirs(run_dir)
    now = time.time()
    with open(os.path.join(run_dir, "studio.json"), "w") as fh:
        json.dump({"pid": os.getpid(), "created": procs.proc_start_time(os.getpid()), "launched": now - 5,
                   "gpus": gpus}, fh)
    set_state(run_dir, "running")
    return run_dir


def set_state(run_dir: str, state: str) -> None:
    with open(os.path.join(run_dir, "status.json"), "w") as fh:
        json.dump({"state": state, "step": 1, "message": "", "pid": os.getpid(), "host": socket.gethostname(),
                   "started": time.time() - 1, "updated": time.time()}, fh)


def test_on_a_gpu_machine_a_run_given_no_gpus_holds_the_environments_first_card(tmp_path, monkeypatch):
    """One rule for the queue and the studio's Inference tab (procs.held_gpus): the trainer's default device is the
    first visible card, so two runs launched without GPUs would share it: the second waits."""
    from app import procs

    monkeypatch.setattr(procs, "machine_has_gpu", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    runs_dir = str(tmp_path)
    live_run(runs_dir, "no-gpus", "")
    assert procs.held_gpus("") == [2] and procs.held_gpus("3") == [3]
    assert gpu_queue.conflicts(runs_dir, "") == {2: "no-gpus"} and gpu_queue.conflicts(runs_dir, "2,3") == {2: "no-gpus"}
    assert gpu_queue.conflicts(runs_dir, "3") == {}
    monkeypatch.setattr(procs, "machine_has_gpu", lambda: False)  # a CPU machine: nothing is held, nothing waits
    assert procs.held_gpus("") == [] and gpu_queue.conflicts(runs_dir, "") == {}


def test_a_run_waits_for_its_gpus_then_starts(tmp_path):
    runs_dir = str(tmp_path)
    holder = live_run(runs_dir, "holder", "0")
    assert gpu_queue.conflicts(runs_dir, "0,1") == {0: "holder"} and gpu_queue.conflicts(runs_dir, "1") == {}
    assert gpu_queue.conflicts(runs_dir, "") == {}  # a CPU run never waits (this machine has no GPU)
    waiting = gpu_queue.enqueue(os.path.join(runs_dir, "waiting"), ["--preset", "tiny-grpo", "--output_dir",
                                                                    os.path.join(runs_dir, "waiting")], "0")
    info = runs.run_info(waiting)
    assert info["state"] == "queued" and "waits for its GPUs" in info["message"]
    assert MonitorViews(runs_dir).buttons(info)["stop_btn"].value == "Remove from the queue"
    assert gpu_queue.start_ready(runs_dir) == [] and runs.run_info(waiting)["state"] == "queued"
    set_state(holder, "finished")  # GPU 0 is free: the queued run starts (for real: here it has no GPU 0)
    try:
        assert gpu_queue.start_ready(runs_dir) == [waiting]
        assert runs.run_info(waiting)["state"] in ("launching", "failed")
        wait_for(lambda: not runs.run_info(waiting)["live"], 120, what="the queued run's process to end")
        log = run_files.tail(os.path.join(waiting, "console.log"), 20)
        assert "CUDA_VISIBLE_DEVICES=0 python -m calligrapher_rl.train" in log
        assert runs.run_info(waiting)["state"] == "failed"  # the trainer's preflight: no GPU 0 on a CPU machine
        assert gpu_queue.start_ready(runs_dir) == []  # started once, never again
    finally:
        kill_run(waiting)


def test_removing_a_queued_run(tmp_path):
    runs_dir = str(tmp_path)
    live_run(runs_dir, "holder", "1")
    waiting = gpu_queue.enqueue(os.path.join(runs_dir, "later"), ["--preset", "tiny-grpo"], "1")
    assert "removed from the queue" in runs.stop_run(waiting)
    info = runs.run_info(waiting)
    assert info["state"] == "stopped" and "removed from the queue" in info["message"]
    assert gpu_queue.start_ready(runs_dir) == []


def test_a_notice_when_a_run_ends(tmp_path, capsys):
    runs_dir = str(tmp_path)
    run_dir = live_run(runs_dir, "noticed", "")
    mon = MonitorViews(runs_dir)
    seen = mon.tick("noticed", {})["seen"]
    assert "noticed" not in capsys.readouterr().out
    set_state(run_dir, "finished")
    seen = mon.tick("noticed", seen)["seen"]
    assert "Run noticed finished at step 1" in capsys.readouterr().out  # gr.Info outside a page prints it
    seen = mon.tick("noticed", seen)["seen"]
    assert "noticed" not in capsys.readouterr().out  # once
    set_state(run_dir, "running")
    seen = mon.tick("noticed", seen)["seen"]
    set_state(run_dir, "failed")
    with pytest.warns(UserWarning, match="Run noticed failed"):  # gr.Warning outside a page: a warning
        mon.tick("noticed", seen)


def test_several_runs_on_one_chart_and_csv(tmp_path):
    import shutil

    runs_dir, run_dir = str(tmp_path), str(tmp_path / "base")
    shutil.copytree(trained_run()[1], run_dir)
    shutil.copytree(run_dir, tmp_path / "copy")
    mon = MonitorViews(runs_dir)
    out = mon.overlay(["base", "copy"], "reward/mean", 0.5)
    fig = out["p_overlay"]
    assert [t.name for t in fig.data if t.showlegend is not False] == ["base", "copy"]
    raw = [r["reward/mean"] for r in run_files.metrics(run_dir) if r.get("reward/mean") is not None]
    assert list(fig.data[1].y) == charts.smooth(raw, 0.5) and list(fig.data[0].y) == raw
    assert ("reward/mean", "reward/mean") in out["overlay_key"].choices
    assert charts.smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull towards 0
    assert charts.smooth([0.0, 2.0], 0.0) == [0.0, 2.0]
    path = mon.export_csv([], "base")["csv_file"]
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and list(rows[0])[:4] == ["run", "step", "phase", "time"] and "reward/mean" in rows[0]
    assert len(rows) == len(run_files.metrics(run_dir)) and {r["run"] for r in rows} == {"base"}
    both = mon.export_csv(["base", "copy"], "base")["csv_file"]
    with open(both, newline="") as fh:
        assert {r["run"] for r in csv.DictReader(fh)} == {"base", "copy"}


def test_chart_labels_do_not_overlap():
    rows = [{"step": 1, "phase": "warmup", "loss": 1.0}, {"step": 2, "phase": "rl", "loss": 0.1, "kl": 0.0,
                                                          "sys/gpu_mem_gib": 10.5, "sys/gpu_util": 80.0}]
    for fig in [*charts.figures(rows).values(), charts.system_figure(rows)]:
        lay = fig.layout
        assert lay.legend.yanchor == "top" and lay.legend.y < 0  # below the plot and its tick labels
        assert not lay.xaxis.title.text and lay.title.yanchor == "top"
        texts = {a.text: a for a in lay.annotations}
        if "warmup" in texts and "RL" in texts:  # one at the bottom of the band, the other at the top of the line
            assert texts["warmup"].yanchor != texts["RL"].yanchor
    gpu = charts.system_figure(rows)
    assert [t.name for t in gpu.data] == ["GPU memory (GiB)", "GPU util (%)"]
    assert "no GPU figures" in charts.system_figure([{"step": 1, "loss": 1.0}]).layout.annotations[0].text


def test_the_dataset_tab(tmp_path):
    runs_dir = str(tmp_path)
    data = DataViews(runs_dir)
    out = data.show("bundled", 1)
    assert len(out["data_gallery"]) == 18 and "16 usable entries, page 1 of 3" in out["data_msg"]
    assert data.show("bundled", 99)["data_page"] == 3
    built = data.synth("mini", 4, 32, 3)
    path = os.path.join(runs_dir, "datasets", "mini", "data.jsonl")
    assert built["data_path"] == path and "built 4 synthetic examples" in built["data_msg"]
    assert len(built["data_gallery"]) == 12
    assert data.validate(path)["data_problems"].startswith("✓") and "4 entries" in data.validate(path)["data_problems"]
    os.unlink(os.path.join(runs_dir, "datasets", "mini", "images", "s3-000001_mask.png"))
    with open(path, "a") as fh:
        fh.write("not json\n")
    problems = data.validate(path)["data_problems"]
    assert problems.startswith("⚠ 2 problem(s)") and "s3-000001_mask.png" in problems and "line 5" in problems
    assert "already exists" in data.synth("mini", 4, 32, 3)["data_msg"]
    for bad in ("/etc/passwd", os.path.join(runs_dir, "..", "x.jsonl")):
        assert "must lie inside" in data.show(bad, 1)["data_msg"]


def test_phase_eta_and_gpu_figures_when_the_trainer_gives_them(tmp_path):
    runs_dir = str(tmp_path)
    run_dir = live_run(runs_dir, "busy", "")
    mon = MonitorViews(runs_dir)
    plain = mon.views("busy")
    assert "phase" not in plain["status"] and "left" not in plain["status"] and not plain["p_sys"].visible
    with open(os.path.join(run_dir, "status.json")) as fh:
        status = json.load(fh)
    with open(os.path.join(run_dir, "status.json"), "w") as fh:
        json.dump({**status, "phase": "rollout", "eta_s": 65.4}, fh)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as fh:
        fh.writelines(json.dumps({"step": step, "phase": "rl", "time": time.time(), "loss": 0.1,
                                 "sys/gpu_mem_gib": 20.0 + step, "sys/gpu_util": 90.0, "time/rollout_s": 12.5,
                                 "time/update_s": 20.0 + step, "time/eval_s": 0.0}) + "\n" for step in (1, 2))
    out = mon.views("busy")
    assert "phase: rollout" in out["status"] and "~0:01:05 left" in out["status"]
    assert out["p_sys"].visible and charts.has_system(run_files.metrics(run_dir))
    assert not plain["p_time"].visible and out["p_time"].visible  # the per-phase time bars, once there are times
    bars = {t.name: list(t.y) for t in charts.phase_figure(run_files.metrics(run_dir)).data}
    assert bars == {"rollout": [12.5, 12.5], "update": [21.0, 22.0]}  # phases that took no time have no segment
    with open(os.path.join(run_dir, "console.log"), "w") as fh:
        fh.write("".join(f"step {i} phase rl reward 0.5 loss 0.1\n" for i in range(500)))
    out = mon.views("busy")
    assert out["log"].splitlines()[-1] == "step 499 phase rl reward 0.5 loss 0.1" and len(out["log"].splitlines()) == 200
    assert out["log_file"] == os.path.join(run_dir, "console.log")  # the whole log, downloadable
