"""The Blocks: components and event wiring only (callbacks live in views.py and infer_views.py).

API names (for gradio_client): preset_values, check_run, start_run, save_preset, list_runs, monitor, stop_run,
resume_run, mark_stopped, load_example, infer_runs, checkpoints, generate, compare, unload.
"""

from __future__ import annotations

import gradio as gr

from . import presets
from .infer_views import InferViews
from .inference import InferenceService
from .views import TABLE_COLUMNS, MonitorViews, TrainViews, suggest_name

POLL_S = 2.0
CSS = """
#run-status {min-height: 3em}
.mono textarea {font-family: ui-monospace, monospace; font-size: 12px}
"""
HIDDEN = {"show_progress": "hidden"}


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


def build_demo(runs_dir: str, service: InferenceService | None = None) -> gr.Blocks:
    train, mon, inf = TrainViews(runs_dir), MonitorViews(runs_dir), InferViews(runs_dir, service)
    preset0 = presets.DEFAULT_PRESET
    values0 = presets.form_values(runs_dir, preset0)

    with gr.Blocks(title="Calligrapher RL studio") as demo:
        gr.Markdown(f"## Calligrapher RL studio\nRuns live in `{runs_dir}`: each is a detached process that keeps "
                    "going when this tab (or the studio) closes; reopen the page to pick it up again.")
        seen = gr.State({})
        with gr.Tabs() as tabs:
            # ================================================================= Train
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    preset = gr.Dropdown(presets.preset_choices(runs_dir), value=preset0, label="Preset", scale=2,
                                         allow_custom_value=True)
                    run_name = gr.Textbox(suggest_name(preset0), label="Run name", scale=2)
                    gpus = gr.Textbox("", label="GPUs", info="CUDA_VISIBLE_DEVICES; several = accelerate launch",
                                      scale=1)
                form = []
                for i in range(0, len(presets.FORM), 4):
                    with gr.Row():
                        for (flag, label, info), value in zip(presets.FORM[i:i + 4], values0[i:i + 4]):
                            form.append(_form_component(flag, label, info, value))
                extra = gr.Textbox("", label="Extra flags", placeholder="--seed 1 --rl_noise_level 0.8  (any flag of "
                                   "python -m calligrapher_rl.train --help; typed last, so they win)")
                with gr.Row():
                    check_btn = gr.Button("Check")
                    start_btn = gr.Button("Start", variant="primary", elem_id="start-btn")
                with gr.Row():
                    save_name = gr.Textbox("", label="Save as preset (name)", scale=3)
                    save_btn = gr.Button("Save preset", scale=1)
                train_msg = gr.Markdown(elem_id="train-msg")

            # ================================================================= Runs
            with gr.Tab("Runs", id="runs", elem_id="runs-tab"):
                runs_table = gr.Dataframe(headers=TABLE_COLUMNS, interactive=False, label="Runs (click a row)",
                                          max_height=260, elem_id="runs-table")
                with gr.Row():
                    run_dd = gr.Dropdown([], label="Run", scale=3, elem_id="run-dd", allow_custom_value=True)
                    stop_btn = gr.Button("Stop (saves a checkpoint)", visible=False, variant="stop", elem_id="stop-btn")
                    resume_btn = gr.Button("Resume", visible=False, elem_id="resume-btn")
                    mark_btn = gr.Button("Mark stopped", visible=False, elem_id="mark-btn")
                status = gr.Markdown(elem_id="run-status")
                with gr.Accordion("Resume options", open=False):
                    with gr.Row():
                        resume_extra = gr.Textbox("", label="Extra flags for resume", placeholder="--max_train_steps 60")
                        resume_gpus = gr.Textbox("", label="GPUs")
                action_msg = gr.Markdown()
                with gr.Row():
                    p_reward, p_kl = gr.Plot(label="reward", elem_id="plot-reward"), gr.Plot(label="kl")
                with gr.Row():
                    p_loss, p_clip = gr.Plot(label="loss"), gr.Plot(label="clipfrac")
                with gr.Row():
                    latest = gr.Image(label="Latest sample grid (rows: input, output, target, reference)",
                                      type="filepath", interactive=False, scale=1)
                    grids = gr.Gallery(label="All sample grids", columns=4, height=320, scale=1)
                log = gr.Textbox(label="Log (tail)", lines=14, max_lines=14, autoscroll=True, elem_classes="mono")

            # ================================================================= Inference
            with gr.Tab("Inference", id="infer"):
                with gr.Row():
                    with gr.Column():
                        with gr.Row():
                            inf_run = gr.Dropdown([], label="Run", allow_custom_value=True)
                            ckpt = gr.Dropdown([], label="Checkpoint file", allow_custom_value=True)
                        ckpt_path = gr.Textbox("", label="…or a checkpoint file inside runs_dir",
                                               placeholder="my-run/checkpoint-10/ip-adapter-ema.safetensors")
                        with gr.Row():
                            flux = gr.Textbox("tiny", label="FLUX.1-Fill path")
                            siglip = gr.Textbox("tiny", label="SigLIP path")
                        editor = gr.ImageEditor(type="numpy", label="Source: brush over the text to replace",
                                                format="png", brush=gr.Brush(colors=["#ff40a0"], color_mode="fixed"),
                                                height=360)
                        with gr.Row():
                            mask_up = gr.Image(type="numpy", label="…or a mask (white = repaint; used when nothing is brushed)",
                                               height=160)
                            reference = gr.Image(type="pil", label="Style reference (default: source in the mask)",
                                                 height=160)
                        text = gr.Textbox("", label="Text to write")
                        with gr.Accordion("Settings", open=False):
                            with gr.Row():
                                steps = gr.Slider(1, 100, value=8, step=1, label="Steps")
                                guidance = gr.Number(30.0, label="Guidance")
                                scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Style strength")
                            with gr.Row():
                                seed = gr.Number(56, precision=0, label="Seed")
                                num_images = gr.Slider(1, 8, value=2, step=1, label="Images")
                                resolution = gr.Number(None, precision=0, label="Resize to (px, empty = keep)")
                                use_context = gr.Checkbox(False, label="In-context reference")
                        with gr.Row():
                            example_btn = gr.Button("Load a dataset example")
                            gen_btn = gr.Button("Generate", variant="primary")
                            unload_btn = gr.Button("Free model memory")
                        ex_index = gr.State(0)
                    with gr.Column():
                        out_gallery = gr.Gallery(label="Results", columns=2, format="png", height=480)
                        inf_msg = gr.Markdown()

            # ================================================================= Compare
            with gr.Tab("Compare", id="compare"):
                gr.Markdown("Two adapters on **the Inference tab's inputs** (source, mask, text, settings, seed).")
                with gr.Row():
                    run_a, ckpt_a = (gr.Dropdown([], label=f"A: {w}", allow_custom_value=True) for w in ("run", "checkpoint"))
                    run_b, ckpt_b = (gr.Dropdown([], label=f"B: {w}", allow_custom_value=True) for w in ("run", "checkpoint"))
                cmp_btn = gr.Button("Compare", variant="primary")
                slider = gr.ImageSlider(label="A | B (first image)", type="pil", format="png")
                cmp_gallery = gr.Gallery(label="All images", columns=4, format="png")
                cmp_msg = gr.Markdown()

        # ===================================================================== wiring
        train_in = [preset, *form, extra, gpus, run_name]
        preset.change(train.preset_changed, preset, [*form, run_name, train_msg], api_name="preset_values")
        check_btn.click(train.check, train_in, train_msg, api_name="check_run")
        start_btn.click(train.start, train_in, [train_msg, run_dd, tabs, run_name], api_name="start_run")
        save_btn.click(train.save, [preset, *form, extra, save_name], [train_msg, preset], api_name="save_preset")

        monitor_out = [status, stop_btn, resume_btn, mark_btn, p_reward, p_kl, p_loss, p_clip, latest, grids, log]
        poll = gr.Timer(POLL_S).tick(mon.tick, [run_dd, seen], [runs_table, run_dd, *monitor_out, seen],
                                     api_visibility="private", concurrency_limit=None, **HIDDEN)
        # a tick in flight when the user picks another run would show the previous run once more: cancel it
        run_dd.change(mon.views, run_dd, monitor_out, api_name="monitor", concurrency_limit=None, cancels=[poll],
                      **HIDDEN)
        runs_table.select(mon.row_selected, runs_table, run_dd, api_visibility="private")
        refresh = dict(fn=mon.views, inputs=run_dd, outputs=monitor_out, api_visibility="private", **HIDDEN)
        stop_btn.click(mon.stop, run_dd, action_msg, api_name="stop_run").then(**refresh)
        resume_btn.click(mon.resume, [run_dd, resume_extra, resume_gpus], action_msg, api_name="resume_run").then(**refresh)
        mark_btn.click(mon.mark, run_dd, action_msg, api_name="mark_stopped").then(**refresh)

        inf_in = [editor, mask_up, reference, text, steps, guidance, scale, seed, num_images, resolution, use_context]
        example_btn.click(inf.example, ex_index, [editor, mask_up, reference, text, ex_index], api_name="load_example")
        inf_run.change(inf.run_changed, inf_run, [ckpt, flux, siglip, resolution], api_name="checkpoints")
        run_a.change(inf.side_changed, run_a, ckpt_a, api_visibility="private")
        run_b.change(inf.side_b_changed, run_b, ckpt_b, api_visibility="private")
        gen_btn.click(inf.generate, [ckpt, ckpt_path, flux, siglip, *inf_in], [out_gallery, inf_msg],
                      api_name="generate", concurrency_id="model")
        cmp_btn.click(inf.compare, [ckpt_a, ckpt_b, flux, siglip, *inf_in], [slider, cmp_gallery, cmp_msg],
                      api_name="compare", concurrency_id="model")
        unload_btn.click(inf.unload, None, inf_msg, api_name="unload", concurrency_id="model")

        def on_load(request: gr.Request):
            """Reconnect: everything comes from runs_dir; ?run=NAME selects a run."""
            wanted = request.query_params.get("run") if request else None
            names = mon.names()
            current = mon.default_run(wanted)
            with_ckpt = inf.runs_with_checkpoints()
            first = with_ckpt[0] if with_ckpt else None
            second = with_ckpt[1] if len(with_ckpt) > 1 else first
            dd = lambda v: gr.Dropdown(choices=with_ckpt, value=v)  # noqa: E731
            return (gr.Dropdown(choices=presets.preset_choices(runs_dir)), suggest_name(presets.DEFAULT_PRESET),
                    mon.table(), gr.Dropdown(choices=names, value=current), dd(first), dd(first), dd(second))

        demo.load(on_load, None, [preset, run_name, runs_table, run_dd, inf_run, run_a, run_b], api_name="list_runs")
    return demo
