"""Reading and shaping images and masks, with one-line errors on bad input."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError


def load_image(path: str | os.PathLike, *, field: str = "image", mode: str = "RGB") -> Image.Image:
    """Open an image file fully (so a truncated file fails here, not later)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError("file not found", where=path, field=field)
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"not a readable image ({type(exc).__name__})", where=path, field=field) from None


def load_mask(path: str | os.PathLike, *, field: str = "mask") -> Image.Image:
    """A mask as a binary 'L' image (255 = region to repaint). Alpha masks use their alpha channel."""
    im = load_image(path, field=field, mode="RGBA")
    arr = np.asarray(im)
    alpha = arr[..., 3]
    gray = np.asarray(im.convert("L"))
    # A mask drawn as a transparent layer carries the stroke in alpha; a plain mask is white on black.
    src = alpha if alpha.min() < 255 and gray.max() == gray.min() else gray
    return Image.fromarray(((src > 127) * 255).astype(np.uint8), mode="L")


def binarize_mask(mask: Image.Image) -> Image.Image:
    arr = np.asarray(mask.convert("L"))
    return Image.fromarray(((arr > 127) * 255).astype(np.uint8), mode="L")


def pad_to_square(image: Image.Image, fill=(0, 0, 0)) -> Image.Image:
    """The release's style input: the reference centred on a black square."""
    w, h = image.size
    side = max(w, h)
    out = Image.new(image.mode, (side, side), fill if image.mode == "RGB" else 0)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def mask_bbox(mask: Image.Image) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the white region, or None for an empty mask."""
    return binarize_mask(mask).getbbox()


def crop_to_mask(image: Image.Image, mask: Image.Image) -> Image.Image:
    box = mask_bbox(mask)
    return image.crop(box) if box else image.copy()


def to_numpy(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
