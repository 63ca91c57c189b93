"""Phase 2 of the tiny pretraining without the VAE in the loop: the frozen VAE encodes the data once
(`pre_encode`), and each step draws its latents from the stored posteriors (`sample_batch`) exactly as
`CalligrapherStack.encode_images` and `prepare_fill` would draw them (the same DiagonalGaussian, the same
shift/scale, the pipeline's own packing of latents and masks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.stack import CalligrapherStack, FillCondition


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pictures -> [-1, 1]."""
    return x.float() / 127.5 - 1.0


@dataclass
class Latents:
    """What the frozen VAE makes of the data, computed once, on the device."""

    sources: torch.Tensor  # [N, 2 * 16, h, w]: posterior parameters (mean, logvar) of the sources
    masked: torch.Tensor  # the same for the masked sources (the fill condition's image)
    masks: torch.Tensor  # [N, L, 256] bool: the masks packed as `prepare_mask_latents` packs them
    img_ids: torch.Tensor  # [L, 3]
    height: int
    width: int


@torch.no_grad()
def pre_encode(stack: CalligrapherStack, sources: torch.Tensor, masks: torch.Tensor, chunk: int = 1024) -> Latents:
    """sources uint8 [N,3,H,W], masks bool [N,1,H,W] -> the posteriors and packed masks `sample_batch` draws from.
    The masked source is made as `prepare_fill` makes it."""
    pipe, vae = stack.pipe, stack.pipe.vae
    src, msk, packed = [], [], []
    for s, m in zip(sources.split(chunk), masks.split(chunk)):
        x = _to_unit(s).to(stack.device, stack.dtype)
        m = (m.float() > 0.5).to(stack.device, stack.dtype)
        src.append(vae.encode(x).latent_dist.parameters)
        post = vae.encode(x * (1 - m)).latent_dist
        msk.append(post.parameters)
        b, _, h, w = x.shape  # the latents go in as they are: only the mask is packed here
        mask_packed, _ = pipe.prepare_mask_latents(m, post.mean, b, vae.config.latent_channels, 1, h, w, stack.dtype,
                                                   stack.device, None)
        packed.append(mask_packed > 0.5)
    lh, lw = stack.latent_hw(h, w)
    img_ids = pipe._prepare_latent_image_ids(b, lh // 2, lw // 2, stack.device, stack.dtype)
    return Latents(torch.cat(src), torch.cat(msk), torch.cat(packed), img_ids, h, w)


def sample_batch(stack: CalligrapherStack, lat: Latents, idx: torch.Tensor,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, FillCondition]:
    """x0 and the fill condition of examples `idx`: sampled from the stored posteriors with `generator` in the order
    (and with the draws) of `encode_images` then `prepare_fill`; generator None = the posterior means."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    def draw(params):
        post = DiagonalGaussianDistribution(params)
        return stack.pack_latents(post.mode() if generator is None else post.sample(generator=generator))

    x0, masked = draw(lat.sources[idx]), draw(lat.masked[idx])
    cond = torch.cat([masked, lat.masks[idx].to(masked.dtype)], dim=-1)
    return x0, FillCondition(cond, lat.img_ids, lat.height, lat.width)
