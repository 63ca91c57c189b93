"""Parsing dataset files into entries, collecting every problem with its place.

Three layouts are read:
- a JSON list of objects (places are "entry I", I the 0-based list index),
- JSONL, one object per line (places are "line N", 1-based; blank lines are skipped),
- the release's bench folder: `self_bench.txt` with lines `N-text` beside testN_source.png,
  testN_mask.png, testN_ref.png (in that release the source shows OTHER text than `text`).
A folder holding `data.jsonl` or `data.json` (what `synth` writes) is read as that file.

Parsing never raises for the file's content: it returns (entries, problems) so `validate` can print
all problems and `load_dataset` can raise the first. Problems are UserErrors whose message reads
`FILE line N: FIELD: what is wrong`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

from PIL import Image

from ..errors import UserError
from ..images import crop_to_mask, load_image, load_mask, mask_bbox

DEFAULT_PROMPT = "The text is '{text}'."  # the release's template
PATH_FIELDS = ("source", "mask", "reference")


@dataclass
class Entry:
    loc: str  # "FILE line N" / "FILE entry I": where problems with it are reported
    id: str
    source: str  # resolved paths
    mask: str
    reference: str | None  # None: the source cropped to the mask's box
    text: str
    prompt: str
    source_shows_text: bool = True
    raw: dict = dataclasses.field(default_factory=dict)  # the fields as written, for messages
    valid: bool = True  # False: it has field problems; kept only so validate can still check its images


def _show(value, limit: int = 80) -> str:
    """A value as one safe line (repr escapes newlines and lone surrogates)."""
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _kind(value) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _isfile(path: str) -> bool:
    try:
        return os.path.isfile(path)
    except (OSError, ValueError):
        return False


def make_entry(obj, loc: str, base: str, problems: list[UserError]) -> Entry | None:
    """Check one decoded entry and append its problems. Returns None for a non-object; otherwise an
    Entry, marked invalid if it had problems (its unusable paths are None)."""
    if not isinstance(obj, dict):
        problems.append(UserError(f"expected an object with source, mask, text; got {_kind(obj)}", where=loc))
        return None
    before = len(problems)
    paths = dict.fromkeys(PATH_FIELDS)
    for name in PATH_FIELDS:
        value = obj.get(name)
        if value is None:
            if name != "reference":
                problems.append(UserError("missing field", where=loc, field=name))
        elif not isinstance(value, str) or not value.strip():
            what = "an empty path" if isinstance(value, str) else _kind(value)
            problems.append(UserError(f"expected a file path, got {what}", where=loc, field=name))
        else:
            if _isfile(os.path.join(base, value)):
                paths[name] = os.path.join(base, value)
            else:
                problems.append(UserError(f"file not found: {_show(value)}", where=loc, field=name))
    text = obj.get("text")
    if text is None:
        problems.append(UserError("missing field", where=loc, field="text"))
    elif not isinstance(text, str):
        problems.append(UserError(f"expected a string, got {_kind(text)}", where=loc, field="text"))
    elif not text.strip():
        problems.append(UserError("empty text", where=loc, field="text"))
    prompt = obj.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        what = "an empty string" if isinstance(prompt, str) else _kind(prompt)
        problems.append(UserError(f"expected a non-empty string or no prompt, got {what}", where=loc, field="prompt"))
    ident = obj.get("id")
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (str, int))):
        problems.append(UserError(f"expected a string, got {_kind(ident)}", where=loc, field="id"))
    valid = len(problems) == before
    if ident is None or not valid:  # stable across runs and orderings: derived from what the entry says
        key = "\0".join(str(obj.get(k)) for k in ("source", "mask", "reference", "text"))
        ident = hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    if valid:
        prompt = DEFAULT_PROMPT.format(text=text) if prompt is None else prompt.replace("{text}", text)
    return Entry(loc, str(ident), paths["source"], paths["mask"], paths["reference"], text, prompt,
                 raw={k: obj.get(k) for k in PATH_FIELDS}, valid=valid)


def _decode(data: bytes, loc: str, problems: list[UserError]) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(UserError(f"bad encoding: not UTF-8 (byte 0x{data[exc.start]:02x} at column "
                                  f"{exc.start + 1})", where=loc))
        return None


def _parse_jsonl(data: bytes, name: str, base: str, problems: list[UserError]) -> list[Entry]:
    entries = []
    for n, line in enumerate(data.split(b"\n"), start=1):
        if n == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if not line.strip():
            continue
        loc = f"{name} line {n}"  # the line is parsed unstripped so reported columns match the file
        text = _decode(line, loc, problems)
        if text is None:
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            problems.append(UserError(f"bad JSON: {_json_reason(exc)}", where=loc))
            continue
        entry = make_entry(obj, loc, base, problems)
        if entry is not None:
            entries.append(entry)
    return entries


def _json_reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} (column {exc.colno})"
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split("\n")[0][:120]


def _parse_json_list(data: bytes, name: str, base: str, problems: list[UserError]) -> list[Entry]:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problems.append(UserError(f"bad encoding: not UTF-8 (byte 0x{data[exc.start]:02x})",
                                  where=f"{name} line {line}"))
        return []
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        where = f"{name} line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else name
        problems.append(UserError(f"bad JSON: {_json_reason(exc)}", where=where))
        return []
    if not isinstance(obj, list):
        problems.append(UserError(f"expected a JSON list of entries, got {_kind(obj)}", where=name))
        return []
    entries = [make_entry(item, f"{name} entry {i}", base, problems) for i, item in enumerate(obj)]
    return [e for e in entries if e is not None]


def _parse_bench(data: bytes, name: str, base: str, problems: list[UserError]) -> list[Entry]:
    entries = []
    for n, line in enumerate(data.split(b"\n"), start=1):
        line = line.strip()
        if n == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        loc = f"{name} line {n}"
        text = _decode(line, loc, problems) if line else None
        if not text:
            continue
        num, sep, words = text.partition("-")
        if not sep or not num.strip().isdigit():
            problems.append(UserError(f"expected 'N-text', got {_show(text)}", where=loc))
            continue
        num = num.strip()
        obj = {"id": f"test{num}", "source": f"test{num}_source.png", "mask": f"test{num}_mask.png",
               "reference": f"test{num}_ref.png", "text": words.strip()}
        entry = make_entry(obj, loc, base, problems)
        entry.source_shows_text = False
        entries.append(entry)
    return entries


def locate(path: str) -> tuple[str, str]:
    """(file to parse, layout) for a dataset path; a folder may hold self_bench.txt or data.jsonl."""
    if os.path.isdir(path):
        for fname, layout in (("self_bench.txt", "bench"), ("data.jsonl", "jsonl"), ("data.json", "json")):
            if os.path.isfile(os.path.join(path, fname)):
                return os.path.join(path, fname), layout
        raise UserError("a dataset folder needs self_bench.txt, data.jsonl or data.json", where=path)
    if os.path.basename(path) == "self_bench.txt":
        return path, "bench"
    return path, "auto"


def parse_entries(path, keep_invalid: bool = False) -> tuple[list[Entry], list[UserError]]:
    """The entries without problems (all entries if keep_invalid), and all problems, of a dataset."""
    try:
        path = os.fspath(path)
        file, layout = locate(path)
        with open(file, "rb") as f:
            data = f.read()
    except UserError as exc:
        return [], [exc]
    except FileNotFoundError:
        return [], [UserError("dataset file not found", where=str(path))]
    except (OSError, ValueError, TypeError) as exc:
        return [], [UserError(f"cannot read the dataset file ({type(exc).__name__})", where=str(path))]
    base = os.path.dirname(os.path.abspath(file))
    problems: list[UserError] = []
    if layout == "bench":
        entries = _parse_bench(data, file, base, problems)
    elif layout == "json" or (layout == "auto" and data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")):
        entries = _parse_json_list(data, file, base, problems)
    else:
        entries = _parse_jsonl(data, file, base, problems)
    if not entries and not problems:
        problems.append(UserError("no entries", where=file))
    return [e for e in entries if keep_invalid or e.valid], problems


def _read(entry: Entry, field: str) -> Image.Image:
    """Open one image of an entry; any failure names the dataset file, the entry and the field."""
    path = getattr(entry, field)
    shown = entry.raw[field]
    if not os.path.isfile(path):
        raise UserError(f"file not found: {_show(shown)}", where=entry.loc, field=field)
    try:
        return load_mask(path, field=field) if field == "mask" else load_image(path, field=field)
    except (UserError, Image.DecompressionBombError):
        raise UserError(f"not a readable image: {_show(shown)}", where=entry.loc, field=field) from None


def _check_pair(entry: Entry, source: Image.Image, mask: Image.Image) -> None:
    if mask.size != source.size:
        raise UserError(f"mask is {mask.size[0]}x{mask.size[1]} but the source is "
                        f"{source.size[0]}x{source.size[1]}", where=entry.loc, field="mask")
    if mask_bbox(mask) is None:
        raise UserError("mask is empty (no white pixels to repaint)", where=entry.loc, field="mask")


def read_entry_images(entry: Entry) -> tuple[Image.Image, Image.Image, Image.Image]:
    """(source RGB, mask L 0/255, reference RGB unpadded) at original size, checked; raises UserError."""
    source = _read(entry, "source")
    mask = _read(entry, "mask")
    _check_pair(entry, source, mask)
    reference = _read(entry, "reference") if entry.reference else crop_to_mask(source, mask)
    return source, mask, reference


def image_problems(entry: Entry) -> list[UserError]:
    """Every image problem of one entry (validate reports them all, not just the first)."""
    problems, images = [], {}
    for field in PATH_FIELDS:
        if getattr(entry, field) is None:  # missing, bad or not found: already reported
            continue
        try:
            images[field] = _read(entry, field)
        except UserError as exc:
            problems.append(exc)
    if "mask" in images:
        try:
            _check_pair(entry, images.get("source", images["mask"]), images["mask"])
        except UserError as exc:
            problems.append(exc)
    return problems
