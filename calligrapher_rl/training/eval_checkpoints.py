"""Evaluate several checkpoints on one eval set and decide which is better (`python -m calligrapher_rl.evaluate`,
the studio's Compare).

A checkpoint is named as the user names it: an adapter file (any layout), a checkpoint folder (its EMA file
when it has one), a run's `checkpoint-0` (a pointer to the file the run started from, or its initial
weights), a run folder (its newest checkpoint), `tiny-pretrained` (the shipped tiny adapter) or `base` (no
adapter: the same pipeline at style strength 0). One model stack is loaded; each checkpoint's weights are
loaded into its adapter in turn, and every checkpoint is sampled on the same examples and noises.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UserError
from .eval_core import EvalSet, EvalSettings, Measures
from .eval_stats import mean_ci, paired, verdict

BASE = "base"
FEW = 20  # fewer paired samples than this: the bootstrap interval is too narrow to trust, and the verdict says so
HELD_OUT_GLYPHS = "glyphs-unseen"  # 64 glyph texts of synth seed 0: the tiny's pretraining never saw them


@dataclass
class CheckpointRef:
    name: str  # shown in tables
    path: str | None  # the adapter file (None: base weights)
    run_dir: str | None = None  # the run it belongs to (for its run.json)


def _run_of(folder: str) -> str | None:
    parent = os.path.dirname(os.path.abspath(folder))
    return parent if os.path.isfile(os.path.join(parent, "run.json")) else None


def resolve_checkpoint(arg: str) -> CheckpointRef:
    """One --checkpoints value -> (name, adapter file, run folder)."""
    from ..models.adapter_refs import is_adapter_folder, resolve_adapter_path
    from ..models.tiny import PRETRAINED_NAME, resolve_adapter_name

    raw = arg.strip()
    if raw == BASE:
        return CheckpointRef(BASE, None)
    if raw == PRETRAINED_NAME:
        return CheckpointRef(PRETRAINED_NAME, resolve_adapter_name(raw))
    path = os.path.expanduser(raw)
    if os.path.isfile(path):
        folder = os.path.dirname(os.path.abspath(path))
        kind = "ema" if "ema" in os.path.basename(path) else "raw"
        name = f"{os.path.basename(_run_of(folder) or '')}/{os.path.basename(folder)}".lstrip("/") + f" ({kind})"
        return CheckpointRef(name, os.path.abspath(path), _run_of(folder))
    if os.path.isdir(path) and not is_adapter_folder(path) and os.path.isfile(os.path.join(path, "run.json")):
        from .checkpointing import list_checkpoints

        found = list_checkpoints(path)
        if not found:
            raise UserError("a run folder without a checkpoint yet", where=raw, field="--checkpoints")
        path = found[-1][1]
    if os.path.isdir(path):
        file = resolve_adapter_path(path)
        run = _run_of(path)
        name = f"{os.path.basename(run or '')}/{os.path.basename(os.path.abspath(path))}".lstrip("/")
        return CheckpointRef(name, file, run)
    raise UserError("not an adapter file, a checkpoint folder, a run folder, 'tiny-pretrained' or 'base'",
                    where=raw, field="--checkpoints")


def unique_names(refs: list[CheckpointRef]) -> list[CheckpointRef]:
    seen: dict[str, int] = {}
    for r in refs:
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name} #{seen[r.name]}"
    return refs


def dataset_for(data: str, resolution: int):
    """A dataset name (bundled, bundled-glyphs, glyphs-unseen) or path -> the loaded dataset."""
    from ..data import ensure_default_dataset, resolve_dataset_path
    from ..data.dataset import load_dataset

    name = data.strip()
    if name.lower() == HELD_OUT_GLYPHS:
        path = ensure_default_dataset(n=64, task="glyphs")
    elif name.lower() == "bundled":
        path = ensure_default_dataset(resolution=resolution)
    else:
        path = resolve_dataset_path(name)
    if not os.path.exists(path):
        raise UserError("no such dataset (a .jsonl/.json file or folder, bundled, bundled-glyphs or "
                        f"{HELD_OUT_GLYPHS})", where=data, field="--data")
    dataset = load_dataset(path, resolution=resolution, seed=0)
    if len(dataset) == 0:
        raise UserError("the dataset has no entries", where=path, field="--data")
    return dataset


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "checkpoint"


def _load_weights(stack, ref: CheckpointRef):
    """Load ref's weights into the stack's adapter; returns the stack (rebuilt when the shapes differ)."""
    from ..models.checkpoints import config_from_state_dict, load_into_adapter, read_adapter_file

    if ref.path is None:
        return stack
    _, flat = read_adapter_file(ref.path)
    if config_from_state_dict(flat, stack.adapter.config) != stack.adapter.config:
        raise UserError("another adapter shape than the first checkpoint's (token counts): evaluate it separately",
                        where=ref.path, field="--checkpoints")
    load_into_adapter(stack.adapter, flat, ref.path)
    return stack


def evaluate_checkpoints(refs: list[CheckpointRef], *, stack, dataset, settings: EvalSettings, out_dir: str | None,
                         siglip_path: str | None, device: str = "cpu", progress=None, measures=None) -> dict:
    """Sample and measure every checkpoint; returns the eval.json object (written with the report when
    `out_dir` is given, with each sample's picture). `measures`: a Measures to reuse (its engines load once)."""
    from .eval_report import write_report

    refs = unique_names(list(refs))
    measures = measures or Measures(siglip_path, device=device)
    evalset = EvalSet(stack, dataset, settings)
    items = evalset.sample_items()
    groups = evalset.groups
    results, images_of = [], {}
    for n, ref in enumerate(refs):
        if progress:
            progress(n, len(refs), ref.name)
        _load_weights(stack, ref)
        images, finite = evalset.sample(scale=0.0 if ref.path is None else settings.scale)
        values, reads = measures.measure(images, items, finite)
        images_of[ref.name] = images
        samples = [{"example": i, "noise": k, "text": it["text"], "read": r,
                    **{m: (None if not np.isfinite(v[j]) else round(float(v[j]), 4)) for m, v in values.items()}}
                   for j, ((i, k), it, r) in enumerate(zip(evalset.pairs, items, reads))]
        results.append({"name": ref.name, "path": ref.path or BASE,
                        "rewards": {m: {k: v for k, v in mean_ci(vals, groups).items() if k != "n"}
                                    for m, vals in values.items()},
                        "n": len(samples), "samples": samples, "_values": values})
    pairs = []
    first = results[0]
    for other in results[1:]:
        for metric in first["_values"]:
            if metric not in other["_values"]:
                continue
            d = paired(first["_values"][metric], other["_values"][metric], groups)
            pairs.append({"a": first["name"], "b": other["name"], "reward": metric, "diff": d["mean"],
                          "ci95": d["ci95"], "n": d["n"],
                          "verdict": verdict(metric, first["name"], other["name"], d["ci95"])
                          + (f" (only {d['n']} samples: a rough interval)" if d["n"] < FEW else "")})
    for r in results:
        r.pop("_values")
    report = {"checkpoints": results, "paired": pairs,
              "settings": {**asdict(settings), "examples": len(evalset.items), "samples": len(evalset.pairs)},
              "interval": "95% percentile bootstrap (2000 resamples) of the mean, stratified by example: the noises "
                          "of each example are resampled (examples, when there is one noise each)"}
    if out_dir:
        write_report(out_dir, report, images_of, items)
    return report


def write_json(out_dir: str, report: dict) -> str:
    from ..atomic import write_text

    path = os.path.join(out_dir, "eval.json")
    write_text(path, json.dumps(report, indent=1, allow_nan=True))
    return path
