"""From dataset indices to conditioned batches: the group sampler and the per-item condition cache.

The sampler is Flow-GRPO's "K-repeat" sampler made stateless: batch `k` of a stream is a pure function
of (seed, stream, k), so a resumed run draws exactly the batches the uninterrupted run would have, and
every process agrees on the global batch without communication. A prompt's group of K images may span
processes; rewards are gathered before advantages (see distributed.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..models.stack import CalligrapherStack, FillCondition, TextCondition

WARMUP_STREAM, RL_STREAM, EVAL_STREAM = 0, 1, 2


def stream_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from (seed, parts...): independent streams for data, noise, windows, timesteps."""
    return int(np.random.SeedSequence([abs(int(seed)), *[int(p) for p in parts]]).generate_state(2, np.uint64)[0] >> 1)


class GroupSampler:
    def __init__(self, num_items: int, prompts_per_process: int, group_size: int, *, num_processes: int = 1,
                 rank: int = 0, seed: int = 0):
        self.num_items, self.prompts_per_process, self.group_size = num_items, prompts_per_process, group_size
        self.num_processes, self.rank, self.seed = num_processes, rank, seed

    @property
    def images_per_process(self) -> int:
        return self.prompts_per_process * self.group_size

    def global_batch(self, stream: int, k: int) -> list[int]:
        """All processes' dataset indices of batch k, in process order (rank r owns slice r)."""
        rng = np.random.default_rng(stream_seed(self.seed, stream, k))
        m = self.prompts_per_process * self.num_processes
        chosen = rng.permutation(self.num_items)[:m] if m <= self.num_items else rng.integers(0, self.num_items, m)
        ids = np.repeat(chosen, self.group_size)
        # spread groups over processes (a group may span several); shuffled for one process too, so that
        # one process and several see the same global batch in the same order
        ids = ids[rng.permutation(len(ids))]
        return ids.tolist()

    def batch(self, stream: int, k: int) -> list[int]:
        ids = self.global_batch(stream, k)
        n = self.images_per_process
        return ids[self.rank * n:(self.rank + 1) * n]


@dataclass
class Batch:
    """One process's conditioned rollout batch (B images; entries of the same group share an index)."""

    indices: list[int]
    items: list[dict]
    fill: FillCondition
    text: TextCondition
    image_embeds: torch.Tensor  # [B, E] SigLIP pooled

    def sources(self) -> torch.Tensor:
        return torch.stack([it["source"] for it in self.items])


class ConditionCache:
    """Frozen-encoder outputs per dataset item (masked-image latents + mask, SigLIP embedding).

    The encoders are frozen, so an item's condition never changes during a run: computing it once per
    item instead of once per image takes the VAE and SigLIP out of the rollout loop. LRU-bounded.
    """

    def __init__(self, stack: CalligrapherStack, dataset, seed: int, capacity: int = 512):
        self.stack, self.dataset, self.seed, self.capacity = stack, dataset, seed, capacity
        self._items: OrderedDict[int, tuple[dict, torch.Tensor, torch.Tensor]] = OrderedDict()

    def _get(self, index: int):
        if index in self._items:
            self._items.move_to_end(index)
            return self._items[index]
        item = self.dataset[index]
        gen = torch.Generator().manual_seed(stream_seed(self.seed, 99, index))  # the VAE posterior sample
        fill = self.stack.prepare_fill(item["source"][None], item["mask"][None], generator=gen)
        embeds = self.stack.encode_style([item["reference"]])
        self._items[index] = (item, fill.cond[0], embeds[0])
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return self._items[index]

    def batch(self, indices: list[int]) -> Batch:
        got = [self._get(i) for i in indices]
        items = [g[0] for g in got]
        cond = torch.stack([g[1] for g in got])
        res = items[0]["source"].shape[-1]
        lh, lw = self.stack.latent_hw(res, res)
        img_ids = self.stack.pipe._prepare_latent_image_ids(len(indices), lh // 2, lw // 2, self.stack.device,
                                                            self.stack.dtype)
        fill = FillCondition(cond, img_ids, res, res)
        text = self.stack.encode_prompts([it["prompt"] for it in items])
        return Batch(list(indices), items, fill, text, torch.stack([g[2] for g in got]))


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in [-1,1] -> PIL RGB images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def mask_pil(mask: torch.Tensor) -> Image.Image:
    return Image.fromarray((mask[0].cpu().numpy() > 0.5).astype(np.uint8) * 255, mode="L")


def fail_nonfinite_images(scores: dict[str, np.ndarray], finite) -> dict[str, np.ndarray]:
    """A decoded image with a NaN/inf pixel is a failed sample: NaN in every reward, never the score of
    the black picture `to_pil` makes of it. `finite` holds one bool per image."""
    bad = ~np.asarray(finite, dtype=bool)
    if not bad.any():
        return scores
    import logging

    logging.getLogger("calligrapher_rl.training").warning("%d of %d decoded images are not finite: their rewards "
                                                          "count as failed", int(bad.sum()), bad.size)
    out = {}
    for name, vals in scores.items():
        v = np.array(vals, dtype=np.float64)
        v[bad] = np.nan
        out[name] = v
    return out


def reward_samples(batch: Batch, images: list[Image.Image]):
    from ..rewards.base import RewardSample

    return [
        RewardSample(image=im, mask=mask_pil(it["mask"]), text=it["text"], reference=it["reference"],
                     source=to_pil(it["source"][None])[0])
        for im, it in zip(images, batch.items)
    ]
