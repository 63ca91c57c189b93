"""Checkpoints: the adapter files users load (README, "What a run writes") plus everything an exact resume needs.

    checkpoint-{step}/
        ip-adapter.safetensors       the trained adapter (flat dotted release key names)
        ip-adapter-ema.safetensors   its EMA (when --use_ema)
        ip-adapter.bin               the release's nested layout, for the original inference code
        trainer_state/
            state.json               step, phase, RL epoch, advantage tracker, version
            policies.safetensors     old.* (NFT old policy), ref.* (KL reference), ema.* (EMA shadow)
            optimizer.pt, scheduler.pt   torch state dicts (read back with weights_only=True)

Randomness is derived from (seed, step) everywhere in the loop, so the counters above are all the RNG
state a resume needs. A checkpoint folder appears only once complete (written to a temp folder first).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir
from ..errors import UserError
from ..models.checkpoints import save_adapter_files

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of complete checkpoints, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(run_dir, name)
        if m and os.path.isfile(os.path.join(path, "trainer_state", "state.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def resolve_resume(run_dir: str, value: str | None) -> str | None:
    """`latest` -> newest checkpoint in the run dir (None if there is none yet); a path must exist."""
    if not value:
        return None
    if value == "latest":
        found = list_checkpoints(run_dir)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(value, "trainer_state", "state.json")):
        raise UserError("not a checkpoint folder (no trainer_state/state.json)", where=value,
                        field="--resume_from_checkpoint")
    return value


def _prefixed(prefix: str, state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in (state or {}).items()}


def save_checkpoint(run_dir: str, step: int, *, adapter: dict, ema: dict | None, old: dict | None, ref: dict | None,
                    optimizer, scheduler, state: dict, total_limit: int | None = None) -> str:
    final = os.path.join(run_dir, f"checkpoint-{step}")
    with atomic_dir(final) as tmp:
        save_adapter_files(tmp, adapter, ema_state=ema)
        ts = os.path.join(tmp, "trainer_state")
        os.makedirs(ts)
        tensors = {**_prefixed("old", old), **_prefixed("ref", ref), **_prefixed("ema", ema)}
        if tensors:
            save_file(tensors, os.path.join(ts, "policies.safetensors"))
        # a state dict already consolidated across processes (sharded moments), or the optimizer itself
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), os.path.join(ts, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(ts, "scheduler.pt"))
        with open(os.path.join(ts, "state.json"), "w", encoding="utf-8") as fh:
            json.dump({**state, "step": step}, fh, indent=2)
    if total_limit:
        for _, path in list_checkpoints(run_dir)[:-total_limit]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: str) -> dict:
    """Returns {adapter, ema, old, ref, optimizer, scheduler, state}; tensors on CPU."""
    ts = os.path.join(path, "trainer_state")
    try:
        with open(os.path.join(ts, "state.json"), encoding="utf-8") as fh:
            state = json.load(fh)
        adapter = load_file(os.path.join(path, "ip-adapter.safetensors"))
        policies = load_file(os.path.join(ts, "policies.safetensors")) if os.path.exists(
            os.path.join(ts, "policies.safetensors")) else {}
        optimizer = torch.load(os.path.join(ts, "optimizer.pt"), map_location="cpu", weights_only=True)
        scheduler = torch.load(os.path.join(ts, "scheduler.pt"), map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"incomplete or unreadable checkpoint ({str(exc).splitlines()[0][:160]})", where=path,
                        field="--resume_from_checkpoint") from None

    def group(prefix: str) -> dict | None:
        out = {k[len(prefix) + 1:]: v for k, v in policies.items() if k.startswith(prefix + ".")}
        return out or None

    return {"adapter": adapter, "ema": group("ema"), "old": group("old"), "ref": group("ref"),
            "optimizer": optimizer, "scheduler": scheduler, "state": state}
