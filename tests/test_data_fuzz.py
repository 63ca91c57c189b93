"""Fuzz: whatever a dataset file holds, the loader fails only with a one-line UserError, and it agrees
with `validate` (no problems reported <=> every item loads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from calligrapher_rl.data import load_dataset
from calligrapher_rl.data.validate import check_dataset
from calligrapher_rl.errors import UserError

FILES = ["good.png", "good_mask.png", "alpha_mask.png", "small_mask.png", "empty_mask.png", "notimage.png",
         "truncated.png", "gray16.png", "palette.png", "tiny.png", "tiny_mask.png", "dir"]
ODD_PATHS = ["missing.png", "", " ", "../good.png", "sub/../good.png", "/etc/passwd", "/", "\x00",
             "a\ud800.png", "C:\\x.png", "good.png\n", "ｇｏｏｄ.png", "x" * 300]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    src = Image.new("RGB", (40, 24), (240, 240, 240))
    ImageDraw.Draw(src).rectangle((8, 6, 20, 16), fill=(10, 10, 10))
    src.save(d / "good.png")
    mask = Image.new("L", (40, 24), 0)
    ImageDraw.Draw(mask).rectangle((6, 4, 22, 18), fill=255)
    mask.save(d / "good_mask.png")
    alpha = Image.new("RGBA", (40, 24), (0, 0, 0, 0))
    ImageDraw.Draw(alpha).rectangle((1, 1, 3, 3), fill=(255, 255, 255, 255))
    alpha.save(d / "alpha_mask.png")
    Image.new("L", (24, 40), 255).save(d / "small_mask.png")
    Image.new("L", (40, 24), 0).save(d / "empty_mask.png")
    (d / "notimage.png").write_text("not an image")
    (d / "truncated.png").write_bytes((d / "good.png").read_bytes()[:70])
    Image.fromarray(np.full((24, 40), 40000, dtype=np.uint16)).save(d / "gray16.png")
    src.convert("P").save(d / "palette.png")
    Image.new("RGB", (1, 1), (5, 5, 5)).save(d / "tiny.png")
    Image.new("L", (1, 1), 255).save(d / "tiny_mask.png")
    (d / "dir").mkdir()
    (d / "sub").mkdir()
    return d


json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**20) | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=6)
paths = st.sampled_from(FILES) | st.sampled_from(ODD_PATHS) | st.text(max_size=12) | json_values
texts = st.sampled_from(["Hello", "", "   ", "a\nb", "é✓", "{text}", "\ud800", "x" * 500]) | json_values
GOOD_SOURCES = ["good.png", "palette.png", "gray16.png"]
GOOD_MASKS = ["good_mask.png", "alpha_mask.png"]
wild_entries = st.fixed_dictionaries(
    {},
    optional={"source": paths, "mask": paths, "reference": paths, "text": texts, "prompt": texts,
              "id": json_values, "extra": json_values},
) | json_values


@st.composite
def near_good_entries(draw) -> dict:
    """A valid entry with a few fields deleted or replaced, so both loading and failing get exercised."""
    entry = {"source": draw(st.sampled_from(GOOD_SOURCES + ["tiny.png"])),
             "mask": draw(st.sampled_from(GOOD_MASKS + ["tiny_mask.png"])),
             "text": draw(st.sampled_from(["Hello", "é✓", "{text}", "a'b\\"])),
             "reference": draw(st.sampled_from([None, "good.png", "tiny.png"]))}
    # a 1x1 source goes with the 1x1 mask; other pairs are 40x24
    if (entry["source"] == "tiny.png") != (entry["mask"] == "tiny_mask.png"):
        entry["mask"] = "tiny_mask.png" if entry["source"] == "tiny.png" else "good_mask.png"
    for key in draw(st.sets(st.sampled_from(["source", "mask", "reference", "text", "prompt", "id", "extra"]),
                            max_size=2)):
        if draw(st.booleans()) and key in entry:
            del entry[key]
        else:
            entry[key] = draw(texts if key in ("text", "prompt") else json_values if key in ("id", "extra")
                              else paths)
    return entry


entries = near_good_entries() | near_good_entries() | near_good_entries() | wild_entries


def _dump(value, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def dataset_files(draw) -> bytes:
    items = draw(st.lists(entries, min_size=1, max_size=4))
    ascii_only = draw(st.booleans())
    layout = draw(st.sampled_from(["jsonl", "jsonl", "json", "json", "raw"]))
    if layout == "json":
        return _dump(items, ascii_only)
    lines = [_dump(item, ascii_only) for item in items]
    if layout == "raw":  # splice in arbitrary bytes: bad encodings, broken JSON, BOMs, CRs
        for _ in range(draw(st.integers(1, 3))):
            junk = draw(st.binary(max_size=12) | st.sampled_from([b"\xef\xbb\xbf", b"\r", b"[", b"{", b"\xff"]))
            lines.insert(draw(st.integers(0, len(lines))), junk)
    return b"\n".join(lines)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(content=dataset_files(), name=st.sampled_from(["d.jsonl", "d.json", "self_bench.txt"]),
       resolution=st.sampled_from([16, 32]))
def test_loader_only_raises_user_errors(folder, content, name, resolution):
    path = folder / name
    path.write_bytes(content)
    loaded_all = True
    try:
        ds = load_dataset(path, resolution=resolution)
        for i in range(len(ds)):
            try:
                item = ds[i]
            except UserError as exc:
                assert "\n" not in str(exc) and str(path) in str(exc)
                loaded_all = False
                continue
            assert item["source"].shape == (3, resolution, resolution)
            assert item["mask"].sum() > 0 and item["text"].strip()
            assert item["reference"].width == item["reference"].height
    except UserError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        loaded_all = False
    problems, _ = check_dataset(path)
    assert all("\n" not in p and p.startswith(str(path)) for p in problems)
    assert (not problems) == loaded_all, problems
