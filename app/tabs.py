"""The tabs' components (one function per tab); layout.py wires them. Each adds its components to the page's
`Wire` under the names the callbacks use."""

from __future__ import annotations

import gradio as gr

from . import export_views, gpu_panel, presets
from .compare_views import EVAL_SETS, GALLERIES, RUN_DATA
from .infer_views import SLOTS
from .monitor_views import TABLE_COLUMNS
from .uploads import checked
from .views import suggest_name


def _form_component(flag: str, label: str, info: str | None, value):
    from calligrapher_rl.config import FIELDS, field_type

    base, _ = field_type(flag)
    choices = FIELDS[flag].metadata.get("choices")
    if choices:
        return gr.Dropdown(list(choices), value=value, label=label, info=info)
    if base is bool:
        return gr.Checkbox(value=bool(value), label=label, info=info)
    if base in (int, float) and flag != "rl_kl_beta":
        return gr.Number(value=value, label=label, info=info, precision=0 if base is int else None)
    return gr.Textbox(value="" if value is None else str(value), label=label, info=info)


def train_tab(w, runs_dir: str, preset0: str, values0: list) -> None:
    """Preset, the form, Check / Start / Save preset."""
    with gr.Tab("Train", id="train"):
        with gr.Row():
            w.add("preset", gr.Dropdown(presets.preset_choices(runs_dir), value=preset0, label="Preset",
                                        scale=2, allow_custom_value=True))
            w.add("run_name", gr.Textbox(suggest_name(preset0), label="Run name", scale=2))
            w.add("gpus", gr.Textbox("", label="GPUs", info="CUDA_VISIBLE_DEVICES; several = accelerate launch",
                                     scale=1))
        for i in range(0, len(presets.FORM), 4):
            with gr.Row():
                for (flag, label, info), value in zip(presets.FORM[i:i + 4], values0[i:i + 4]):
                    w.add(f"form:{flag}", _form_component(flag, label, info, value))
        w.add("extra", gr.Textbox("", label="Extra flags", placeholder="--seed 1 --rl_noise_level 0.8  (any flag "
                                  "of python -m calligrapher_rl.train --help; typed last, so they win)"))
        with gr.Row():
            w.add("force", gr.Checkbox(False, label="Force: start even if a run holds these GPUs (else it "
                                                    "waits in the queue)"))
            w.add("check_btn", gr.Button("Check", elem_id="check-btn"))
            w.add("start_btn", gr.Button("Start", variant="primary", elem_id="start-btn"))
        with gr.Row():
            w.add("save_name", gr.Textbox("", label="Save as preset (name)", scale=3))
            w.add("save_btn", gr.Button("Save preset", scale=1, elem_id="save-btn"))
        w.add("train_msg", gr.Markdown(elem_id="train-msg"))


def runs_tab(w, gpus0: list) -> None:
    """The runs table, the selected run's monitor (status, actions, charts, grids, log); the GPU panel on top when
    the machine has GPUs (gpu_panel.py)."""
    with gr.Tab("Runs", id="runs", elem_id="runs-tab"):
        w.add("gpu_panel", gr.Dataframe(gpus0, headers=gpu_panel.COLUMNS, interactive=False, label="GPUs (NVML)",
                                        visible=bool(gpus0), elem_id="gpu-panel"))
        w.add("runs_table", gr.Dataframe(headers=TABLE_COLUMNS, interactive=False, label="Runs (click a row)",
                                         max_height=260, elem_id="runs-table"))
        with gr.Row():
            w.add("run_dd", gr.Dropdown([], label="Run", scale=3, elem_id="run-dd", allow_custom_value=True))
            w.add("stop_btn", gr.Button("Stop (saves a checkpoint)", visible=False, variant="stop",
                                        elem_id="stop-btn"))
            w.add("resume_btn", gr.Button("Resume", visible=False, elem_id="resume-btn"))
            w.add("mark_btn", gr.Button("Mark stopped", visible=False, elem_id="mark-btn"))
            w.add("clone_btn", gr.Button("Clone config", visible=False, elem_id="clone-btn"))
            w.add("delete_btn", gr.Button("Delete (to archive)", visible=False, elem_id="delete-btn"))
        w.add("status", gr.Markdown(elem_id="run-status"))
        with gr.Accordion("Resume options, rename", open=False):
            with gr.Row():
                w.add("resume_extra", gr.Textbox("", label="Extra flags for resume",
                                                 placeholder="--max_train_steps 60"))
                w.add("resume_gpus", gr.Textbox("", label="GPUs"))
            with gr.Row():
                w.add("new_name", gr.Textbox("", label="New name", scale=3))
                w.add("rename_btn", gr.Button("Rename", scale=1))
        w.add("action_msg", gr.Markdown(elem_id="action-msg"))
        with gr.Row():
            w.add("p_reward", gr.Plot(label="reward", show_label=False, elem_id="plot-reward"))
            w.add("p_kl", gr.Plot(label="kl", show_label=False))
        with gr.Row():
            w.add("p_loss", gr.Plot(label="loss", show_label=False))
            w.add("p_clip", gr.Plot(label="clipfrac", show_label=False))
        with gr.Row():
            w.add("p_sys", gr.Plot(label="GPU", show_label=False, visible=False, elem_id="plot-sys"))
            w.add("p_time", gr.Plot(label="Time per phase", show_label=False, visible=False, elem_id="plot-time"))
        with gr.Accordion("Several runs on one chart, CSV export", open=False):
            with gr.Row():
                w.add("overlay_runs", gr.Dropdown([], multiselect=True, label="Runs", scale=3))
                w.add("overlay_key", gr.Dropdown(["reward/mean"], value="reward/mean", label="Metric", scale=2,
                                                 allow_custom_value=True))
                w.add("smoothing", gr.Slider(0, 0.99, value=0.6, step=0.01, label="Smoothing", scale=2))
            w.add("p_overlay", gr.Plot(label="overlay", show_label=False, elem_id="plot-overlay"))
            with gr.Row():
                w.add("csv_btn", gr.Button("Export metrics (CSV): the runs above, else the selected run"))
                w.add("csv_file", gr.File(label="metrics.csv", interactive=False))
        with gr.Row():
            w.add("latest", gr.Image(label="Latest sample grid (rows: input, output, target, reference)",
                                     type="filepath", interactive=False, scale=1))
            w.add("grids", gr.Gallery(label="All sample grids", columns=4, height=320, scale=1))
        w.add("prompt_grids", gr.Gallery(label="Sample prompts (your texts, fixed seeds; newest first)", columns=1,
                                         height=320, visible=False, elem_id="prompt-grids"))
        w.add("log", gr.Textbox(label="Log (console of the run, last lines)", lines=14, max_lines=14,
                                autoscroll=True, elem_classes="mono", elem_id="run-log"))
        w.add("log_file", gr.DownloadButton("Download the whole log", value=None, elem_id="log-download"))


def inference_tab(w) -> None:
    """One checkpoint on a source, a mask and a text."""
    with gr.Tab("Inference", id="infer"):
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    w.add("inf_run", gr.Dropdown([], label="Run", allow_custom_value=True))
                    w.add("ckpt", gr.Dropdown([], label="Checkpoint file", allow_custom_value=True))
                w.add("ckpt_path", gr.Textbox("", label="…or a checkpoint file inside runs_dir",
                                              placeholder="my-run/checkpoint-10/ip-adapter-ema.safetensors"))
                with gr.Row():
                    w.add("flux", gr.Textbox("tiny-pretrained", label="FLUX.1-Fill path"))
                    w.add("siglip", gr.Textbox("tiny-pretrained", label="SigLIP path"))
                w.add("editor", checked(gr.ImageEditor(type="numpy", label="Source: brush over the text to replace",
                                               format="png", height=360,
                                               brush=gr.Brush(colors=["#ff40a0"], color_mode="fixed"))))
                with gr.Row():
                    w.add("mask_up", checked(gr.Image(type="numpy", height=160, label="Mask: or upload one of the source's "
                                                      "size (white = repaint; used when nothing is brushed)")))
                    w.add("reference", checked(gr.Image(type="pil", label="Style reference (default: source in the mask)",
                                                        height=160)))
                w.add("text", gr.Textbox("", label="Text to write", info="the tiny model writes 1-4 characters; FLUX a word "
                                          "or a short line (at most 100)"))
                with gr.Accordion("Settings", open=False):
                    with gr.Row():
                        w.add("steps", gr.Slider(1, 100, value=8, step=1, label="Steps"))
                        w.add("guidance", gr.Number(30.0, label="Guidance"))
                        w.add("scale", gr.Slider(0, 2, value=1.0, step=0.05, label="Style strength"))
                    with gr.Row():
                        w.add("seed", gr.Number(56, precision=0, label="Seed"))
                        w.add("num_images", gr.Slider(1, 8, value=2, step=1, label="Images"))
                        w.add("resolution", gr.Number(None, precision=0, label="Resize to a square (px)",
                                                      info="empty = keep the source's size (rounded to 16)"))
                        w.add("use_context", gr.Checkbox(False, label="In-context reference"))
                with gr.Row():
                    w.add("example_btn", gr.Button("Load a dataset example"))
                    w.add("gen_btn", gr.Button("Generate", variant="primary"))
                    w.add("unload_btn", gr.Button("Free model memory"))
                w.add("ex_index", gr.State(0))
            with gr.Column():
                w.add("out_gallery", gr.Gallery(label="Results", columns=2, format="png", height=480))
                w.add("inf_msg", gr.Markdown(elem_id="infer-msg"))
                with gr.Accordion("Export and share the chosen checkpoint file", open=False):
                    with gr.Row():
                        w.add("exp_format", gr.Radio(export_views.FORMATS, value="release", label="Format",
                                                     info="release = the original .bin layout"))
                        w.add("exp_btn", gr.Button("Export", elem_id="exp-btn"))
                    w.add("exp_file", gr.File(label="Exported", interactive=False))
                    with gr.Row():
                        w.add("hub_repo", gr.Textbox("", label="Hub repository (USER/NAME)"))
                        w.add("hub_token", gr.Textbox("", label="Hub token (empty = the saved one)", type="password"))
                        w.add("push_btn", gr.Button("Push to the Hub", elem_id="push-btn"))
                    w.add("exp_msg", gr.Markdown(elem_id="exp-msg"))


def compare_tab(w) -> None:
    """The evaluation of 1-4 checkpoints (compare_views.py) and the quick look on the Inference inputs."""
    with gr.Tab("Compare", id="compare"):
        gr.Markdown("Which checkpoint is better, and how sure: 1 to 4 checkpoints (any run, any step, raw or EMA, a run's "
                    "starting point, or the base weights) on an eval set, every one on **the same examples and noises**. "
                    "The table gives each metric's mean with its 95% interval; the verdict compares B, C, D with A.")
        with gr.Row():
            for i, slot in enumerate(SLOTS):
                w.add(slot, gr.Dropdown([], label="ABCD"[i], allow_custom_value=True, elem_id=f"cmp-{i + 1}"))
        with gr.Row():
            w.add("cmp_data", gr.Dropdown(EVAL_SETS, value=RUN_DATA, label="Eval set", allow_custom_value=True, scale=2,
                                          info="a dataset file or folder typed here works too"))
            w.add("cmp_noises", gr.Number(16, precision=0, label="Noises per example", scale=1, elem_id="cmp-noises",
                                          info="more = a narrower interval (docs/evaluation.md)"))
            w.add("cmp_examples", gr.Number(None, precision=0, label="Examples", scale=1, info="empty = all",
                                            elem_id="cmp-examples"))
        with gr.Row():
            w.add("step0_run", gr.Dropdown([], label="Run", scale=2, allow_custom_value=True))
            w.add("step0_btn", gr.Button("Start vs newest checkpoint", scale=1, elem_id="cmp-step0"))
            w.add("cmp_refresh", gr.Button("Refresh the lists", scale=1))
        w.add("cmp_eval_btn", gr.Button("Evaluate", variant="primary", elem_id="cmp-eval-btn"))
        w.add("cmp_eval_msg", gr.Markdown(elem_id="cmp-eval-msg"))
        w.add("cmp_verdict", gr.Markdown(elem_id="cmp-verdict"))
        w.add("cmp_table", gr.Markdown(elem_id="cmp-table"))
        with gr.Row():
            for i, slot in enumerate(GALLERIES):
                w.add(slot, gr.Gallery(label="ABCD"[i], columns=4, height=520, object_fit="contain", visible=False,
                                       elem_id=f"cmp-grid-{i + 1}", allow_preview=True))
        w.add("cmp_report", gr.File(label="Report (report.html, report.md, eval.json, pictures)", interactive=False,
                                    elem_id="cmp-report"))
        with gr.Accordion("Quick look: the Inference tab's inputs (one example, a few images, no intervals)", open=False):
            w.add("cmp_btn", gr.Button("Compare on the Inference tab's inputs", elem_id="cmp-btn"))
            w.add("cmp_msg", gr.Markdown(elem_id="cmp-msg"))
            w.add("slider", gr.ImageSlider(label="A | B (first image)", type="pil", format="png"))
            w.add("cmp_gallery", gr.Gallery(label="All images (captions: OCR score, text read, style score)",
                                            columns=4, format="png"))
            w.add("cmp_scores", gr.Markdown(elem_id="cmp-scores"))


def dataset_tab(w, data0: str) -> None:
    """A dataset's examples and problems; a synthetic set."""
    with gr.Tab("Dataset", id="dataset"):
        with gr.Row():
            w.add("data_path", gr.Textbox(data0, label="Dataset (.jsonl/.json file or folder; 'bundled', 'bundled-glyphs')",
                                          scale=4, elem_id="data-path"))
            w.add("data_page", gr.Number(1, precision=0, label="Page", scale=1))
        with gr.Row():
            w.add("data_show_btn", gr.Button("Show examples", elem_id="data-show"))
            w.add("data_validate_btn", gr.Button("Validate", elem_id="data-validate"))
        w.add("data_msg", gr.Markdown(elem_id="data-msg"))
        w.add("data_gallery", gr.Gallery(label="Examples (source, mask, reference)", columns=6, height=360))
        w.add("data_problems", gr.Markdown(elem_id="data-problems"))
        with gr.Accordion("Build a synthetic set (runs_dir/datasets/NAME)", open=False):
            with gr.Row():
                w.add("synth_name", gr.Textbox("synth", label="Name"))
                w.add("synth_n", gr.Number(16, precision=0, label="Examples"))
                w.add("synth_res", gr.Number(64, precision=0, label="Resolution (px)"))
                w.add("synth_seed", gr.Number(0, precision=0, label="Seed"))
                w.add("synth_btn", gr.Button("Build"))
