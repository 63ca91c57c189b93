"""What a run will meet, checked before any model is loaded: rewards, paths, GPUs, the dataset file.

`preflight(cfg)` returns every problem found, one line each (naming the flag, the value and what was
expected); `require_ready(cfg)` raises the first as a UserError. The trainer calls `require_ready` first
thing, and the studio's Check shows the same list, so Check approves exactly what Start will accept.
None of this loads a model or decodes an image: it is meant to answer in well under a second.
"""

from __future__ import annotations

import os

from ..errors import UserError

TINY, BUNDLED = ("tiny", "tiny-pretrained"), ("bundled", "bundled-glyphs")  # the embedded names


def _is(value, special: tuple[str, ...]) -> bool:
    return isinstance(value, str) and value.strip().lower() in special


def _rewards(cfg) -> list[str]:
    from ..rewards import parse_spec

    try:
        weights = parse_spec(cfg.rewards)
    except UserError as exc:
        return [str(exc)]
    if not any(weights.values()):
        return [f"--rewards: at least one reward weight must be non-zero, got {cfg.rewards!r}"]
    return []


def _model_paths(cfg) -> list[str]:
    problems = []
    for flag, marker, what in (("pretrained_model_name_or_path", "model_index.json", "a FluxFillPipeline folder"),
                               ("siglip_path", "config.json", "a SigLIP model folder")):
        value = getattr(cfg, flag)
        if not value or _is(value, TINY):
            continue
        path = os.path.expanduser(value)
        if not os.path.exists(path):
            problems.append(f"--{flag}: no such folder: {value}")
        elif not os.path.isfile(os.path.join(path, marker)):
            problems.append(f"--{flag}: expected {what} (with {marker}), got {value}")
    init = cfg.initial_ip_adapter_path
    if init and not _is(init, ("tiny-pretrained",)):
        from ..models.adapter_refs import is_adapter_folder, resolve_adapter_path

        path = os.path.expanduser(init)
        if is_adapter_folder(path):  # a checkpoint folder, or a run's checkpoint-0 (a pointer)
            try:
                resolve_adapter_path(path)
            except UserError as exc:
                problems.append(f"--initial_ip_adapter_path: {exc}")
        elif not os.path.isfile(path):
            problems.append(f"--initial_ip_adapter_path: no such file: {init}")
    resume = cfg.resume_from_checkpoint
    if resume and resume != "latest":
        from .checkpointing import resolve_resume

        try:
            resolve_resume(cfg.output_dir or "", resume)
        except UserError as exc:
            problems.append(str(exc))
    return problems


def _dataset(cfg, limit: int = 5) -> list[str]:
    """The dataset file parses and its entries name existing files (images are not decoded here)."""
    value = cfg.train_data_json
    if not value or _is(value, BUNDLED):
        return []
    from ..data.entries import parse_entries

    entries, problems = parse_entries(os.path.expanduser(value))
    lines = [f"--train_data_json: {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"--train_data_json: ... and {len(problems) - limit} more problems "
                     f"(python -m calligrapher_rl.data validate {value})")
    if not problems and not entries:
        lines.append(f"--train_data_json: the dataset has no entries: {value}")
    return lines


def visible_gpus(gpus: str | None = None) -> list[str]:
    """The GPUs a run asks for: the studio's GPU box, else CUDA_VISIBLE_DEVICES (empty or -1 = none)."""
    text = gpus if gpus is not None else os.environ.get("CUDA_VISIBLE_DEVICES", "")
    items = [g.strip() for g in (text or "").split(",") if g.strip()]
    if any(g.startswith("-") for g in items):
        return []  # CUDA's own "no GPU" spelling
    return items


def _gpus(gpus: str | None) -> list[str]:
    wanted = visible_gpus(gpus)
    if not wanted:
        return []
    import torch

    count = torch.cuda.device_count()
    where = "GPUs" if gpus is not None else "CUDA_VISIBLE_DEVICES"
    if count == 0:
        return [f"{where}: {','.join(wanted)} requested, but this machine has no CUDA GPU that torch can use"]
    if gpus is not None:  # indices of the machine's GPUs (the studio sets CUDA_VISIBLE_DEVICES from them)
        missing = [g for g in wanted if not g.isdigit() or int(g) >= count]
        if missing:
            return [f"{where}: no GPU {','.join(missing)} on this machine (it has {count}: 0-{count - 1})"]
    elif len(wanted) > count:  # inside the process, CUDA_VISIBLE_DEVICES hides the GPUs it does not list
        return [f"{where}: lists {len(wanted)} GPUs ({','.join(wanted)}), but torch sees {count}"]
    return []


def _output_dir(cfg) -> list[str]:
    out = cfg.output_dir
    if not out:
        return []
    if os.path.exists(out) and not os.path.isdir(out):
        return [f"--output_dir: exists and is not a folder: {out}"]
    parent = os.path.dirname(os.path.abspath(out)) or "."
    if not os.path.isdir(out):
        if os.path.isdir(parent) and not os.access(parent, os.W_OK):
            return [f"--output_dir: the parent folder is not writable: {parent}"]
    elif not os.access(out, os.W_OK):
        return [f"--output_dir: not writable: {out}"]
    return []


def preflight(cfg, gpus: str | None = None, *, rewards: bool = True, dataset: bool = True) -> list[str]:
    """Every problem a run of `cfg` would meet before training, one line each (empty: ready).
    `gpus`: the studio's GPU indices ('0,1'); None = check CUDA_VISIBLE_DEVICES as this process sees it.
    `rewards`/`dataset`: False when the Python API passes those objects instead of the config's names."""
    return [*(_rewards(cfg) if rewards else []), *_model_paths(cfg), *_gpus(gpus),
            *(_dataset(cfg) if dataset else []), *_output_dir(cfg)]


def require_ready(cfg, gpus: str | None = None, **parts) -> None:
    """Raise the first preflight problem as a UserError (the trainer's first step)."""
    problems = preflight(cfg, gpus, **parts)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
