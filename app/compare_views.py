"""The Compare tab's evaluation: 1-4 checkpoints on an eval set (examples x noises, the same noises for all), the
table of means with 95% intervals, the verdict of each checkpoint against the first (A), a grid per checkpoint
with each cell's OCR reading and score, and the report (report.html, report.md, eval.json, the pictures) as
one zip. The work is `calligrapher_rl.training.eval_checkpoints`, what `python -m calligrapher_rl.evaluate`
runs; its files go to runs_dir/.evaluations/<time>/.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import gradio as gr
from PIL import Image

from calligrapher_rl.errors import UserError

from . import runs
from .infer_views import INITIAL, NONE, InferViews
from .view_common import err

RUN_DATA = "the first checkpoint's run data"
EVAL_SETS = [RUN_DATA, "bundled-glyphs", "glyphs-unseen", "bundled"]
GALLERIES = ["cmp_grid_1", "cmp_grid_2", "cmp_grid_3", "cmp_grid_4"]
MAX_NOISES, MAX_EXAMPLES = 64, 64
CELL = 128  # px on screen: the tiny's 64 px pictures are shown at twice their size


class CompareViews:
    def __init__(self, infer: InferViews):
        self.infer = infer
        self.runs_dir = infer.runs_dir
        self._measures: dict[str, object] = {}
        self._lock = threading.Lock()

    def _ref(self, choice: str):
        """A slot's value -> CheckpointRef (name shown, adapter file or None for the base weights, its run)."""
        from calligrapher_rl.training.eval_checkpoints import CheckpointRef

        if choice == NONE:
            return CheckpointRef("base weights", None)
        file, label = self.infer.adapter_file(choice)
        run = None
        if choice.startswith(INITIAL + ":"):
            run = runs.run_path(self.runs_dir, choice.split(":", 1)[1])
        else:
            head = choice.split(os.sep)[0]
            if os.path.isfile(os.path.join(self.runs_dir, head, "run.json")):
                run = os.path.join(self.runs_dir, head)
        return CheckpointRef(label, file, run)

    def _measures_for(self, siglip_dir: str):
        from calligrapher_rl.training.eval_core import Measures

        if siglip_dir not in self._measures:
            from .inference import _device_dtype

            self._measures[siglip_dir] = Measures(siglip_dir, device=_device_dtype()[0])
        return self._measures[siglip_dir]

    def _settings(self, refs, data, noises, examples) -> tuple[dict, str, object]:
        from calligrapher_rl.training.eval_core import EvalSettings

        cfg = next((runs.run_config(r.run_dir) for r in refs if r.run_dir), {})
        problems = []
        if noises is None or not 1 <= int(noises) <= MAX_NOISES:
            problems.append(f"Noises per example: expected 1 to {MAX_NOISES}, got {noises}")
        if examples and not 1 <= int(examples) <= MAX_EXAMPLES:  # empty (or 0): all
            problems.append(f"Examples: expected 1 to {MAX_EXAMPLES} (or empty for all), got {examples}")
        data = (data or "").strip()
        if data in ("", RUN_DATA):
            data = cfg.get("train_data_json") or ""
            if not data:
                problems.append("Eval set: the first checkpoint belongs to no run that names its data; choose a set")
        if problems:
            raise UserError("; ".join(problems))
        settings = EvalSettings(noises=int(noises), max_examples=int(examples) if examples else None,
                                steps=cfg.get("rl_eval_num_inference_steps") or 4,
                                guidance=cfg.get("rl_guidance_scale", 30.0), scale=cfg.get("ip_adapter_scale", 1.0))
        return cfg, data, settings

    def evaluate(self, c1, c2, c3, c4, data, noises, examples, flux, siglip, progress=gr.Progress()) -> dict:  # noqa: B008 - gradio injects it
        from calligrapher_rl.models.stack import resolve_model_paths
        from calligrapher_rl.training.eval_checkpoints import dataset_for, evaluate_checkpoints
        from calligrapher_rl.training.eval_report import headline, markdown_table

        chosen = [c for c in (c1, c2, c3, c4) if c]
        try:
            if not chosen:
                raise UserError("choose 1 to 4 checkpoints (or the base weights) in the slots A-D")
            refs = [self._ref(c) for c in chosen]
            cfg, data, settings = self._settings(refs, data, noises, examples)
            flux, siglip = (flux or "").strip(), (siglip or "").strip()
            siglip_dir = resolve_model_paths(flux, siglip)[1]
            dataset = dataset_for(data, cfg.get("resolution") or 64)
            out_dir = os.path.join(self.runs_dir, ".evaluations", time.strftime("%Y%m%d-%H%M%S"))
            first = next((r.path for r in refs if r.path), None)
            t0 = time.time()
            with self._lock, self.infer.service.borrowed_stack(flux, siglip, first) as stack:
                report = evaluate_checkpoints(
                    refs, stack=stack, dataset=dataset, settings=settings, out_dir=out_dir, siglip_path=siglip_dir,
                    measures=self._measures_for(siglip_dir),
                    progress=lambda i, n, name: progress((i, n), desc=f"sampling and scoring {name}"))
        except UserError as exc:
            gr.Warning(str(exc))
            return {"cmp_eval_msg": err(exc)}
        from calligrapher_rl.training.eval_report import _paired_rows, _table_rows, settings_line

        head, body = _table_rows(report)
        phead, pbody = _paired_rows(report)
        verdict = headline(report) or "one checkpoint: nothing to compare with"
        archive = shutil.make_archive(out_dir, "zip", out_dir)
        out = {"cmp_table": markdown_table(head, body) + ("\n\n" + markdown_table(phead, pbody) if pbody else ""),
               "cmp_verdict": verdict.replace("\n", "  \n"), "cmp_report": archive,
               "cmp_eval_msg": f"✓ {len(refs)} checkpoint(s) in {time.time() - t0:.0f} s on **{data}**. "
                               f"{settings_line(report)}"}
        for i, slot in enumerate(GALLERIES):
            if i < len(report["checkpoints"]):
                c = report["checkpoints"][i]
                out[slot] = gr.Gallery(value=self._cells(out_dir, c), label=f"{'ABCD'[i]}: {c['name']}", visible=True)
            else:
                out[slot] = gr.Gallery(value=[], visible=False)
        return out

    @staticmethod
    def _cells(out_dir: str, checkpoint: dict) -> list[tuple[Image.Image, str]]:
        from calligrapher_rl.training.eval_report import caption

        cells = []
        for s in checkpoint["samples"]:
            with Image.open(os.path.join(out_dir, s["image"])) as im:
                scale = max(1, -(-CELL // max(im.size)))
                big = im.convert("RGB").resize((im.width * scale, im.height * scale), Image.NEAREST)
            cells.append((big, f"{s['text']} → {caption(s)}"))
        return cells

    def step0(self, name: str | None) -> dict:
        """A = the run's starting point (checkpoint-0), B = its newest checkpoint (EMA when kept)."""
        if not name:
            return {"cmp_eval_msg": "⚠ Run: choose a run"}
        files = [v for _, v in self.infer.checkpoint_choices(name)]
        start = next((v for v in files if v.endswith(os.sep + "checkpoint-0")), None)
        latest = next((v for v in files if v not in (NONE, start) and not v.startswith(INITIAL + ":")), None)
        if latest is None:
            return {"cmp_eval_msg": f"⚠ Run: {name!r} has no checkpoint yet"}
        if start is None:  # a run of an older version: its initial adapter, else the base weights
            start = next((v for v in files if v.startswith(INITIAL + ":")), NONE)
        choices = self.infer.all_choices()
        return {"cmp_1": gr.Dropdown(choices=choices, value=start), "cmp_2": gr.Dropdown(choices=choices, value=latest),
                "cmp_3": gr.Dropdown(choices=choices, value=None), "cmp_4": gr.Dropdown(choices=choices, value=None),
                "cmp_eval_msg": f"A = {name}'s starting point, B = its newest checkpoint. Press **Evaluate**."}
