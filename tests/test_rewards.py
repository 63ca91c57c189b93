"""Local rewards: OCR, style (tiny random SigLIP), toy rewards, the --rewards spec, RewardSet, the CLI."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from calligrapher_rl.errors import UserError
from calligrapher_rl.rewards import (
    RewardError,
    RewardSample,
    RewardSet,
    available_rewards,
    build_rewards,
    make_reward,
    parse_spec,
)
from calligrapher_rl.rewards.base import PerSampleReward, Reward
from calligrapher_rl.rewards.ocr import text_score

ROOT = Path(__file__).resolve().parents[1]
DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf"


def fonts():
    out = [ImageFont.load_default(size=40)]  # scalable (Pillow >= 10.1, FreeType), always present
    if os.path.exists(DEJAVU):
        out.append(ImageFont.truetype(DEJAVU, 36))
    return out


def render(word, font=None, size=(400, 160), fg=(20, 20, 20), bg=(235, 235, 235), at=(60, 50)):
    """A text image and the mask of the text's box grown by 8 px (as a user would draw it)."""
    font = font or ImageFont.load_default(size=40)
    im = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(im)
    d.text(at, word, font=font, fill=fg)
    l, t, r, b = d.textbbox(at, word, font=font)
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((l - 8, t - 8, r + 8, b + 8), fill=255)
    return im, mask


# ---------------------------------------------------------------- OCR

@pytest.fixture(scope="module")
def ocr():
    return make_reward("ocr")


def test_ocr_weights_ship_in_the_wheel_and_nothing_is_downloaded(monkeypatch):
    import rapidocr_onnxruntime

    models = Path(rapidocr_onnxruntime.__file__).parent / "models"
    assert len(list(models.glob("*.onnx"))) == 3

    def no_network(*a, **k):
        raise AssertionError("the OCR reward tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    reward = make_reward("ocr")
    im, mask = render("offline")
    assert reward.score([RewardSample(im, mask, "offline")]) == [1.0]


def test_ocr_right_text_scores_high_wrong_text_low(ocr):
    words = ["garden", "Sunset", "coffee", "OPEN", "market", "neon 42"]
    for font in fonts():
        samples, wrong = [], []
        for i, w in enumerate(words):
            im, mask = render(w, font)
            samples.append(RewardSample(im, mask, w))
            wrong.append(RewardSample(im, mask, words[(i + 1) % len(words)]))
        right_scores, wrong_scores = ocr.score(samples), ocr.score(wrong)
        assert min(right_scores) >= 0.9, right_scores
        assert max(wrong_scores) <= 0.5, wrong_scores


def test_ocr_small_text_in_a_large_image_is_upscaled_and_read(ocr):
    im, mask = render("tiny", ImageFont.load_default(size=14), size=(512, 512), at=(300, 400))
    assert ocr.score([RewardSample(im, mask, "tiny")]) == [1.0]


def test_ocr_nothing_recognised_is_zero_not_nan(ocr):
    im = Image.new("RGB", (200, 100), (235, 235, 235))
    assert ocr.score([RewardSample(im, Image.new("L", im.size, 255), "hello")]) == [0.0]


def test_ocr_engine_exception_is_nan(ocr, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("onnx exploded")

    monkeypatch.setattr(ocr, "engine", boom)
    im, mask = render("hello")
    assert math.isnan(ocr.score([RewardSample(im, mask, "hello")])[0])


def test_ocr_is_thread_safe(ocr):
    samples = [RewardSample(*render(w), w) for w in ["alpha", "bravo"]]
    expected = ocr.score(samples)
    results = []
    threads = [threading.Thread(target=lambda: results.append(ocr.score(samples))) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == [expected] * 3


def test_text_score_formula():
    assert text_score("Hello World", "helloworld") == 1.0
    assert text_score("xx hello xx", "hello") == 1.0  # contained
    assert text_score("hallo", "hello") == pytest.approx(0.8)
    assert text_score("", "hello") == 0.0
    assert text_score("completely different", "abc") == 0.0  # distance capped at len(target)


# ---------------------------------------------------------------- style

@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A tiny random SigLIP saved like a real one, so the real loading-by-path code runs."""
    import torch
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=64, patch_size=8)
    path = tmp_path_factory.mktemp("siglip")
    SiglipVisionModel(cfg).save_pretrained(path)
    SiglipImageProcessor(size={"height": 64, "width": 64}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def style(siglip_dir):
    return make_reward("style", siglip_path=siglip_dir)


def test_style_identical_image_is_one(style):
    im, mask = render("garden")
    ref = im.crop(mask.getbbox())
    assert style.score([RewardSample(im, mask, "garden", reference=ref)])[0] == pytest.approx(1.0, abs=1e-5)


def test_style_prefers_the_reference_colour_scheme(style):
    # A random-weight SigLIP cannot tell fonts apart reliably (measured over 6 seeds: the same font won
    # ~50% of pairs), but it does separate colour schemes by a wide margin (>= 0.11 over 10 seeds) when
    # region and reference have the same shape (with different aspect ratios the black square padding
    # dominates a random encoder). So: same-sized regions, a different word, three colour schemes.
    words = ["garden", "market", "bread", "neon"]
    for i, w in enumerate(words):
        ref = render(words[(i + 1) % 4])[0]
        full = Image.new("L", ref.size, 255)
        same = RewardSample(render(w)[0], full, w, reference=ref)
        inverted = RewardSample(render(w, fg=(235, 235, 235), bg=(20, 20, 20))[0], full, w, reference=ref)
        red_blue = RewardSample(render(w, fg=(200, 30, 30), bg=(30, 30, 160))[0], full, w, reference=ref)
        s = style.score([same, inverted, red_blue])
        assert s[0] > s[1] + 0.05 and s[0] > s[2] + 0.05, s


def test_style_batch_equals_one_by_one_and_missing_reference_is_nan(style):
    samples = []
    for i, w in enumerate(["garden", "Sunset", "coffee"]):
        im, mask = render(w, fg=(40 * i, 20, 20))
        samples.append(RewardSample(im, mask, w, reference=render("ref")[0]))
    samples.insert(1, RewardSample(*render("none"), "none"))
    batch = style.score(samples)
    assert math.isnan(batch[1])
    single = [style.score([s])[0] for s in samples]
    np.testing.assert_allclose(np.delete(batch, 1), np.delete(single, 1), atol=1e-5)


def test_style_needs_a_readable_siglip_folder(tmp_path):
    with pytest.raises(UserError, match="--siglip_path"):
        make_reward("style")
    with pytest.raises(UserError, match="folder not found"):
        make_reward("style", siglip_path=tmp_path / "missing")
    with pytest.raises(UserError, match="not a SigLIP"):
        make_reward("style", siglip_path=tmp_path)


# ---------------------------------------------------------------- toy rewards

def test_fidelity_and_brightness_exact_values():
    src = Image.new("RGB", (4, 4), (100, 100, 100))
    gen = Image.new("RGB", (4, 4), (100, 100, 100))
    gen.paste((151, 151, 151), (0, 0, 2, 4))  # left half differs by 51 = 0.2 * 255
    mask = Image.new("L", (4, 4), 0)
    mask.paste(255, (0, 0, 2, 2))  # top-left 2x2 only: inside the changed half
    fid, bright = make_reward("fidelity"), make_reward("brightness")
    assert fid.score([RewardSample(gen, mask, "x", source=src)]) == [pytest.approx(0.8)]
    assert fid.score([RewardSample(gen, Image.new("L", (4, 4), 255), "x", source=src)]) == [pytest.approx(0.9)]
    assert math.isnan(fid.score([RewardSample(gen, mask, "x")])[0])  # no source
    assert bright.score([RewardSample(gen, mask, "x")]) == [pytest.approx(151 / 255)]
    assert bright.score([RewardSample(gen, Image.new("L", (4, 4), 255), "x")]) == [pytest.approx(125.5 / 255)]
    assert math.isnan(bright.score([RewardSample(gen, Image.new("L", (4, 4), 0), "x")])[0])  # empty mask
    assert math.isnan(bright.score([RewardSample(gen, Image.new("L", (5, 5), 255), "x")])[0])  # size mismatch


# ---------------------------------------------------------------- spec, RewardSet

def test_parse_spec_and_its_errors():
    assert parse_spec("ocr:0.7,style:0.3") == {"ocr": 0.7, "style": 0.3}
    assert parse_spec(" brightness , fidelity:2") == {"brightness": 1.0, "fidelity": 2.0}
    assert set(available_rewards()) >= {"ocr", "style", "fidelity", "brightness", "vlm"}
    for bad, msg in [("ocrr:1", "unknown reward 'ocrr'.*valid: brightness"), ("ocr:abc", "weight 'abc'"),
                     ("ocr:nan", "not a finite"), ("", "no reward"), ("ocr,,style", "empty entry"),
                     ("ocr,ocr:2", "twice")]:
        with pytest.raises(UserError, match=msg) as exc:
            build_rewards(bad)
        assert str(exc.value).startswith("--rewards: ")


class Const(Reward):
    def __init__(self, values):
        self.values = values

    def score(self, samples):
        return list(self.values)


def test_reward_set_weighted_total_nan_and_async():
    samples = [RewardSample(*render("a"), "a")] * 3
    rs = RewardSet({"a": Const([1.0, 0.5, float("nan")]), "b": Const([0.0, 1.0, 1.0])}, {"a": 0.7, "b": 0.3})
    out = rs.score(samples)
    assert list(out) == ["a", "b", "total"]
    np.testing.assert_allclose(out["total"][:2], [0.7, 0.65])
    assert math.isnan(out["total"][2])  # a NaN component is never summed away
    fut = rs.score_async(samples)
    np.testing.assert_array_equal(fut.result(timeout=10)["b"], out["b"])
    rs.close()


def test_reward_set_whole_batch_failures_raise_reward_error():
    class Crash(Reward):
        def score(self, samples):
            raise RuntimeError("cuda died")

    samples = [RewardSample(*render("a"), "a")] * 2
    with pytest.raises(RewardError, match="crash failed on the batch.*cuda died"):
        RewardSet({"crash": Crash()}, {"crash": 1.0}).score(samples)
    with pytest.raises(RewardError, match="1 scores for 2"):
        RewardSet({"short": Const([1.0])}, {"short": 1.0}).score(samples)


def test_per_sample_reward_turns_one_exception_into_one_nan(caplog):
    class Picky(PerSampleReward):
        name = "picky"

        def score_one(self, s):
            if s.text == "bad":
                raise ValueError("nope")
            return 0.25

    samples = [RewardSample(*render("a"), t) for t in ["ok", "bad", "ok"]]
    out = Picky().score(samples)
    assert out[0] == out[2] == 0.25 and math.isnan(out[1])
    assert "picky: sample 1 failed" in caplog.text


def test_build_rewards_local_end_to_end():
    im, mask = render("Sunset")
    with build_rewards("ocr:0.5,brightness:0.5") as rs:
        out = rs.score([RewardSample(im, mask, "Sunset")])
    assert out["ocr"][0] == 1.0
    assert out["total"][0] == pytest.approx(0.5 + 0.5 * out["brightness"][0])


# ---------------------------------------------------------------- CLI

def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "calligrapher_rl.rewards", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_score_cli_prints_one_json_object(tmp_path, siglip_dir):
    im, mask = render("Sunset")
    im.save(tmp_path / "im.png")
    mask.save(tmp_path / "mask.png")
    im.crop(mask.getbbox()).save(tmp_path / "ref.png")
    r = run_cli("score", "--reward", "ocr", "--image", str(tmp_path / "im.png"), "--mask", str(tmp_path / "mask.png"),
                "--text", "Sunset")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"ocr": 1.0}
    r = run_cli("score", "--reward", "style", "--image", str(tmp_path / "im.png"), "--mask",
                str(tmp_path / "mask.png"), "--text", "x", "--reference", str(tmp_path / "ref.png"),
                "--siglip_path", siglip_dir)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["style"] == pytest.approx(1.0, abs=1e-5)
    r = run_cli("score", "--reward", "fidelity", "--image", str(tmp_path / "im.png"), "--text", "x",
                "--source", str(tmp_path / "im.png"))
    assert (r.returncode, r.stdout.strip()) == (0, '{"fidelity": 1.0}')


def test_score_cli_bad_input_is_one_line_exit_2(tmp_path):
    im, mask = render("x")
    im.save(tmp_path / "im.png")
    mask.resize((10, 10)).save(tmp_path / "small.png")
    (tmp_path / "junk.png").write_text("not an image")
    cases = [
        (["--reward", "nope", "--image", str(tmp_path / "im.png"), "--text", "x"], "--reward: unknown reward 'nope'"),
        (["--reward", "ocr", "--image", str(tmp_path / "missing.png"), "--text", "x"], "file not found"),
        (["--reward", "ocr", "--image", str(tmp_path / "junk.png"), "--text", "x"], "not a readable image"),
        (["--reward", "ocr", "--image", str(tmp_path / "im.png"), "--text", "x", "--mask", str(tmp_path / "small.png")],
         "does not match"),
        (["--reward", "style", "--image", str(tmp_path / "im.png"), "--text", "x"], "--siglip_path"),
        (["--reward", "fidelity", "--image", str(tmp_path / "im.png"), "--text", "x"], "--source"),
        (["--image", str(tmp_path / "im.png")], "required"),
    ]
    for args, msg in cases:
        r = run_cli("score", *args)
        assert r.returncode == 2 and r.stdout == "", (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)
