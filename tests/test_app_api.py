"""The studio through its HTTP API (gradio_client): start a run, watch it finish, read charts and grids,
run inference and a comparison on a checkpoint, and refuse a wrong password."""

from __future__ import annotations

import json
import os

import httpx
import numpy as np
import pytest
from PIL import Image
from test_app_support import (
    REPO,
    free_port,
    kill_run,
    single_thread_runs,  # noqa: F401  (a module fixture, used below)
    trained_run,
    wait_for,
)

from app.server import launch
from app.views import FORM_KEYS

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

AUTH = ("alice", "s3cret")
pytestmark = [pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*"),  # inside gradio
              pytest.mark.usefixtures("single_thread_runs")]


@pytest.fixture(scope="module")
def studio():
    runs_dir, _ = trained_run()
    port = free_port()
    demo = launch(runs_dir, "127.0.0.1", port, auth=AUTH, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    yield url, runs_dir, Client(url, auth=AUTH, verbose=False)
    demo.close()


def test_wrong_password_is_rejected(studio):
    url, _, _ = studio
    with pytest.raises(Exception, match="(?i)login"):
        Client(url, auth=(AUTH[0], "wrong"), verbose=False)
    with pytest.raises(Exception, match="(?i)credentials|login"):
        Client(url, verbose=False)
    r = httpx.post(url + "login", data={"username": AUTH[0], "password": "wrong"})
    assert r.status_code in (400, 401)


def test_only_runs_dir_files_are_served(studio):
    url, runs_dir, _ = studio
    with httpx.Client() as http:
        assert http.post(url + "login", data={"username": AUTH[0], "password": AUTH[1]}).status_code == 200
        inside = http.get(url + "gradio_api/file=" + os.path.join(runs_dir, "base", "run.json"))
        assert inside.status_code == 200 and "max_train_steps" in inside.text
        for outside in (os.path.join(REPO, "pyproject.toml"), "/etc/passwd"):
            assert http.get(url + "gradio_api/file=" + outside).status_code == 403


def test_start_a_run_and_watch_it_finish(studio):
    url, runs_dir, client = studio
    values = client.predict("tiny-grpo", api_name="/preset_values")
    form = list(values[:-3])
    assert values[-2].startswith("preset **tiny-grpo**") and form[0] == "grpo"
    assert values[-1] == "bundled-glyphs"  # the Dataset tab follows the preset
    extra = "--max_train_steps 3 --eval_steps 3 --checkpointing_steps 3 --num_eval_noises 2"
    bad = client.predict("tiny-grpo", *form, "--rl_kl_beta -1", "", "api-bad", False, api_name="/start_run")
    assert bad[0].startswith("⚠") and "--rl_kl_beta" in bad[0] and not os.path.exists(os.path.join(runs_dir, "api-bad"))
    doomed = client.predict("tiny-grpo", *form, "--rewards nonsense:1", "", "api-bad", False, api_name="/check_run")
    assert doomed.startswith("⚠ Start would fail") and "unknown reward 'nonsense'" in doomed
    checked = client.predict("tiny-grpo", *form, extra, "", "api-run", False, api_name="/check_run")
    assert "python -m calligrapher_rl.train --preset tiny-grpo --max_train_steps 3" in checked
    started = client.predict("tiny-grpo", *form, extra, "", "api-run", False, api_name="/start_run")
    run_dir = os.path.join(runs_dir, "api-run")
    try:
        msg, run_dd, fresh_name, status = started[:4]
        assert "started **api-run**" in msg and run_dd["value"] == "api-run"
        assert fresh_name.startswith("tiny-grpo-")  # a fresh name is suggested for the next run
        assert status.startswith("**api-run** · **launching**")  # the new run's monitor comes with Start itself
        again = client.predict("tiny-grpo", *form, extra, "", "api-run", False, api_name="/start_run")
        assert again[0].startswith("⚠") and "api-run" in again[0]

        def finished():
            out = client.predict("api-run", api_name="/monitor")
            assert "failed" not in out[0] and "dead" not in out[0], out[0]
            return out if out[0].startswith("**api-run** · **finished**") else None

        out = wait_for(finished, 180, every=1.0, what="the run started through the API to finish")
        status, reward, kl, loss, clip, gpu, phase_times, latest, gallery, prompts, log, log_file = out
        assert prompts["visible"] is False  # no --sample_prompts: no sample-prompt gallery
        assert "step 3 / 3" in status
        for fig in (reward, kl, loss, clip):
            assert fig["type"] == "plotly"
        assert gpu["visible"] is False  # a CPU run logs no GPU figures: no empty chart either
        traces = [t.get("name") for t in json.loads(reward["plot"])["data"]]
        assert "reward/mean" in traces and "eval (EMA, fixed set)" in traces
        assert latest.endswith(".png") and os.path.getsize(latest) > 0
        assert [g["caption"] for g in gallery] == ["step 0", "step 3"]
        assert "saved" in log and "$ python -m calligrapher_rl.train" in log  # the whole console, from the command on
        with open(log_file, encoding="utf-8") as fh:
            assert fh.read().strip().endswith(log.strip().splitlines()[-1])
        listed = client.predict(api_name="/list_runs")
        table = listed[2]["data"]
        assert ["api-run", "finished"] == table[[r[0] for r in table].index("api-run")][:2]
    finally:
        kill_run(run_dir)


def test_inference_and_compare_on_a_checkpoint(studio, tmp_path):
    _, runs_dir, client = studio
    ckpt, flux, siglip = client.predict("base", api_name="/checkpoints")  # the run's models, never a resize
    assert ckpt["value"] == "base/checkpoint-4/ip-adapter-ema.safetensors" and (flux, siglip) == ("tiny-pretrained", "tiny-pretrained")
    editor, mask, reference, text = client.predict(api_name="/load_example")
    assert editor["layers"] == [] and mask and reference and text
    value = {"background": handle_file(editor["background"]), "layers": [], "composite": handle_file(editor["composite"])}
    settings = [text, 4, 30.0, 1.0, 56, 2, None, False]
    gallery, msg = client.predict(ckpt["value"], "", flux, siglip, value, handle_file(mask), handle_file(reference),
                                  *settings, api_name="/generate")
    assert msg.startswith("✓ 2 image(s)") and "64x64" in msg and "resized" not in msg, msg
    assert len(gallery) == 2 and all(os.path.getsize(g["image"]) > 0 for g in gallery)
    # a source that is not a square keeps its size (rounded to 16, and said so); a resize is asked for, never implied
    wide = tmp_path / "wide.png"
    Image.new("RGB", (88, 40), (200, 200, 200)).save(wide)
    wide_mask, tall_mask = tmp_path / "wide-mask.png", tmp_path / "tall-mask.png"
    Image.new("L", (88, 40), 255).save(wide_mask)
    Image.new("L", (30, 90), 255).save(tall_mask)
    wide_value = {"background": handle_file(str(wide)), "layers": [], "composite": handle_file(str(wide))}
    one = [text, 2, 30.0, 1.0, 56, 1]
    gallery, msg = client.predict("none", "", flux, siglip, wide_value, handle_file(str(wide_mask)), None, *one, None,
                                  False, api_name="/generate")
    assert "80x32" in msg and "source 88x40 resized to 80x32: the model needs sides that are multiples of 16" in msg
    assert Image.open(gallery[0]["image"]).size == (80, 32)
    gallery, msg = client.predict("none", "", flux, siglip, wide_value, handle_file(str(wide_mask)), None, *one, 48,
                                  False, api_name="/generate")
    assert "resized to 48x48 as asked" in msg and Image.open(gallery[0]["image"]).size == (48, 48)
    _, msg = client.predict("none", "", flux, siglip, wide_value, handle_file(str(tall_mask)), None, *one, None, False,
                            api_name="/generate")
    assert msg.startswith("⚠ the mask is 30x90 but the source is 88x40"), msg
    # a brushed mask: the editor's first layer, transparent except where painted
    layer = np.zeros((64, 64, 4), dtype=np.uint8)
    layer[20:40, 10:50] = (255, 64, 160, 255)
    layer_path = str(tmp_path / "layer.png")
    Image.fromarray(layer, "RGBA").save(layer_path)
    brushed = {**value, "layers": [handle_file(layer_path)]}
    gallery, msg = client.predict("none", "", flux, siglip, brushed, None, None, *settings, api_name="/generate")
    assert msg.startswith("✓ 2 image(s) from **no adapter**"), msg
    # a typed path outside runs_dir is refused
    _, msg = client.predict(ckpt["value"], "/etc/passwd", flux, siglip, brushed, None, None, *settings, api_name="/generate")
    assert msg.startswith("⚠") and "must lie inside" in msg
    # an empty mask is a one-line message, not a traceback
    _, msg = client.predict(ckpt["value"], "", flux, siglip, value, None, None, *settings, api_name="/generate")
    assert msg.startswith("⚠") and "mask is empty" in msg
    # Compare: up to four checkpoints on the same inputs, every image scored with the training rewards
    slots = client.predict("base", api_name="/compare_step0")  # A = the run's start (checkpoint-0), B = its newest
    assert [slot["value"] for slot in slots[:4]] == ["base/checkpoint-0", "base/checkpoint-4/ip-adapter-ema.safetensors",
                                                     None, None]
    assert "starting point" in slots[-1]
    # the evaluation: the same 2 examples x 2 noises for each, means with intervals, the verdict, grids, the report
    table, verdict, report, msg, *grids = client.predict("base/checkpoint-0", "base/checkpoint-4/ip-adapter-ema.safetensors",
                                                         "none", None, "the first checkpoint's run data", 2, 2, flux,
                                                         siglip, api_name="/evaluate")
    assert msg.startswith("✓ 3 checkpoint(s)") and "on **bundled-glyphs**" in msg and "2 examples x 2 noises" in msg, msg
    assert verdict.count(" vs base · start (checkpoint-0): OCR reward") == 2, verdict
    assert "| base · start (checkpoint-0) | 0." in table and "mean(B - A) [95% CI]" in table
    assert [len(g["value"]) for g in grids[:3]] == [4, 4, 4] and grids[3]["visible"] is False  # D was left empty
    assert grids[0]["label"] == "A: base · start (checkpoint-0)" and report.endswith(".zip")
    assert all(cell["caption"].startswith(("EH4H → ", "LP2C → ")) for cell in grids[0]["value"])  # text → reading · score
    _, _, _, msg, *_ = client.predict(None, None, None, None, "bundled-glyphs", 0, None, flux, siglip, api_name="/evaluate")
    assert msg.startswith("⚠ choose 1 to 4 checkpoints"), msg
    three = ["base/checkpoint-4/ip-adapter-ema.safetensors", "base/checkpoint-2/ip-adapter.safetensors", "none", None]
    pair, both, table, msg = client.predict(*three, flux, siglip, value, handle_file(mask), None, *settings,
                                            api_name="/compare")
    assert msg.startswith("✓ 3 checkpoint(s), same inputs, seed 56, 2 image(s) each") and "C: OCR" in msg, msg
    assert len(pair) == 2 and len(both) == 6
    assert [g["caption"][:1] for g in both] == ["A", "A", "B", "B", "C", "C"]
    assert "base/checkpoint-4 · EMA" in both[0]["caption"] and "OCR " in both[0]["caption"] and "style " in both[0]["caption"]
    lines = table.splitlines()
    assert lines[0] == "| | checkpoint | image | OCR read | OCR score | style score |" and len(lines) == 2 + 6
    scores = [float(x) for line in lines[2:] for x in line.split("|")[5:7]]
    assert all(0 <= x <= 1 for x in scores[0::2]) and all(-1 <= x <= 1 for x in scores[1::2])
    _, _, _, msg = client.predict(None, None, None, None, flux, siglip, value, handle_file(mask), None, *settings,
                                  api_name="/compare")
    assert msg.startswith("⚠ choose 1 to 4 checkpoints")
    assert "unloaded 1" in client.predict(api_name="/unload")


def test_manage_runs_and_datasets_through_the_api(studio):
    _, runs_dir, client = studio
    cloned = client.predict("base", api_name="/clone_config")  # the form, preset, extra flags, name, messages
    n = len(FORM_KEYS)
    assert cloned[0] == "grpo" and cloned[n] == "tiny-grpo" and cloned[n + 2] == "base-clone"
    assert "--max_train_steps" not in cloned[n + 1] and cloned[3] == 4  # the form has it; extra holds the rest
    csv_path = client.predict([], "base", api_name="/export_csv")
    with open(csv_path, encoding="utf-8") as fh:
        assert fh.readline().startswith("run,step,phase,time,")
    fake = os.path.join(runs_dir, "api-failed")
    os.makedirs(fake)
    with open(os.path.join(fake, "status.json"), "w") as fh:
        json.dump({"state": "failed", "step": 0, "message": "UserError: bad", "started": 1.0, "updated": 1.0}, fh)
    renamed = client.predict("api-failed", "api-failed-2", api_name="/rename_run")
    assert renamed[0].startswith("**api-failed-2** · **failed**") and "renamed" in renamed[-3]
    deleted = client.predict("api-failed-2", api_name="/delete_run")
    assert "moved to" in deleted[-3] and not os.path.exists(os.path.join(runs_dir, "api-failed-2"))
    assert os.listdir(os.path.join(runs_dir, ".archive"))
    gallery, msg, page = client.predict("bundled", 2, api_name="/dataset_page")
    assert len(gallery) == 18 and "page 2 of 3" in msg and page == 2
    assert client.predict("bundled", api_name="/dataset_validate").startswith("✓")
