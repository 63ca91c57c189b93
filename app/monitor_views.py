"""The Runs tab's callbacks: the run list, one run's monitor (status, buttons, charts, grids, log), the actions
on a run (stop, resume, mark stopped, delete, rename) and several runs at once (overlay, CSV export). UI values
in, {component name: value} out, as in views.py (the Train tab's); runs.py, manage.py and charts.py do the work.

The selected run lives in server-side state (`selected`), written by every callback that changes it and read
by the timer (`tick`), and all of these run one at a time (one concurrency group): a timer tick can therefore
never show a run the user has already left.
"""

from __future__ import annotations

import os
import time

import gradio as gr
import pandas as pd

from calligrapher_rl.errors import UserError

from . import charts, manage, presets, run_files, runs
from .view_common import err, toast_error

TABLE_COLUMNS = ["run", "state", "step", "reward", "eval reward", "method", "started"]
MONITOR_KEYS = ["status", "stop_btn", "resume_btn", "mark_btn", "delete_btn", "clone_btn", "p_reward", "p_kl",
                "p_loss", "p_clip", "p_sys", "p_time", "latest", "grids", "prompt_grids", "log", "log_file", "selected"]
LOG_LINES = 200


def _fmt(x, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}g}"


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MonitorViews:
    """The Runs tab: the run list, the selected run's monitor, the actions on it, several runs together."""

    def __init__(self, runs_dir: str, read_roots: list[str] | None = None):
        self.runs_dir = runs_dir
        self.read_roots = read_roots

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

    def row_selected(self, table, evt: gr.SelectData) -> dict:
        try:
            name = evt.row_value[0] if evt.row_value else table.iloc[evt.index[0], 0]
        except (AttributeError, IndexError, KeyError, TypeError):
            return {}
        return {**self.views(name), "run_dd": gr.Dropdown(choices=self.names(), value=name)}

    # ------------------------------------------------------------------ one run
    def _dir(self, name: str) -> str:
        return runs.run_path(self.runs_dir, name)

    def status_text(self, info: dict) -> str:
        parts = [f"**{info['name']}**", f"**{runs.display_state(info)}**", f"step {info['step']} / {info['max_steps'] or '?'}"]
        if info.get("phase"):
            parts.append(f"phase: {info['phase']}")
        if info["method"]:
            parts.append(str(info["method"]).upper() if info["method"] in ("grpo", "nft", "awm") else info["method"])
        if info["reward"] is not None:
            parts.append(f"reward {info['reward']:.4g}")
        if info["eval_reward"] is not None:
            parts.append(f"eval {info['eval_reward']:.4g}")
        sps = info["sec_per_step"]
        if sps:
            parts.append(f"{sps:.2f} s/step")
        if info["state"] in ("running", "stopping"):
            eta = info.get("eta_s")
            if not isinstance(eta, (int, float)) and sps and info["max_steps"]:
                eta = sps * (info["max_steps"] - info["step"])  # over the last steps (run_files.seconds_per_step)
            if isinstance(eta, (int, float)):
                parts.append(f"~{_duration(eta)} left")
        parts.append("checkpoints: " + (", ".join(map(str, info["checkpoints"][-4:])) or "none"))
        if info["updated"] and info["live"]:
            parts.append(f"updated {_duration(time.time() - info['updated'])} ago")
        text = " · ".join(parts)
        if info.get("trained"):
            text += f"\n\ntrains {info['trained']}"
        if info["message"]:
            text += f"\n\n{info['message']}"
        if info["state"] == "dead":
            text += "\n\n→ **Mark stopped**, then **Resume** continues from the latest checkpoint."
        if info["state"] == "paused":
            text += "\n\n→ fix the cause, then **Continue**; or **Stop** (saves a checkpoint)."
        if info["state"] == "failed" and not info["checkpoints"]:
            text += "\n\n→ no checkpoint to resume: **Clone config** into the Train form (fix it, Start again), " \
                    "or **Delete** (moves the folder to the archive)."
        return text

    def buttons(self, info: dict | None) -> dict:
        hidden = gr.Button(visible=False)
        if info is None:
            return dict.fromkeys(("stop_btn", "resume_btn", "mark_btn", "delete_btn", "clone_btn"), hidden)
        s = info["state"]
        label = {"stopping": "Stopping…", "queued": "Remove from the queue"}.get(s, "Stop (saves a checkpoint)")
        stop = gr.Button(label, visible=s in runs.LIVE or s == "queued", interactive=s != "stopping")
        if s == "paused":
            resume = gr.Button("Continue", visible=True)
        elif s in ("stopped", "failed", "finished") and info["checkpoints"]:
            resume = gr.Button(f"Resume from checkpoint-{info['checkpoints'][-1]}", visible=True)
        else:
            resume = hidden
        ended = not info["live"] and s not in ("dead", "queued")
        return {"stop_btn": stop, "resume_btn": resume,
                "mark_btn": gr.Button("Mark stopped", visible=s == "dead" or (s == "failed" and info["was"] is None)),
                "delete_btn": gr.Button("Delete (to archive)", visible=ended),
                "clone_btn": gr.Button("Clone config", visible=bool(runs.run_config(info["path"])))}

    @staticmethod
    def log_path(info: dict) -> str | None:
        """The run's console (everything the process printed: per-step lines, warnings, errors); a run
        started outside the studio has only train.log."""
        for fname in (runs.CONSOLE, "train.log"):
            path = os.path.join(info["path"], fname)
            if os.path.isfile(path):
                return path
        return None

    def log_text(self, info: dict) -> str:
        path = self.log_path(info)
        return run_files.tail(path, LOG_LINES) if path else ""

    def _charts(self, run_dir: str, info: dict) -> dict:
        rows = run_files.metrics(run_dir)
        figs = charts.figures(rows, revision=info["name"], method=info["method"])
        return {"p_reward": figs["reward"], "p_kl": figs["kl"], "p_loss": figs["loss"], "p_clip": figs["clipfrac"],
                # GPU memory and utilisation beside the curves, when the trainer logged them (not on CPU)
                "p_sys": gr.Plot(charts.system_figure(rows, revision=info["name"]), visible=charts.has_system(rows)),
                "p_time": gr.Plot(charts.phase_figure(rows, revision=info["name"]), visible=charts.has_phases(rows))}

    def _grids(self, run_dir: str) -> dict:
        grids = run_files.samples(run_dir)
        prompts = run_files.samples(run_dir, "prompts")  # the sample prompts' own gallery (newest first)
        return {"latest": grids[-1][1] if grids else None, "grids": [(p, f"step {s}") for s, p in grids],
                "prompt_grids": gr.Gallery([(p, f"step {s}") for s, p in reversed(prompts)], visible=bool(prompts))}

    def views(self, name: str | None) -> dict:
        """Everything about one run (status, buttons, charts, grids, log) and the selection itself."""
        if not name:
            return self._empty("No run selected: start one in the Train tab, or pick one above.", None)
        try:
            run_dir = self._dir(name)
        except UserError as exc:
            return self._empty(err(exc), None)
        if not os.path.isdir(run_dir):
            return self._empty(f"⚠ no run named {name!r} in {self.runs_dir}", None)
        info = runs.run_info(run_dir)
        return {"status": self.status_text(info), **self.buttons(info), **self._charts(run_dir, info),
                **self._grids(run_dir), "log": self.log_text(info), "log_file": self.log_path(info), "selected": name}

    def _empty(self, text: str, name) -> dict:
        empty = charts.figures([])
        return {"status": text, **self.buttons(None), "p_reward": empty["reward"], "p_kl": empty["kl"],
                "p_loss": empty["loss"], "p_clip": empty["clipfrac"], "p_sys": gr.Plot(None, visible=False),
                "p_time": gr.Plot(None, visible=False), "latest": None, "grids": [],
                "prompt_grids": gr.Gallery([], visible=False), "log": "", "log_file": None, "selected": name}

    def select(self, name: str | None) -> dict:
        return self.views(name)

    def notices(self, infos: list[dict], seen: dict) -> None:
        """A toast when a run the page saw live has ended (finished, stopped, failed, dead)."""
        before = seen.get("states") or {}
        for r in infos:
            was = before.get(r["name"])
            if was in runs.LIVE and not r["live"]:
                text = f"Run {r['name']} {runs.display_state(r)} at step {r['step']}"
                (gr.Info if r["state"] in ("finished", "stopped") else gr.Warning)(text)
        seen["states"] = {r["name"]: r["state"] for r in infos}

    def tick(self, name: str | None, seen: dict | None) -> dict:
        """The timer: the run list and the selected run, leaving out whatever did not change (so an idle page
        costs little and the charts keep their zoom)."""
        seen = dict(seen or {})
        infos = runs.list_runs(self.runs_dir)
        self.notices(infos, seen)
        out: dict = {}
        table = self.table(infos)
        table_key = table.to_json()
        names = [r["name"] for r in infos]
        if seen.get("table") != table_key:
            out["runs_table"] = table
        if seen.get("names") != names:  # new choices only: the value is the user's (or Start's) to set
            out["run_dd"] = gr.Dropdown(choices=names)
            out["overlay_runs"] = gr.Dropdown(choices=names)
        seen.update(table=table_key, names=names)
        info = next((r for r in infos if r["name"] == name), None)
        if info is None:
            if seen.get("run", "<unset>") != name:
                out.update(self.views(None) if name is None else self._empty(f"⚠ run {name!r} is gone", name))
            seen["run"] = name
            out["seen"] = seen
            return out
        run_dir = info["path"]
        mpath = os.path.join(run_dir, "metrics.jsonl")
        mkey = (name, os.path.getsize(mpath) if os.path.exists(mpath) else -1, info["method"])
        gkey = (name, tuple(s for s, _ in run_files.samples(run_dir)), tuple(s for s, _ in run_files.samples(run_dir, "prompts")))
        log = self.log_text(info)
        bkey = (name, info["state"], tuple(info["checkpoints"][-1:]), info["was"])
        out["status"] = self.status_text(info)
        if seen.get("buttons") != bkey:
            out.update(self.buttons(info))
        if seen.get("metrics") != mkey:
            out.update(self._charts(run_dir, info))
        if seen.get("grids") != gkey:
            out.update(self._grids(run_dir))
        if seen.get("log") != (name, log):
            out.update(log=log, log_file=self.log_path(info))
        seen.update(run=name, buttons=bkey, metrics=mkey, grids=gkey, log=(name, log))
        out["seen"] = seen
        return out

    # ------------------------------------------------------------------ actions
    def _act(self, fn, name, *args) -> dict:
        try:
            msg = fn(self._dir(name), *args)
        except UserError as exc:
            return {**self.views(name), "action_msg": toast_error(exc)}
        gr.Info(f"{name}: {msg}")
        return {**self.views(name), "action_msg": f"✓ {name}: {msg}"}

    def stop(self, name) -> dict:
        return self._act(runs.stop_run, name)

    def resume(self, name, extra, gpus) -> dict:
        try:
            flags = presets.split_extra(extra)
        except UserError as exc:
            return {"action_msg": toast_error(exc)}
        return self._act(lambda d: runs.resume_run(d, flags, gpus or "", self.read_roots), name)

    def mark(self, name) -> dict:
        return self._act(runs.mark_stopped, name)

    def delete(self, name) -> dict:
        try:
            dest = manage.archive_run(self._dir(name))
        except UserError as exc:
            return {"action_msg": toast_error(exc)}
        gr.Info(f"{name} moved to the archive")
        after = self.default_run()
        return {**self.views(after), "run_dd": gr.Dropdown(choices=self.names(), value=after),
                "runs_table": self.table(), "action_msg": f"🗑 **{name}** moved to `{dest}` (restore: move it back)"}

    def rename(self, name, new_name) -> dict:
        try:
            dest = manage.rename_run(self._dir(name), new_name)
        except UserError as exc:
            return {"action_msg": toast_error(exc)}
        new = os.path.basename(dest)
        gr.Info(f"{name} renamed to {new}")
        return {**self.views(new), "run_dd": gr.Dropdown(choices=self.names(), value=new), "runs_table": self.table(),
                "action_msg": f"✓ renamed **{name}** to **{new}**"}

    # ------------------------------------------------------------------ several runs
    def _rows_of(self, names) -> dict[str, list[dict]]:
        out = {}
        for name in names or []:
            try:
                out[name] = run_files.metrics(self._dir(name))
            except UserError:
                continue
        return out

    def overlay(self, names, key, smoothing) -> dict:
        """One metric of several runs on one chart, smoothed (TensorBoard's debiased EMA)."""
        series = self._rows_of(names)
        keys = charts.metric_keys([r for rows in series.values() for r in rows])
        key = key if key in keys else (keys[0] if keys else "reward/mean")
        return {"p_overlay": charts.overlay_figure(series, key, float(smoothing or 0)),
                "overlay_key": gr.Dropdown(choices=keys, value=key)}

    def export_csv(self, names, selected=None) -> dict:
        """The metrics of the chosen runs (else the selected one) as one CSV: run, step, phase, time, metrics."""
        import tempfile

        names = list(names or []) or ([selected] if selected else [])
        frames = [run_files.metrics_frame(self._dir(n)).assign(run=n) for n in self._rows_of(names)]
        frames = [f for f in frames if len(f)]
        if not frames:
            gr.Warning("no metrics to export yet")
            return {"csv_file": None}
        df = pd.concat(frames, ignore_index=True)
        front = [c for c in ("run", "step", "phase", "time") if c in df.columns]
        df = df[front + sorted(c for c in df.columns if c not in front)]
        folder = tempfile.mkdtemp(prefix="studio-csv-")
        path = os.path.join(folder, ("metrics-" + "-".join(names))[:120] + ".csv")
        df.to_csv(path, index=False)
        return {"csv_file": path}
