"""Data roles, geometry, collation, bench layout, synth reproducibility, the bundled default set.

The role tests exist because an earlier fork swapped target and style crop and fed a black crop: here
the target must show the text inside the mask, the model input must not, and the reference must
show ink of the sample's own colour.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from calligrapher_rl.data import collate_fn, ensure_default_dataset, load_dataset, resolve_dataset_path, synthesize
from calligrapher_rl.data.fonts import DEFAULT_FONT, FONT_DIR, FONTS, available_fonts
from calligrapher_rl.errors import UserError
from calligrapher_rl.images import pad_to_square

ROOT = Path(__file__).resolve().parents[1]
RES = 128


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, n=6, resolution=RES, seed=1)
    return out


def _ink(arr: np.ndarray, colour, tol: int = 40) -> np.ndarray:
    return np.abs(arr.astype(int) - np.array(colour)).max(axis=-1) <= tol


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    return ((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def test_roles_target_input_reference(synth_dir):
    ds = load_dataset(synth_dir / "data.jsonl", resolution=RES)
    rows = [json.loads(line) for line in (synth_dir / "data.jsonl").read_text().splitlines()]
    assert len(ds) == len(rows) == 6
    for i, row in enumerate(rows):
        item = ds[i]
        colour = row["style"]["colour"]
        src, mask, inp = item["source"], item["mask"], item["masked_source"]
        assert src.shape == (3, RES, RES) and inp.shape == (3, RES, RES) and mask.shape == (1, RES, RES)
        assert src.dtype == torch.float32 and src.min() >= -1 and src.max() <= 1
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        inside = mask[0].bool().numpy()
        # target: the text's ink is inside the mask, and nowhere outside it
        ink = _ink(_to_uint8(src), colour)
        assert (ink & inside).sum() >= 5, row["text"]
        assert (ink & ~inside).sum() == 0
        # model input: the masked region is exactly 0 (mid-grey in [-1, 1]), the rest is the target
        assert torch.all(inp[:, mask[0].bool()] == 0)
        assert torch.equal(inp[:, ~mask[0].bool()], src[:, ~mask[0].bool()])
        assert torch.equal(inp, src * (1 - mask))
        # reference: a square RGB picture, not black, with ink of the sample's colour, of another word
        ref = item["reference"]
        assert isinstance(ref, Image.Image) and ref.mode == "RGB" and ref.width == ref.height
        ref_arr = np.asarray(ref)
        assert ref_arr.mean() > 5 and _ink(ref_arr, colour).sum() >= 5
        assert row["reference_text"].lower() != row["text"].lower()
        assert item["text"] == row["text"] and item["prompt"] == f"The text is '{row['text']}'."
        assert item["id"] == row["id"] and item["index"] == i and item["source_shows_text"] is True


def test_batch_of_three_collates(synth_dir):
    ds = load_dataset(synth_dir, resolution=64)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_fn)))
    assert batch["source"].shape == (3, 3, 64, 64) and batch["masked_source"].shape == (3, 3, 64, 64)
    assert batch["mask"].shape == (3, 1, 64, 64)
    assert batch["index"].tolist() == [0, 1, 2]
    assert len(batch["reference"]) == 3 and all(isinstance(r, Image.Image) for r in batch["reference"])
    assert len(batch["text"]) == len(batch["prompt"]) == len(batch["id"]) == 3
    assert all(m.sum() > 0 for m in batch["mask"])  # masks survive the resize


def test_matches_diffusers_fill_preprocessing(synth_dir):
    """masked_source is what FluxFillPipeline computes: image in [-1,1] times (1 - binarized mask)."""
    image_processor = pytest.importorskip("diffusers.image_processor")
    item = load_dataset(synth_dir, resolution=RES)[0]
    src_pil = Image.fromarray(_to_uint8(item["source"]))
    mask_pil = Image.fromarray((item["mask"][0].numpy() * 255).astype(np.uint8))
    image = image_processor.VaeImageProcessor(vae_scale_factor=16).preprocess(src_pil)
    mask = image_processor.VaeImageProcessor(vae_scale_factor=16, do_normalize=False, do_binarize=True,
                                             do_convert_grayscale=True).preprocess(mask_pil)
    assert torch.allclose(image[0], item["source"], atol=1e-5)
    assert torch.equal(mask[0], item["mask"])
    assert torch.allclose(image[0] * (1 - mask[0]), item["masked_source"], atol=1e-5)


def _wide_sample(tmp: Path) -> Path:
    """A 320x80 picture with a word at the far right: a centre crop would cut it away."""
    src = Image.new("RGB", (320, 80), (230, 230, 230))
    ImageDraw.Draw(src).rectangle((262, 22, 309, 57), fill=(200, 20, 20))  # the "text"
    mask = Image.new("L", (320, 80), 0)
    ImageDraw.Draw(mask).rectangle((258, 18, 313, 61), fill=255)
    src.save(tmp / "wide.png")
    mask.save(tmp / "wide_mask.png")
    (tmp / "d.json").write_text(json.dumps([{"source": "wide.png", "mask": "wide_mask.png", "text": "Hi"}]))
    return tmp / "d.json"


def test_reference_defaults_to_crop_in_original_coordinates(tmp_path):
    path = _wide_sample(tmp_path)
    src = Image.open(tmp_path / "wide.png").convert("RGB")
    item = load_dataset(path, resolution=32)[0]
    expected = pad_to_square(src.crop((258, 18, 314, 62)))
    assert np.array_equal(np.asarray(item["reference"]), np.asarray(expected))
    assert _ink(np.asarray(item["reference"]), (200, 20, 20), 0).sum() == 48 * 36
    # the square crop followed the mask to the right edge, so the hole and the red ink are both there
    assert item["mask"].sum() > 0
    assert _ink(_to_uint8(item["source"]), (200, 20, 20), 60)[item["mask"][0].bool().numpy()].any()


def test_random_crop_is_seeded_and_keeps_mask(tmp_path):
    path = _wide_sample(tmp_path)
    a = load_dataset(path, resolution=48, random_crop=True, seed=5)
    b = load_dataset(path, resolution=48, random_crop=True, seed=5)
    assert torch.equal(a[0]["source"], b[0]["source"])
    crops = set()
    for epoch in range(6):
        a.set_epoch(epoch)
        item = a[0]
        assert item["mask"].sum() > 0
        crops.add(hashlib.sha1(item["source"].numpy().tobytes()).hexdigest())
    assert len(crops) > 1


def test_bench_layout_loads(tmp_path):
    for n, colour in ((1, (10, 120, 200)), (7, (200, 60, 10))):
        src = Image.new("RGB", (96, 64), (240, 240, 220))
        ImageDraw.Draw(src).text((20, 20), "old", fill=colour)
        src.save(tmp_path / f"test{n}_source.png")
        mask = Image.new("L", (96, 64), 0)
        ImageDraw.Draw(mask).rectangle((16, 16, 60, 40), fill=255)
        mask.save(tmp_path / f"test{n}_mask.png")
        Image.new("RGB", (40, 20), colour).save(tmp_path / f"test{n}_ref.png")
    (tmp_path / "self_bench.txt").write_text("1-Hello World\n\n7-e-mail\n", encoding="utf-8")
    for path in (tmp_path, tmp_path / "self_bench.txt"):
        ds = load_dataset(path, resolution=32)
        assert len(ds) == 2
        first, second = ds[0], ds[1]
        assert (first["id"], first["text"]) == ("test1", "Hello World")
        assert (second["id"], second["text"]) == ("test7", "e-mail")
        assert first["prompt"] == "The text is 'Hello World'."
        assert first["source_shows_text"] is False  # the bench's source shows other text
        assert first["reference"].size == (40, 40)
        assert np.asarray(first["reference"])[20, 20].tolist() == [10, 120, 200]
        assert len(collate_fn([first, second])["text"]) == 2


def test_user_errors_name_file_entry_field(tmp_path):
    path = _wide_sample(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "wide.png", "mask": "wide_mask.png", "text": "ok"}\n'
                   '{"source": "wide.png", "mask": "nope.png", "text": "x"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl line 2: mask: file not found: 'nope\.png'"):
        load_dataset(bad)
    with pytest.raises(UserError, match=r"d\.json entry 0: text"):
        path.write_text(json.dumps([{"source": "wide.png", "mask": "wide_mask.png", "text": " "}]))
        load_dataset(path)
    Image.new("L", (10, 10), 0).save(tmp_path / "empty.png")
    path.write_text(json.dumps([{"source": "wide.png", "mask": "empty.png", "text": "a"}]))
    ds = load_dataset(path)
    with pytest.raises(UserError, match=r"entry 0: mask: mask is 10x10 but the source is 320x80"):
        ds[0]
    with pytest.raises(UserError, match="resolution"):
        load_dataset(path, resolution=50)


def test_synth_is_reproducible(tmp_path):
    def digest(folder: Path) -> dict:
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    cmd = [sys.executable, "-m", "calligrapher_rl.data", "synth", "--n", "4", "--resolution", "64"]
    run = subprocess.run(cmd + ["--out", str(tmp_path / "a"), "--seed", "7"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    synthesize(tmp_path / "b", n=4, resolution=64, seed=7)
    synthesize(tmp_path / "c", n=4, resolution=64, seed=8)
    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert len(a) == 4 * 3 + 1 and a == b
    assert a["data.jsonl"] != c["data.jsonl"]
    assert a["images/s7-000000_source.png"] != c["images/s8-000000_source.png"]
    # sample i does not depend on --n
    synthesize(tmp_path / "d", n=2, resolution=64, seed=7)
    assert digest(tmp_path / "d")["images/s7-000001_source.png"] == a["images/s7-000001_source.png"]


def test_synth_variety_and_fonts():
    from calligrapher_rl.data.synth import render_sample

    assert len(available_fonts()) == len(FONTS) >= 3 and DEFAULT_FONT not in available_fonts()
    total = sum(p.stat().st_size for p in FONT_DIR.iterdir())
    assert total < 2 * 1024 * 1024
    samples = [render_sample(i, seed=0, resolution=64) for i in range(60)]
    texts = [s.text for s in samples]
    assert all(1 <= len(t) <= 12 for t in texts)
    assert any(t.isupper() for t in texts) and any(t.islower() for t in texts) and any(t.istitle() for t in texts)
    assert any(ch.isdigit() for t in texts for ch in t) and any(not ch.isalnum() for t in texts for ch in t)
    assert len({s.style["font"] for s in samples}) >= 3
    assert {s.style["background"]["kind"] for s in samples} == {"flat", "gradient", "noise"}
    assert any(s.style["angle"] for s in samples)


def test_synth_bad_arguments_are_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "calligrapher_rl.data", "synth", "--out", str(tmp_path),
                          "--n", "2", "--resolution", "50"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == ["error: --resolution: expected a multiple of 16, at least 32, got 50"]


def test_bundled_default_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("CALLIGRAPHER_RL_CACHE", str(tmp_path / "cache"))
    path = ensure_default_dataset(resolution=64, n=3)
    assert Path(path).is_file() and path.startswith(str(tmp_path / "cache"))
    mtime = Path(path).stat().st_mtime_ns
    assert ensure_default_dataset(resolution=64, n=3) == path and Path(path).stat().st_mtime_ns == mtime
    assert not [p for p in Path(path).parent.parent.iterdir() if p.name.startswith(".")]  # no temp left
    assert resolve_dataset_path("bundled") == ensure_default_dataset()
    ds = load_dataset("bundled", resolution=64)
    assert len(ds) == 16 and ds[0]["source"].shape == (3, 64, 64)
