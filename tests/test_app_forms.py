"""The studio's messages without a server: Check lists every problem in the form's words, uploads that are not
images and texts the model cannot paint are one line each, the log shows what a progress bar shows last."""

from __future__ import annotations

import gradio as gr
import pytest
from gradio.data_classes import FileData
from PIL import Image

from app import presets
from app.form_check import labelled
from app.inference import InferenceService, Inputs
from app.run_files import tail
from app.uploads import checked
from app.views import FORM_KEYS, TrainViews
from calligrapher_rl.errors import UserError


def _form(runs_dir, **changes) -> list:
    values = dict(zip(FORM_KEYS, presets.form_values(runs_dir, "tiny-grpo")))
    values.update({f"form:{k}": v for k, v in changes.items()})
    return [values[k] for k in FORM_KEYS]


def test_check_lists_every_problem_at_once_with_the_form_labels(tmp_path):
    views = TrainViews(str(tmp_path))
    msg = views.check("tiny-grpo", *_form(tmp_path, max_train_steps="many", learning_rate="fast"), "", "", "r1",
                      False)["train_msg"]
    assert msg.startswith("⚠ Start would fail") and msg.count("\n- ") == 2, msg
    assert "Steps (--max_train_steps)" in msg and "Learning rate (--learning_rate)" in msg
    msg = views.check("tiny-grpo", *_form(tmp_path, max_train_steps=0, rl_num_images_per_prompt=0), "", "", "r2",
                      False)["train_msg"]
    assert msg.count("\n- ") == 2 and "Steps (--max_train_steps): must be at least 1" in msg, msg
    assert "Group size (--rl_num_images_per_prompt): must be at least 1" in msg
    assert labelled("--train_data_json: required (see --help), got None") == \
        "Dataset (--train_data_json): required, got nothing"


def test_the_log_shows_what_a_progress_bar_shows_last(tmp_path):
    log = tmp_path / "console.log"
    log.write_bytes(b"start\nLoading:  10%|#\rLoading:  50%|##\rLoading: 100%|###\r\n\x1b[Aepoch 1\r\nstep 2: 40%\rstep 2: 80%")
    assert tail(str(log)).splitlines() == ["start", "Loading: 100%|###", "epoch 1", "step 2: 80%"]


def test_a_text_longer_than_the_model_can_paint_is_refused_in_one_line():
    image = Image.new("RGB", (64, 64))
    mask = Image.new("L", (64, 64), 255)
    with pytest.raises(UserError, match=r"^Text to write: 20000 characters; the tiny model writes 1-4 characters"):
        InferenceService().generate("tiny-pretrained", "tiny-pretrained", None, Inputs(image, mask, "x" * 20000))
    with pytest.raises(UserError, match=r"^Text to write: 101 characters; at most 100"):
        InferenceService().generate("/models/flux", "/models/siglip", None, Inputs(image, mask, "y" * 101))


def test_an_upload_that_is_not_an_image_is_one_line_naming_the_field_and_the_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    payload = FileData(path=str(notes), orig_name="notes.txt")
    mask = checked(gr.Image(type="numpy", label="Mask: or upload one of the source's size"))
    with pytest.raises(gr.Error) as exc:
        mask.preprocess(payload)
    assert exc.value.message.startswith("Mask: notes.txt is not an image (expected a PNG, JPEG or WebP picture")
    editor = checked(gr.ImageEditor(type="numpy", label="Source: brush over the text to replace"))
    from gradio.components.image_editor import EditorData

    with pytest.raises(gr.Error) as exc:
        editor.preprocess(EditorData(background=payload, layers=[], composite=payload))
    assert exc.value.message.startswith("Source: notes.txt is not an image")
    good = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(good)
    assert mask.preprocess(FileData(path=str(good), orig_name="ok.png")).shape == (8, 8, 3)


def test_the_gpu_panel_reads_nvml_and_is_empty_without_it(tmp_path, monkeypatch):
    """No NVML here: no rows (the panel is hidden). A stand-in `pynvml` with two GPUs (this machine has none to
    read) gives one row per GPU with its numbers."""
    import sys
    import types

    from app import gpu_panel

    monkeypatch.setitem(sys.modules, "pynvml", None)  # as on a machine without nvidia-ml-py
    assert gpu_panel.rows(str(tmp_path)) == []
    nv = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100", NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=50 * h),
        nvmlDeviceGetTemperature=lambda h, kind: 40 + h)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    assert gpu_panel.rows(str(tmp_path)) == [[0, "NVIDIA H100", 0, "1.0 / 80.0", 40, ""],
                                             [1, "NVIDIA H100", 50, "2.0 / 80.0", 41, ""]]


def test_export_and_hub_push_say_in_one_line_what_is_missing(tmp_path, monkeypatch):
    """Without calligrapher_rl.export (another branch's module) Export says so; a push names what it lacks (the
    repository id, the network, a token), and the model card it would upload names the run's method and eval."""
    import importlib.util
    import json

    from app import export_views

    run = tmp_path / "r1"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "ip-adapter-ema.safetensors").write_bytes(b"x")
    (run / "run.json").write_text(json.dumps({"rl_method": "grpo", "rewards": "ocr:1.0", "seed": 3}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "phase": "rl", "time": 0, "eval/reward/mean": 0.5,
                                                   "eval/reward/mean_lo": 0.4, "eval/reward/mean_hi": 0.6,
                                                   "eval/n": 64}) + "\n")
    choice = "r1/checkpoint-2/ip-adapter-ema.safetensors"
    if importlib.util.find_spec("calligrapher_rl.export") is None:
        out, msg = export_views.export(str(tmp_path), choice, "release")
        assert out is None and msg.startswith("⚠ Export: `python -m calligrapher_rl.export` is not in this installation")
    assert export_views.push(str(tmp_path), choice, "no-slash", None).startswith("⚠ Hub repository: expected USER/NAME")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert export_views.push(str(tmp_path), choice, "me/adapter", "t").startswith("⚠ Hub push: HF_HUB_OFFLINE is set")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no saved token
    assert export_views.push(str(tmp_path), choice, "me/adapter", "").startswith("⚠ Hub token: none given")
    card = export_views.model_card(str(run), str(run / "checkpoint-2"), True)
    assert "# r1 · checkpoint-2 (EMA)" in card and "| rl_method | `grpo` |" in card
    assert "reward 0.500 (95% interval 0.400 to 0.600, 64 samples)" in card


def test_the_dataset_tab_shows_the_tiny_presets_data(tmp_path):
    """The Dataset tab follows the preset (tiny-grpo trains on bundled-glyphs): that name must show its examples."""
    from app.data_views import DataViews

    out = DataViews(str(tmp_path)).show("bundled-glyphs", 1)
    assert "4 usable entries" in out["data_msg"] and len(out["data_gallery"]) == 12
