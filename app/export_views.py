"""Export and share a checkpoint from the Inference tab: `python -m calligrapher_rl.export` (the release `.bin` or
the safetensors adapter; the module ships with the LoRA work: without it, one line says so), and a push to the
Hugging Face Hub with a generated model card (the run's method and settings, its last evaluation with the 95%
interval, its latest sample grid) when a token and the network are there; one line saying which is missing when not.
"""

from __future__ import annotations

import os
import shutil
import time

from calligrapher_rl.errors import UserError

from . import run_files, runs
from .view_common import err

FORMATS = ["release", "safetensors"]


def _checkpoint_dir(runs_dir: str, choice: str | None) -> tuple[str, bool]:
    """(checkpoint folder, EMA?) of an Inference-tab checkpoint choice (a file inside runs_dir)."""
    if not choice or ":" in choice or choice == "none":
        raise UserError("Checkpoint file: choose a run's checkpoint file to export")
    path = runs.confine(os.path.join(runs_dir, choice), [runs_dir], "checkpoint file")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    return folder, "ema" in os.path.basename(path)


def export(runs_dir: str, choice: str | None, fmt: str) -> tuple[str | None, str]:
    """(exported file or folder, message)."""
    try:
        folder, ema = _checkpoint_dir(runs_dir, choice)
        try:
            from calligrapher_rl.export import main as export_main
        except ImportError:
            return None, ("⚠ Export: `python -m calligrapher_rl.export` is not in this installation (it comes with the "
                          "LoRA support); the checkpoint's ip-adapter.bin is already in the release's layout")
        if fmt not in FORMATS:
            raise UserError(f"Format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
        out = os.path.join(runs_dir, ".exports", f"{os.path.basename(os.path.dirname(folder))}-"
                                                 f"{os.path.basename(folder)}{'-ema' if ema else ''}-{fmt}")
        export_main(["--checkpoint", folder, *(["--ema"] if ema else []), "--out", out, "--format", fmt])
    except UserError as exc:
        return None, err(exc)
    return out, f"✓ exported {'EMA ' if ema else ''}{os.path.basename(folder)} as {fmt} to `{out}`"


def model_card(run_dir: str, folder: str, ema: bool) -> str:
    """README.md of a pushed checkpoint: what it is, how it was trained, how well it did."""
    cfg = runs.run_config(run_dir)
    rows = [r for r in run_files.metrics(run_dir) if "eval/reward/mean" in r]
    last = rows[-1] if rows else None
    lines = ["---", "library_name: calligrapher-rl", "tags: [calligrapher, flux, style-adapter, reinforcement-learning]",
             "---", f"# {os.path.basename(run_dir)} · {os.path.basename(folder)}{' (EMA)' if ema else ''}", "",
             "A Calligrapher style adapter (FLUX.1-Fill + SigLIP style tokens) fine-tuned with online RL by "
             "[calligrapher-rl](https://github.com/Calligrapher2025/Calligrapher).", "",
             "| setting | value |", "|---|---|"]
    for key in ("rl_method", "rewards", "learning_rate", "max_train_steps", "rl_num_images_per_prompt",
                "pretrained_model_name_or_path", "train_data_json", "seed"):
        if key in cfg:
            lines.append(f"| {key} | `{cfg[key]}` |")
    if last is not None:
        lo, hi = last.get("eval/reward/mean_lo"), last.get("eval/reward/mean_hi")
        ci = f" (95% interval {lo:.3f} to {hi:.3f}, {int(last.get('eval/n', 0))} samples)" if lo is not None else ""
        lines += ["", f"Evaluation at step {last['step']}: reward {last['eval/reward/mean']:.3f}{ci}."]
    grids = run_files.samples(run_dir)
    if grids:
        lines += ["", "![latest sample grid: input, output, target, reference](sample-grid.png)"]
    lines += ["", "Load it with `python -m calligrapher_rl.infer --ip_adapter ip-adapter.bin ...` or the release's "
                  "inference code (the `.bin` is in its layout)."]
    return "\n".join(lines) + "\n"


def push(runs_dir: str, choice: str | None, repo_id: str, token: str | None) -> str:
    """Upload the checkpoint's adapter files and a model card; a one-line reason when it cannot."""
    try:
        folder, ema = _checkpoint_dir(runs_dir, choice)
        repo_id = (repo_id or "").strip()
        if not repo_id or repo_id.count("/") != 1:
            raise UserError(f"Hub repository: expected USER/NAME, got {repo_id!r}")
        try:
            import huggingface_hub
        except ImportError:
            raise UserError("Hub push: huggingface_hub is not installed (pip install huggingface_hub)") from None
        from calligrapher_rl.models.hub import hub_offline

        if hub_offline():
            raise UserError("Hub push: HF_HUB_OFFLINE is set (no network use): unset it to push")
        token = (token or "").strip() or huggingface_hub.get_token()
        if not token:
            raise UserError("Hub token: none given and none saved (`hf auth login`, HF_TOKEN, or paste a write token)")
        run_dir = os.path.dirname(folder)
        stage = os.path.join(runs_dir, ".exports", f"hub-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(stage)
        for name in ("ip-adapter-ema.safetensors" if ema else "ip-adapter.safetensors", "ip-adapter.bin"):
            if os.path.isfile(os.path.join(folder, name)):
                shutil.copy2(os.path.join(folder, name), stage)
        grids = run_files.samples(run_dir)
        if grids:
            shutil.copy2(grids[-1][1], os.path.join(stage, "sample-grid.png"))
        with open(os.path.join(stage, "README.md"), "w", encoding="utf-8") as fh:
            fh.write(model_card(run_dir, folder, ema))
        api = huggingface_hub.HfApi(token=token)
        try:
            api.create_repo(repo_id, exist_ok=True)
            info = api.upload_folder(folder_path=stage, repo_id=repo_id, commit_message=f"{os.path.basename(folder)}")
        except Exception as exc:  # noqa: BLE001 - network, auth, permissions: one line, not a traceback
            raise UserError(f"Hub push to {repo_id} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from None
    except UserError as exc:
        return err(exc)
    return f"✓ pushed to https://huggingface.co/{repo_id} ({getattr(info, 'commit_url', '') or 'done'})"
