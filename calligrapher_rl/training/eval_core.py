"""The evaluation every part of the project uses (the run's periodic eval, `python -m calligrapher_rl.evaluate`,
the studio's Compare): ODE samples of a fixed set of examples x K initial noises, the same noises for every
checkpoint, and per-sample measurements.

Sample (i, k) = example i with initial noise k, drawn from its own generator `stream_seed(seed, EVAL_STREAM,
i, k)`: its noise depends neither on the batch it is sampled in nor on how many examples or noises the set
has, so a larger eval set extends a smaller one, and two checkpoints see exactly the same noises.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..sampling import rollout
from .batches import EVAL_STREAM, ConditionCache, fail_nonfinite_images, mask_pil, stream_seed, to_pil


@dataclass(frozen=True)
class EvalSettings:
    noises: int = 16  # initial noises per example
    seed: int = 0  # of the noises (and of the VAE posterior samples of the conditions)
    steps: int = 4  # ODE steps
    guidance: float = 30.0
    scale: float = 1.0  # style strength (0 for the base weights)
    max_examples: int | None = None  # the first N examples of the set (None: all)
    batch_size: int = 64  # samples per rollout (memory)


class EvalSet:
    """The examples x noises of one evaluation, with their conditions computed once (they do not depend on the
    adapter): sample j is (example j // noises, noise j % noises)."""

    def __init__(self, stack, dataset, settings: EvalSettings, conditions: ConditionCache | None = None):
        self.stack, self.settings = stack, settings
        n = len(dataset) if settings.max_examples is None else min(settings.max_examples, len(dataset))
        self.conditions = conditions or ConditionCache(stack, dataset, settings.seed, capacity=max(512, n))
        self.pairs = [(i, k) for i in range(n) for k in range(settings.noises)]
        self.items = [self.conditions.batch([i]).items[0] for i in range(n)]  # fills the cache too

    @property
    def groups(self) -> np.ndarray:
        """The example of every sample (the bootstrap's strata)."""
        return np.array([i for i, _ in self.pairs])

    def sample_items(self) -> list[dict]:
        return [self.items[i] for i, _ in self.pairs]

    @torch.no_grad()
    def sample(self, *, scale: float | None = None, params=None, autocast=None) -> tuple[list[Image.Image], np.ndarray]:
        """(images, finite flags) of every sample with the stack's current adapter (or `params`)."""
        s = self.settings
        images, finite = [], []
        for start in range(0, len(self.pairs), s.batch_size):
            chunk = self.pairs[start:start + s.batch_size]
            batch = self.conditions.batch([i for i, _ in chunk])
            gens = [torch.Generator().manual_seed(stream_seed(s.seed, EVAL_STREAM, i, k)) for i, k in chunk]
            with (autocast or contextlib.nullcontext)():
                ro = rollout(self.stack, batch.fill, batch.text, batch.image_embeds, num_steps=s.steps,
                             guidance=s.guidance, generator=gens, scale=s.scale if scale is None else scale,
                             params=params, quantized=True)
            decoded = self.stack.decode(ro.final, batch.fill.height, batch.fill.width)
            finite.append(torch.isfinite(decoded.float()).flatten(1).all(1).cpu().numpy())
            images += to_pil(decoded)
        return images, np.concatenate(finite)


def reward_samples(items: list[dict], images: list[Image.Image]):
    from ..rewards.base import RewardSample

    return [RewardSample(image=im, mask=mask_pil(it["mask"]), text=it["text"], reference=it["reference"],
                         source=to_pil(it["source"][None])[0]) for im, it in zip(images, items)]


def preservation(images: list[Image.Image], items: list[dict]) -> dict[str, np.ndarray]:
    """How much the inpainting changed what it must keep: over the pixels outside the mask, the mean absolute
    difference to the source (0-1 scale; lower is better) and the PSNR in dB (capped at 100; higher is better)."""
    mae, psnr = [], []
    for im, it in zip(images, items):
        out = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
        src = (it["source"].permute(1, 2, 0).cpu().numpy().astype(np.float64) + 1.0) / 2.0
        keep = (it["mask"][0].cpu().numpy() <= 0.5)
        if not keep.any():
            mae.append(np.nan), psnr.append(np.nan)
            continue
        diff = out[keep] - src[keep]
        mae.append(float(np.abs(diff).mean()))
        mse = float((diff ** 2).mean())
        psnr.append(100.0 if mse <= 1e-10 else min(100.0, 10 * np.log10(1.0 / mse)))
    return {"preservation_mae": np.array(mae), "preservation_psnr": np.array(psnr)}


class Measures:
    """Per-sample measurements beyond the training rewards: OCR reading, its reward score, exact match and
    normalised edit distance; SigLIP style similarity to the reference (when a SigLIP folder is given); the
    preservation of the unmasked region. Engines load once."""

    def __init__(self, siglip_path: str | None = None, device: str = "cpu", style: bool = True):
        from ..rewards.ocr import OcrReward

        self.ocr = OcrReward()
        self.style = None
        if style and siglip_path:
            from ..rewards.style import StyleReward

            self.style = StyleReward(siglip_path=siglip_path, device=device)

    def measure(self, images: list[Image.Image], items: list[dict], finite=None) -> tuple[dict, list[str]]:
        """({metric: per-sample array}, OCR readings). A non-finite image fails every metric (NaN)."""
        from ..rewards.ocr import ocr_crop, text_score
        from .eval_stats import normalized_edit_distance

        samples = reward_samples(items, images)
        reads = [self.ocr.recognize(ocr_crop(s)) for s in samples]
        out = {"ocr": np.array([text_score(r, s.text) for r, s in zip(reads, samples)]),
               "ocr_exact": np.array([float(normalized_edit_distance(r, s.text) == 0.0) for r, s in zip(reads, samples)]),
               "ocr_edit_distance": np.array([normalized_edit_distance(r, s.text) for r, s in zip(reads, samples)])}
        if self.style is not None:
            out["style"] = np.asarray(self.style.score(samples), dtype=np.float64)
        out.update(preservation(images, items))
        if finite is not None:
            out = fail_nonfinite_images(out, finite)
        return out, reads
