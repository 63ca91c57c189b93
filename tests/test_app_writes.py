"""The studio on the embedded default writes text a reader gets right: the Inference tab's own path
(InferenceService.generate at the tab's defaults, the Scorer behind Compare's table) on unseen glyph pictures."""

from __future__ import annotations

import sys

import numpy as np
import torch

from app.inference import InferenceService, Inputs, Scorer, dataset_example
from calligrapher_rl.data.synth import GLYPH_CHARS, render_sample
from calligrapher_rl.models.stack import resolve_model_paths
from calligrapher_rl.models.tiny import PRETRAINED_NAME, resolve_adapter_name


def test_inference_on_the_embedded_default_writes_the_text():
    torch.set_num_threads(1)
    service, scorer = InferenceService(), Scorer()
    adapter = resolve_adapter_name(PRETRAINED_NAME)  # what a run's step-0 checkpoint holds
    siglip_dir = resolve_model_paths(PRETRAINED_NAME, PRETRAINED_NAME)[1]  # as Compare resolves it
    # short texts of synth seed 0 (never seen in pretraining): the model writes these right most of the time
    samples = [s for s in (render_sample(i, 0, 64, "glyphs") for i in range(40)) if len(s.text) <= 2][:6]
    scores = []
    for s in samples:
        inputs = Inputs(source=s.source, mask=s.mask, text=s.text, reference=s.reference, steps=4, seed=56,
                        num_images=2)
        images, _ = service.generate(PRETRAINED_NAME, PRETRAINED_NAME, adapter, inputs)
        assert [im.size for im in images] == [(64, 64)] * 2
        scores += [row["ocr"] for row in scorer.score(images, inputs, siglip_dir)]
    assert np.mean(scores) >= 0.5, scores  # measured 0.79 (12 images; random tiny: 0)


def test_the_inference_tabs_example_is_the_default_models_task():
    tiny = dataset_example(0, PRETRAINED_NAME)
    assert len(tiny["text"]) == 4 and set(tiny["text"]) <= set(GLYPH_CHARS)  # bundled-glyphs
    words = dataset_example(0, "/models/FLUX.1-Fill-dev")  # a real model: the bundled word dataset
    assert not set(words["text"]) <= set(GLYPH_CHARS), words["text"]


def test_compare_without_the_ocr_package_shows_images_and_says_why_scores_are_missing(tmp_path, monkeypatch):
    """A GPU server set up for training only may lack the OCR engine: Compare still paints and shows the style
    scores, its OCR columns read '—', and one line says what to install (never a traceback in the tab)."""
    from app.infer_views import NONE, InferViews

    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # importing it now fails as if not installed
    s = render_sample(0, 0, 64, "glyphs")
    mask = np.asarray(s.mask.convert("L"))
    brush = np.zeros((*mask.shape, 4), dtype=np.uint8)
    brush[..., 3] = np.where(mask > 127, 255, 0)
    source = np.asarray(s.source.convert("RGB"))
    editor = {"background": source, "layers": [brush], "composite": source}
    views = InferViews(str(tmp_path))
    got = views.compare(NONE, None, None, None, PRETRAINED_NAME, PRETRAINED_NAME, editor, None,
                        np.asarray(s.reference.convert("RGB")), s.text, 4, 30.0, 1.0, 56, 1, None, False)
    assert got["cmp_msg"].startswith("✓ 1 checkpoint(s)"), got["cmp_msg"]
    assert "rapidocr_onnxruntime is not installed" in got["cmp_msg"] and "OCR —" in got["cmp_msg"]
    assert len(got["cmp_gallery"]) == 1 and "| — |" in got["cmp_scores"]
