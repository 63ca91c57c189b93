"""Rollouts: FluxFillPipeline's schedule, SDE steps with log-probabilities, an SDE window, ODE evaluation.

A rollout denoises a whole batch (all groups at once) and keeps what the RL updates need: the trajectory
of packed latents, the log-probability of every stochastic step, and which steps were stochastic. The
step math is float32 (`rl.sde`), whatever the transformer's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .models.stack import CalligrapherStack, FillCondition, TextCondition
from .rl.sde import sde_step_with_logprob


def flux_sigmas(num_steps: int, image_seq_len: int, scheduler) -> torch.Tensor:
    """[N+1] float32 sigmas from 1 to 0, time-shifted by the image sequence length exactly as
    FluxFillPipeline does (`mu = calculate_shift(seq_len)`; never derived from the guidance)."""
    from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift

    cfg = scheduler.config
    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu, device="cpu")
    return scheduler.sigmas.to(torch.float32).clone()


@dataclass
class SDEWindow:
    """Which steps are stochastic (and trained). `None` window = every step except the last."""

    start: int
    size: int

    @staticmethod
    def pick(num_steps: int, size: int, lo: int, hi: int, rng: np.random.Generator) -> "SDEWindow":
        """A random window of `size` steps lying inside steps [lo, hi): its start is drawn in
        [lo, hi - size] inclusive (Flow-GRPO's "fast" mode). The last step (into sigma 0) is never
        stochastic, so hi <= num_steps - 1; a range without room is refused (config validation)."""
        if not (size >= 1 and 0 <= lo and lo + size <= hi <= num_steps - 1):
            raise ValueError(f"no room for an SDE window of {size} steps in [{lo}, {hi}) of {num_steps} steps "
                             f"(the last step is never stochastic)")
        return SDEWindow(int(rng.integers(lo, hi - size + 1)), size)

    def steps(self) -> list[int]:
        return list(range(self.start, self.start + self.size))


@dataclass
class Rollout:
    latents: torch.Tensor  # [B, N+1, L, C] float32: x at every sigma, last is the clean sample
    log_probs: torch.Tensor  # [B, N] float32 (0 on ODE steps)
    sigmas: torch.Tensor  # [N+1]
    sde_steps: list[int]  # indices j whose transition j -> j+1 was stochastic
    # the reference policy's SDE step mean at x_j, for the steps asked for (GRPO's KL term): computed here,
    # without gradient, so the update needs neither the reference forward nor the reference weights
    ref_means: dict[int, torch.Tensor] | None = None
    means: torch.Tensor | None = None  # [B, N, L, C] float32: each step's mean (GRPO-Guard's old means)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


@torch.no_grad()
def rollout(
    stack: CalligrapherStack,
    fill: FillCondition,
    text: TextCondition,
    image_embeds: torch.Tensor,
    *,
    num_steps: int,
    guidance: float,
    noise_level: float = 0.0,
    sde_type: str = "sde",
    window: SDEWindow | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    scale: float = 1.0,
    params=None,
    initial_noise: torch.Tensor | None = None,
    quantized: bool = False,
    reference=None,
    reference_steps: int | None = None,
) -> Rollout:
    """Denoise `fill.cond.shape[0]` samples. `noise_level=0` is the deterministic ODE (evaluation).

    `params` runs another set of adapter weights (e.g. NFT's old policy) without touching the live ones.
    `quantized` samples with the stack's float8 transformer copy, if it has one (NFT rollouts, evaluation).
    `generator`: one for the batch, or one per sample (a sample's noise then ignores its batch-mates).
    `reference`: adapter weights whose step means are recorded (`Rollout.ref_means`) on the first
    `reference_steps` stochastic steps (all of them when None): TRL computes its reference log-probs at
    generation time the same way.
    """
    b = fill.cond.shape[0]
    sigmas = flux_sigmas(num_steps, fill.seq_len, stack.pipe.scheduler)
    if initial_noise is None and isinstance(generator, (list, tuple)):  # one generator per sample
        initial_noise = torch.cat([stack.noise_like(fill, 1, g) for g in generator])
    x = initial_noise if initial_noise is not None else stack.noise_like(fill, b, generator)
    x = x.to(stack.device, torch.float32)
    stochastic = set((window or SDEWindow(0, num_steps)).steps()) if noise_level > 0 else set()
    # fixed for the whole rollout: the style tokens, and each block's style keys/values, once (with gradients
    # on, the processors recompute the keys/values from the live weights instead)
    tokens, style_kv = stack.style_condition(image_embeds, params)
    ref_condition = stack.style_condition(image_embeds, reference) if reference is not None else None
    ref_todo = set(sorted(j for j in stochastic if float(sigmas[j + 1]) > 0)[:reference_steps])
    trajectory, log_probs, means, ref_means = [x], [], [], {}
    for j in range(num_steps):
        s, s_next = float(sigmas[j]), float(sigmas[j + 1])
        v = stack.velocity(x, fill, text, s, image_embeds, guidance, scale, params=params, style_tokens=tokens,
                           style_kv=style_kv, quantized=quantized)
        level = noise_level if j in stochastic and s_next > 0 else 0.0
        x_prev = x
        x, log_prob, mean, _ = sde_step_with_logprob(v, s, s_next, x, level, generator=generator, sde_type=sde_type)
        if ref_condition is not None and j in ref_todo:
            v_ref = stack.velocity(x_prev, fill, text, s, image_embeds, guidance, scale, params=reference,
                                   style_tokens=ref_condition[0], style_kv=ref_condition[1])
            ref_means[j] = sde_step_with_logprob(v_ref, s, s_next, x_prev, level, prev_sample=x,
                                                 sde_type=sde_type)[2]
        trajectory.append(x)
        means.append(mean)
        log_probs.append(log_prob if level > 0 else torch.zeros(b, device=x.device))
    sde_steps = sorted(j for j in stochastic if float(sigmas[j + 1]) > 0)
    return Rollout(torch.stack(trajectory, 1), torch.stack(log_probs, 1), sigmas, sde_steps,
                   ref_means if ref_condition is not None else None, torch.stack(means, 1))
