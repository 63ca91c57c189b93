"""The RL math, as pure functions of tensors: sampler-step log-probabilities (``sde``), the GRPO (with
GRPO-Guard's ratio normalisation), DiffusionNFT and AWM losses, group-relative advantages and the
parameter EMA. No I/O and no model classes, so every formula can be tested on random tensors (formulas:
``docs/rl-formulas.md``)."""

from .advantages import PerPromptStatTracker, batch_advantages, compute_advantages
from .awm import AWM_WEIGHTINGS, awm_ema_decay, awm_log_likelihood, awm_loss, awm_timestep_indices, velocity_kl
from .ema import ParamEMA, ema_decay_at
from .grpo import grpo_loss, ratio_norm_log_ratio
from .nft import ADV_MODES, nft_loss, old_decay, optimality_probability, update_old_params
from .sde import SDE_TYPES, kl_to_reference, sde_step_with_logprob, step_variance

__all__ = [
    "ADV_MODES", "AWM_WEIGHTINGS", "SDE_TYPES", "awm_ema_decay", "awm_log_likelihood", "awm_loss",
    "awm_timestep_indices", "ratio_norm_log_ratio", "velocity_kl", "ParamEMA", "PerPromptStatTracker",
    "batch_advantages",
    "compute_advantages", "ema_decay_at", "grpo_loss", "kl_to_reference", "nft_loss", "old_decay",
    "optimality_probability", "sde_step_with_logprob", "step_variance", "update_old_params",
]
