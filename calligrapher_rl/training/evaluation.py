"""Evaluation: ODE samples of fixed examples with the evaluation (EMA) weights, their rewards logged as
`eval/reward/*` and a grid saved under samples/, on the main process only. A mixin of `Trainer`."""

from __future__ import annotations

import numpy as np
import torch

from ..sampling import rollout
from .batches import EVAL_STREAM, fail_nonfinite_images, reward_samples, stream_seed, to_pil
from .run_dir import make_grid
from .timing import timed_phase


class Evaluation:
    """`Trainer.evaluate`."""

    @timed_phase("eval")
    @torch.no_grad()
    def evaluate(self) -> None:
        """ODE samples of fixed examples with the EMA weights; grid rows: input, output, target, reference."""
        cfg = self.cfg
        self._evaluated_step = self.step
        if not self.is_main:  # the grid and its rewards are the main process's: the others go on meanwhile
            return
        self._phase("evaluating")
        n = min(cfg.num_eval_samples, len(self.dataset))
        batch = self.conditions.batch(list(range(n)))
        gen = torch.Generator().manual_seed(stream_seed(cfg.seed, EVAL_STREAM))
        # the EMA weights through the forwards' params= mapping, or swapped in from host memory: no GPU copy
        with self.policies.evaluation_weights(), self.autocast():
            ro = rollout(self.stack, batch.fill, batch.text, batch.image_embeds, num_steps=cfg.rl_eval_num_inference_steps,
                         guidance=cfg.rl_guidance_scale, generator=gen, scale=cfg.ip_adapter_scale, quantized=True,
                         params=self.policies.evaluation_params())
        decoded = self.stack.decode(ro.final, batch.fill.height, batch.fill.width)
        images = to_pil(decoded)
        scores = fail_nonfinite_images(self.rewards.score(reward_samples(batch, images)),
                                       torch.isfinite(decoded.float()).flatten(1).all(1).cpu().numpy())
        stats = {("eval/reward/mean" if k == "total" else f"eval/reward/{k}"): float(np.nanmean(v)) if np.isfinite(v).any()
                 else float("nan") for k, v in scores.items()}
        phase = "rl" if cfg.use_rl and self.step >= cfg.rl_warmup_steps else "warmup"
        self._log(phase, stats)
        rows = [to_pil(torch.stack([it["masked_source"] for it in batch.items])), images,
                to_pil(batch.sources()), [it["reference"] for it in batch.items]]
        grid_path = self.run_dir.save_grid(self.step, make_grid(rows))
        self.callbacks.call("on_evaluate", self, step=self.step, metrics=stats, grid_path=grid_path)
