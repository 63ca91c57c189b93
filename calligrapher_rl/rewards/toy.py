"""Cheap rewards with exact, closed-form values: for tests, the CPU demo and sanity checks of the loop.

- ``fidelity``: 1 - mean |generated - source| over the masked pixels (all channels) / 255; it rewards
  reproducing the ground-truth text image, so a tiny model can visibly learn it. NaN without a source.
- ``brightness``: the mean grey level of the masked pixels in [0, 1]; trivially learnable, which makes
  it the reward of choice for "does RL move the policy at all" checks.
An empty mask has no pixels to average: NaN (not 0), since nothing was measured.
"""

from __future__ import annotations

import numpy as np

from .base import NAN, PerSampleReward, RewardSample, mask_array
from .registry import register_reward


@register_reward("fidelity")
class FidelityReward(PerSampleReward):
    name = "fidelity"
    requires = ("source",)

    def score_one(self, sample: RewardSample) -> float:
        if sample.source is None:
            return NAN
        m = mask_array(sample)
        if sample.source.size != sample.image.size:
            raise ValueError(f"source size {sample.source.size} != image size {sample.image.size}")
        if not m.any():
            return NAN
        gen = np.asarray(sample.image.convert("RGB"), dtype=np.float64)[m]
        src = np.asarray(sample.source.convert("RGB"), dtype=np.float64)[m]
        return 1.0 - float(np.abs(gen - src).mean()) / 255.0


@register_reward("brightness")
class BrightnessReward(PerSampleReward):
    name = "brightness"

    def score_one(self, sample: RewardSample) -> float:
        m = mask_array(sample)
        if not m.any():
            return NAN
        grey = np.asarray(sample.image.convert("L"), dtype=np.float64)
        return float(grey[m].mean()) / 255.0
