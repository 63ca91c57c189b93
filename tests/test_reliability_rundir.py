"""One owner per run folder, nothing of an earlier run lost or mixed in, every bad checkpoint named.

Faults from the reliability table (docs/reliability.md): two trainers on one folder, a new run into a
used folder, a resume of another method's checkpoint, a kill before the first checkpoint, a kill in the
middle of a checkpoint write, orphaned temporaries, corrupt checkpoints, an output folder under a
missing parent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from calligrapher_rl.config_parse import parse_args
from calligrapher_rl.errors import UserError
from calligrapher_rl.training.checkpointing import list_checkpoints, remove_orphans, resolve_resume
from calligrapher_rl.training.run_dir import read_metrics, read_status, request_stop
from calligrapher_rl.training.setup import check_output_dir
from calligrapher_rl.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--resolution", "32", "--rl_num_inference_steps", "4", "--num_style_tokens", "8", "--eval_steps", "0",
        "--rl_warmup_steps", "1"]


def _args(out, *extra, preset="tiny-grpo"):
    return ["--preset", preset, "--output_dir", str(out), *FAST, *extra]


def _spawn(out, *extra):
    return subprocess.Popen([sys.executable, "-m", "calligrapher_rl.train",
                             *_args(out, "--max_train_steps", "1000", "--checkpointing_steps", "1000", *extra)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait(cond, what, proc=None, timeout=180):
    deadline = time.time() + timeout
    while not cond():
        assert proc is None or proc.poll() is None, f"run exited while waiting for {what}: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-step tiny GRPO run with checkpoint-2 (tests copy it before changing anything)."""
    out = tmp_path_factory.mktemp("owned") / "run"
    assert train(parse_args(_args(out, "--max_train_steps", "2", "--checkpointing_steps", "2"))) == "finished"
    return out


def _copy(run, dest) -> Path:
    shutil.copytree(run, dest)
    return Path(dest)


def test_a_second_trainer_is_refused_naming_the_running_pid(tmp_path):
    out = tmp_path / "run"
    proc = _spawn(out)
    try:
        _wait(lambda: any(r.get("step", 0) >= 1 for r in read_metrics(str(out))), "the first step", proc)
        rows = len(read_metrics(str(out)))
        for extra in (["--resume_from_checkpoint", "latest"], ["--overwrite_output_dir"]):
            with pytest.raises(UserError, match=rf"another trainer \(pid {proc.pid} on .*\) is running") as exc:
                train(parse_args(_args(out, "--max_train_steps", "1", *extra)))
            assert "\n" not in str(exc.value)
        assert read_status(str(out))["pid"] == proc.pid  # the refused one wrote nothing, removed nothing
        assert len(read_metrics(str(out))) >= rows and proc.poll() is None
        request_stop(str(out))
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_new_run_into_a_used_folder_is_refused_and_a_resume_must_match(finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"--output_dir: not empty \(checkpoint-0, checkpoint-2, .*--overwrite_output_dir"):
        train(parse_args(_args(out, "--max_train_steps", "1", preset="tiny-nft")))
    assert (out / "metrics.jsonl").read_text() == before and read_status(str(out))["state"] == "finished"

    with pytest.raises(UserError, match="trained with --rl_method grpo, this run has nft"):
        train(parse_args(_args(out, "--resume_from_checkpoint", "latest", preset="tiny-nft")))
    assert (out / "metrics.jsonl").read_text() == before
    with pytest.raises(UserError, match="trained with --num_style_tokens 8, this run has 16"):
        train(parse_args(_args(out, "--resume_from_checkpoint", "latest", "--num_style_tokens", "16")))
    legacy = out / "checkpoint-2" / "trainer_state" / "state.json"  # a checkpoint of an older version: run.json
    state = json.loads(legacy.read_text())
    legacy.write_text(json.dumps({k: v for k, v in state.items() if k != "config"}))
    with pytest.raises(UserError, match="--rl_method grpo"):
        train(parse_args(_args(out, "--resume_from_checkpoint", "latest", preset="tiny-nft")))

    (out / "notes.txt").write_text("mine")
    assert train(parse_args(_args(out, "--max_train_steps", "1", "--overwrite_output_dir", preset="tiny-nft"))) == "finished"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0", "checkpoint-1"] and (out / "notes.txt").exists()
    assert [r["step"] for r in read_metrics(str(out))] == [1]
    assert json.loads((out / "run.json").read_text())["rl_method"] == "nft"
    assert "--overwrite_output_dir: removed the earlier run's" in (out / "train.log").read_text()

    typo = tmp_path / "typo"  # a start that failed while loading recorded nothing: the fixed command runs
    with pytest.raises(UserError, match="missing.jsonl"):
        train(parse_args(_args(typo, "--train_data_json", str(tmp_path / "missing.jsonl"))))
    assert read_status(str(typo))["state"] == "failed"
    assert train(parse_args(_args(typo, "--max_train_steps", "1"))) == "finished"


def test_sigkill_before_the_first_checkpoint_then_latest_starts_again_at_zero(tmp_path):
    out = tmp_path / "run"
    proc = _spawn(out)
    try:
        _wait(lambda: any(r.get("step", 0) >= 2 for r in read_metrics(str(out))), "two steps", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_rows = len(read_metrics(str(out)))
    # what writers killed mid-write leave behind
    (out / ".checkpoint-7.x1y2.tmp" / "trainer_state").mkdir(parents=True)
    (out / ".checkpoint-7.x1y2.tmp" / "ip-adapter.safetensors").write_bytes(b"half")
    (out / ".status.json.abc.tmp").write_text("{")
    (out / "samples" / ".step-000002.png.def.tmp").write_bytes(b"")
    assert train(parse_args(_args(out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"))) == "finished"
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2, 3]  # not 1, 2, 1, 2, 3
    log = (out / "train.log").read_text()
    assert f"no checkpoint in {out} yet, so the run starts at step 0; dropped the {killed_rows} metric rows" in log
    # the three made above (and any temporary the kill itself interrupted, e.g. a status.json write)
    assert "leftover(s) of writes interrupted" in log and all(
        name in log for name in (".checkpoint-7.x1y2.tmp", ".status.json.abc.tmp", "samples/.step-000002.png.def.tmp"))
    assert not list(out.glob(".*.tmp")) and not list((out / "samples").glob(".*.tmp"))


def _corrupt_cases():
    """(name, damage(run_dir), file named in the error)."""
    ck = "checkpoint-2"
    ts = f"{ck}/trainer_state"

    def write(rel, data):
        return lambda run: (run / rel).write_bytes(data)

    def truncate(rel):
        return lambda run: (run / rel).write_bytes((run / rel).read_bytes()[:100])

    def state_edit(fn):
        def damage(run):
            p = run / ts / "state.json"
            p.write_text(json.dumps(fn(json.loads(p.read_text()))))
        return damage

    def adapter_shapes(run):
        p = run / ck / "ip-adapter.safetensors"
        t = load_file(p)
        k = sorted(t)[0]
        t[k] = torch.zeros(*t[k].shape[:-1], t[k].shape[-1] + 1)
        save_file(t, p)

    def optimizer_shapes(run):
        p = run / ts / "optimizer.pt"
        sd = torch.load(p, weights_only=True)
        first = next(iter(sd["state"].values()))
        first["exp_avg"] = torch.zeros(3, 3)
        torch.save(sd, p)

    def optimizer_groups(run):
        p = run / ts / "optimizer.pt"
        sd = torch.load(p, weights_only=True)
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:1]
        torch.save(sd, p)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    return [
        ("state.json garbage", write(f"{ts}/state.json", b"\x00{not json"), "state.json"),
        ("state.json no step", state_edit(lambda s: {k: v for k, v in s.items() if k != "step"}), "state.json"),
        ("state.json negative epoch", state_edit(lambda s: {**s, "rl_epoch": -1}), "state.json"),
        ("adapter missing", lambda run: (run / ck / "ip-adapter.safetensors").unlink(), "ip-adapter.safetensors"),
        ("adapter truncated", truncate(f"{ck}/ip-adapter.safetensors"), "ip-adapter.safetensors"),
        ("adapter garbage", write(f"{ck}/ip-adapter.safetensors", b"\xff" * 64), "ip-adapter.safetensors"),
        ("adapter wrong shape", adapter_shapes, "ip-adapter.safetensors"),
        ("EMA truncated", truncate(f"{ck}/ip-adapter-ema.safetensors"), "ip-adapter-ema.safetensors"),
        ("optimizer truncated", truncate(f"{ts}/optimizer.pt"), "optimizer.pt"),
        ("optimizer pickle with code", lambda run: torch.save(Evil(), run / ts / "optimizer.pt"), "optimizer.pt"),
        ("optimizer wrong shape", optimizer_shapes, "optimizer.pt"),
        ("optimizer other params", optimizer_groups, "optimizer.pt"),
        ("scheduler missing", lambda run: (run / ts / "scheduler.pt").unlink(), "scheduler.pt"),
    ]


def test_corrupt_checkpoints_fail_with_one_line_naming_the_file_and_status_failed(finished, tmp_path):
    for i, (name, damage, file) in enumerate(_corrupt_cases()):
        run = _copy(finished, tmp_path / f"case{i}")
        damage(run)
        with pytest.raises(UserError) as exc:
            train(parse_args(_args(run, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")))
        msg = str(exc.value)
        assert file in msg and "--resume_from_checkpoint" in msg and "\n" not in msg, (name, msg)
        status = read_status(str(run))
        assert status["state"] == "failed" and file in status["message"], (name, status)
    # the command: one line, exit 2, no traceback
    run = _copy(finished, tmp_path / "cli")
    (run / "checkpoint-2" / "trainer_state" / "optimizer.pt").write_bytes(b"PK\x03\x04 truncated")
    r = subprocess.run([sys.executable, "-m", "calligrapher_rl.train", *_args(run, "--resume_from_checkpoint",
                        str(run / "checkpoint-2"))], cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "optimizer.pt" in errors[0] and "Traceback" not in r.stderr
    assert read_status(str(run))["state"] == "failed"


def test_output_dir_under_a_missing_parent_is_created_and_a_file_parent_is_named(tmp_path):
    cfg = parse_args(_args(tmp_path / "new" / "deeper" / "run"))
    check_output_dir(cfg)
    assert (tmp_path / "new" / "deeper").is_dir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"afile is a file, not a folder"):
        check_output_dir(parse_args(_args(tmp_path / "afile" / "sub" / "run")))


def test_kill_9_in_the_middle_of_a_checkpoint_write_leaves_latest_on_the_previous_one(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    writer = subprocess.Popen([sys.executable, "-c", f"""
import os, time
from calligrapher_rl.atomic import atomic_dir
with atomic_dir({str(run / "checkpoint-9")!r}) as tmp:  # what save_checkpoint does, held open half-written
    open(os.path.join(tmp, "ip-adapter.safetensors"), "wb").write(b"half an adapter")
    os.makedirs(os.path.join(tmp, "trainer_state"))
    open(os.path.join(tmp, "trainer_state", "state.json"), "w").write('{{"step": 9')
    print("inside", flush=True)
    time.sleep(120)
"""], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "inside"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert [step for step, _ in list_checkpoints(str(run))] == [2] and not (run / "checkpoint-9").exists()
    assert resolve_resume(str(run), "latest") == str(run / "checkpoint-2")
    assert [p.name for p in run.glob(".checkpoint-9.*.tmp")]  # the orphan, until the next start
    # a re-save killed between its two renames: the previous folder, moved aside, is put back
    os.replace(run / "checkpoint-2", run / ".checkpoint-2.k1ll.tmp.old")
    removed = remove_orphans(str(run))
    assert len(removed) == 1 and removed[0].startswith(".checkpoint-9.") and not list(run.glob(".checkpoint-*"))
    assert resolve_resume(str(run), "latest") == str(run / "checkpoint-2")


def test_a_refused_resume_writes_nothing_and_a_changed_meaning_needs_allow_changed_settings(finished, tmp_path):
    """Before: a refused resume rewrote the finished run's status.json to `failed`, step 0; a resume took a
    changed resolution or reward set silently, and one at its last step ended `done` having trained nothing."""
    out = _copy(finished, tmp_path / "run")
    kept = {name: (out / name).read_bytes() for name in ("status.json", "metrics.jsonl", "run.json")}

    def refused(match, *extra, preset="tiny-grpo"):
        with pytest.raises(UserError, match=match) as exc:
            train(parse_args(_args(out, "--resume_from_checkpoint", "latest", *extra, preset=preset)))
        assert "\n" not in str(exc.value)
        assert {name: (out / name).read_bytes() for name in kept} == kept  # the finished run's files as they were

    refused(r"trained with --rl_method grpo, this run has nft: .*pass --allow_changed_settings", preset="tiny-nft")
    refused(r"^--max_train_steps: 2 is at or below the checkpoint's step 2 \(.*checkpoint-2\): nothing would be "
            r"trained", "--max_train_steps", "2")
    refused(r"trained with --resolution 32, this run has 48, .*--allow_changed_settings", "--max_train_steps", "3",
            "--resolution", "48")
    refused(r"trained with --rewards ocr:1.0, this run has fidelity, .*--allow_changed_settings", "--max_train_steps",
            "3", "--rewards", "fidelity")
    assert train(parse_args(_args(out, "--resume_from_checkpoint", "latest", "--max_train_steps", "3", "--rewards",
                                  "fidelity", "--allow_changed_settings", preset="tiny-nft"))) == "finished"
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2, 3]
    assert json.loads((out / "run.json").read_text())["rewards"] == "fidelity"
