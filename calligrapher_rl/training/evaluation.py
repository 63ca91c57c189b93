"""Evaluation: ODE samples of fixed examples x `num_eval_noises` fixed noises with the evaluation (EMA)
weights (eval_core.EvalSet: the same samples as `python -m calligrapher_rl.evaluate`), their rewards logged
as `eval/reward/*` with the 95% interval of the total (`eval/reward/mean_lo`, `_hi`), the preservation of
the unmasked region, and a grid saved under samples/, on the main process only. A mixin of `Trainer`."""

from __future__ import annotations

import numpy as np
import torch

from .batches import fail_nonfinite_images, to_pil
from .eval_core import EvalSet, EvalSettings, preservation, reward_samples
from .eval_stats import mean_ci
from .run_dir import make_grid
from .timing import timed_phase


class Evaluation:
    """`Trainer.evaluate`."""

    _evalset = None

    def eval_set(self) -> EvalSet:
        if self._evalset is None:
            cfg = self.cfg
            settings = EvalSettings(noises=cfg.num_eval_noises, seed=cfg.seed, steps=cfg.rl_eval_num_inference_steps,
                                    guidance=cfg.rl_guidance_scale, scale=cfg.ip_adapter_scale,
                                    max_examples=cfg.num_eval_samples,
                                    batch_size=max(1, cfg.train_batch_size * cfg.rl_num_images_per_prompt))
            self._evalset = EvalSet(self.stack, self.dataset, settings, conditions=self.conditions)
        return self._evalset

    @timed_phase("eval")
    @torch.no_grad()
    def evaluate(self) -> None:
        """ODE samples of the eval set with the EMA weights; grid rows: input, output (first noise), target,
        reference."""
        cfg = self.cfg
        self.state.evaluated_step = self.step
        if not self.is_main:  # the grid and its rewards are the main process's: the others go on meanwhile
            return
        self._phase("evaluating")
        evalset = self.eval_set()
        # the EMA weights through the forwards' params= mapping, or swapped in from host memory: no GPU copy
        with self.policies.evaluation_weights():
            images, finite = evalset.sample(autocast=self.autocast, params=self.policies.evaluation_params())
        items = evalset.sample_items()
        scores = fail_nonfinite_images({**self.rewards.score(reward_samples(items, images)),
                                        **preservation(images, items)}, finite)
        stats = {}
        for k, v in scores.items():
            key = "eval/reward/mean" if k == "total" else f"eval/{k}" if k.startswith("preservation") else f"eval/reward/{k}"
            stats[key] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        ci = mean_ci(scores["total"], evalset.groups)
        stats.update({"eval/reward/mean_lo": ci["ci95"][0], "eval/reward/mean_hi": ci["ci95"][1], "eval/n": float(ci["n"])})
        phase = "rl" if cfg.use_rl and self.step >= cfg.rl_warmup_steps else "warmup"
        self._log(phase, stats)
        first = [j for j, (_, k) in enumerate(evalset.pairs) if k == 0]  # one sample of each example
        shown = [items[j] for j in first]
        rows = [to_pil(torch.stack([it["masked_source"] for it in shown])), [images[j] for j in first],
                to_pil(torch.stack([it["source"] for it in shown])), [it["reference"] for it in shown]]
        grid_path = self.run_dir.save_grid(self.step, make_grid(rows))
        self.callbacks.call("on_evaluate", self, step=self.step, metrics=stats, grid_path=grid_path)
