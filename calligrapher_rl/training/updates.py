"""The three gradient computations of a run: supervised warmup, GRPO and DiffusionNFT.

Each function does forward + backward for one batch and returns float stats; the caller owns the
optimizer step (so accumulation and gradient sync stay in one place). The losses themselves are the
pure functions of `rl/`; this module only feeds them the right tensors.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ..rl.grpo import grpo_loss, ratio_norm_log_ratio
from ..rl.nft import nft_loss
from ..rl.sde import kl_to_reference, sde_step_with_logprob
from ..sampling import Rollout
from .batches import Batch


class StatsMeter:
    """Averages float stats over micro-steps. A non-finite value is kept (the mean becomes NaN/inf):
    a NaN loss must show in the metrics, never vanish from them."""

    def __init__(self):
        self.sums, self.counts = defaultdict(float), defaultdict(int)

    def add(self, stats: dict[str, float], prefix: str = "") -> None:
        for k, v in stats.items():
            if v is not None:
                self.sums[prefix + k] += float(v)
                self.counts[prefix + k] += 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def _plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


def _draw(sample, shape, generator):
    """`sample(shape)` (torch.rand/randn) from one generator, or row by row from one generator per sample:
    then a sample's draws do not depend on how the batch is split over processes."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([sample((1, *shape[1:]), generator=g) for g in generator])
    return sample(shape, generator=generator)


def warmup_backward(stack, batch: Batch, *, guidance: float, scale: float, generator: torch.Generator,
                    loss_scale: float, autocast, backward=_plain_backward) -> dict[str, float]:
    """Supervised flow matching on the ground truth: target = the source WITH its text, input = the
    masked source (in the fill condition), style = the reference; latents carry the VAE shift."""
    x0 = stack.encode_images(batch.sources(), generator=generator).float()
    b = x0.shape[0]
    # logit-normal t (SD3/FLUX training), drawn on the CPU generator for reproducibility
    t = torch.sigmoid(torch.randn(b, generator=generator)).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    tt = t.view(b, 1, 1)
    x_t = (1 - tt) * x0 + tt * eps
    with autocast():
        v = stack.velocity(x_t, batch.fill, batch.text, t, batch.image_embeds, guidance, scale)
    per_sample = torch.mean((v.float() - (eps - x0)) ** 2, dim=(1, 2))
    # The release's bench sources show other text than the label: no supervised target there.
    keep = torch.tensor([bool(it.get("source_shows_text", True)) for it in batch.items], device=per_sample.device)
    loss = per_sample[keep].mean() if keep.any() else per_sample.sum() * 0
    backward(loss * loss_scale)
    return {"loss": float(loss.detach()), "warmup/supervised_fraction": float(keep.float().mean())}


def grpo_backward(stack, batch: Batch, ro: Rollout, advantages: torch.Tensor, steps: list[int], *, policies,
                  guidance: float, scale: float, noise_level: float, sde_type: str, clip_range: float,
                  adv_clip_max: float, kl_beta: float, loss_scale: float, autocast,
                  backward=_plain_backward, ratio_norm: bool = False) -> dict[str, float]:
    """PPO-clip over the trained transitions x_j -> x_{j+1}, each a micro-batch, plus the KL to the
    reference policy computed from the two policies' step means. `ratio_norm`: GRPO-Guard's RatioNorm
    against the step means recorded at rollout."""
    meter = StatsMeter()
    valid = torch.isfinite(advantages)
    ref_condition = None  # the reference's style tokens and keys/values, once (see nft_targets)
    for j in steps:
        s, s_next = float(ro.sigmas[j]), float(ro.sigmas[j + 1])
        x_j, x_next = ro.latents[:, j], ro.latents[:, j + 1]
        with autocast():
            v = stack.velocity(x_j, batch.fill, batch.text, s, batch.image_embeds, guidance, scale)
        _, log_prob, mean, std = sde_step_with_logprob(v, s, s_next, x_j, noise_level, prev_sample=x_next,
                                                       sde_type=sde_type)
        guard = {}
        if ratio_norm:
            log_ratio, weight = ratio_norm_log_ratio(log_prob, ro.log_probs[:, j], mean, ro.means[:, j], std, s_next - s)
            guard = {"log_ratio": log_ratio, "weight": weight}
        loss, stats = grpo_loss(log_prob, ro.log_probs[:, j], advantages, clip_range, adv_clip_max, valid=valid, **guard)
        if kl_beta > 0 and (ro.ref_means is not None and j in ro.ref_means or policies.reference is not None):
            if ro.ref_means is not None and j in ro.ref_means:  # computed at rollout time (the trainer's way)
                ref_mean = ro.ref_means[j]
            else:
                with torch.no_grad(), autocast():
                    if ref_condition is None:
                        ref_condition = stack.style_condition(batch.image_embeds, policies.reference)
                    v_ref = stack.velocity(x_j, batch.fill, batch.text, s, batch.image_embeds, guidance, scale,
                                           params=policies.reference, style_tokens=ref_condition[0],
                                           style_kv=ref_condition[1])
                ref_mean = sde_step_with_logprob(v_ref, s, s_next, x_j, noise_level, prev_sample=x_next,
                                                 sde_type=sde_type)[2]
            kl = kl_to_reference(mean, ref_mean, std, s_next - s, sde_type)
            kl = kl[valid].mean() if valid.any() else kl.sum() * 0
            loss = loss + kl_beta * kl
            stats["kl"] = float(kl.detach())
        backward(loss * loss_scale)
        stats["loss"] = float(loss.detach())
        meter.add(stats)
    return meter.means()


@dataclass
class NFTTarget:
    """One trained timestep of a batch: where the policy is evaluated and what the old and reference
    policies predict there (both fixed during the update)."""

    t: torch.Tensor  # [B]
    x_t: torch.Tensor  # [B, L, C] float32
    v_old: torch.Tensor  # [B, L, C], the model dtype (the forward's own output precision)
    v_ref: torch.Tensor | None


@torch.no_grad()
def nft_targets(stack, batch: Batch, ro: Rollout, num_timesteps: int, *, policies, guidance: float, scale: float,
                kl_beta: float, generator: torch.Generator, autocast) -> list[NFTTarget]:
    """The old/reference predictions of an NFT update, computed before any gradient exists: the update
    then holds neither snapshot on the device (at real size each is 6 GB). Each sample trains the first
    `num_timesteps` of its own random permutation of the schedule's timesteps (DiffusionNFT): distinct
    timesteps, never one twice; the noise is fresh for each. `generator`: one, or one per sample (see
    `_draw`)."""
    x0 = ro.final.float()
    b = x0.shape[0]
    sigmas = ro.sigmas[:-1]  # the schedule's noisy levels (all > 0)
    order = torch.argsort(_draw(torch.rand, (b, len(sigmas)), generator), dim=1)  # a permutation per sample
    # Each policy's style tokens and block keys/values once, handed to its forwards as the rollout hands them: the
    # compiled transformer then sees the rollout's inputs (one graph) instead of recompiling the whole model for
    # keys/values computed inside it from another policy's adapter weights (minutes at FLUX size)
    with autocast():
        old = stack.style_condition(batch.image_embeds, policies.old)
        ref = stack.style_condition(batch.image_embeds, policies.reference) if kl_beta > 0 else None
    out = []
    for i in range(num_timesteps):
        t = sigmas[order[:, i]].to(x0.device)
        eps = _draw(torch.randn, x0.shape, generator).to(x0.device)
        tt = t.view(b, 1, 1)
        x_t = (1 - tt) * x0 + tt * eps
        with autocast():
            v_old = stack.velocity(x_t, batch.fill, batch.text, t, batch.image_embeds, guidance, scale,
                                   params=policies.old, style_tokens=old[0], style_kv=old[1])
            v_ref = (stack.velocity(x_t, batch.fill, batch.text, t, batch.image_embeds, guidance, scale,
                                    params=policies.reference, style_tokens=ref[0], style_kv=ref[1])
                     if ref is not None else None)
        keep = stack.dtype  # a bf16 forward's output is exact in bf16: half the memory, nothing lost
        out.append(NFTTarget(t, x_t, v_old.to(keep), v_ref.to(keep) if v_ref is not None else None))
    return out


def nft_backward_on(stack, batch: Batch, ro: Rollout, advantages: torch.Tensor, targets: list[NFTTarget], *,
                    guidance: float, scale: float, beta: float, kl_beta: float, adv_mode: str, adv_clip_max: float,
                    loss_scale: float, autocast, backward=_plain_backward) -> dict[str, float]:
    """Negative-aware fine-tuning on the clean rollouts x0: at the targets' noisy points, the implicit
    positive/negative policies are regressed onto x0, weighted by r (see nft_targets)."""
    meter = StatsMeter()
    x0 = ro.final.float()
    for tg in targets:
        with autocast():
            v_theta = stack.velocity(tg.x_t, batch.fill, batch.text, tg.t, batch.image_embeds, guidance, scale)
        loss, stats = nft_loss(v_theta, tg.v_old.float(), tg.v_ref.float() if tg.v_ref is not None else None, tg.x_t,
                               x0, tg.t, advantages, beta, kl_beta, adv_mode=adv_mode, adv_clip_max=adv_clip_max)
        backward(loss * loss_scale)
        meter.add(stats)
    return meter.means()


def nft_backward(stack, batch: Batch, ro: Rollout, advantages: torch.Tensor, num_timesteps: int, *, policies,
                 guidance: float, scale: float, beta: float, kl_beta: float, adv_mode: str, adv_clip_max: float,
                 generator: torch.Generator, loss_scale: float, autocast, backward=_plain_backward) -> dict[str, float]:
    """nft_targets then nft_backward_on, for one batch (the trainer computes every batch's targets first)."""
    targets = nft_targets(stack, batch, ro, num_timesteps, policies=policies, guidance=guidance, scale=scale,
                          kl_beta=kl_beta, generator=generator, autocast=autocast)
    return nft_backward_on(stack, batch, ro, advantages, targets, guidance=guidance, scale=scale, beta=beta,
                           kl_beta=kl_beta, adv_mode=adv_mode, adv_clip_max=adv_clip_max, loss_scale=loss_scale,
                           autocast=autocast, backward=backward)
