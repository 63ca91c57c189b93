"""Studio unit tests: runs.py, presets.py and charts.py on a run folder written by a real training run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from test_app_support import (
    REPO,
    free_port,
    kill_run,
    single_thread_runs,  # noqa: F401  (a module fixture, used below)
    trained_run,
    wait_for,
)

from app import charts, manage, presets, procs, run_files, runs
from app.infer_views import InferViews
from app.monitor_views import MonitorViews
from app.views import FORM_KEYS, TrainViews
from calligrapher_rl.config_parse import load_preset
from calligrapher_rl.errors import UserError

pytestmark = pytest.mark.usefixtures("single_thread_runs")


@pytest.fixture(scope="module")
def trained():
    return trained_run()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_status(run_dir: str, **fields) -> None:
    os.makedirs(run_dir, exist_ok=True)
    status = {"state": "running", "step": 3, "message": "", "host": socket.gethostname(), "started": time.time(),
              "updated": time.time(), **fields}
    with open(os.path.join(run_dir, "status.json"), "w") as fh:
        json.dump(status, fh)


# ------------------------------------------------------------------------------------------- reading a run
def test_run_info_of_a_real_run(trained):
    runs_dir, run_dir = trained
    info = runs.run_info(run_dir)
    assert info["state"] == "finished" and info["step"] == 4 and info["max_steps"] == 4
    assert info["checkpoints"] == [2, 4] and info["method"] == "grpo"
    assert info["reward"] is not None and info["eval_reward"] is not None and not info["live"]
    assert [r["name"] for r in runs.list_runs(runs_dir)][-1] == "base"
    labels = [label for label, _ in run_files.checkpoint_files(run_dir)]
    assert labels == ["checkpoint-4 · EMA", "checkpoint-4 · raw", "checkpoint-2 · EMA", "checkpoint-2 · raw",
                      "checkpoint-0 · start"]  # the run's starting point (a pointer to tiny-pretrained's adapter)
    assert [s for s, _ in run_files.samples(run_dir)] == [0, 2, 4]
    df = run_files.metrics_frame(run_dir)
    assert {"step", "phase", "reward/mean", "kl", "loss", "clipfrac"} <= set(df.columns)
    assert set(df["phase"]) == {"warmup", "rl"}
    assert "saved" in run_files.tail(os.path.join(run_dir, "train.log"), 5)


def test_metrics_are_read_incrementally(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "phase": "rl", "loss": 1.0}\n{"step": 2, "ph')  # a line being written
    assert [r["step"] for r in run_files.metrics(str(tmp_path))] == [1]
    with open(path, "a") as fh:
        fh.write('ase": "rl", "loss": 2.0}\n{"step": 3, "phase": "rl", "loss": 3.0}\n')
    assert [r["step"] for r in run_files.metrics(str(tmp_path))] == [1, 2, 3]
    tmp = tmp_path / "new"  # a resume replaces the file (atomic rename) with the rows up to its checkpoint
    tmp.write_text('{"step": 1, "phase": "rl", "loss": 1.0}\n{"step": 2, "phase": "rl", "loss": 2.5}\n'
                   '{"step": 3, "phase": "rl", "loss": 3.5}\n{"step": 4, "phase": "rl", "loss": 4.5}\n')
    os.replace(tmp, path)
    assert [r["loss"] for r in run_files.metrics(str(tmp_path))] == [1.0, 2.5, 3.5, 4.5]


def test_charts_from_real_metrics(trained):
    rows = run_files.metrics(trained[1])
    figs = charts.figures(rows, revision="base", method="grpo")
    assert set(figs) == {"reward", "kl", "loss", "clipfrac"}
    names = [t.name for t in figs["reward"].data]
    assert "reward/mean" in names and "reward/ocr" in names and "eval (EMA, fixed set)" in names  # the preset's reward
    assert "reward/count" not in names
    loss = [t.name for t in figs["loss"].data]
    assert loss == ["loss (warmup)", "loss (rl)"]  # the phases are separate traces
    last_warm, first_rl = charts.phase_bounds(rows)
    assert last_warm is not None and first_rl is not None
    assert any(s.type == "rect" for s in figs["kl"].layout.shapes)  # warmup band
    assert figs["clipfrac"].data and figs["kl"].data
    empty = charts.figures([], method="nft")
    assert not empty["reward"].data and "no reward yet" in empty["reward"].layout.annotations[0].text
    assert "DiffusionNFT" in empty["clipfrac"].layout.annotations[0].text


def test_monitor_views_and_tick_skip(trained):
    runs_dir, _ = trained
    mon = MonitorViews(runs_dir)
    out = mon.views("base")
    assert out["status"].startswith("**base** · **finished**") and "checkpoints: 2, 4" in out["status"]
    assert out["latest"].endswith("step-000004.png") and len(out["grids"]) == 3 and out["selected"] == "base"
    assert out["log_file"].endswith("console.log") and "saved" in out["log"]
    first = mon.tick("base", {})
    assert {"runs_table", "run_dd", "status", "p_reward", "latest", "log"} <= set(first)
    again = mon.tick("base", first["seen"])
    assert set(again) == {"status", "seen"}  # only the status line is sent again when nothing changed
    other = mon.tick(None, again["seen"])  # a selection change: the monitor follows at once
    assert other["status"].startswith("No run selected") and other["selected"] is None


# ------------------------------------------------------------------------------------------- dead processes
def test_dead_pid_detection_and_mark_stopped(tmp_path):
    run_dir = str(tmp_path / "crashed")
    write_status(run_dir, pid=dead_pid())
    info = runs.run_info(run_dir)
    assert info["state"] == "dead" and info["was"] == "running"
    assert runs.display_state(info) == "dead (was running)"
    assert "Mark stopped" in MonitorViews(str(tmp_path)).status_text(info)
    with pytest.raises(UserError, match="mark it stopped first"):
        runs.resume_run(run_dir)
    assert runs.mark_stopped(run_dir) == "marked stopped"
    after = runs.run_info(run_dir)
    assert after["state"] == "stopped" and "died while running" in after["message"]
    with pytest.raises(UserError, match="only a dead run"):
        runs.mark_stopped(run_dir)


def test_a_process_that_exited_with_an_error_is_failed(tmp_path):
    started = str(tmp_path / "bad-data")
    write_status(started, state="starting", pid=dead_pid())
    with open(os.path.join(started, "console.log"), "w") as fh:
        fh.write("loading\nerror: /data/x.jsonl line 1: bad JSON\n")
    info = runs.run_info(started)
    assert info["state"] == "failed" and info["message"] == "error: /data/x.jsonl line 1: bad JSON"
    never = str(tmp_path / "never")  # died before writing any status: only the studio's launch record
    os.makedirs(never)
    with open(os.path.join(never, "studio.json"), "w") as fh:
        json.dump({"pid": dead_pid(), "launched": time.time()}, fh)
    with open(os.path.join(never, "console.log"), "w") as fh:
        fh.write("error: command line: unrecognized arguments: --bogus\n")
    info = runs.run_info(never)
    assert info["state"] == "failed" and "--bogus" in info["message"]
    assert [r["name"] for r in runs.list_runs(str(tmp_path))] == ["never", "bad-data"]


def test_a_paused_run_continues_through_control_resume(tmp_path):
    run_dir = str(tmp_path / "paused")
    write_status(run_dir, state="paused", pid=os.getpid(), message="40% of rewards failed this epoch (limit 10%)")
    info = runs.run_info(run_dir)
    mon = MonitorViews(str(tmp_path))
    assert info["state"] == "paused" and "rewards failed" in mon.status_text(info)
    b = mon.buttons(info)
    assert b["resume_btn"].value == "Continue" and b["resume_btn"].visible and b["stop_btn"].visible
    assert not b["mark_btn"].visible and not b["delete_btn"].visible
    assert "resume requested" in runs.resume_run(run_dir)
    assert os.path.isfile(os.path.join(run_dir, "control", "resume"))


def test_live_reused_and_remote_pids(tmp_path):
    alive = str(tmp_path / "alive")
    write_status(alive, pid=os.getpid())
    assert runs.run_info(alive)["state"] == "running"
    os.makedirs(os.path.join(alive, "control"))
    open(os.path.join(alive, "control", "stop"), "w").close()
    assert runs.run_info(alive)["state"] == "stopping"  # shown at once, before the trainer notices
    reused = str(tmp_path / "reused")
    write_status(reused, pid=os.getpid(), started=1000.0)  # this process is younger than that run
    assert runs.run_info(reused)["state"] == "dead"
    remote = str(tmp_path / "remote")
    write_status(remote, pid=dead_pid(), host="another-host")
    assert runs.display_state(runs.run_info(remote)) == "running (on another-host)"


# ------------------------------------------------------------------------------------------- paths
def test_path_confinement(trained, tmp_path):
    runs_dir, run_dir = trained
    assert runs.confine(os.path.join(run_dir, "run.json"), [runs_dir]) == os.path.realpath(os.path.join(run_dir, "run.json"))
    for bad in ("/etc/passwd", os.path.join(runs_dir, "..", "x"), "~/.ssh/id_rsa"):
        with pytest.raises(UserError, match="must lie inside"):
            runs.confine(bad, [runs_dir])
    link = os.path.join(runs_dir, "escape")
    os.symlink("/etc", link)
    try:
        with pytest.raises(UserError, match="must lie inside"):
            runs.confine(os.path.join(link, "passwd"), [runs_dir])
    finally:
        os.unlink(link)
    for name in ("", "../x", "a/b", "presets", ".hidden", "x" * 81):
        with pytest.raises(UserError):
            runs.run_path(runs_dir, name)
    with pytest.raises(UserError, match="must lie inside"):
        presets.resolve_preset(runs_dir, "/etc/passwd.toml")
    inf = InferViews(runs_dir)
    for typed in ("/etc/passwd", "../../etc/passwd", os.path.join(runs_dir, "..", "x.safetensors")):
        with pytest.raises(UserError, match="must lie inside"):
            inf.adapter_file(None, typed)
    with pytest.raises(UserError, match="must lie inside"):
        inf.adapter_file("../outside.safetensors")
    path, label = inf.adapter_file("base/checkpoint-4/ip-adapter-ema.safetensors")
    assert os.path.isfile(path) and label == "base/checkpoint-4 · EMA"
    assert inf.adapter_file("none") == (None, "no adapter")


# ------------------------------------------------------------------------------------------- presets and the form
def test_preset_save_load_round_trip(tmp_path):
    runs_dir = str(tmp_path)
    form = presets.form_values(runs_dir, "tiny-grpo")
    assert form[presets.FORM_FLAGS.index("pretrained_model_name_or_path")] == "tiny-pretrained"
    form[presets.FORM_FLAGS.index("learning_rate")] = 0.002
    form[presets.FORM_FLAGS.index("rl_method")] = "nft"
    form[presets.FORM_FLAGS.index("rewards")] = "fidelity:0.5,style:0.5"
    path = presets.save_preset(runs_dir, "my-nft", "tiny-grpo", form, "--seed 7 --rl_noise_level 0.0")
    assert path == os.path.join(runs_dir, "presets", "my-nft.toml")
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]
    saved = load_preset(path)
    assert saved["learning_rate"] == 0.002 and saved["rl_method"] == "nft" and saved["seed"] == 7
    assert saved["rewards"] == "fidelity:0.5,style:0.5" and saved["resolution"] == 64 and "output_dir" not in saved
    assert ("my-nft (saved)", path) in presets.preset_choices(runs_dir)
    assert presets.form_values(runs_dir, path) == form  # the saved preset fills the form back identically
    assert presets.form_argv(runs_dir, path, form) == ["--preset", path]
    with pytest.raises(UserError, match="--learning_rate"):
        bad = list(form)
        bad[presets.FORM_FLAGS.index("learning_rate")] = -1
        presets.save_preset(runs_dir, "bad", "tiny-grpo", bad)
    assert not os.path.exists(os.path.join(runs_dir, "presets", "bad.toml"))


def test_form_errors_are_one_line(trained):
    runs_dir, _ = trained
    form = presets.form_values(runs_dir, "tiny-grpo")
    steps = presets.FORM_FLAGS.index("max_train_steps")
    cases = [({steps: "ten"}, "", "expected a number"), ({steps: 2.5}, "", "whole number"),
             ({}, "--rl_method ppo", "--rl_method"), ({}, "--no_such_flag 1", "unrecognized"),
             ({}, "--output_dir /tmp/x", "set by the studio"), ({}, "--seed '1", "extra flags")]
    for change, extra, expected in cases:
        f = list(form)
        for i, v in change.items():
            f[i] = v
        with pytest.raises(UserError, match=expected) as exc:
            runs.prepare_start(runs_dir, "new-run", presets.form_argv(runs_dir, "tiny-grpo", f, extra))
        assert "\n" not in str(exc.value)
    f = list(form)
    f[presets.FORM_FLAGS.index("siglip_path")] = os.path.join(runs_dir, "no-such-siglip")
    with pytest.raises(UserError, match="--siglip_path: no such folder"):
        runs.prepare_start(runs_dir, "new-run", presets.form_argv(runs_dir, "tiny-grpo", f))
    with pytest.raises(UserError, match="already exists"):
        runs.prepare_start(runs_dir, "base", presets.form_argv(runs_dir, "tiny-grpo", form))


def test_name_in_use_by_a_live_run_is_refused(tmp_path):
    write_status(str(tmp_path / "busy"), pid=os.getpid())
    with pytest.raises(UserError, match="is running: stop it first"):
        runs.prepare_start(str(tmp_path), "busy", ["--preset", "tiny-grpo"])


# ------------------------------------------------------------------------------------------- real processes
def test_start_stop_resume_a_real_run(tmp_path):
    runs_dir = str(tmp_path)
    argv = presets.form_argv(runs_dir, "tiny-grpo", presets.form_values(runs_dir, "tiny-grpo"),
                             "--max_train_steps 4 --eval_steps 0 --checkpointing_steps 100 --rl_warmup_steps 1")
    run_dir = runs.start_run(runs_dir, "stopme", argv)
    try:
        assert runs.run_info(run_dir)["state"] in ("launching", "starting", "running")
        wait_for(lambda: runs.run_info(run_dir)["step"] >= 1, 120, what="the first step")
        assert "stop requested" in runs.stop_run(run_dir)
        assert runs.run_info(run_dir)["state"] == "stopping"  # shown at once
        wait_for(lambda: not runs.run_info(run_dir)["live"], 60, what="the run to end")
        info = runs.run_info(run_dir)
        assert info["state"] == "stopped" and info["checkpoints"] == [info["step"]] and info["step"] < 4
        assert os.path.isfile(os.path.join(run_dir, f"checkpoint-{info['step']}", "ip-adapter.safetensors"))
        assert "relaunched from checkpoint" in runs.resume_run(run_dir)
        assert runs.run_info(run_dir)["state"] == "launching"  # not "stopped": a second Resume is refused
        with pytest.raises(UserError):
            runs.resume_run(run_dir)
        wait_for(lambda: runs.run_info(run_dir)["state"] == "finished", 120, what="the resumed run to finish")
        steps = [r["step"] for r in run_files.metrics(run_dir) if "loss" in r]
        assert steps == list(range(1, 5))  # continued from the checkpoint's step, no step twice
        assert "resumed from" in run_files.tail(os.path.join(run_dir, "train.log"), 200)
        with pytest.raises(UserError, match="max_train_steps"):
            runs.resume_run(run_dir)
    finally:
        kill_run(run_dir)


def test_stop_while_loading_ends_the_process(tmp_path):
    run_dir = runs.start_run(str(tmp_path), "early", ["--preset", "tiny-grpo"])
    try:
        runs.stop_run(run_dir)
        info = runs.run_info(run_dir)
        assert info["state"] == "stopped" and "while launching" in info["message"]
        assert not runs.pid_alive(info["launch_pid"])
    finally:
        kill_run(run_dir)


# ------------------------------------------------------------------------------------------- the command
def test_app_py_one_line_errors():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "app.py", "--port", str(port)], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"port {port}" in r.stderr and f"--port {port + 1}" in r.stderr
    r = subprocess.run([sys.executable, "app.py", "--auth", "nopassword", "--port", str(free_port())], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "USER:PASS" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------- signals and paths
def test_a_reused_launch_pid_is_never_signalled(tmp_path):
    """A run's recorded pid that now belongs to another process: Stop refuses, the process lives on."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        wait_for(lambda: procs.proc_start_time(other.pid), 30, what="the stand-in process")
        run_dir = str(tmp_path / "old")
        os.makedirs(run_dir)
        with open(os.path.join(run_dir, "studio.json"), "w") as fh:  # launched an hour ago, with this pid
            json.dump({"pid": other.pid, "launched": time.time() - 3600, "created": time.time() - 3600}, fh)
        info = runs.run_info(run_dir)
        assert info["state"] == "failed" and not info["live"]  # not "launching": that pid is not the run
        with pytest.raises(UserError, match="nothing to stop"):
            runs.stop_run(run_dir)
        with pytest.raises(UserError, match="no longer run 'old'"):  # asked directly, it is refused too
            procs.signal_run(other.pid, created=time.time() - 3600, what="run 'old'")
        with pytest.raises(UserError, match="no start time"):
            procs.signal_run(other.pid, what="run 'old'")
        assert other.poll() is None  # never signalled
    finally:
        other.kill()
        other.wait()


def test_path_flags_from_the_page_are_confined(trained, tmp_path):
    runs_dir, _ = trained
    form = presets.form_values(runs_dir, "tiny-grpo")
    outside = str(tmp_path / "outside")
    for extra, expected in ((f"--logging_dir {outside}", "--logging_dir"), ("--logging_dir ../../x", "--logging_dir"),
                            (f"--train_data_json {outside}/d.jsonl", "--train_data_json"),
                            (f"--initial_ip_adapter_path {outside}/a.bin", "--initial_ip_adapter_path")):
        with pytest.raises(UserError, match=f"{expected}.*must lie inside") as exc:
            runs.prepare_start(runs_dir, "confined", presets.form_argv(runs_dir, "tiny-grpo", form, extra))
        assert "--allow_read" in str(exc.value) or "logging_dir" in expected
    assert not os.path.exists(outside) and not os.path.exists(os.path.join(runs_dir, "confined"))
    run_dir, argv = runs.prepare_start(runs_dir, "confined", presets.form_argv(runs_dir, "tiny-grpo", form,
                                                                                 "--logging_dir tb"))
    assert argv[-2:] == ["--output_dir", run_dir]
    # a folder added with --allow_read is readable (and then checked by preflight: here it does not exist)
    with pytest.raises(UserError, match="--train_data_json: .*not found"):
        runs.prepare_start(runs_dir, "confined", presets.form_argv(runs_dir, "tiny-grpo", form,
                           f"--train_data_json {outside}/d.jsonl"), read_roots=[runs_dir, str(tmp_path)])


def test_check_lists_what_start_would_meet(trained):
    runs_dir, _ = trained
    form = presets.form_values(runs_dir, "tiny-grpo")
    argv = presets.form_argv(runs_dir, "tiny-grpo", form, "--rewards nonsense:1.0")
    _, _, problems = runs.plan_start(runs_dir, "checked", argv, gpus="0,1")
    assert any("unknown reward 'nonsense'" in p for p in problems), problems
    assert any(p.startswith("GPUs: 0,1 requested") for p in problems), problems
    with pytest.raises(UserError, match="unknown reward 'nonsense'.*and 1 more"):
        runs.start_run(runs_dir, "checked", argv, gpus="0,1")
    assert not os.path.exists(os.path.join(runs_dir, "checked"))
    check = TrainViews(runs_dir).check("tiny-grpo", *form, "--rewards nonsense:1.0", "0,1", "checked", False)
    assert check["train_msg"].startswith("⚠ Start would fail") and "nonsense" in check["train_msg"]


# ------------------------------------------------------------------------------------------- managing runs
def test_archive_rename_and_clone_a_failed_run(tmp_path):
    runs_dir = str(tmp_path)
    run_dir = str(tmp_path / "broken")
    write_status(run_dir, state="failed", pid=dead_pid(), message="UserError: bad")
    cfg = presets.defaults(runs_dir, "tiny-nft")
    with open(os.path.join(run_dir, "run.json"), "w") as fh:
        json.dump({**{k: v for k, v in cfg.items() if k != "preset"}, "output_dir": run_dir, "seed": 7,
                   "learning_rate": 0.5}, fh)
    mon, train = MonitorViews(runs_dir), TrainViews(runs_dir)
    out = mon.views("broken")
    assert "Clone config" in out["status"] and out["delete_btn"].visible and out["clone_btn"].visible
    cloned = train.clone("broken")
    assert cloned["preset"] == "tiny-nft" and cloned["extra"] == "--seed 7"
    assert cloned["form:learning_rate"] == 0.5 and cloned["run_name"] == "broken-clone"
    argv = presets.form_argv(runs_dir, cloned["preset"], [cloned[k] for k in FORM_KEYS], cloned["extra"])
    assert "--learning_rate" in argv and argv[-2:] == ["--seed", "7"]
    dest = manage.rename_run(run_dir, "broken-2")
    assert os.path.isdir(dest) and not os.path.exists(run_dir)
    assert runs.run_config(dest)["output_dir"] == dest
    with pytest.raises(UserError, match="already exists"):
        write_status(str(tmp_path / "other"), state="stopped")
        manage.rename_run(dest, "other")
    archived = manage.archive_run(dest)
    assert archived.startswith(os.path.join(runs_dir, ".archive", "broken-2-")) and os.path.isdir(archived)
    assert [r["name"] for r in runs.list_runs(runs_dir)] == ["other"]
    live = str(tmp_path / "live")
    write_status(live, pid=os.getpid())
    for action in (manage.archive_run, lambda d: manage.rename_run(d, "x")):
        with pytest.raises(UserError, match="is running"):
            action(live)
