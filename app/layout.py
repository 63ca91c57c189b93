"""The Blocks: components and event wiring only (callbacks live in views.py, monitor_views.py and
infer_views.py).

Callbacks return {name: value}; `Wire` maps the names to this page's components (a name left out leaves its
component unchanged). API names (for gradio_client): preset_values, check_run, start_run, save_preset,
clone_config, list_runs, monitor, stop_run, resume_run, mark_stopped, delete_run, rename_run, load_example,
checkpoints, generate, evaluate (Compare: the evaluation), compare_step0, compare (the quick look), unload.
One function builds each tab (tabs.py) and one here wires it.
"""

from __future__ import annotations

import functools

import gradio as gr

from . import export_views, gpu_panel, presets, tabs
from .compare_views import GALLERIES, CompareViews
from .data_views import DataViews
from .infer_views import SLOTS, InferViews
from .inference import InferenceService
from .monitor_views import MONITOR_KEYS, MonitorViews
from .views import FORM_KEYS, TrainViews, suggest_name

POLL_S = 2.0
GPU_POLL_S = 5.0
CSS = """
#run-status {min-height: 3em}
.mono textarea {font-family: ui-monospace, monospace; font-size: 12px}
"""
# The log box follows its tail: on every new text it scrolls to the end, unless the reader scrolled up (then it
# stays where they are until they scroll back to the bottom).
JS = """
() => {
  setInterval(() => {
    const box = document.querySelector('#run-log textarea');
    if (!box) return;
    if (!box.dataset.watched) {
      box.dataset.watched = '1';
      box.dataset.follow = '1';
      box.addEventListener('scroll', () => {
        box.dataset.follow = (box.scrollHeight - box.scrollTop - box.clientHeight < 30) ? '1' : '0';
      });
    }
    if (box.dataset.len !== String(box.value.length)) {
      box.dataset.len = String(box.value.length);
      if (box.dataset.follow === '1') box.scrollTop = box.scrollHeight;
    }
  }, 300);
}
"""
HIDDEN = {"show_progress": "hidden"}
MONITOR_GROUP = {"concurrency_id": "monitor", "concurrency_limit": 1}  # selection changes and ticks, in order


class Wire:
    """Component names -> components, and callbacks returning {name: value} -> {component: value}."""

    def __init__(self):
        self.c: dict[str, gr.components.Component] = {}

    def add(self, name: str, component):
        self.c[name] = component
        return component

    def __call__(self, *names: str) -> list:
        return [self.c[n] for n in names]

    def fn(self, callback):
        @functools.wraps(callback)
        def keyed(*args, **kwargs):
            return {self.c[name]: value for name, value in callback(*args, **kwargs).items()}

        return keyed


def build_demo(runs_dir: str, service: InferenceService | None = None, read_roots: list[str] | None = None) -> gr.Blocks:
    inf, data = InferViews(runs_dir, service), DataViews(runs_dir, read_roots)
    train, mon = TrainViews(runs_dir, read_roots, service=inf.service), MonitorViews(runs_dir, read_roots)
    cmp = CompareViews(inf)
    preset0 = presets.DEFAULT_PRESET
    values0 = presets.form_values(runs_dir, preset0)
    w = Wire()

    with gr.Blocks(title="Calligrapher RL studio") as demo:
        gr.Markdown(f"## Calligrapher RL studio\nRuns live in `{runs_dir}`: each is a detached process that keeps "
                    "going when this tab (or the studio) closes; reopen the page to pick it up again.")
        w.add("seen", gr.State({}))
        w.add("selected", gr.State(None))  # the monitored run, server-side: the timer reads it when it runs
        with w.add("tabs", gr.Tabs()):
            tabs.train_tab(w, runs_dir, preset0, values0)
            gpus0 = gpu_panel.rows(runs_dir)
            tabs.runs_tab(w, gpus0)
            tabs.inference_tab(w)
            tabs.compare_tab(w)
            tabs.dataset_tab(w, presets.defaults(runs_dir, preset0).get("train_data_json") or "bundled")
        _wire_train(w, train)
        _wire_runs(w, mon)
        _wire_inference(w, inf, cmp)
        _wire_dataset(w, data)
        _wire_load(w, demo, runs_dir, mon, inf)
        if gpus0:  # no GPU, no panel and no polling
            gr.Timer(GPU_POLL_S).tick(lambda: gpu_panel.rows(runs_dir), None, w("gpu_panel"), api_visibility="private",
                                      **HIDDEN)
    return demo


def _wire_train(w: Wire, train: TrainViews) -> None:
    train_in = w("preset", *FORM_KEYS, "extra", "gpus", "run_name", "force")
    monitor = w(*MONITOR_KEYS)
    w.c["preset"].change(w.fn(train.preset_changed), w("preset"), w(*FORM_KEYS, "run_name", "train_msg", "data_path"),
                         api_name="preset_values")
    w.c["check_btn"].click(w.fn(train.check), train_in, w("train_msg"), api_name="check_run")
    w.c["start_btn"].click(w.fn(train.start), train_in, [*w("train_msg", "run_dd", "tabs", "run_name"), *monitor],
                           api_name="start_run", **MONITOR_GROUP)
    w.c["save_btn"].click(w.fn(train.save), w("preset", *FORM_KEYS, "extra", "save_name"), w("train_msg", "preset"),
                          api_name="save_preset")
    w.c["clone_btn"].click(w.fn(train.clone), w("run_dd"),
                           w(*FORM_KEYS, "preset", "extra", "run_name", "tabs", "train_msg", "action_msg"),
                           api_name="clone_config")


def _wire_runs(w: Wire, mon: MonitorViews) -> None:
    monitor = w(*MONITOR_KEYS)
    poll = gr.Timer(POLL_S)
    poll.tick(w.fn(mon.tick), w("selected", "seen"), [*w("runs_table", "run_dd", "overlay_runs"), *monitor, w.c["seen"]],
              api_visibility="private", **MONITOR_GROUP, **HIDDEN)
    # the user's own choice (`input`, not `change`: a value set by a callback comes with its monitor already)
    w.c["run_dd"].input(w.fn(mon.select), w("run_dd"), monitor, api_name="monitor", **MONITOR_GROUP, **HIDDEN)
    w.c["runs_table"].select(w.fn(mon.row_selected), w("runs_table"), [*monitor, w.c["run_dd"]],
                             api_visibility="private", **MONITOR_GROUP)
    # actions name the run shown in the Run box (what the user sees); each sets the selection to it
    act_out = [*monitor, *w("action_msg")]
    w.c["stop_btn"].click(w.fn(mon.stop), w("run_dd"), act_out, api_name="stop_run", **MONITOR_GROUP)
    w.c["resume_btn"].click(w.fn(mon.resume), w("run_dd", "resume_extra", "resume_gpus"), act_out,
                            api_name="resume_run", **MONITOR_GROUP)
    w.c["mark_btn"].click(w.fn(mon.mark), w("run_dd"), act_out, api_name="mark_stopped", **MONITOR_GROUP)
    manage_out = [*act_out, *w("run_dd", "runs_table")]
    w.c["delete_btn"].click(w.fn(mon.delete), w("run_dd"), manage_out, api_name="delete_run", **MONITOR_GROUP)
    w.c["rename_btn"].click(w.fn(mon.rename), w("run_dd", "new_name"), manage_out, api_name="rename_run",
                            **MONITOR_GROUP)
    overlay_in = w("overlay_runs", "overlay_key", "smoothing")
    for trigger in (w.c["overlay_runs"].change, w.c["overlay_key"].input, w.c["smoothing"].release):
        trigger(w.fn(mon.overlay), overlay_in, w("p_overlay", "overlay_key"), api_visibility="private", **HIDDEN)
    w.c["csv_btn"].click(w.fn(mon.export_csv), w("overlay_runs", "run_dd"), w("csv_file"), api_name="export_csv")


def _wire_inference(w: Wire, inf: InferViews, cmp: CompareViews) -> None:
    """The Inference and Compare tabs (they share the model paths and the loaded stack)."""
    inf_in = w("editor", "mask_up", "reference", "text", "steps", "guidance", "scale", "seed", "num_images",
               "resolution", "use_context")
    w.c["example_btn"].click(w.fn(inf.example), w("ex_index", "flux"), w("editor", "mask_up", "reference", "text", "ex_index"),
                             api_name="load_example")
    w.c["inf_run"].change(w.fn(inf.run_changed), w("inf_run"), w("ckpt", "flux", "siglip"), api_name="checkpoints")
    w.c["gen_btn"].click(w.fn(inf.generate), [*w("ckpt", "ckpt_path", "flux", "siglip"), *inf_in],
                         w("out_gallery", "inf_msg"), api_name="generate", concurrency_id="model")
    w.c["cmp_eval_btn"].click(w.fn(cmp.evaluate), w(*SLOTS, "cmp_data", "cmp_noises", "cmp_examples", "flux", "siglip"),
                              w("cmp_table", "cmp_verdict", "cmp_report", "cmp_eval_msg", *GALLERIES), api_name="evaluate",
                              concurrency_id="model")
    w.c["cmp_btn"].click(w.fn(inf.compare), [*w(*SLOTS, "flux", "siglip"), *inf_in],
                         w("slider", "cmp_gallery", "cmp_scores", "cmp_msg"), api_name="compare", concurrency_id="model")
    w.c["step0_btn"].click(w.fn(cmp.step0), w("step0_run"), w(*SLOTS, "cmp_eval_msg"), api_name="compare_step0")
    w.c["cmp_refresh"].click(w.fn(inf.compare_choices), None, w(*SLOTS), api_visibility="private")
    w.c["unload_btn"].click(w.fn(inf.unload), None, w("inf_msg"), api_name="unload", concurrency_id="model")
    w.c["exp_btn"].click(lambda c, f: dict(zip(w("exp_file", "exp_msg"), export_views.export(inf.runs_dir, c, f))),
                         w("ckpt", "exp_format"), w("exp_file", "exp_msg"), api_name="export")
    w.c["push_btn"].click(lambda c, r, t: {w.c["exp_msg"]: export_views.push(inf.runs_dir, c, r, t)},
                          w("ckpt", "hub_repo", "hub_token"), w("exp_msg"), api_name="push_to_hub")


def _wire_dataset(w: Wire, data: DataViews) -> None:
    w.c["data_show_btn"].click(w.fn(data.show), w("data_path", "data_page"), w("data_gallery", "data_msg", "data_page"),
                               api_name="dataset_page")
    w.c["data_validate_btn"].click(w.fn(data.validate), w("data_path"), w("data_problems"), api_name="dataset_validate")
    w.c["synth_btn"].click(w.fn(data.synth), w("synth_name", "synth_n", "synth_res", "synth_seed"),
                           w("data_gallery", "data_msg", "data_page", "data_path"), api_name="dataset_synth")


def _wire_load(w: Wire, demo: gr.Blocks, runs_dir: str, mon: MonitorViews, inf: InferViews) -> None:
    def on_load(request: gr.Request) -> dict:
        """Reconnect: everything comes from runs_dir; ?run=NAME opens the Runs tab on that run."""
        wanted = request.query_params.get("run") if request else None
        names = mon.names()
        current = mon.default_run(wanted)
        with_ckpt = inf.runs_with_checkpoints()
        out = {**mon.views(current), **inf.compare_choices(),
               "preset": gr.Dropdown(choices=presets.preset_choices(runs_dir)),
               "run_name": suggest_name(presets.DEFAULT_PRESET), "runs_table": mon.table(),
               "run_dd": gr.Dropdown(choices=names, value=current), "overlay_runs": gr.Dropdown(choices=names),
               "inf_run": gr.Dropdown(choices=with_ckpt, value=with_ckpt[0] if with_ckpt else None),
               "step0_run": gr.Dropdown(choices=with_ckpt, value=with_ckpt[0] if with_ckpt else None)}
        if wanted:
            if wanted in names:
                out["tabs"] = gr.Tabs(selected="runs")
            else:
                gr.Warning(f"?run={wanted}: no such run in {runs_dir}")
        return out

    demo.load(w.fn(on_load), None, w("preset", "run_name", "runs_table", "run_dd", "overlay_runs", "tabs", *MONITOR_KEYS, *SLOTS,
                                     "inf_run", "step0_run"), api_name="list_runs", **MONITOR_GROUP)
