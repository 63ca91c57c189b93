"""A synthetic text data set: words drawn on varied backgrounds, with a mask and a style reference.

Roles (the earlier fork got these wrong, so they are spelled out):
- `source`: the full picture WITH the word drawn in. It is the training target; the model's input is
  this picture with the masked region blanked (the data loader builds that).
- `mask`: white over the word's region (its rotated bounding box, padded a little), black elsewhere.
- `reference`: a DIFFERENT word drawn in the SAME font, size, colour, outline and rotation, on a fresh
  patch of the same background, cropped the way the mask crops the source. It carries the style but not
  the answer: with the answer's own pixels as reference, an OCR reward could be earned by copying the
  reference into the hole instead of writing `text` in its style, and supervised warm-up would learn the
  same shortcut. (A dataset file may still omit `reference`; the loader then uses the source's own crop,
  as the release's self-reference mode does.)

Every sample draws from its own generator seeded by (seed, index), so sample i is the same whatever
`--n` is, and the whole output is byte-identical for a seed (fonts are vendored, layout is Pillow's
BASIC engine, PNGs carry no timestamps).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UserError
from .fonts import available_fonts, load_font

SYNTH_VERSION = 1  # bump when the pictures change, so cached default data sets are rebuilt

WORDS = (
    "open sale coffee hello world river north cafe books music garden studio market light night "
    "dream ocean paper story happy spring winter summer autumn bread pizza hotel metro ticket exit "
    "entry street avenue design vintage golden silver forest stone glass water fire smile quiet "
    "bakery theater cinema museum garage office school planet rocket magic candy royal crown lucky "
    "tiger zebra panda eagle falcon salt pepper lemon mango cherry velvet neon retro urban coast "
    "harbor island valley canyon summit route sunday monday friday menu wine beer tea juice fresh "
    "local daily press print type ink brush letter word craft shop club team city park lake"
).split()
PUNCT_FORMS = ("{w}!", "{w}?", "{w}.", "{w},", "{w}:", "{w}'s", "#{w}", "({w})", "{w}&co", "{w}-{v}")
NUMBER_FORMS = ("{d4}", "${d1}.{d2}", "No.{d1}", "{d2}%", "24/7", "{d1}:{d2}", "+{d2}", "{d3}-{d2}")
CONSONANTS = "bcdfghjklmnprstvwxz"
VOWELS = "aeiouy"

# The `glyphs` task: a task a tiny model can learn and an OCR engine reads at 64 px. 1-4 characters from
# the digits and capitals that no OCR confuses with a digit (no O/I/S/B/Z/G), in the two plainest
# vendored faces, upright, dark-on-light or light-on-dark on a flat background.
GLYPH_CHARS = "0123456789ACEHKLPX"
GLYPH_FONTS = ("dejavu-sans-bold", "dejavu-sans-mono")
TASKS = ("words", "glyphs")


@dataclass
class SynthSample:
    source: Image.Image  # RGB, resolution x resolution, the word drawn in (the target)
    mask: Image.Image  # L, 255 over the word's padded box
    reference: Image.Image  # RGB, a different word in the same style
    text: str
    reference_text: str
    style: dict


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _case(rng: np.random.Generator, word: str) -> str:
    return _pick(rng, (str.upper, str.lower, str.title, str.title))(word)


def random_word(rng: np.random.Generator) -> str:
    """1-12 characters: dictionary words, made-up words, numbers, punctuation, in any case."""
    for _ in range(16):  # redraw rather than cut a word in the middle
        text = _word_once(rng)
        if 1 <= len(text) <= 12:
            return text
    return text[:12].strip() or "A"


def _word_once(rng: np.random.Generator) -> str:
    kind = _pick(rng, ("word", "word", "word", "pseudo", "number", "punct", "mixed", "short"))
    digits = lambda k: "".join(str(int(rng.integers(10))) for _ in range(k))  # noqa: E731
    if kind == "word":
        text = _case(rng, _pick(rng, WORDS))
    elif kind == "pseudo":
        syll = [_pick(rng, CONSONANTS) + _pick(rng, VOWELS) for _ in range(int(rng.integers(1, 5)))]
        text = _case(rng, "".join(syll))
    elif kind == "number":
        form = _pick(rng, NUMBER_FORMS)
        text = form.format(d1=digits(1), d2=digits(2), d3=digits(3), d4=digits(4))
    elif kind == "punct":
        form = _pick(rng, PUNCT_FORMS)
        text = form.format(w=_case(rng, _pick(rng, WORDS)), v=_pick(rng, WORDS))
    elif kind == "mixed":
        text = _case(rng, _pick(rng, WORDS)) + _pick(rng, ("", " ", "-")) + digits(int(rng.integers(1, 4)))
    else:
        text = _case(rng, "".join(_pick(rng, CONSONANTS + VOWELS) for _ in range(int(rng.integers(1, 4)))))
    return text.strip()


def _luma(c) -> float:
    return (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) / 255.0


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _background_params(rng: np.random.Generator) -> dict:
    c1 = _random_colour(rng)
    kind = _pick(rng, ("flat", "gradient", "noise"))
    if kind == "flat":
        return {"kind": kind, "colours": [c1]}
    # the second colour stays near the first in brightness so one text colour contrasts everywhere
    c2 = tuple(int(np.clip(v + rng.integers(-70, 71), 0, 255)) for v in c1)
    if kind == "gradient":
        return {"kind": kind, "colours": [c1, c2], "angle": float(round(rng.uniform(0, 360), 2))}
    return {"kind": kind, "colours": [c1, c2], "cells": int(rng.integers(3, 10)),
            "grain": float(round(rng.uniform(2, 14), 2))}


def make_background(params: dict, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Flat colour, linear gradient, or smooth noise between two colours plus film grain."""
    w, h = size
    c1 = np.array(params["colours"][0], dtype=np.float32)
    if params["kind"] == "flat":
        return Image.new("RGB", size, tuple(int(v) for v in c1))
    c2 = np.array(params["colours"][1], dtype=np.float32)
    if params["kind"] == "gradient":
        a = np.deg2rad(params["angle"])
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * np.cos(a) + yy * np.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:
        cells = params["cells"]
        coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
        t = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    if params["kind"] == "noise":
        img = img + rng.normal(0.0, params["grain"], size=img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def _text_colour(rng: np.random.Generator, bg: dict) -> tuple[int, int, int]:
    mean = np.mean(np.array(bg["colours"], dtype=np.float32), axis=0)
    for _ in range(32):
        c = _random_colour(rng)
        if abs(_luma(c) - _luma(mean)) >= 0.4:
            return c
    return (0, 0, 0) if _luma(mean) > 0.5 else (255, 255, 255)


def render_text(text: str, style: dict) -> Image.Image:
    """The word alone on a transparent RGBA layer, rotated, cropped to its ink."""
    font = load_font(style["font"], style["size"])
    colour = tuple(style["colour"])
    sw = style["stroke_width"]
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=font, stroke_width=sw)
    m = 2 + sw
    # transparent pixels take the text colour so bicubic rotation leaves no dark fringe
    layer = Image.new("RGBA", (x1 - x0 + 2 * m, y1 - y0 + 2 * m), colour + (0,))
    ImageDraw.Draw(layer).text((m - x0, m - y0), text, font=font, fill=colour + (255,),
                               stroke_width=sw, stroke_fill=tuple(style["stroke_colour"]) + (255,))
    if style["angle"]:
        layer = layer.rotate(style["angle"], resample=Image.BICUBIC, expand=True,
                             fillcolor=colour + (0,))
    box = layer.getchannel("A").point(lambda v: 255 if v > 24 else 0).getbbox()
    return layer.crop(box) if box else layer


def _padding(layer: Image.Image) -> int:
    return max(2, round(0.12 * min(layer.size)))


def random_glyphs(rng: np.random.Generator, lo: int = 1, hi: int = 4) -> str:
    return "".join(_pick(rng, GLYPH_CHARS) for _ in range(int(rng.integers(lo, hi + 1))))


def _render_glyphs(rng: np.random.Generator, side: int) -> SynthSample:
    """The `glyphs` task: 1-4 characters, ink about 40% of the side high, at most 85% wide."""
    text = random_glyphs(rng)
    ref_text = random_glyphs(rng, 2, 4)
    while ref_text == text:
        ref_text = random_glyphs(rng, 2, 4)
    light = rng.random() < 0.5
    lo, hi = (170, 256) if light else (0, 86)
    bg_colour = tuple(int(v) for v in rng.integers(lo, hi, size=3))
    colour = tuple(int(v) for v in rng.integers(0, 86, size=3)) if light else \
        tuple(int(v) for v in rng.integers(170, 256, size=3))
    fonts = [f for f in GLYPH_FONTS if f in available_fonts()] or available_fonts()
    font = _pick(rng, fonts)
    bg = {"kind": "flat", "colours": [list(bg_colour)]}
    style = {"font": font, "colour": list(colour), "background": bg, "angle": 0.0,
             "stroke_colour": list(colour), "stroke_width": 0}
    probe = load_font(font, 100)
    pl, pt, pr, pb = probe.getbbox("0" * max(len(text), 2))  # one size per length: a steady glyph height
    size = int(min(100 * 0.85 * side / max(pr - pl, 1), 100 * 0.4 * side / max(pb - pt, 1)))
    style["size"] = max(size, 8)
    layer = render_text(text, style)
    pad = _padding(layer)
    return _compose(layer, pad, side, text, ref_text, style, rng,
                    lambda size: Image.new("RGBA", size, bg_colour + (255,)))


def render_sample(index: int, seed: int = 0, resolution: int = 512, task: str = "words") -> SynthSample:
    """Sample `index` of the data set for `seed` (independent of how many samples are made).

    `task`: `words` (varied words, fonts, backgrounds, rotations) or `glyphs` (see GLYPH_CHARS)."""
    if task not in TASKS:
        raise UserError(f"expected one of {', '.join(TASKS)}, got {task!r}", field="--task")
    rng = np.random.default_rng([seed, index, SYNTH_VERSION])
    if task == "glyphs":
        return _render_glyphs(rng, resolution)
    side = resolution
    text = random_word(rng)
    ref_text = random_word(rng)
    while ref_text.lower() == text.lower() or len(ref_text) < 3:  # a 1-glyph reference shows little style
        ref_text = random_word(rng)
    bg = _background_params(rng)
    colour = _text_colour(rng, bg)
    font = _pick(rng, available_fonts())
    stroke = rng.random() < 0.25
    style = {"font": font, "colour": list(colour), "background": bg,
             "angle": float(round(rng.uniform(-8, 8), 2)) if rng.random() < 0.6 else 0.0,
             "stroke_colour": list(_text_colour(rng, {"colours": [colour]}) if stroke else colour)}
    width_frac = rng.uniform(0.3, 0.85)
    probe = load_font(font, 100)
    pl, pt, pr, pb = probe.getbbox(text)
    size = min(100 * width_frac * side / max(pr - pl, 1), 100 * 0.35 * side / max(pb - pt, 1))
    size = max(int(size), 12, side // 8)  # legible even at the demo's 64 px
    while True:  # shrink until the rotated word and its padding fit the canvas
        style["size"] = size
        style["stroke_width"] = max(1, size // 18) if stroke and size >= 28 else 0
        layer = render_text(text, style)
        pad = _padding(layer)
        if max(layer.size) + 2 * pad <= side or size <= 6:
            break
        size = int(size * 0.9)
    return _compose(layer, pad, side, text, ref_text, style, rng,
                    lambda size: make_background(bg, size, rng).convert("RGBA"))


def _compose(layer, pad: int, side: int, text: str, ref_text: str, style: dict, rng, background) -> SynthSample:
    """Place the rendered text at a random padded spot of a `side` square, its padded box as the mask, and the
    reference text in the same style on its own padded card; `background(size)` paints each RGBA canvas."""
    lw, lh = layer.size
    x = int(rng.integers(pad, max(pad, side - lw - pad) + 1))
    y = int(rng.integers(pad, max(pad, side - lh - pad) + 1))
    canvas = background((side, side))
    canvas.alpha_composite(layer, (x, y))
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).rectangle(
        (max(0, x - pad), max(0, y - pad), min(side, x + lw + pad) - 1, min(side, y + lh + pad) - 1), fill=255)
    ref_layer = render_text(ref_text, style)
    rw, rh = ref_layer.size
    ref = background((rw + 2 * pad, rh + 2 * pad))
    ref.alpha_composite(ref_layer, (pad, pad))
    return SynthSample(canvas.convert("RGB"), mask, ref.convert("RGB"), text, ref_text, style)


def _check_args(n: int, resolution: int, seed: int, task: str = "words") -> None:
    if task not in TASKS:
        raise UserError(f"expected one of {', '.join(TASKS)}, got {task!r}", field="--task")
    if n < 1:
        raise UserError(f"expected at least 1 sample, got {n}", field="--n")
    if resolution < 32 or resolution % 16:
        raise UserError(f"expected a multiple of 16, at least 32, got {resolution}", field="--resolution")
    if seed < 0:
        raise UserError(f"expected a non-negative seed, got {seed}", field="--seed")


def synthesize(out_dir: str | os.PathLike, n: int, resolution: int = 512, seed: int = 0,
               task: str = "words") -> Path:
    """Write DIR/images/{id}_{source,mask,ref}.png and DIR/data.jsonl; return the data.jsonl path."""
    _check_args(n, resolution, seed, task)
    out = Path(out_dir)
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder ({exc.strerror})", where=str(out), field="--out") from None
    lines = []
    for i in range(n):
        s = render_sample(i, seed, resolution, task)
        sid = f"s{seed}-{i:06d}"
        rel = {k: f"images/{sid}_{k}.png" for k in ("source", "mask", "ref")}
        for key, image in (("source", s.source), ("mask", s.mask), ("ref", s.reference)):
            try:
                image.save(out / rel[key], format="PNG")
            except OSError as exc:
                raise UserError(f"cannot write ({exc.strerror or exc})", where=str(out / rel[key]),
                                field="--out") from None
        entry = {"id": sid, "source": rel["source"], "mask": rel["mask"], "reference": rel["ref"],
                 "text": s.text, "reference_text": s.reference_text, "style": s.style}
        lines.append(json.dumps(entry, sort_keys=True, ensure_ascii=False))
    target = out / "data.jsonl"
    tmp = out / ".data.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def synthesize_glyph_set(out_dir: str | os.PathLike, n: int = 4, seed: int = 1, length: int = 4) -> Path:
    """The first `n` examples of exactly `length` characters among `glyphs` samples of `seed` (the tiny presets'
    set: the pretrained tiny writes 4 characters right about a third of the time, so RL has both a signal and
    room to improve; docs/tiny.md)."""
    out = Path(out_dir)
    pool = synthesize(out, n=16 * n, resolution=64, seed=seed, task="glyphs")
    lines = [line for line in pool.read_text(encoding="utf-8").splitlines() if len(json.loads(line)["text"]) == length]
    if len(lines) < n:
        raise UserError(f"only {len(lines)} examples of {length} characters among {16 * n}", field="n")
    tmp = out / ".data.jsonl.tmp"
    tmp.write_text("\n".join(lines[:n]) + "\n", encoding="utf-8")
    os.replace(tmp, pool)
    return pool
