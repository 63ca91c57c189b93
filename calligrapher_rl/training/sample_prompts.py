"""Sample prompts: the user's own texts painted during training, every `--sample_prompts_steps` steps, with fixed
seeds, into their own gallery (`samples/prompts/step-{step:06d}.png`), as fluxgym and ai-toolkit offer.

    --sample_prompts "EH4H|3682|A1"      texts, separated by '|'
    --sample_references "a.png|"         optional style references, one per text ('' = the canvas's own)
    --sample_prompts_steps 10            every N optimizer steps (0 = never); step 0 too with --eval_at_start

Each text is painted on the first example of the dataset (its source and mask are the canvas) with the
evaluation (EMA) weights, one fixed initial noise per text (the same at every step), so pictures of
successive steps differ only by the weights. The grid has one cell per text with the text under it.
"""

from __future__ import annotations

import logging
import os

import torch
from PIL import Image, ImageDraw

from ..atomic import atomic_path
from ..data.entries import DEFAULT_PROMPT
from .batches import ConditionCache, stream_seed, to_pil
from .callbacks import TrainerCallback

logger = logging.getLogger("calligrapher_rl.training")
SAMPLE_STREAM = 3
FOLDER = os.path.join("samples", "prompts")


def split_texts(value: str | None) -> list[str]:
    return [t.strip() for t in (value or "").split("|") if t.strip()]


def prompts_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, FOLDER, f"step-{step:06d}.png")


class _Items:
    """The canvas example with each text (and reference) in turn: a dataset for ConditionCache."""

    def __init__(self, canvas: dict, texts: list[str], references: list[Image.Image | None]):
        self.canvas, self.texts, self.references = canvas, texts, references

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        return {**self.canvas, "text": self.texts[i], "prompt": DEFAULT_PROMPT.format(text=self.texts[i]),
                "reference": self.references[i] or self.canvas["reference"]}


def _load_reference(path: str) -> Image.Image | None:
    if not path:
        return None
    from ..images import load_image

    return load_image(path, field="--sample_references")


class SamplePromptsCallback(TrainerCallback):
    """Paints the sample prompts at step 0 (with --eval_at_start) and every --sample_prompts_steps steps."""

    def __init__(self):
        self.cache = None

    def _due(self, trainer, step: int) -> bool:
        cfg = trainer.cfg
        every = cfg.sample_prompts_steps
        return bool(every and split_texts(cfg.sample_prompts) and step % every == 0)

    def on_train_begin(self, trainer) -> None:
        if trainer.step == 0 and trainer.cfg.eval_at_start and self._due(trainer, 0):
            self.paint(trainer)

    def on_step_end(self, trainer, step: int, phase: str, metrics: dict) -> None:
        if step and self._due(trainer, step):
            self.paint(trainer)

    @torch.no_grad()
    def paint(self, trainer) -> str | None:
        from ..sampling import rollout

        cfg = trainer.cfg
        texts = split_texts(cfg.sample_prompts)
        if self.cache is None:
            refs = [_load_reference(p.strip()) for p in (cfg.sample_references or "").split("|")]
            refs = (refs + [None] * len(texts))[:len(texts)]
            self.cache = ConditionCache(trainer.stack, _Items(trainer.dataset[0], texts, refs), cfg.seed)
        batch = self.cache.batch(list(range(len(texts))))
        gens = [torch.Generator().manual_seed(stream_seed(cfg.seed, SAMPLE_STREAM, i)) for i in range(len(texts))]
        with trainer.policies.evaluation_weights(), trainer.autocast():
            ro = rollout(trainer.stack, batch.fill, batch.text, batch.image_embeds, num_steps=cfg.rl_eval_num_inference_steps,
                         guidance=cfg.rl_guidance_scale, generator=gens, scale=cfg.ip_adapter_scale, quantized=True)
        images = to_pil(trainer.stack.decode(ro.final, batch.fill.height, batch.fill.width))
        if not trainer.is_main:
            return None
        path = prompts_path(cfg.output_dir, trainer.step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp:
            sheet(images, texts).save(tmp, format="PNG")
        return path


def sheet(images: list[Image.Image], texts: list[str], cell: int = 128) -> Image.Image:
    """One row: each picture (at least `cell` px) with its text under it."""
    from .eval_report import _font

    w, h = images[0].size
    scale = max(1, -(-cell // max(w, h)))
    cw, ch = w * scale, h * scale
    out = Image.new("RGB", (cw * len(images), ch + 18), "white")
    draw = ImageDraw.Draw(out)
    for i, (im, text) in enumerate(zip(images, texts)):
        out.paste(im.convert("RGB").resize((cw, ch), Image.NEAREST), (i * cw, 0))
        draw.text((i * cw + 3, ch + 2), text[:20], fill=(0, 0, 0), font=_font(13))
    return out
