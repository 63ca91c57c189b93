"""The studio through its HTTP API (gradio_client): start a run, watch it finish, read charts and grids,
run inference and a comparison on a checkpoint, and refuse a wrong password."""

from __future__ import annotations

import json
import os
import time

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
    form = list(values[:-2])
    assert values[-1].startswith("preset **tiny-grpo**") and form[0] == "grpo"
    extra = "--max_train_steps 3 --eval_steps 3 --checkpointing_steps 3"
    bad = client.predict("tiny-grpo", *form, "--rl_kl_beta -1", "", "api-bad", api_name="/start_run")
    assert bad[0].startswith("⚠") and "--rl_kl_beta" in bad[0] and not os.path.exists(os.path.join(runs_dir, "api-bad"))
    checked = client.predict("tiny-grpo", *form, extra, "", "api-run", api_name="/check_run")
    assert "python -m calligrapher_rl.train --preset tiny-grpo --max_train_steps 3" in checked
    started = client.predict("tiny-grpo", *form, extra, "", "api-run", api_name="/start_run")
    run_dir = os.path.join(runs_dir, "api-run")
    try:
        assert "started **api-run**" in started[0] and started[1]["value"] == "api-run"
        assert started[2].startswith("tiny-grpo-")  # a fresh name is suggested for the next run
        again = client.predict("tiny-grpo", *form, extra, "", "api-run", api_name="/start_run")
        assert again[0].startswith("⚠") and "api-run" in again[0]

        def finished():
            out = client.predict("api-run", api_name="/monitor")
            assert "failed" not in out[0] and "dead" not in out[0], out[0]
            return out if out[0].startswith("**finished**") else None

        out = wait_for(finished, 180, every=1.0, what="the run started through the API to finish")
        status, reward, kl, loss, clip, latest, gallery, log = out
        assert "step 3 / 3" in status
        for fig in (reward, kl, loss, clip):
            assert fig["type"] == "plotly"
        traces = [t.get("name") for t in json.loads(reward["plot"])["data"]]
        assert "reward/mean" in traces and "eval (EMA, fixed set)" in traces
        assert latest.endswith(".png") and os.path.getsize(latest) > 0
        assert [g["caption"] for g in gallery] == ["step 0", "step 3"]
        assert "saved" in log
        listed = client.predict(api_name="/list_runs")
        table = listed[2]["data"]
        assert ["api-run", "finished"] == table[[r[0] for r in table].index("api-run")][:2]
    finally:
        kill_run(run_dir)


def test_inference_and_compare_on_a_checkpoint(studio, tmp_path):
    _, runs_dir, client = studio
    ckpt, flux, siglip, resolution = client.predict("base", api_name="/checkpoints")
    assert ckpt["value"] == "base/checkpoint-4/ip-adapter-ema.safetensors" and (flux, siglip, resolution) == ("tiny", "tiny", 64)
    editor, mask, reference, text = client.predict(api_name="/load_example")
    assert editor["layers"] == [] and mask and reference and text
    value = {"background": handle_file(editor["background"]), "layers": [], "composite": handle_file(editor["composite"])}
    settings = [text, 4, 30.0, 1.0, 56, 2, 64, False]
    t0 = time.time()
    gallery, msg = client.predict(ckpt["value"], "", flux, siglip, value, handle_file(mask), handle_file(reference),
                                  *settings, api_name="/generate")
    assert msg.startswith("✓ 2 image(s)"), msg
    assert len(gallery) == 2 and all(os.path.getsize(g["image"]) > 0 for g in gallery)
    assert time.time() - t0 < 120
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
    pair, both, msg = client.predict("base/checkpoint-4/ip-adapter-ema.safetensors", "none", flux, siglip, value,
                                     handle_file(mask), None, *settings, api_name="/compare")
    assert msg.startswith("✓ A = **base/checkpoint-4 · EMA**") and "B = **no adapter**" in msg
    assert len(pair) == 2 and len(both) == 4
    assert [g["caption"][:1] for g in both] == ["A", "A", "B", "B"]
    assert "unloaded 1" in client.predict(api_name="/unload")
