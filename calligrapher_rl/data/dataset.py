"""Training samples for Calligrapher: (target with text, mask, style reference, text).

Roles, because the earlier fork swapped them and fed a black style crop:
- `source` is the picture WITH the text: the target the model should reproduce inside the mask.
- `masked_source` = source * (1 - mask) in [-1, 1] space: the model's input, text blanked to 0, exactly
  as diffusers' FluxFillPipeline builds its masked image.
- `reference` is the style input: a given reference image, or else the source cropped to the mask's
  bounding box in ORIGINAL coordinates, before any resize or crop (so it can never be cropped away
  into black), then padded to a square with black as the release does.

The file formats (a JSON list, JSONL, or the release's bench folder) are parsed, and an entry's images
read and checked, in `entries.py`, which `validate.py` shares so both agree on what is a problem.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError
from ..images import mask_bbox, pad_to_square
from .entries import Entry, parse_entries, read_entry_images


def _check_resolution(resolution) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 16 or resolution % 16:
        raise UserError(f"expected a positive multiple of 16, got {resolution!r}", field="resolution")
    return resolution


def _axis_offset(length: int, side: int, b0: float, b1: float, rng: np.random.Generator | None) -> int:
    """Where a window of `side` starts on an axis of `length` so that [b0, b1) stays inside if it can."""
    if length <= side:
        return 0
    lo, hi = max(0, math.ceil(b1 - side)), min(length - side, math.floor(b0))
    centred = round((b0 + b1) / 2 - side / 2)
    if lo > hi:  # the box is longer than the window: centre on it
        return min(max(centred, 0), length - side)
    if rng is not None:
        return int(rng.integers(lo, hi + 1))
    return min(max(centred, lo), hi)


def fit_square(source: Image.Image, mask: Image.Image, side: int, rng: np.random.Generator | None = None):
    """Resize the shorter side to `side`, then crop a square keeping the mask's box inside where possible.

    The source is resized bicubically, the mask with NEAREST and thresholded, both with the same box, so
    they stay aligned. A mask too thin to survive NEAREST falls back to an area resize (any coverage
    counts), so a valid sample never loses its hole.
    """
    w, h = source.size
    scale = side / min(w, h)
    sw, sh = max(side, round(w * scale)), max(side, round(h * scale))
    left, top, right, bottom = mask_bbox(mask)
    x0 = _axis_offset(sw, side, left * sw / w, right * sw / w, rng)
    y0 = _axis_offset(sh, side, top * sh / h, bottom * sh / h, rng)
    box = (x0, y0, x0 + side, y0 + side)
    src = source.resize((sw, sh), Image.BICUBIC).crop(box)
    m = np.asarray(mask.resize((sw, sh), Image.NEAREST).crop(box)) > 127
    if not m.any():
        m = np.asarray(mask.resize((sw, sh), Image.BOX).crop(box)) > 0
    return src, m


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> float [3, H, W] in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


class TextImageDataset(Dataset):
    """Items: source [3,R,R] in [-1,1] (the target, WITH text), mask [1,R,R] in {0,1} (1 = repaint),
    masked_source [3,R,R] (the model input), reference (PIL RGB square, black padding), text, prompt,
    index, id, source_shows_text (False for the release's bench, whose source shows other text).

    Crops are centred on the mask by default (stable evaluation); with random_crop=True the window is
    drawn from a generator seeded by (seed, epoch, index), so a run is reproducible and `set_epoch`
    varies it between epochs.
    """

    def __init__(self, entries: list[Entry], resolution: int = 512, random_crop: bool = False,
                 seed: int = 0, path: str = ""):
        self.entries = entries
        self.path = path
        self.resolution = _check_resolution(resolution)
        self.random_crop = bool(random_crop)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        index = range(len(self.entries))[index]  # negative indices too; IndexError past the end
        entry = self.entries[index]
        source, mask, reference = read_entry_images(entry)
        rng = np.random.default_rng([abs(self.seed), self.epoch, index]) if self.random_crop else None
        src, m = fit_square(source, mask, self.resolution, rng)
        source_t = to_tensor(src)
        mask_t = torch.from_numpy(m.astype(np.float32))[None]
        return {
            "source": source_t,
            "mask": mask_t,
            "masked_source": source_t * (1.0 - mask_t),
            "reference": pad_to_square(reference.convert("RGB")),
            "text": entry.text,
            "prompt": entry.prompt,
            "index": index,
            "id": entry.id,
            "source_shows_text": entry.source_shows_text,
        }


def collate_fn(items: list[dict]) -> dict:
    """Stack tensors (and ints/bools into tensors); keep PIL images and strings as lists."""
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (bool, int)) and not isinstance(values[0], str):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


def load_dataset(path: str | os.PathLike, resolution: int = 512, random_crop: bool = False,
                 seed: int = 0) -> TextImageDataset:
    """Parse a dataset file or folder ("bundled" = the default synthetic set) into a Dataset.

    Field and file-existence problems are found here; image content is checked when an item is read
    (and by `python -m calligrapher_rl.data validate`, which checks everything).
    """
    from . import resolve_dataset_path

    _check_resolution(resolution)
    path = resolve_dataset_path(path)
    entries, problems = parse_entries(path)
    if problems:
        more = f" (and {len(problems) - 1} more; run `python -m calligrapher_rl.data validate {path}`)"
        raise UserError(str(problems[0]) + (more if len(problems) > 1 else ""))
    return TextImageDataset(entries, resolution=resolution, random_crop=random_crop, seed=seed, path=str(path))
