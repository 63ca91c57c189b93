"""The Train and Runs tabs' callbacks: UI values in, UI values out (runs.py, presets.py and charts.py do the work).

User mistakes come back as one line starting with "⚠" in the tab's message box, never as a traceback.
The monitor's timer callback returns gr.skip() for every output whose source did not change, so an idle
page costs almost nothing over an SSH tunnel and the charts keep their zoom.
"""

from __future__ import annotations

import os
import time

import gradio as gr
import pandas as pd

from calligrapher_rl.errors import UserError

from . import charts, presets, procs, runs

TABLE_COLUMNS = ["run", "state", "step", "reward", "eval reward", "method", "started"]


def err(exc: Exception) -> str:
    return f"⚠ {exc}"


def suggest_name(preset: str) -> str:
    base = os.path.basename(str(preset or "run"))
    base = base[:-5] if base.endswith(".toml") else base
    return f"{base}-{time.strftime('%m%d-%H%M%S')}"


def _fmt(x, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}g}"


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class TrainViews:
    def __init__(self, runs_dir: str):
        self.runs_dir = runs_dir

    def preset_changed(self, preset: str):
        try:
            values = presets.form_values(self.runs_dir, preset)
        except UserError as exc:
            return [gr.skip()] * len(presets.FORM) + [gr.skip(), err(exc)]
        return [*values, suggest_name(preset), f"preset **{os.path.basename(str(preset))}** loaded"]

    def _argv(self, preset, form, extra):
        return presets.form_argv(self.runs_dir, preset, list(form), extra)

    def check(self, preset, *args):
        *form, extra, gpus, name = args
        try:
            argv = self._argv(preset, form, extra)
            run_dir, full = runs.prepare_start(self.runs_dir, name, argv)
        except UserError as exc:
            return err(exc)
        return f"✓ valid. It will run:\n```\n{procs.command_line(full, gpus)}\n```"

    def start(self, preset, *args):
        *form, extra, gpus, name = args
        try:
            argv = self._argv(preset, form, extra)
            run_dir = runs.start_run(self.runs_dir, name, argv, gpus)
        except UserError as exc:
            return err(exc), gr.skip(), gr.skip(), gr.skip()
        names = [r["name"] for r in runs.list_runs(self.runs_dir)]
        msg = (f"▶ started **{name}** in `{run_dir}` (a detached process: closing this tab or the studio does not "
               "stop it). Follow it in the Runs tab.")
        return (msg, gr.Dropdown(choices=names, value=os.path.basename(run_dir)), gr.Tabs(selected="runs"),
                suggest_name(preset))  # a fresh name, so a second Start is not refused

    def save(self, preset, *args):
        *form, extra, save_name = args
        try:
            path = presets.save_preset(self.runs_dir, save_name, preset, list(form), extra)
        except UserError as exc:
            return err(exc), gr.skip()
        choices = presets.preset_choices(self.runs_dir)
        return f"💾 saved `{path}`", gr.Dropdown(choices=choices, value=path)


class MonitorViews:
    def __init__(self, runs_dir: str):
        self.runs_dir = runs_dir

    # ------------------------------------------------------------------ the list
    def table(self, infos: list[dict] | None = None) -> pd.DataFrame:
        infos = runs.list_runs(self.runs_dir) if infos is None else infos
        rows = [[r["name"], runs.display_state(r), f"{r['step']}/{r['max_steps'] or '?'}", _fmt(r["reward"]),
                 _fmt(r["eval_reward"]), r["method"] or "", runs.fmt_time(r["started"])] for r in infos]
        return pd.DataFrame(rows, columns=TABLE_COLUMNS)

    def names(self) -> list[str]:
        return [r["name"] for r in runs.list_runs(self.runs_dir)]

    def default_run(self, wanted: str | None = None) -> str | None:
        infos = runs.list_runs(self.runs_dir)
        names = [r["name"] for r in infos]
        if wanted in names:
            return wanted
        live = [r["name"] for r in infos if r["live"]]
        return (live or names or [None])[0]

    def row_selected(self, table, evt: gr.SelectData):
        try:
            name = evt.row_value[0] if evt.row_value else table.iloc[evt.index[0], 0]
        except (AttributeError, IndexError, KeyError, TypeError):
            return gr.skip()
        return gr.Dropdown(choices=self.names(), value=name)

    # ------------------------------------------------------------------ one run
    def _dir(self, name: str) -> str:
        return runs.run_path(self.runs_dir, name)

    def status_text(self, info: dict) -> str:
        parts = [f"**{runs.display_state(info)}**", f"step {info['step']} / {info['max_steps'] or '?'}"]
        if info["method"]:
            parts.append(str(info["method"]).upper() if info["method"] in ("grpo", "nft") else info["method"])
        if info["reward"] is not None:
            parts.append(f"reward {info['reward']:.4g}")
        if info["eval_reward"] is not None:
            parts.append(f"eval {info['eval_reward']:.4g}")
        sps = info["sec_per_step"]
        if sps:
            parts.append(f"{sps:.2f} s/step")
            if info["state"] in ("running", "stopping") and info["max_steps"]:
                parts.append(f"~{_duration(sps * (info['max_steps'] - info['step']))} left")
        parts.append("checkpoints: " + (", ".join(map(str, info["checkpoints"][-4:])) or "none"))
        if info["updated"] and info["live"]:
            parts.append(f"updated {_duration(time.time() - info['updated'])} ago")
        text = " · ".join(parts)
        if info["message"]:
            text += f"\n\n{info['message']}"
        if info["state"] == "dead":
            text += "\n\n→ **Mark stopped**, then **Resume** continues from the latest checkpoint."
        if info["state"] == "paused":
            text += "\n\n→ fix the cause, then **Continue**; or **Stop** (saves a checkpoint)."
        return text

    def buttons(self, info: dict | None):
        if info is None:
            return gr.Button(visible=False), gr.Button(visible=False), gr.Button(visible=False)
        s = info["state"]
        stop = gr.Button("Stopping…" if s == "stopping" else "Stop (saves a checkpoint)", visible=s in runs.LIVE,
                         interactive=s != "stopping")
        if s == "paused":
            resume = gr.Button("Continue", visible=True)
        elif s in ("stopped", "failed", "finished") and info["checkpoints"]:
            resume = gr.Button(f"Resume from checkpoint-{info['checkpoints'][-1]}", visible=True)
        else:
            resume = gr.Button(visible=False)
        mark = gr.Button("Mark stopped", visible=s == "dead" or (s == "failed" and info["was"] is None))
        return stop, resume, mark

    def log_text(self, info: dict) -> str:
        train_log = os.path.join(info["path"], "train.log")
        console = os.path.join(info["path"], runs.CONSOLE)
        if info["state"] in ("dead", "failed", "launching", "starting") or not os.path.exists(train_log):
            return runs.tail(console, 60) or runs.tail(train_log, 60)
        return runs.tail(train_log, 60)

    def views(self, name: str | None):
        """Everything about one run: status, buttons, 4 charts, latest grid, all grids, log."""
        if not name:
            empty = charts.figures([])
            return ("No run selected: start one in the Train tab, or pick one above.", *self.buttons(None),
                    *empty.values(), None, [], "")
        try:
            run_dir = self._dir(name)
        except UserError as exc:
            empty = charts.figures([])
            return (err(exc), *self.buttons(None), *empty.values(), None, [], "")
        info = runs.run_info(run_dir)
        figs = charts.figures(runs.metrics(run_dir), revision=name, method=info["method"])
        grids = runs.samples(run_dir)
        gallery = [(p, f"step {s}") for s, p in grids]
        return (self.status_text(info), *self.buttons(info), *figs.values(), grids[-1][1] if grids else None,
                gallery, self.log_text(info))

    def tick(self, name: str | None, seen: dict | None):
        """The timer: like views() plus the run list, with gr.skip() for what did not change."""
        seen = dict(seen or {})
        infos = runs.list_runs(self.runs_dir)
        table = self.table(infos)
        table_key = table.to_json()
        names = [r["name"] for r in infos]
        out_table = table if seen.get("table") != table_key else gr.skip()
        # new choices only: sending a value could undo a selection the user made while this tick ran
        out_dd = gr.Dropdown(choices=names) if seen.get("names") != names else gr.skip()
        seen.update(table=table_key, names=names)
        info = next((r for r in infos if r["name"] == name), None)
        if info is None:
            if seen.get("run", "<unset>") == name:
                return (out_table, out_dd, *[gr.skip()] * 11, seen)
            seen["run"] = name
            return (out_table, out_dd, *self.views(None), seen)
        run_dir = info["path"]
        mpath = os.path.join(run_dir, "metrics.jsonl")
        mkey = (name, os.path.getsize(mpath) if os.path.exists(mpath) else -1, info["method"])
        grids = runs.samples(run_dir)
        gkey = (name, tuple(s for s, _ in grids))
        log = self.log_text(info)
        bkey = (name, info["state"], tuple(info["checkpoints"][-1:]), info["was"])
        out = [self.status_text(info)]
        out += list(self.buttons(info)) if seen.get("buttons") != bkey else [gr.skip()] * 3
        if seen.get("metrics") != mkey:
            out += list(charts.figures(runs.metrics(run_dir), revision=name, method=info["method"]).values())
        else:
            out += [gr.skip()] * 4
        if seen.get("grids") != gkey:
            out += [grids[-1][1] if grids else None, [(p, f"step {s}") for s, p in grids]]
        else:
            out += [gr.skip()] * 2
        out.append(log if seen.get("log") != (name, log) else gr.skip())
        seen.update(run=name, buttons=bkey, metrics=mkey, grids=gkey, log=(name, log))
        return (out_table, out_dd, *out, seen)

    # ------------------------------------------------------------------ actions
    def stop(self, name):
        try:
            return runs.stop_run(self._dir(name))
        except UserError as exc:
            return err(exc)

    def resume(self, name, extra, gpus):
        try:
            return runs.resume_run(self._dir(name), presets.split_extra(extra), gpus or "")
        except UserError as exc:
            return err(exc)

    def mark(self, name):
        try:
            return runs.mark_stopped(self._dir(name))
        except UserError as exc:
            return err(exc)
