"""Presets and the Train form: which flags the form shows, form values <-> command-line flags, saving.

Built-in presets live in the repo's presets/ folder (calligrapher_rl.config_parse.PRESETS_DIR); presets saved
from the studio go to runs_dir/presets/NAME.toml. A preset is chosen by name (built-in) or by a path that
must lie inside one of those two folders.
"""

from __future__ import annotations

import math
import os
import shlex
import time

from calligrapher_rl.atomic import atomic_path
from calligrapher_rl.config import FIELDS, field_type
from calligrapher_rl.config_parse import PRESETS_DIR, build_parser, list_presets, load_preset, parse_args
from calligrapher_rl.errors import UserError

from .runs import check_name, confine

DEFAULT_PRESET = "tiny-grpo"

# (flag, label, help) of the form; everything else goes through "extra flags"
FORM = [
    ("rl_method", "Method", "grpo = Flow-GRPO on SDE rollouts, nft = DiffusionNFT, awm = Advantage Weighted "
                            "Matching (both on clean ODE rollouts)"),
    ("rewards", "Rewards", "weighted sum, e.g. ocr:0.7,style:0.3"),
    ("learning_rate", "Learning rate", None),
    ("max_train_steps", "Steps", "optimizer steps"),
    ("rl_warmup_steps", "Warmup steps", "supervised steps before RL"),
    ("rl_num_images_per_prompt", "Group size", "images per prompt"),
    ("train_batch_size", "Prompts per batch", None),
    ("rl_kl_beta", "KL beta", "empty = method default"),
    ("nft_beta", "NFT beta", "DiffusionNFT only"),
    ("trainable", "Trainable", "all/attn/proj = adapter weights; lora = LoRA layers (docs/lora.md)"),
    ("lora_target", "LoRA on", "with Trainable lora: adapter, transformer or both"),
    ("lora_rank", "LoRA rank", "with Trainable lora"),
    ("lora_alpha", "LoRA alpha", "update scaled by alpha / rank"),
    ("use_ema", "EMA", None),
    ("ema_decay", "EMA decay", None),
    ("eval_steps", "Sample grid every", "steps (0 = never)"),
    ("checkpointing_steps", "Checkpoint every", "steps"),
    ("pretrained_model_name_or_path", "FLUX.1-Fill path", "'tiny' = embedded CPU model"),
    ("siglip_path", "SigLIP path", "'tiny' = embedded"),
    ("initial_ip_adapter_path", "Initial adapter", "release calligrapher.bin; empty = fresh"),
    ("train_data_json", "Dataset", "'bundled' = synthetic set"),
    ("sample_prompts", "Sample prompts", "your texts to paint during training, '|'-separated (references: "
                                         "--sample_references in Extra flags)"),
    ("sample_prompts_steps", "Sample every", "steps (0 = never)"),
]
FORM_FLAGS = [f for f, _, _ in FORM]
NOT_SAVED = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir", "preset")  # per run, never a preset


def presets_dir(runs_dir: str) -> str:
    return os.path.join(runs_dir, "presets")


def preset_choices(runs_dir: str) -> list[tuple[str, str]]:
    """(label, value) of built-in presets (value = name) and saved ones (value = file path)."""
    out = [(name, name) for name in list_presets()]
    folder = presets_dir(runs_dir)
    if os.path.isdir(folder):
        for fname in sorted(os.listdir(folder)):
            if fname.endswith(".toml") and not fname.startswith("."):
                out.append((f"{fname[:-5]} (saved)", os.path.join(folder, fname)))
    return out


def resolve_preset(runs_dir: str, preset: str) -> str:
    """A built-in name, or a path confined to runs_dir/presets or the repo's presets/."""
    preset = (preset or "").strip()
    if not preset:
        raise UserError("choose a preset")
    if preset in list_presets():
        return preset
    if os.sep in preset or "/" in preset or preset.endswith((".toml", ".json")):
        return confine(preset, [presets_dir(runs_dir), str(PRESETS_DIR)], "preset file")
    raise UserError(f"unknown preset {preset!r}; available: {', '.join(list_presets())}")


def defaults(runs_dir: str, preset: str) -> dict:
    """Every flag's value under this preset (dataclass defaults < preset)."""
    values = {name: f.default for name, f in FIELDS.items()}
    values.update(load_preset(resolve_preset(runs_dir, preset)))
    return values


def form_values(runs_dir: str, preset: str) -> list:
    """The form's values for this preset, in FORM order ('' for none)."""
    values = defaults(runs_dir, preset)
    return ["" if values[f] is None else values[f] for f in FORM_FLAGS]


def _to_value(flag: str, raw):
    """A form value -> the flag's type (None for empty); UserError naming the field."""
    base, optional = field_type(flag)
    label = next(lbl for f, lbl, _ in FORM if f == flag)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        if optional:
            return None
        raise UserError(f"{label} (--{flag}) is required")
    if base is bool:
        return bool(raw)
    if base is str:
        return str(raw).strip()
    try:
        num = float(raw)
    except (TypeError, ValueError):
        raise UserError(f"{label} (--{flag}): expected a number, got {raw!r}") from None
    if base is int:
        if not math.isfinite(num) or num != int(num):
            raise UserError(f"{label} (--{flag}): expected a whole number, got {raw!r}")
        return int(num)
    return num


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def split_extra(extra: str) -> list[str]:
    try:
        tokens = shlex.split(extra or "")
    except ValueError as exc:
        raise UserError(f"extra flags: {exc}") from None
    for t in tokens:
        name = t[2:].split("=", 1)[0] if t.startswith("--") else None
        if name in ("preset",):
            raise UserError("extra flags: --preset is chosen in the Preset box")
    return tokens


def form_argv(runs_dir: str, preset: str, form: list, extra: str = "") -> list[str]:
    """--preset P plus the form fields that differ from the preset, plus the extra flags (typed last, so they win)."""
    if len(form) != len(FORM):
        raise UserError(f"expected {len(FORM)} form values, got {len(form)}")
    resolved = resolve_preset(runs_dir, preset)
    base = defaults(runs_dir, preset)
    argv = ["--preset", resolved]
    for flag, raw in zip(FORM_FLAGS, form):
        value = _to_value(flag, raw)
        if value != base[flag]:
            argv += [f"--{flag}", _show(value)]
    return argv + split_extra(extra)


def _toml_value(value) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def save_preset(runs_dir: str, name: str, preset: str, form: list, extra: str = "") -> str:
    """Write runs_dir/presets/NAME.toml (atomically): the chosen preset with the form and extra flags
    applied, checked by the trainer's parser first. Returns the path."""
    name = check_name(name, "preset name")
    argv = form_argv(runs_dir, preset, form, extra)
    typed = vars(build_parser().parse_args(argv[2:]))  # the overrides, typed
    values = {**defaults(runs_dir, preset), **typed}
    parse_args(["--preset", argv[1], *argv[2:], "--output_dir", os.path.join(runs_dir, "_check")])  # validates
    keep = {k: v for k, v in values.items() if k not in NOT_SAVED and v is not None and v != FIELDS[k].default}
    base_name = os.path.basename(str(resolve_preset(runs_dir, preset)))
    lines = [f"# {name}: saved by the studio on {time.strftime('%Y-%m-%d %H:%M')} from preset {base_name}",
             "# Keys are flag names of `python -m calligrapher_rl.train --help`; unset flags keep their defaults.", ""]
    lines += [f"{k} = {_toml_value(v)}" for k, v in keep.items()]
    path = os.path.join(presets_dir(runs_dir), f"{name}.toml")
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        back = load_preset(tmp)  # must read back exactly
        if back != keep:
            raise UserError("preset did not read back identically; not saved", where=path)
    return path


def clone_values(runs_dir: str, run_cfg: dict) -> tuple[str, list, str]:
    """A run's configuration (its run.json) as the Train form: (preset, form values, extra flags). The base
    preset is the built-in one that needs the fewest extra flags; every other difference is spelled out."""
    from calligrapher_rl.config import TrainConfig

    if not run_cfg:
        raise UserError("the run has no run.json (it failed before writing its configuration)")
    cfg = TrainConfig.from_json(run_cfg).to_dict()
    keep = {k: v for k, v in cfg.items() if k in FIELDS and k not in NOT_SAVED and k not in FORM_FLAGS}
    best = None
    for name in list_presets():
        base = defaults(runs_dir, name)
        base_resolved = TrainConfig(**{k: v for k, v in base.items() if k in FIELDS}).resolved()
        diff = {k: v for k, v in keep.items() if v != getattr(base_resolved, k)}
        if best is None or len(diff) < len(best[1]):
            best = (name, diff)
    preset, diff = best
    form = ["" if cfg[f] is None else cfg[f] for f in FORM_FLAGS]
    extra = shlex.join([t for k, v in diff.items() for t in (f"--{k}", _show(v))])
    return preset, form, extra
