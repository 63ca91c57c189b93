"""Rewards for generated text images: OCR correctness, SigLIP style similarity, cheap toy rewards, an
optional VLM judge, and a server/client pair to compute any of them remotely.

The trainer uses ``build_rewards("ocr:0.7,style:0.3", siglip_path=...)`` -> :class:`RewardSet`. Importing
this package is cheap: heavy engines (onnxruntime, transformers) load when a reward is constructed.
"""

from .base import NAN, Reward, RewardError, RewardSample, logger
from .registry import RewardSet, available_rewards, build_rewards, make_reward, parse_spec, register_reward

# Importing the reward modules registers them.
from . import ocr, style, toy, vlm  # noqa: E402,F401  isort: skip

__all__ = [
    "NAN", "Reward", "RewardError", "RewardSample", "RewardSet", "available_rewards", "build_rewards",
    "logger", "make_reward", "parse_spec", "register_reward",
]
