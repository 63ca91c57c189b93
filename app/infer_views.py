"""The Inference and Compare tabs' callbacks.

A checkpoint is chosen as a run plus one of its adapter files, or typed as a path; every path must resolve
inside runs_dir (the run's own initial adapter from run.json is offered by name, never by a typed path).
"""

from __future__ import annotations

import os

import gradio as gr
from PIL import Image

from calligrapher_rl.errors import UserError

from . import runs
from .inference import InferenceService, Inputs, dataset_example, editor_inputs, size_note

NONE = "none"  # plain FLUX-Fill: the same pipeline at style strength 0
INITIAL = "initial"  # the run's --initial_ip_adapter_path


def err(exc: Exception) -> str:
    return f"⚠ {exc}"


class InferViews:
    def __init__(self, runs_dir: str, service: InferenceService | None = None):
        self.runs_dir = runs_dir
        self.service = service or InferenceService()

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
                out = [(label, os.path.relpath(path, self.runs_dir)) for label, path in runs.checkpoint_files(run_dir)]
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
        return (gr.Dropdown(choices=choices, value=choices[0][1]),
                cfg.get("pretrained_model_name_or_path") or gr.skip(), cfg.get("siglip_path") or gr.skip())

    def side_changed(self, name: str | None):
        """Side A: the run's latest file (EMA first)."""
        choices = self.checkpoint_choices(name)
        return gr.Dropdown(choices=choices, value=choices[0][1])

    def side_b_changed(self, name: str | None):
        """Side B: the run's oldest checkpoint (EMA), or no adapter when it has only one."""
        choices = self.checkpoint_choices(name)
        files = [v for _, v in choices if v != NONE and not v.startswith(INITIAL + ":")]
        oldest = [f for f in files if os.path.dirname(f) == os.path.dirname(files[-1])] if files else []
        value = oldest[0] if oldest and os.path.dirname(files[0]) != os.path.dirname(files[-1]) else NONE
        return gr.Dropdown(choices=choices, value=value)

    def adapter_file(self, choice: str | None, typed: str | None = None) -> tuple[str | None, str]:
        """(file or None for no adapter, label)."""
        if typed and typed.strip():
            raw = typed.strip()
            path = raw if os.path.isabs(os.path.expanduser(raw)) else os.path.join(self.runs_dir, raw)
            real = runs.confine(path, [self.runs_dir], "checkpoint file")
            if not os.path.isfile(real):
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
        if not os.path.isfile(real):
            raise UserError("no such checkpoint file (deleted by checkpoints_total_limit?)", where=choice)
        return real, choice.replace(os.sep + "ip-adapter-ema.safetensors", " · EMA").replace(
            os.sep + "ip-adapter.safetensors", " · raw")

    # ------------------------------------------------------------------ inputs
    def example(self, index):
        """The next example of the bundled dataset: source in the editor, its mask as the uploaded mask."""
        index = int(index or 0)
        ex = dataset_example(index)
        src = ex["source"].convert("RGBA")
        editor = {"background": src, "layers": [], "composite": src}
        return editor, ex["mask"].convert("RGB"), ex["reference"], ex["text"], index + 1

    @staticmethod
    def _inputs(editor, mask_up, reference, text, steps, guidance, scale, seed, num_images, resolution, use_context):
        source, mask = editor_inputs(editor, mask_up)
        ref = Image.fromarray(reference).convert("RGB") if reference is not None and not isinstance(reference, Image.Image) \
            else reference
        return Inputs(source=source, mask=mask, text=text or "", reference=ref, steps=steps, guidance=guidance,
                      scale=scale, seed=int(seed or 0), num_images=num_images,
                      resolution=int(resolution) if resolution else None, use_context=bool(use_context))

    # ------------------------------------------------------------------ actions
    def generate(self, choice, typed, flux, siglip, *inputs):
        try:
            file, label = self.adapter_file(choice, typed)
            inp = self._inputs(*inputs)
            images, secs = self.service.generate(flux, siglip, file, inp)
        except UserError as exc:
            gr.Warning(str(exc))
            return [], err(exc)
        gallery = [(im, f"{label} · seed {inp.seed} · #{i + 1}") for i, im in enumerate(images)]
        note = size_note(inp.source.size, inp.resolution)
        if note:
            gr.Info(note)
        size = f"{images[0].width}x{images[0].height}" if images else ""
        return gallery, f"✓ {len(images)} image(s) from **{label}** in {secs:.1f} s, {size}" + (f"\n\nℹ {note}" if note else "")

    def compare(self, choice_a, choice_b, flux, siglip, *inputs):
        try:
            file_a, label_a = self.adapter_file(choice_a)
            file_b, label_b = self.adapter_file(choice_b)
            inp = self._inputs(*inputs)
            images_a, sa = self.service.generate(flux, siglip, file_a, inp)
            images_b, sb = self.service.generate(flux, siglip, file_b, inp)
        except UserError as exc:
            return None, [], err(exc)
        gallery = [(im, f"A · {label_a} · #{i + 1}") for i, im in enumerate(images_a)]
        gallery += [(im, f"B · {label_b} · #{i + 1}") for i, im in enumerate(images_b)]
        return ((images_a[0], images_b[0]), gallery,
                f"✓ A = **{label_a}** ({sa:.1f} s), B = **{label_b}** ({sb:.1f} s); same inputs, seed {inp.seed}")

    def unload(self):
        return self.service.unload()
