"""``ocr``: does the repainted region read as the target text? (PP-OCRv4 through rapidocr-onnxruntime)

The weights ship inside the rapidocr_onnxruntime wheel (``rapidocr_onnxruntime/models/*.onnx``) and the
engine never touches the network, so this works offline.

Pipeline per sample: crop the generated image to the mask's bbox, padded by a fifth of its height (the
model's text often overflows a tight mask); upscale crops lower than 64 px so the recogniser, which
works at 48 px line height, does not read blurry upsampled strokes of tiny text; then detection +
recognition. The detector runs with ``limit_type=max`` (native size up to 960 px) instead of the
package default (upscale the short side to 736 px), which is ~15x faster on text crops with the same
accuracy on rendered words. If the detector finds nothing, the recogniser alone reads the whole crop,
keeping a graded signal for half-formed text; its output counts only above the usual 0.5 confidence.
The engine's onnxruntime sessions run on the calling thread (``intra_op_num_threads=1``): onnxruntime's
default pool (one spinning thread per core) made scoring 128 tiny-model crops take 10.5 s of CPU for 5.3 s
of wall on 2 cores, against 4.2 s of CPU and 4.1 s of wall with one thread, same scores (the crops are far
too small to split; the spinning threads also stole the cores from the trainer scoring runs beside).

Score (docs/rl-formulas.md): lowercase, drop whitespace; 1 if the target is contained in the
recognition, else ``1 - min(lev(rec, target), len(target)) / len(target)``. Nothing recognised is a
legitimate 0; an engine exception is NaN.
"""

from __future__ import annotations

import re
import threading

import numpy as np
from PIL import Image

from .base import PerSampleReward, RewardSample, padded_box, region_box
from .registry import register_reward

MIN_CROP_HEIGHT = 64
MAX_SIDE = 960
MIN_CONFIDENCE = 0.5


def normalize(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def text_score(recognized: str, target: str) -> float:
    """The OCR reward formula on two raw strings."""
    from rapidfuzz.distance import Levenshtein

    rec, tgt = normalize(recognized), normalize(target)
    if not tgt:
        return 1.0 if not rec else 0.0
    if tgt in rec:
        return 1.0
    return 1.0 - min(Levenshtein.distance(rec, tgt), len(tgt)) / len(tgt)


def ocr_crop(sample: RewardSample) -> Image.Image:
    """The padded, rescaled region the OCR engine reads."""
    box = region_box(sample)
    pad = max(4, (box[3] - box[1]) // 5)
    crop = sample.image.convert("RGB").crop(padded_box(box, sample.image.size, pad))
    w, h = crop.size
    # Upscale low crops, but never past MAX_SIDE (a wide line would only be shrunk back by the detector).
    scale = min(max(1.0, MIN_CROP_HEIGHT / h), max(1.0, MAX_SIDE / max(w, h)))
    if scale != 1.0:
        crop = crop.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    return crop


@register_reward("ocr")
class OcrReward(PerSampleReward):
    """One engine per reward object; calls are serialised by a lock because RapidOCR mutates its own
    state per call (the detector's preprocessing op), which is not safe to share across threads."""

    name = "ocr"

    def __init__(self):
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR(det_limit_type="max", det_limit_side_len=MAX_SIDE, intra_op_num_threads=1,
                               inter_op_num_threads=1)
        self._lock = threading.Lock()

    def recognize(self, image: Image.Image) -> str:
        """Text read in ``image`` (lines joined by spaces in reading order); '' if none."""
        arr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])  # engine wants BGR
        with self._lock:
            result, _ = self.engine(arr)
            if result:
                return " ".join(str(r[1]) for r in result)
            result, _ = self.engine(arr, use_det=False, use_cls=False)
        if result and float(result[0][1]) >= MIN_CONFIDENCE:
            return str(result[0][0])
        return ""

    def score_one(self, sample: RewardSample) -> float:
        return text_score(self.recognize(ocr_crop(sample)), sample.text)
