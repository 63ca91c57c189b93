"""Studio: the Inference and Compare tabs never load a model onto a card where it could push a training run out
of memory (app/gpu_room.py). The card's free memory is given (this machine has no GPU); the runs are real run
folders whose live process is this test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from test_app_manage import live_run, set_state

from app import gpu_room, procs, runs
from app.gpu_room import GIB, GpuRoom, make_room_for_run
from app.infer_views import InferViews
from app.inference import InferenceService
from calligrapher_rl.errors import UserError
from calligrapher_rl.models.footprint import estimated_bytes


@pytest.fixture(autouse=True)
def gpu_machine(monkeypatch):
    """These tests stand for a GPU server: a run launched with no GPUs trains on the environment's first card."""
    from app import procs

    monkeypatch.setattr(procs, "machine_has_gpu", lambda: True)


def with_step(run_dir: str, step: int) -> None:
    path = os.path.join(run_dir, "status.json")
    with open(path) as fh:
        status = json.load(fh)
    status["step"] = step
    with open(path, "w") as fh:
        json.dump(status, fh)


def free(gib: float, total: float = 80.0):
    return lambda: (int(gib * GIB), int(total * GIB))


def child() -> subprocess.Popen:
    """A real process that lives until its stdin is closed (it stands for a trainer that exits)."""
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)


def played_by(run_dir: str, proc: subprocess.Popen, state: str, launched: bool = True) -> None:
    """Record `proc` as the run's process, in `state`: in studio.json as live_run does (`launched`), and in
    status.json as a trainer does (its pid, and when it started)."""
    created = procs.proc_start_time(proc.pid)
    assert created is not None
    if launched:
        with open(os.path.join(run_dir, "studio.json"), "w") as fh:
            json.dump({**procs.launch_record(run_dir), "pid": proc.pid, "created": created}, fh)
    else:  # a trainer started on this host from a shell, not by the studio: status.json alone
        os.remove(os.path.join(run_dir, "studio.json"))
    set_state(run_dir, state)
    path = os.path.join(run_dir, "status.json")
    with open(path) as fh:
        status = json.load(fh)
    with open(path, "w") as fh:
        json.dump({**status, "pid": proc.pid, "started": created}, fh)


def ended(run_dir: str, state: str) -> None:
    """The run ended in `state` and its process is gone (exited and reaped)."""
    proc = child()
    played_by(run_dir, proc, state)
    proc.stdin.close()
    proc.wait()


def test_a_starting_run_on_the_card_refuses_any_load(tmp_path):
    runs_dir = str(tmp_path)
    run = live_run(runs_dir, "flux-a", "0")
    with_step(run, 0)  # before its first optimizer step its memory has not peaked
    room = GpuRoom(runs_dir, mem_info=free(70), gpu=0)
    with pytest.raises(UserError) as exc:
        room.check(40 * GIB)
    msg = str(exc.value)
    assert "\n" not in msg and "'flux-a'" in msg and "first optimizer step" in msg and "GPU 0" in msg
    with_step(run, 1)  # past it, what is free is what it leaves
    room.check(40 * GIB)


def test_a_stepped_run_leaves_what_is_free(tmp_path):
    runs_dir = str(tmp_path)
    live_run(runs_dir, "flux-a", "0")  # status step 1
    with pytest.raises(UserError) as exc:
        GpuRoom(runs_dir, mem_info=free(27.1), gpu=0).check(46 * GIB)
    msg = str(exc.value)
    assert "needs ~49 GiB on GPU 0" in msg and "27.1 of 80 GiB is free" in msg and "'flux-a' trains on it" in msg
    assert "\n" not in msg
    GpuRoom(runs_dir, mem_info=free(60), gpu=0).check(46 * GIB)  # 46 + headroom fits in 60


def test_runs_on_other_cards_do_not_count_but_runs_without_gpus_do(tmp_path):
    runs_dir = str(tmp_path)
    other = live_run(runs_dir, "on-gpu1", "1")
    with_step(other, 0)
    GpuRoom(runs_dir, mem_info=free(70), gpu=0).check(40 * GIB)  # a starting run on GPU 1 does not hold GPU 0
    with pytest.raises(UserError, match="'on-gpu1' is starting on GPU 1"):
        GpuRoom(runs_dir, mem_info=free(70), gpu=1).check(40 * GIB)
    env = live_run(runs_dir, "no-gpus", "")  # launched without GPUs: it takes the environment's card, the studio's
    with_step(env, 0)
    with pytest.raises(UserError, match="'no-gpus'"):
        GpuRoom(runs_dir, mem_info=free(70), gpu=0).check(40 * GIB)
    ended(env, "finished")  # their processes are gone: what still holds the card is no run of the studio's
    ended(other, "finished")
    with pytest.raises(UserError, match="another process holds the rest"):
        GpuRoom(runs_dir, mem_info=free(10), gpu=0, exit_wait_s=0).check(40 * GIB)


def test_an_ended_run_is_exiting_while_its_process_is_there(tmp_path):
    """runs.run_info: `exiting` for an ended run whose process (the one the studio launched, or the trainer its
    status records on this host) still exists; a zombie (exited, not yet reaped) is gone; `live` is unchanged."""
    for launched in (True, False):
        run = live_run(str(tmp_path), f"run-{launched}", "0")
        assert runs.run_info(run)["exiting"] is False  # live: not exiting
        proc = child()
        try:
            played_by(run, proc, "stopped", launched=launched)
            info = runs.run_info(run)
            assert info["state"] == "stopped" and not info["live"] and info["exiting"] is True
            proc.stdin.close()
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # until it has exited, left unreaped: a zombie
            assert procs.psutil.Process(proc.pid).status() == procs.psutil.STATUS_ZOMBIE
            assert runs.run_info(run)["exiting"] is False
        finally:
            proc.kill()
            proc.wait()
        assert runs.run_info(run)["exiting"] is False


def test_check_waits_for_a_stopped_runs_process_to_exit(tmp_path):
    """The user stops a run and generates at once: the run says `stopped`, its process still frees the card. The
    check waits for that process to end, then reads what is free again and loads."""
    runs_dir = str(tmp_path)
    run = live_run(runs_dir, "flux-a", "")  # no GPUs: the environment's first card, the studio's
    proc = child()
    calls = []

    def mem_info():
        calls.append(proc.poll())
        if len(calls) == 1:
            proc.stdin.close()  # the trainer wrote "stopped"; its process now ends on its own
            return int(19.7 * GIB), 79 * GIB
        return int((70 if proc.poll() is not None else 19.7) * GIB), 79 * GIB

    try:
        played_by(run, proc, "stopped")
        GpuRoom(runs_dir, mem_info=mem_info, gpu=0, exit_wait_s=60).check(44 * GIB)
        assert len(calls) == 2 and proc.poll() is not None  # read again once, after the process had ended
    finally:
        proc.kill()
        proc.wait()


def test_a_process_still_exiting_after_the_bound_is_named(tmp_path):
    runs_dir = str(tmp_path)
    run = live_run(runs_dir, "flux-a", "0")
    proc = child()  # never exits by itself
    try:
        played_by(run, proc, "stopped")
        with pytest.raises(UserError) as exc:
            GpuRoom(runs_dir, mem_info=free(19.7, 79), gpu=0, exit_wait_s=0.5).check(44 * GIB)
        msg = str(exc.value)
        assert "\n" not in msg and "'flux-a'" in msg and "still exiting" in msg and f"pid {proc.pid}" in msg
        assert "19.7 of 79 GiB is free" in msg and "another process" not in msg and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def released_after(short: int, gib: float = 19.7, then: float = 70.0, total: float = 79.0):
    """A card whose driver gives an ended run's memory back after `short` readings: the first `short` calls of
    the returned mem_info report `gib` free, the later ones `then`; `calls` counts them."""
    calls = []

    def mem_info():
        calls.append(1)
        return int((gib if len(calls) <= short else then) * GIB), int(total * GIB)

    return mem_info, calls


def ended_ago(run_dir: str, seconds: float) -> None:
    """The run's final status was written `seconds` ago."""
    path = os.path.join(run_dir, "status.json")
    with open(path) as fh:
        status = json.load(fh)
    with open(path, "w") as fh:
        json.dump({**status, "updated": time.time() - seconds}, fh)


@pytest.fixture
def quick_polls(monkeypatch):
    monkeypatch.setattr(gpu_room, "EXIT_POLL_S", 0.01)


def test_check_waits_for_the_driver_to_release_a_just_stopped_runs_memory(tmp_path, quick_polls):
    """Measured on an H100: the run wrote `stopped`, its process was gone, and the driver still held its 53 GiB
    seconds later. The check keeps reading the free memory and loads once it is back."""
    runs_dir = str(tmp_path)
    run = live_run(runs_dir, "flux-a", "0")
    ended(run, "stopped")
    assert not runs.run_info(run)["exiting"]  # the pid alone says nothing is left to wait for
    mem_info, calls = released_after(3)
    # a long settle and bound: only the memory coming back ends this wait
    GpuRoom(runs_dir, mem_info=mem_info, gpu=0, exit_wait_s=60, settle_s=60).check(44 * GIB)
    assert len(calls) == 4  # three short readings, then the one that fits (the decision uses it: no extra read)


def test_memory_still_held_after_the_wait_names_the_ended_run(tmp_path, quick_polls):
    runs_dir = str(tmp_path)
    run = live_run(runs_dir, "flux-a", "0")
    ended(run, "stopped")
    ended_ago(run, 0)  # just now: well inside the window (exit_wait_s), however slow the child's start was
    mem_info, calls = released_after(10**9)  # never given back
    start = time.monotonic()
    with pytest.raises(UserError) as exc:
        GpuRoom(runs_dir, mem_info=mem_info, gpu=0, exit_wait_s=5, settle_s=0.2).check(44 * GIB)
    assert time.monotonic() - start < 30  # generous: the settle interval ends it, the bound at the latest
    msg = str(exc.value)
    assert len(calls) > 1 and "\n" not in msg and "19.7 of 79 GiB is free" in msg
    assert "'flux-a' (stopped" in msg and "memory was not released: still held after waiting" in msg
    assert "another process" not in msg


class FakeClock:
    """gpu_room's `time` with a monotonic clock that only its sleeps advance (the wall clock stays real: a
    run's `updated` is wall time)."""

    def __init__(self):
        self.now = 0.0
        self.time = time.time

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_memory_that_keeps_coming_back_too_slowly_waits_no_longer_than_the_bound(tmp_path, monkeypatch):
    """Free memory that grows on every reading never settles: exit_wait_s alone ends the wait."""
    runs_dir = str(tmp_path)
    run = live_run(runs_dir, "flux-a", "0")
    ended(run, "stopped")
    clock = FakeClock()
    monkeypatch.setattr(gpu_room, "time", clock)
    calls = []

    def slow_release():
        calls.append(1)
        return int((10 + 0.001 * len(calls)) * GIB), 79 * GIB

    with pytest.raises(UserError, match="still held after waiting 60.0 s"):
        GpuRoom(runs_dir, mem_info=slow_release, gpu=0, exit_wait_s=60, settle_s=5).check(44 * GIB)
    assert clock.now == pytest.approx(60) and len(calls) > 60 / 5  # it kept reading past many settle intervals


def test_a_run_that_ended_long_ago_causes_no_wait(tmp_path, quick_polls):
    """Memory held long after a run ended is no longer its: the check refuses at once, on one reading."""
    runs_dir = str(tmp_path)
    run = live_run(runs_dir, "flux-a", "0")
    ended(run, "stopped")
    ended_ago(run, 3600)
    mem_info, calls = released_after(10**9, gib=10)
    with pytest.raises(UserError) as exc:
        GpuRoom(runs_dir, mem_info=mem_info, gpu=0, exit_wait_s=60, settle_s=60).check(44 * GIB)
    assert "another process holds the rest" in str(exc.value) and "flux-a" not in str(exc.value)
    assert len(calls) == 1


def test_a_live_run_beside_causes_no_wait(tmp_path, quick_polls):
    runs_dir = str(tmp_path)
    live_run(runs_dir, "flux-a", "0")  # stepped, still training: it releases nothing
    mem_info, calls = released_after(10**9)
    with pytest.raises(UserError, match="'flux-a' trains on it"):
        GpuRoom(runs_dir, mem_info=mem_info, gpu=0, exit_wait_s=60, settle_s=60).check(44 * GIB)
    assert len(calls) == 1


def test_studio_gpu_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert gpu_room.studio_gpu() == 3
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_room.studio_gpu() == 0


def test_the_estimate_counts_the_folders_the_adapter_in_fp32_and_a_loras_base(tmp_path):
    from safetensors.torch import save_file

    flux, siglip = tmp_path / "flux", tmp_path / "siglip"
    (flux / "transformer").mkdir(parents=True)
    siglip.mkdir()
    save_file({"w": torch.zeros(1000, dtype=torch.bfloat16)}, str(flux / "transformer" / "m.safetensors"))
    (flux / "model_index.json").write_text("{}")  # not a weight file
    save_file({"w": torch.zeros(500)}, str(siglip / "model.safetensors"))
    adapter = tmp_path / "adapter.safetensors"
    save_file({"a": torch.zeros(100, dtype=torch.bfloat16), "b": torch.zeros(10, 10, dtype=torch.bfloat16)}, str(adapter))
    files = os.path.getsize(flux / "transformer" / "m.safetensors") + os.path.getsize(siglip / "model.safetensors")
    assert estimated_bytes(str(flux), str(siglip), str(adapter)) == files + 4 * 200  # fp32, whatever the file stores
    lora = tmp_path / "checkpoint-4"  # a LoRA checkpoint loads its base adapter first
    lora.mkdir()
    (lora / "lora.json").write_text(json.dumps({"base_adapter": str(adapter)}))
    save_file({"l": torch.zeros(50)}, str(lora / "pytorch_lora_weights.safetensors"))
    assert estimated_bytes(str(flux), str(siglip), str(lora)) == \
        files + 4 * 200 + os.path.getsize(lora / "pytorch_lora_weights.safetensors")


def test_the_inference_tab_refuses_in_one_line_and_loads_nothing(tmp_path, monkeypatch):
    """Through the tab's own callback: the service would load FLUX onto a card a starting run holds."""
    import numpy as np

    import app.inference as inference

    runs_dir = str(tmp_path)
    with_step(live_run(runs_dir, "flux-a", ""), 0)
    monkeypatch.setattr(inference, "_device_dtype", lambda: ("cuda", torch.bfloat16))  # the refusal comes first
    views = InferViews(runs_dir, InferenceService(room=GpuRoom(runs_dir, mem_info=free(70), gpu=0)))
    source = np.full((64, 64, 3), 255, dtype=np.uint8)
    brush = np.zeros((64, 64, 4), dtype=np.uint8)
    brush[20:40, 10:50, 3] = 255
    editor = {"background": source, "layers": [brush], "composite": source}
    # choice, typed path, FLUX, SigLIP, then the tab's inputs: editor, mask upload, reference, text, steps,
    # guidance, style strength, seed, images, resize, use context
    out = views.generate("none", "", "tiny-pretrained", "tiny-pretrained", editor, None, None, "ab", 4, 30.0, 1.0,
                         56, 1, None, False)
    assert "flux-a" in out["inf_msg"] and "first optimizer step" in out["inf_msg"] and out["out_gallery"] == []
    assert views.service.loaded() == []


def test_a_run_starting_on_the_studio_card_unloads_the_studio_model(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    service = InferenceService()
    assert make_room_for_run(service, "0") == ""  # nothing loaded: nothing to say
    service._stacks[("flux", "siglip", "cuda", "torch.bfloat16")] = {"stack": object(), "adapter": None}
    assert make_room_for_run(service, "1") == "" and service.loaded_on_gpu()  # another card: kept
    assert "unloaded from GPU 0" in make_room_for_run(service, "0,1") and service.loaded() == []
    service._stacks[("flux", "siglip", "cuda", "torch.bfloat16")] = {"stack": object(), "adapter": None}
    assert "unloaded" in make_room_for_run(service, "")  # no GPUs given: the environment's card, the studio's
