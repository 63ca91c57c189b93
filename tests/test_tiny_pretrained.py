"""The pretrained tiny: shipped in the package, loaded through the real paths, made by a deterministic command."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from calligrapher_rl.data.synth import GLYPH_CHARS, render_sample
from calligrapher_rl.models.stack import CalligrapherStack, resolve_model_paths
from calligrapher_rl.models.tiny import (
    PRETRAINED_DIR,
    PRETRAINED_NAME,
    resolve_adapter_name,
)


def test_shipped_in_the_package_within_25_mb():
    files = [os.path.join(d, f) for d, _, fs in os.walk(PRETRAINED_DIR) for f in fs]
    weights = [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".pth"))]
    assert all(f.endswith(".safetensors") for f in weights), weights
    assert len(weights) == 6  # transformer, vae, two text encoders, siglip, adapter
    assert sum(os.path.getsize(f) for f in files) <= 25 * 2**20


def test_magic_name_resolves_to_the_real_folders():
    flux, siglip = resolve_model_paths(PRETRAINED_NAME, PRETRAINED_NAME)
    assert os.path.isfile(os.path.join(flux, "model_index.json"))
    assert os.path.isfile(os.path.join(siglip, "config.json"))
    adapter = resolve_adapter_name(PRETRAINED_NAME)
    keys = load_file(adapter).keys()
    assert any(k.startswith("attn_adapter.") for k in keys) and any(k.startswith("image_proj_mlp.") for k in keys)
    assert resolve_adapter_name("some/file.bin") == "some/file.bin"


def test_glyph_task_is_deterministic_and_in_its_alphabet():
    a, b = render_sample(7, 3, 64, "glyphs"), render_sample(7, 3, 64, "glyphs")
    assert a.text == b.text and np.array_equal(np.asarray(a.source), np.asarray(b.source))
    texts = [render_sample(i, 0, 64, "glyphs").text for i in range(40)]
    assert all(1 <= len(t) <= 4 and set(t) <= set(GLYPH_CHARS) for t in texts)
    assert {len(t) for t in texts} == {1, 2, 3, 4}


def test_ocr_reads_the_glyph_task_ground_truth():
    from calligrapher_rl.rewards.base import RewardSample
    from calligrapher_rl.rewards.ocr import OcrReward

    ocr = OcrReward()
    samples = [render_sample(i, 0, 64, "glyphs") for i in range(12)]
    scores = [ocr.score_one(RewardSample(image=s.source, mask=s.mask, text=s.text)) for s in samples]
    assert np.mean(scores) >= 0.9, scores


def test_pretrained_writes_where_the_random_tiny_does_not(tmp_path):
    """The shipped model's samples of unseen glyph examples partly read right; the random tiny's never do."""
    from calligrapher_rl.tiny import evaluate_ocr

    torch.set_num_threads(1)
    pretrained = evaluate_ocr(PRETRAINED_NAME, n=16)
    assert pretrained["ocr"] >= 0.05 and pretrained["exact"] > 0, pretrained


def test_pretrain_command_is_deterministic_and_writes_the_tiny_layout(tmp_path):
    from calligrapher_rl.tiny import main

    args = ["pretrain", "--n_data", "8", "--vae_steps", "2", "--dit_steps", "2", "--batch_size", "2",
            "--workers", "1", "--device", "cpu", "--snapshot_steps", "2"]
    for name in ("a", "b"):
        assert main([*args, "--out", str(tmp_path / name), "--seed", "5"]) == 0
    part = "flux-fill/transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "a" / part), load_file(tmp_path / "b" / part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the written folder loads through the real path, adapter included; the snapshot exports to the same weights
    out = tmp_path / "a"
    stack = CalligrapherStack.from_pretrained(str(out / "flux-fill"), str(out / "siglip"),
                                              adapter_path=str(out / "ip-adapter.safetensors"))
    assert stack.adapter.config.num_style_tokens == 8
    assert main(["export", "--snapshot", str(out / "weights-step2.safetensors"), "--out", str(tmp_path / "c"),
                 "--seed", "5"]) == 0
    c = load_file(tmp_path / "c" / part)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_pretrain_rejects_bad_input_in_one_line(tmp_path):
    from calligrapher_rl.errors import UserError
    from calligrapher_rl.tiny import main

    with pytest.raises(UserError, match="--dit_steps"):
        main(["pretrain", "--out", str(tmp_path), "--dit_steps", "0"])
    with pytest.raises(UserError, match="--snapshot"):
        main(["export", "--snapshot", str(tmp_path / "none.safetensors"), "--out", str(tmp_path)])
