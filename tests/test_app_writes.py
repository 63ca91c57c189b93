"""The studio on the embedded default writes text a reader gets right: the Inference tab's own path
(InferenceService.generate at the tab's defaults, the Scorer behind Compare's table) on unseen glyph pictures."""

from __future__ import annotations

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
