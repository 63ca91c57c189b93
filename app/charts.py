"""Plotly figures from metrics.jsonl rows (a list of dicts as read by run_files.metrics).

Every figure marks the phases: the supervised warmup is a shaded band and a dashed line marks where RL
starts; when a metric is logged in both phases (loss), each phase is its own trace (warmup on the right
axis, since its scale differs by orders of magnitude). `uirevision` keeps the user's zoom across updates.
Labels never overlap: the title sits above the plot, the legend below the tick labels (plotly grows the
bottom margin for it), "warmup" at the bottom of its band and "RL" at the top of its line; hovering shows
every trace's value at that step.
"""

from __future__ import annotations

import plotly.graph_objects as go

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
HEIGHT = 280


def _series(rows: list[dict], key: str, phase: str | None = None) -> tuple[list, list]:
    xs, ys = [], []
    for row in rows:
        if row.get(key) is not None and (phase is None or row.get("phase") == phase):
            xs.append(row["step"])
            ys.append(row[key])
    return xs, ys


def phase_bounds(rows: list[dict]) -> tuple[int | None, int | None]:
    """(last warmup step, first RL step) or None where a phase is absent."""
    warm = [r["step"] for r in rows if r.get("phase") == "warmup"]
    rl = [r["step"] for r in rows if r.get("phase") == "rl"]
    return (max(warm) if warm else None), (min(rl) if rl else None)


def _base(title: str, rows: list[dict], revision: str, ytitle: str = "") -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title={"text": title, "x": 0.02, "y": 0.98, "yanchor": "top", "font": {"size": 14}},
                      height=HEIGHT, template="plotly_white", margin={"l": 50, "r": 20, "t": 40, "b": 30},
                      uirevision=revision, hovermode="x unified",
                      legend={"orientation": "h", "x": 0, "xanchor": "left", "y": -0.14, "yanchor": "top",
                              "font": {"size": 10}},
                      xaxis={"title": {"text": ""}, "automargin": True},  # the step is in the hover label
                      yaxis={"title": {"text": ytitle}, "automargin": True})
    last_warm, first_rl = phase_bounds(rows)
    if last_warm is not None:
        end = first_rl if first_rl is not None else last_warm
        fig.add_vrect(x0=0, x1=max(end, 0.5), fillcolor="#888", opacity=0.12, line_width=0,
                      annotation_text="warmup", annotation_position="bottom left")
    if first_rl is not None and last_warm is not None:
        fig.add_vline(x=first_rl, line_dash="dash", line_color="#555", annotation_text="RL",
                      annotation_position="top right")
    return fig


def _empty(fig: go.Figure, note: str) -> go.Figure:
    fig.add_annotation(text=note, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                       font={"size": 13, "color": "#888"})
    return fig


def reward_figure(rows: list[dict], revision: str = "") -> go.Figure:
    """reward/mean with a ±std band, each reward/<name>, and the evaluation reward (EMA weights) as markers."""
    fig = _base("Reward", rows, revision)
    xs, ys = _series(rows, "reward/mean")
    _, sd = _series(rows, "reward/std")
    if xs and len(sd) == len(ys):
        fig.add_trace(go.Scatter(x=xs + xs[::-1], y=[y + s for y, s in zip(ys, sd)] + [y - s for y, s in zip(ys, sd)][::-1],
                                 fill="toself", fillcolor="rgba(31,119,180,0.15)", line={"width": 0},
                                 hoverinfo="skip", name="± std", showlegend=True))
    if xs:
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name="reward/mean", line={"color": COLORS[0], "width": 2}))
    names = sorted({k for r in rows for k in r if k.startswith("reward/")} - {"reward/mean", "reward/std", "reward/failed", "reward/count"})
    for i, key in enumerate(names):
        x, y = _series(rows, key)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=key, line={"dash": "dot", "color": COLORS[(i + 1) % 8]}))
    ex, ey = _series(rows, "eval/reward/mean")
    if ex:
        # the eval's 95% interval as error bars (docs/evaluation.md): a rise is real when it clears them
        lo, hi = _series(rows, "eval/reward/mean_lo")[1], _series(rows, "eval/reward/mean_hi")[1]
        bars = ({"type": "data", "symmetric": False, "array": [h - y for h, y in zip(hi, ey)],
                 "arrayminus": [y - v for v, y in zip(lo, ey)], "thickness": 1, "width": 3}
                if len(lo) == len(hi) == len(ey) else None)
        fig.add_trace(go.Scatter(x=ex, y=ey, mode="markers+lines", name="eval (EMA, fixed set)",
                                 marker={"symbol": "diamond", "size": 9, "color": "#d62728"}, error_y=bars,
                                 line={"dash": "dash", "width": 1, "color": "#d62728"}))
    fx, fy = _series(rows, "reward/failed")
    if any(fy):
        fig.add_trace(go.Bar(x=fx, y=fy, name="failed fraction", marker_color="rgba(214,39,40,0.3)", yaxis="y2"))
        fig.update_layout(yaxis2={"overlaying": "y", "side": "right", "range": [0, 1], "showgrid": False})
    if not (xs or ex):
        _empty(fig, "no reward yet")
    return fig


def metric_figure(rows: list[dict], key: str, title: str | None = None, note: str | None = None,
                  revision: str = "", also: tuple[str, ...] = ()) -> go.Figure:
    """One scalar over steps; split by phase when it was logged in both. `also`: further RL-phase keys
    drawn on the same axes (e.g. AWM's second KL term beside the first)."""
    fig = _base(title or key, rows, revision)
    for i, extra in enumerate(also):
        x, y = _series(rows, extra, "rl")
        if x:
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=extra, marker={"size": 4},
                                     line={"color": COLORS[(i + 1) % len(COLORS)], "dash": "dash"}))
    phases = [p for p in ("warmup", "rl") if _series(rows, key, p)[0]]
    if not phases and not fig.data:
        return _empty(fig, note or f"no {key} yet")
    both = len(phases) == 2
    for phase in phases:
        x, y = _series(rows, key, phase)
        on_right = both and phase == "warmup"
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=f"{key} ({phase})",
                                 line={"color": "#888" if phase == "warmup" else COLORS[0],
                                       "dash": "dot" if phase == "warmup" else "solid"},
                                 marker={"size": 4}, yaxis="y2" if on_right else "y"))
    if both:
        fig.update_layout(yaxis2={"overlaying": "y", "side": "right", "showgrid": False,
                                  "title": {"text": "warmup", "font": {"size": 10}}})
    return fig


def figures(rows: list[dict], revision: str = "", method: str | None = None) -> dict[str, go.Figure]:
    """The monitor's four charts: reward, kl, loss and the method's own (GRPO: the ratio's clip fraction;
    AWM: the flow-matching error of its rollouts, the quantity it reweights; NFT has neither)."""
    if method == "awm":
        own = metric_figure(rows, "awm/fm_loss", "Flow-matching error on the rollouts (AWM)", revision=revision)
    else:
        own = metric_figure(rows, "clipfrac", "Clip fraction (GRPO)",
                            note="no clipfrac: DiffusionNFT has no ratio clip" if method == "nft" else None,
                            revision=revision)
    return {
        "reward": reward_figure(rows, revision),
        "kl": metric_figure(rows, "kl", "KL to the reference policy" + (" and to the EMA policy" if method == "awm" else ""),
                            revision=revision, also=("awm/ema_kl",) if method == "awm" else ()),
        "loss": metric_figure(rows, "loss", "Loss", revision=revision),
        "clipfrac": own,
    }


SYSTEM_KEYS = ("sys/gpu_mem_gib", "sys/gpu_util")


def has_system(rows: list[dict]) -> bool:
    return any(r.get(k) is not None for r in rows for k in SYSTEM_KEYS)


def system_figure(rows: list[dict], revision: str = "") -> go.Figure:
    """GPU memory (GiB, left axis) and utilisation (%, right axis) of the run, when the trainer logs them."""
    fig = _base("GPU", rows, revision, ytitle="memory (GiB)")
    mx, my = _series(rows, "sys/gpu_mem_gib")
    ux, uy = _series(rows, "sys/gpu_util")
    if mx:
        fig.add_trace(go.Scatter(x=mx, y=my, mode="lines", name="GPU memory (GiB)", line={"color": COLORS[4]}))
    if ux:
        fig.add_trace(go.Scatter(x=ux, y=uy, mode="lines", name="GPU util (%)", line={"color": COLORS[5], "dash": "dot"},
                                 yaxis="y2"))
        fig.update_layout(yaxis2={"overlaying": "y", "side": "right", "range": [0, 100], "showgrid": False,
                                  "title": {"text": "util (%)"}})
    if not (mx or ux):
        _empty(fig, "no GPU figures (CPU run, or not logged)")
    return fig


PHASES = ("rollout", "reward", "update", "optimizer", "ema", "old_policy", "eval", "checkpoint_save", "resume_load",
          "load")


def has_phases(rows: list[dict]) -> bool:
    return any(f"time/{p}_s" in r for r in rows for p in ("rollout", "update"))


def phase_figure(rows: list[dict], revision: str = "") -> go.Figure:
    """Where each epoch's seconds went: one stacked bar per logged step, a segment per phase (the trainer's
    time/<phase>_s; evaluation and checkpoint time shows on the epoch after them)."""
    fig = _base("Time per phase (s)", rows, revision, ytitle="seconds")
    timed = [r for r in rows if any(f"time/{p}_s" in r for p in PHASES)]
    for i, phase in enumerate(PHASES):
        xs = [r["step"] for r in timed]
        ys = [r.get(f"time/{phase}_s", 0.0) or 0.0 for r in timed]
        if any(ys):
            fig.add_trace(go.Bar(x=xs, y=ys, name=phase.replace("_", " "), marker={"color": COLORS[i % len(COLORS)]}))
    fig.update_layout(barmode="stack")
    if not timed:
        _empty(fig, "no per-phase times yet")
    return fig


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled
    towards 0. weight 0 = raw."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {weight}")
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def overlay_figure(runs: dict[str, list[dict]], key: str, smoothing: float = 0.0) -> go.Figure:
    """One metric of several runs on one chart (x = step), each smoothed, with the raw values faint behind."""
    fig = _base(f"{key} · {len(runs)} run(s)" + (f" · smoothed {smoothing:g}" if smoothing else ""), [], "overlay")
    for i, (name, rows) in enumerate(runs.items()):
        xs, ys = _series(rows, key)
        if not xs:
            continue
        color = COLORS[i % len(COLORS)]
        if smoothing:
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"{name} (raw)", showlegend=False,
                                     hoverinfo="skip", line={"color": color, "width": 1}, opacity=0.25))
        fig.add_trace(go.Scatter(x=xs, y=smooth(ys, smoothing), mode="lines", name=name, line={"color": color}))
    if not fig.data:
        _empty(fig, f"no {key} in the chosen runs")
    return fig


def metric_keys(rows: list[dict]) -> list[str]:
    """The numeric metrics of some rows, reward first."""
    keys = {k for r in rows for k, v in r.items() if k not in ("step", "time") and isinstance(v, (int, float))}
    return sorted(keys, key=lambda k: (not k.startswith("reward/mean"), not k.startswith("reward"), k))
