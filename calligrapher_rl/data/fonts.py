"""The typefaces the synthetic data set draws with.

The fonts are vendored under `calligrapher_rl/assets/fonts/` (licences beside them) rather than taken
from the system, because a fresh machine may have no fonts at all and because the synthetic data must be
byte-identical for a seed: a system font that differs between machines would change every pixel.
Layout uses Pillow's BASIC engine for the same reason (libraqm may or may not be present).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from PIL import ImageFont

FONT_DIR = Path(__file__).resolve().parent.parent / "assets" / "fonts"


@dataclass(frozen=True)
class FontSpec:
    name: str  # a short stable name, written into data.jsonl
    file: str  # file name under FONT_DIR
    licence: str
    kind: str  # sans / serif / mono / hand / display: for variety, and for readers of data.jsonl


FONTS: tuple[FontSpec, ...] = (
    FontSpec("dejavu-sans-bold", "DejaVuSans-Bold-Latin1.ttf", "Bitstream Vera (DejaVu)", "sans"),
    FontSpec("dejavu-serif-italic", "DejaVuSerif-Italic-Latin1.ttf", "Bitstream Vera (DejaVu)", "serif"),
    FontSpec("dejavu-sans-mono", "DejaVuSansMono-Latin1.ttf", "Bitstream Vera (DejaVu)", "mono"),
    FontSpec("amatic-sc-bold", "AmaticSC-Bold.ttf", "SIL OFL 1.1", "hand"),
    FontSpec("fredoka-one", "FredokaOne-Regular.ttf", "SIL OFL 1.1", "display"),
    FontSpec("intuitive", "Intuitive.ttf", "SIL OFL 1.1", "hand"),
)

# Pillow's built-in scalable font (Pillow >= 10.1): the last resort if the assets were stripped.
DEFAULT_FONT = "pillow-default"


def available_fonts() -> list[str]:
    """Names of the fonts that can be loaded here, in a fixed order (the order seeds depend on)."""
    names = [f.name for f in FONTS if (FONT_DIR / f.file).is_file()]
    return names or [DEFAULT_FONT]


@functools.lru_cache(maxsize=256)
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A font at a pixel size. Unknown or missing fonts fall back to Pillow's default font."""
    size = max(4, int(size))
    for spec in FONTS:
        path = FONT_DIR / spec.file
        if spec.name == name and path.is_file():
            return ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.BASIC)
    return ImageFont.load_default(size)
