"""`python -m calligrapher_rl.data validate` lists every problem with its place, and nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]


def _validate(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calligrapher_rl.data", "validate", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture()
def images(tmp_path) -> Path:
    src = Image.new("RGB", (48, 32), (250, 250, 250))
    ImageDraw.Draw(src).text((6, 8), "Ab", fill=(0, 0, 0))
    src.save(tmp_path / "src.png")
    mask = Image.new("L", (48, 32), 0)
    ImageDraw.Draw(mask).rectangle((4, 6, 30, 24), fill=255)
    mask.save(tmp_path / "mask.png")
    Image.new("L", (40, 40), 255).save(tmp_path / "small_mask.png")
    Image.new("L", (48, 32), 0).save(tmp_path / "empty_mask.png")
    (tmp_path / "notimage.png").write_text("this is not a PNG")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "src.png").read_bytes()[:60])
    return tmp_path


def _line(**fields) -> bytes:
    base = {"source": "src.png", "mask": "mask.png", "text": "Hello"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def test_validate_lists_every_fault(images):
    lines = [
        _line(),                                                 # 1 good
        _line(source="missing.png"),                             # 2 missing file
        _line(source="notimage.png"),                            # 3 unreadable image
        _line(mask="small_mask.png"),                            # 4 mask size differs
        _line(mask="empty_mask.png"),                            # 5 empty mask
        _line(text="   "),                                       # 6 empty text
        b'{"source": "src.png", "mask": "mask.png", "text": "caf\xe9"}',  # 7 Latin-1, not UTF-8
        b'{"source": "src.png", "mask": "mask.png", "text": ',   # 8 bad JSON
        _line(mask=...),                                         # 9 missing field
        b"",                                                     # 10 blank: skipped
        _line(reference="truncated.png", text=7),               # 11 two problems in one entry
        _line(prompt="Write '{text}' in gold"),                  # 12 good, custom prompt
    ]
    path = images / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    run = _validate(path)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    p = str(path)
    assert run.stdout.splitlines() == [
        f"{p} line 2: source: file not found: 'missing.png'",
        f"{p} line 3: source: not a readable image: 'notimage.png'",
        f"{p} line 4: mask: mask is 40x40 but the source is 48x32",
        f"{p} line 5: mask: mask is empty (no white pixels to repaint)",
        f"{p} line 6: text: empty text",
        f"{p} line 7: bad encoding: not UTF-8 (byte 0xe9 at column 55)",
        f"{p} line 8: bad JSON: Expecting value (column 51)",
        f"{p} line 9: mask: missing field",
        f"{p} line 11: text: expected a string, got a number",
        f"{p} line 11: reference: not a readable image: 'truncated.png'",
    ]
    assert run.stderr.strip() == f"10 problem(s) found in {p}"


def test_validate_reports_all_image_problems_of_an_entry(images):
    path = images / "data.jsonl"
    path.write_bytes(_line(source="notimage.png", mask="empty_mask.png", reference="truncated.png") + b"\n")
    run = _validate(path)
    assert run.returncode == 1
    assert run.stdout.splitlines() == [
        f"{path} line 1: source: not a readable image: 'notimage.png'",
        f"{path} line 1: reference: not a readable image: 'truncated.png'",
        f"{path} line 1: mask: mask is empty (no white pixels to repaint)",
    ]


def test_validate_json_list_and_file_faults(images):
    path = images / "data.json"
    path.write_text(json.dumps([{"source": "src.png", "mask": "mask.png", "text": "ok"}, "oops",
                                {"source": 3, "mask": "mask.png", "text": "x", "prompt": ""}], indent=1))
    run = _validate(path)
    assert run.returncode == 1
    assert run.stdout.splitlines() == [
        f"{path} entry 1: expected an object with source, mask, text; got str",
        f"{path} entry 2: source: expected a file path, got a number",
        f"{path} entry 2: prompt: expected a non-empty string or no prompt, got an empty string",
    ]
    path.write_bytes(b'[\n{"source": "src.png",\n "text": "\xff"}]')
    assert _validate(path).stdout.splitlines() == [f"{path} line 3: bad encoding: not UTF-8 (byte 0xff)"]
    path.write_text('[\n{"source": "src.png",\n "text": }]')
    assert _validate(path).stdout.splitlines() == [f"{path} line 3: bad JSON: Expecting value (column 10)"]
    run = _validate(images / "nowhere.jsonl")
    assert run.returncode == 1 and run.stdout.strip() == f"{images / 'nowhere.jsonl'}: dataset file not found"
    (images / "empty.jsonl").write_text("\n\n")
    assert _validate(images / "empty.jsonl").stdout.strip() == f"{images / 'empty.jsonl'}: no entries"


def test_validate_good_file_exits_zero(images):
    path = images / "data.jsonl"
    path.write_bytes(b"\n".join([_line(), _line(reference="src.png", id="x"), _line(text="\u00e9t\u00e9")]))
    run = _validate(path)
    assert run.returncode == 0, run.stdout
    assert run.stdout.strip() == f"ok: 3 entries checked in {path}, no problems"
