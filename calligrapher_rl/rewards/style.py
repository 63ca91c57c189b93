"""``style``: does the repainted text look like the reference? Cosine of SigLIP image embeddings.

SigLIP is the image encoder Calligrapher's style adapter itself is conditioned on, so this reward
measures style in the space the adapter consumes. Both sides are prepared the way the release prepares a
style reference: the generated region is cropped to the mask's bbox and centred on a black square; the
reference (an unpadded crop) is centred on a black square too. Embedding = ``pooler_output`` of
``SiglipVisionModel`` (the attention-pooled head), compared by cosine.

Range: we keep the raw cosine in [-1, 1] (identical images -> 1.0) rather than (cos + 1) / 2. SigLIP
image-image cosines sit well above 0 in practice, so the affine map would only halve the reward's
spread against the OCR reward's [0, 1] in a weighted sum; GRPO normalises per group anyway.

A sample without a reference is NaN. Model and processor load from a local folder, offline.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import UserError
from ..images import pad_to_square
from .base import NAN, Reward, RewardSample, logger, region_square
from .registry import register_reward


def load_siglip(siglip_path, device="cpu"):
    """(model, processor) from a local folder; a missing or unreadable folder is a one-line UserError."""
    if not siglip_path:
        raise UserError("the style reward needs a local SigLIP folder", field="--siglip_path")
    path = os.fspath(siglip_path)
    from ..models.hub import is_hub_id, resolve_model

    if is_hub_id(path):  # e.g. google/siglip-so400m-patch14-384: from the local Hugging Face cache
        path = resolve_model(path, "siglip").path
    if not os.path.isdir(path):
        raise UserError("folder not found", where=path, field="--siglip_path")
    from transformers import AutoImageProcessor, SiglipVisionModel

    try:
        model = SiglipVisionModel.from_pretrained(path, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"not a SigLIP vision model + image processor folder ({msg})", where=path,
                        field="--siglip_path") from None
    return model.to(device).eval(), processor


@register_reward("style")
class StyleReward(Reward):
    name = "style"
    requires = ("reference",)

    def __init__(self, siglip_path=None, device="cpu", batch_size: int = 32, model=None, processor=None):
        if model is None or processor is None:
            model, processor = load_siglip(siglip_path, device)
        self.model, self.processor = model, processor
        self.device = next(model.parameters()).device
        self.batch_size = batch_size

    def embed(self, images) -> np.ndarray:
        """L2-normalised pooler embeddings, float64, one row per image, in one forward pass."""
        import torch

        pixel_values = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            emb = self.model(pixel_values=pixel_values.to(self.device, dtype)).pooler_output
        emb = emb.float().cpu().numpy().astype(np.float64)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def score(self, samples: list[RewardSample]) -> list[float]:
        out = [NAN] * len(samples)
        pairs = []
        for i, s in enumerate(samples):
            if s.reference is None:
                continue
            try:
                pairs.append((i, region_square(s), pad_to_square(s.reference.convert("RGB"))))
            except Exception as exc:  # noqa: BLE001 - a malformed sample is NaN, the rest still score
                logger.warning("reward style: sample %d failed: %s: %s", i, type(exc).__name__, exc)
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            emb = self.embed([g for _, g, _ in chunk] + [r for _, _, r in chunk])
            gen, ref = emb[: len(chunk)], emb[len(chunk):]
            for (i, _, _), cos in zip(chunk, (gen * ref).sum(axis=1)):
                out[i] = float(np.clip(cos, -1.0, 1.0))
        return out
