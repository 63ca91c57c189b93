"""The Train tab's callbacks: UI values in, {component name: value} out (layout.py maps the names to
components; a name left out leaves its component as it is). runs.py, presets.py and form_check.py do the work;
the Runs tab's callbacks are in monitor_views.py.

User mistakes come back as one line starting with "⚠" in the tab's message box and as a toast, never as a
traceback. Start and Clone switch tabs: Start shows the new run's monitor (and selects it, as every Runs-tab
callback that changes the selection does), Clone fills this tab's form from a run.
"""

from __future__ import annotations

import os
import time

import gradio as gr

from calligrapher_rl.errors import UserError

from . import form_check, gpu_queue, gpu_room, presets, procs, runs
from .monitor_views import MonitorViews
from .view_common import RunsFolderViews, toast_error

FORM_KEYS = [f"form:{flag}" for flag in presets.FORM_FLAGS]


def suggest_name(preset: str) -> str:
    base = os.path.basename(str(preset or "run"))
    base = base.removesuffix(".toml")
    return f"{base}-{time.strftime('%m%d-%H%M%S')}"


class TrainViews(RunsFolderViews):
    """The Train tab. `service`: the studio's inference service, whose model leaves the card a run starts on."""

    def __init__(self, runs_dir: str, read_roots: list[str] | None = None, service=None):
        super().__init__(runs_dir, read_roots)
        self.service = service

    def preset_changed(self, preset: str) -> dict:
        try:
            values = presets.form_values(self.runs_dir, preset)
        except UserError as exc:
            return {"train_msg": toast_error(exc)}
        data = presets.defaults(self.runs_dir, preset).get("train_data_json")  # the Dataset tab shows the preset's
        return {**dict(zip(FORM_KEYS, values)), "run_name": suggest_name(preset), **({"data_path": data} if data else {}),
                "train_msg": f"preset **{os.path.basename(str(preset))}** loaded"}

    def _plan(self, preset, args):
        *form, extra, gpus, name, force = args
        argv = presets.form_argv(self.runs_dir, preset, list(form), extra)
        run_dir, full, problems = runs.plan_start(self.runs_dir, name, argv, gpus or "", self.read_roots)
        held = {} if force else gpu_queue.conflicts(self.runs_dir, gpus or "")
        return run_dir, full, problems, gpus or "", held

    @staticmethod
    def _held(held: dict) -> str:
        return ", ".join(f"GPU {g} (run {n})" for g, n in sorted(held.items()))

    def check(self, preset, *args) -> dict:
        """What Start would meet: the trainer's parser and validation, the allowed paths, then its preflight. Every
        problem at once, named by the form's labels (form_check.py)."""
        problems = self._form_problems(preset, args)
        try:
            if not problems:
                _, full, problems, gpus, held = self._plan(preset, args)
                problems = [form_check.labelled(p) for p in problems]
        except UserError as exc:
            problems = [form_check.labelled(str(exc))]
        if problems:
            gr.Warning(f"{len(problems)} problem(s): Start would fail. The first: {problems[0]}")
            return {"train_msg": "⚠ Start would fail:\n" + "\n".join(f"- {p}" for p in problems)}
        wait = f"\n\nIt would wait in the queue for {self._held(held)} (or tick Force)." if held else ""
        gr.Info("Check passed: Start will " + ("queue" if held else "launch") + " this run")
        return {"train_msg": f"✓ valid. It will run:\n```\n{procs.command_line(full, gpus)}\n```{wait}"}

    def _form_problems(self, preset, args) -> list[str]:
        *form, extra, _, name, _ = args
        problems = form_check.form_problems(form)
        if not problems:
            try:
                argv = presets.form_argv(self.runs_dir, preset, list(form), extra)
            except UserError as exc:
                return [form_check.labelled(str(exc))]
            problems = form_check.config_problems([*argv, "--output_dir", os.path.join(self.runs_dir, name or "run")])
        return problems

    def start(self, preset, *args) -> dict:
        try:
            problems = self._form_problems(preset, args)
            if problems:
                raise UserError("; ".join(problems))
            run_dir, full, problems, gpus, held = self._plan(preset, args)
            problems = [form_check.labelled(p) for p in problems]
            if problems:
                raise UserError(problems[0] + (f" (and {len(problems) - 1} more: press Check)" if len(problems) > 1 else ""))
            made_room = ""
            if held:
                gpu_queue.enqueue(run_dir, full, gpus)
            else:
                made_room = gpu_room.make_room_for_run(self.service, gpus)
                procs._launch(run_dir, full, gpus)
        except UserError as exc:
            return {"train_msg": toast_error(exc)}
        name = os.path.basename(run_dir)
        if held:
            gr.Info(f"Queued {name}: waits for {self._held(held)}")
            msg = f"⏳ queued **{name}**: it starts when {self._held(held)} is free (Force shares GPUs instead)."
        else:
            gr.Info(f"Started {name}")
            msg = (f"▶ started **{name}** in `{run_dir}` (a detached process: closing this tab or the studio does not "
                   "stop it). Follow it in the Runs tab." + made_room)
        # the monitor of the new run comes with the tab switch, so the previous run is never shown under it
        return {**MonitorViews(self.runs_dir, self.read_roots).views(name), "train_msg": msg, "tabs": gr.Tabs(selected="runs"),
                "run_dd": gr.Dropdown(choices=[r["name"] for r in runs.list_runs(self.runs_dir)], value=name),
                "run_name": suggest_name(preset)}  # a fresh name, so a second Start is not refused

    def save(self, preset, *args) -> dict:
        *form, extra, save_name = args
        try:
            path = presets.save_preset(self.runs_dir, save_name, preset, list(form), extra)
        except UserError as exc:
            return {"train_msg": toast_error(exc)}
        gr.Info(f"Saved preset {os.path.basename(path)[:-5]}")
        return {"train_msg": f"💾 saved preset `{path}`",
                "preset": gr.Dropdown(choices=presets.preset_choices(self.runs_dir), value=path)}

    def clone(self, name) -> dict:
        """A run's configuration into the form (base preset + form + extra flags), with a fresh name."""
        try:
            cfg = runs.run_config(runs.run_path(self.runs_dir, name))
            preset, form, extra = presets.clone_values(self.runs_dir, cfg)
        except UserError as exc:
            return {"action_msg": toast_error(exc)}
        gr.Info(f"{name}'s configuration is in the Train form")
        return {**dict(zip(FORM_KEYS, form)), "preset": preset, "extra": extra, "run_name": f"{name}-clone",
                "tabs": gr.Tabs(selected="train"),
                "train_msg": f"configuration of **{name}** loaded (preset {preset} + extra flags): press Start"}
