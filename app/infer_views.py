"""The Inference and Compare tabs' callbacks ({component name: value} out, as in views.py).

A checkpoint is chosen as a run plus one of its adapter files, or typed as a path; every path must resolve
inside runs_dir (the run's own initial adapter from run.json is offered by name, never by a typed path).
Compare runs 1-4 checkpoints on the same inputs and seed and scores every image with the training rewards
(what OCR reads, the OCR score, the SigLIP style score).
"""

from __future__ import annotations

import os

import gradio as gr
from PIL import Image

from calligrapher_rl.errors import UserError

from . import run_files, runs
from .gpu_room import GpuRoom
from .inference import (
    InferenceService,
    Inputs,
    Scorer,
    dataset_example,
    editor_inputs,
    size_note,
)
from .view_common import err

NONE = "none"  # plain FLUX-Fill (the base weights): the same pipeline at style strength 0
SLOTS = ["cmp_1", "cmp_2", "cmp_3", "cmp_4"]
INITIAL = "initial"  # the run's --initial_ip_adapter_path


class InferViews:
    def __init__(self, runs_dir: str, service: InferenceService | None = None, scorer: Scorer | None = None):
        self.runs_dir = runs_dir
        self.service = service or InferenceService(room=GpuRoom(runs_dir))
        self.scorer = scorer or Scorer()

    # ------------------------------------------------------------------ choosing a checkpoint
    def runs_with_checkpoints(self) -> list[str]:
        return [r["name"] for r in runs.list_runs(self.runs_dir) if r["checkpoints"]]

    def checkpoint_choices(self, name: str | None) -> list[tuple[str, str]]:
        out = []
        if name:
            try:
                run_dir = runs.run_path(self.runs_dir, name)
            except UserError:
                run_dir = None
            if run_dir:
                out = [(label, os.path.relpath(path, self.runs_dir)) for label, path in run_files.checkpoint_files(run_dir)]
                if runs.run_config(run_dir).get("initial_ip_adapter_path"):
                    out.append(("initial adapter (run.json)", f"{INITIAL}:{name}"))
        return out + [("no adapter — plain FLUX-Fill", NONE)]

    def run_changed(self, name: str | None):
        """Checkpoint choices (latest EMA first) and the run's model paths (never a resize: the source keeps
        its size unless the user asks for a square)."""
        choices = self.checkpoint_choices(name)
        cfg = {}
        if name:
            try:
                cfg = runs.run_config(runs.run_path(self.runs_dir, name))
            except UserError:
                cfg = {}
        out = {"ckpt": gr.Dropdown(choices=choices, value=choices[0][1])}
        for key, flag in (("flux", "pretrained_model_name_or_path"), ("siglip", "siglip_path")):
            if cfg.get(flag):
                out[key] = cfg[flag]
        return out

    def all_choices(self) -> list[tuple[str, str]]:
        """Every adapter file of every run (newest run first), and the base weights."""
        out = []
        for name in self.runs_with_checkpoints():
            out += [(f"{name} · {label}", value) for label, value in self.checkpoint_choices(name)[:-1]]
        return out + [("base weights — no adapter (plain FLUX-Fill)", NONE)]

    def compare_choices(self) -> dict:
        choices = self.all_choices()
        return {slot: gr.Dropdown(choices=choices) for slot in SLOTS}

    def step0(self, name: str | None) -> dict:
        """A run's latest EMA (or raw) file against what it started from: its initial adapter, else the base
        weights (a run without one started from a fresh adapter, which no file holds)."""
        if not name:
            return {"cmp_msg": "⚠ choose a run"}
        files = self.checkpoint_choices(name)
        latest = next((v for _, v in files if v != NONE and not v.startswith(INITIAL + ":")), None)
        if latest is None:
            return {"cmp_msg": f"⚠ run {name!r} has no checkpoint yet"}
        start = next((v for _, v in files if v.startswith(INITIAL + ":")), NONE)
        note = ("its initial adapter" if start != NONE else
                "the base weights (the run began from a fresh, random adapter: no file holds step 0)")
        choices = self.all_choices()
        return {"cmp_1": gr.Dropdown(choices=choices, value=latest), "cmp_2": gr.Dropdown(choices=choices, value=start),
                "cmp_3": gr.Dropdown(choices=choices, value=None), "cmp_4": gr.Dropdown(choices=choices, value=None),
                "cmp_msg": f"A = {name}'s latest checkpoint, B = step 0: {note}. Press **Compare**."}

    def adapter_file(self, choice: str | None, typed: str | None = None) -> tuple[str | None, str]:
        """(file or None for no adapter, label)."""
        if typed and typed.strip():
            raw = typed.strip()
            path = raw if os.path.isabs(os.path.expanduser(raw)) else os.path.join(self.runs_dir, raw)
            real = runs.confine(path, [self.runs_dir], "checkpoint file")
            if not (os.path.isfile(real) or _is_lora(real)):
                raise UserError("no such checkpoint file", where=raw)
            return real, os.path.relpath(real, self.runs_dir)
        if not choice or choice == NONE:
            return None, "no adapter"
        if choice.startswith(INITIAL + ":"):
            name = choice.split(":", 1)[1]
            init = runs.run_config(runs.run_path(self.runs_dir, name)).get("initial_ip_adapter_path")
            if not init or not os.path.isfile(init):
                raise UserError("the run's initial adapter file is missing", where=str(init))
            return init, f"{name} · initial adapter"
        real = runs.confine(os.path.join(self.runs_dir, choice), [self.runs_dir], "checkpoint file")
        if _is_lora(real):  # a LoRA checkpoint's folder (raw) or its ema/ folder
            return real, (choice[:-len(os.sep + "ema")] + " · EMA LoRA" if choice.endswith(os.sep + "ema")
                          else choice + " · raw LoRA")
        if os.path.isdir(real) and os.path.basename(real) == "checkpoint-0":  # a run's starting point
            return real, choice.rstrip(os.sep).replace(os.sep + "checkpoint-0", " · start (checkpoint-0)")
        if not os.path.isfile(real):
            raise UserError("no such checkpoint file (deleted by checkpoints_total_limit?)", where=choice)
        return real, choice.replace(os.sep + "ip-adapter-ema.safetensors", " · EMA").replace(
            os.sep + "ip-adapter.safetensors", " · raw")

    # ------------------------------------------------------------------ inputs
    def example(self, index, flux=None) -> dict:
        """The next example (of the glyph task for the embedded tiny models, else of the bundled word dataset):
        source in the editor, its mask as the uploaded mask."""
        index = int(index or 0)
        ex = dataset_example(index, flux)
        src = ex["source"].convert("RGBA")
        return {"editor": {"background": src, "layers": [], "composite": src}, "mask_up": ex["mask"].convert("RGB"),
                "reference": ex["reference"], "text": ex["text"], "ex_index": index + 1}

    @staticmethod
    def _inputs(editor, mask_up, reference, text, steps, guidance, scale, seed, num_images, resolution, use_context):
        source, mask = editor_inputs(editor, mask_up)
        ref = Image.fromarray(reference).convert("RGB") if reference is not None and not isinstance(reference, Image.Image) \
            else reference
        return Inputs(source=source, mask=mask, text=text or "", reference=ref, steps=steps, guidance=guidance,
                      scale=scale, seed=int(seed or 0), num_images=num_images,
                      resolution=int(resolution) if resolution else None, use_context=bool(use_context))

    # ------------------------------------------------------------------ actions
    def generate(self, choice, typed, flux, siglip, *inputs) -> dict:
        try:
            file, label = self.adapter_file(choice, typed)
            inp = self._inputs(*inputs)
            images, secs = self.service.generate(flux, siglip, file, inp)
        except UserError as exc:
            gr.Warning(str(exc))
            return {"out_gallery": [], "inf_msg": err(exc)}
        gallery = [(im, f"{label} · seed {inp.seed} · #{i + 1}") for i, im in enumerate(images)]
        note = size_note(inp.source.size, inp.resolution)
        if note:
            gr.Info(note)
        size = f"{images[0].width}x{images[0].height}" if images else ""
        msg = f"✓ {len(images)} image(s) from **{label}** in {secs:.1f} s, {size}" + (f"\n\nℹ {note}" if note else "")
        return {"out_gallery": gallery, "inf_msg": msg}

    def compare(self, c1, c2, c3, c4, flux, siglip, *inputs) -> dict:
        """1-4 checkpoints on the same inputs and seed, side by side, each image with its reward scores."""
        from calligrapher_rl.models.stack import resolve_model_paths

        chosen = [c for c in (c1, c2, c3, c4) if c]
        try:
            if not chosen:
                raise UserError("choose 1 to 4 checkpoints (or the base weights) in the slots")
            inp = self._inputs(*inputs)
            siglip_dir = resolve_model_paths((flux or "").strip(), (siglip or "").strip())[1]
            results = []
            for letter, choice in zip("ABCD", chosen):
                file, label = self.adapter_file(choice)
                images, secs = self.service.generate(flux, siglip, file, inp)
                results.append((letter, label, images, secs, self.scorer.score(images, inp, siglip_dir)))
        except UserError as exc:
            gr.Warning(str(exc))
            return {"cmp_msg": err(exc)}
        gallery, rows = [], ["| | checkpoint | image | OCR read | OCR score | style score |", "|---|---|---|---|---|---|"]
        for letter, label, images, _, scores in results:
            for i, (im, sc) in enumerate(zip(images, scores)):
                gallery.append((im, f"{letter} · {label} · #{i + 1} · OCR {_score(sc['ocr'], 2)} "
                                    f"({sc['ocr_text'] or '—'}) · style {sc['style']:.3f}"))
                rows.append(f"| {letter} | {label} | #{i + 1} | `{sc['ocr_text'] or '—'}` | {_score(sc['ocr'], 3)} | "
                            f"{sc['style']:.3f} |")
        means = " · ".join(f"{letter}: OCR {_score(_mean([s['ocr'] for s in sc]), 3)}, style "
                           f"{_mean([s['style'] for s in sc]):.3f}" for letter, _, _, _, sc in results)
        first = [r[2][0] for r in results]
        note = f"\n\nℹ {self.scorer.note}" if self.scorer.note else ""
        return {"slider": (first[0], first[1]) if len(first) > 1 else None, "cmp_gallery": gallery,
                "cmp_scores": "\n".join(rows),
                "cmp_msg": f"✓ {len(results)} checkpoint(s), same inputs, seed {inp.seed}, {inp.num_images} image(s) "
                           f"each. Means: {means}{note}"}

    def unload(self) -> dict:
        return {"inf_msg": self.service.unload()}


def _is_lora(path: str) -> bool:
    from calligrapher_rl.models.lora import find_lora

    return os.path.isdir(path) and find_lora(path) is not None


def _mean(values: list) -> float | None:
    return None if any(v is None for v in values) or not values else sum(values) / len(values)


def _score(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"
