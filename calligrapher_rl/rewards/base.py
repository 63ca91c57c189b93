"""The reward interface the trainer relies on, and the small image helpers every reward shares.

Failure policy (see docs/rl-formulas.md): a reward that could not be computed must never look
like a legitimate 0, because a 0 enters the group-normalised advantages and silently pushes the policy.
So a per-sample failure is ``float('nan')`` (the trainer drops or masks it) and a failure of the whole
batch raises :class:`RewardError`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image

from ..errors import UserError
from ..images import binarize_mask, mask_bbox, pad_to_square

logger = logging.getLogger("calligrapher_rl.rewards")

NAN = float("nan")
# A reward beyond this magnitude is a broken scorer, not a signal: |r| = 1e308 overflows every statistic
# (the mean, the std, the advantages) while still looking finite. It counts as failed (NaN), like inf.
REWARD_ABS_LIMIT = 1e6


class RewardError(UserError):
    """A whole batch could not be scored (a server down, a model that failed to load, ...).

    It subclasses UserError so that a command run through ``cli_main`` reports it as one line (e.g.
    "reward server http://...: not reachable") instead of a traceback; the cause is in the message.
    """


@dataclass
class RewardSample:
    image: Image.Image  # the generated full image, RGB
    mask: Image.Image  # 'L', 255 = the repainted text region
    text: str  # the target text
    reference: Image.Image | None = None  # style reference (unpadded crop)
    source: Image.Image | None = None  # ground-truth source image (for fidelity)


class Reward:
    """Base class: ``score`` maps a batch to one float per sample, NaN where that sample failed.

    ``requires`` names the optional sample fields a reward cannot work without (the CLI checks them
    up front so a user gets a one-line error rather than a null score).
    """

    name: str = "reward"
    requires: ClassVar[tuple[str, ...]] = ()

    def score(self, samples: list[RewardSample]) -> list[float]:
        raise NotImplementedError

    def close(self) -> None:  # release engines / sessions; optional
        pass


def sanitize_scores(values, name: str) -> list[float]:
    """Scores as floats, with every non-finite or out-of-range (|r| > REWARD_ABS_LIMIT) one made NaN, i.e.
    failed: counted by the trainer's failure statistics and its pause, never used in an update. Logged."""
    out, bad = [], []
    for i, v in enumerate(values):
        try:
            f = float(v) if v is not None else NAN
        except (TypeError, ValueError, OverflowError):  # float(10**400) overflows
            f = math.inf
        if math.isfinite(f) and abs(f) <= REWARD_ABS_LIMIT:
            out.append(f)
            continue
        if not math.isnan(f):
            bad.append((i, v))
        out.append(NAN)
    if bad:
        i, v = bad[0]
        logger.warning("reward %s: %d score(s) non-finite or beyond +-%g counted as failed (e.g. sample %d: %r)",
                       name, len(bad), REWARD_ABS_LIMIT, i, v)
    return out


class PerSampleReward(Reward):
    """A reward computed one sample at a time; an exception on one sample makes only that one NaN.

    The exception is logged (with the reward's name and the sample's index) so the NaN is explained.
    """

    def score_one(self, sample: RewardSample) -> float:
        raise NotImplementedError

    def score(self, samples: list[RewardSample]) -> list[float]:
        out = []
        for i, s in enumerate(samples):
            try:
                out.append(float(self.score_one(s)))
            except Exception as exc:  # noqa: BLE001 - any per-sample failure becomes NaN, logged
                logger.warning("reward %s: sample %d failed: %s: %s", self.name, i, type(exc).__name__, exc)
                out.append(NAN)
        return sanitize_scores(out, self.name)


def region_box(sample: RewardSample) -> tuple[int, int, int, int]:
    """The mask's bounding box in the generated image; the whole image for an empty mask."""
    if sample.mask.size != sample.image.size:
        raise ValueError(f"mask size {sample.mask.size} != image size {sample.image.size}")
    box = mask_bbox(sample.mask)
    return box if box else (0, 0, *sample.image.size)


def padded_box(box, size, pad: int) -> tuple[int, int, int, int]:
    """``box`` grown by ``pad`` pixels on every side, clipped to an image of ``size``."""
    l, t, r, b = box
    w, h = size
    return max(0, l - pad), max(0, t - pad), min(w, r + pad), min(h, b + pad)


def region_square(sample: RewardSample) -> Image.Image:
    """The generated region as the style encoder sees references: cropped, centred on black."""
    return pad_to_square(sample.image.convert("RGB").crop(region_box(sample)))


def mask_array(sample: RewardSample) -> np.ndarray:
    """Boolean mask (True = repainted) matching the image size."""
    if sample.mask.size != sample.image.size:
        raise ValueError(f"mask size {sample.mask.size} != image size {sample.image.size}")
    return np.asarray(binarize_mask(sample.mask)) > 0


def nan_to_none(values) -> list[float | None]:
    """JSON has no NaN: a failed score travels as null."""
    return [None if (v is None or not math.isfinite(float(v))) else float(v) for v in values]
