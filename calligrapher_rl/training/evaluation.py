"""Evaluation: ODE samples of fixed examples x `num_eval_noises` fixed noises with the evaluation (EMA)
weights (eval_core.EvalSet: the same samples as `python -m calligrapher_rl.evaluate`), their rewards logged
as `eval/reward/*` with the 95% interval of the total (`eval/reward/mean_lo`, `_hi`), the preservation of
the unmasked region, and a grid saved under samples/, on the main process only.

`Evaluation` is a part the trainer holds (`trainer.evaluation_part`), built with what it uses passed in; the
trainer's reporting (phase, metrics row, the `on_evaluate` callbacks) comes with each `run()` call, so the
part holds no reference to the trainer (as rl_epoch.py)."""

from __future__ import annotations

import numpy as np
import torch

from .batches import fail_nonfinite_images, to_pil
from .eval_core import EvalSet, EvalSettings, preservation, reward_samples
from .eval_stats import mean_ci
from .run_dir import make_grid
from .run_state import RunState
from .timing import timed_phase


class Evaluation:
    """`run(phase=, log=, evaluated=)` is `Trainer.evaluate`; it only records in the run state the step it
    evaluated."""

    def __init__(self, cfg, state: RunState, *, is_main: bool, stack, dataset, conditions, policies, rewards, run_dir,
                 clock, autocast):
        self.cfg, self.state, self.is_main = cfg, state, is_main
        self.stack, self.dataset, self.conditions, self.policies = stack, dataset, conditions, policies
        self.rewards, self.run_dir, self.clock, self.autocast = rewards, run_dir, clock, autocast
        self._evalset = None  # built at the first evaluation: a run that evaluates nothing builds none

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
    def run(self, *, phase, log, evaluated) -> None:
        """ODE samples of the eval set with the EMA weights; grid rows: input, output (first noise), target,
        reference. `phase(name)` and `log(phase, stats)` are the trainer's reporting, `evaluated(step=,
        metrics=, grid_path=)` its on_evaluate callbacks."""
        cfg, step = self.cfg, self.state.step
        self.state.evaluated_step = step
        if not self.is_main:  # the grid and its rewards are the main process's: the others go on meanwhile
            return
        phase("evaluating")
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
        log("rl" if cfg.use_rl and step >= cfg.rl_warmup_steps else "warmup", stats)
        first = [j for j, (_, k) in enumerate(evalset.pairs) if k == 0]  # one sample of each example
        shown = [items[j] for j in first]
        rows = [to_pil(torch.stack([it["masked_source"] for it in shown])), [images[j] for j in first],
                to_pil(torch.stack([it["source"] for it in shown])), [it["reference"] for it in shown]]
        grid_path = self.run_dir.save_grid(step, make_grid(rows))
        evaluated(step=step, metrics=stats, grid_path=grid_path)
