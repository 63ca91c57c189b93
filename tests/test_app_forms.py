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
from app.runs import tail
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
