"""Checkpoints: the adapter files users load (README, "What a run writes") plus everything an exact resume needs.

    checkpoint-{step}/
        ip-adapter.safetensors       the trained adapter (flat dotted release key names), fp32
        ip-adapter-ema.safetensors   its EMA (when --use_ema), fp32 (bf16 with --checkpoint_averages_dtype bf16);
                                     also what a resume restores the EMA from
        ip-adapter.bin               the release's nested layout for the original inference code, while the
                                     adapter is under RELEASE_BIN_BYTES (the tiny, a LoRA merge); at real size
                                     `python -m calligrapher_rl.export` writes it from any checkpoint
        trainer_state/
            state.json               step, phase, RL epoch, advantage tracker, where the reference comes from
            policies.safetensors     old.* (NFT's old policy: its fp32 average, or bf16 as the EMA), unless it
                                     equals the adapter (DiffusionNFT's first steps set old = current): state.json
                                     then says so
            optimizer.pt, scheduler.pt   torch state dicts (read back with weights_only=True)
    reference.safetensors            (run folder) the KL reference, written once when RL begins after a
                                     supervised warmup; when RL begins at step 0 the reference is the run's
                                     initial adapter and nothing is written: a resume rebuilds it from there

No tensor is written twice: at real size (3.0 B trainable parameters) a checkpoint is the adapter (12 GB), its
EMA and, for NFT, the old policy (12 GB each, 6 in bf16: the flux presets) and the 8-bit moments (6 GB) -
docs/benchmarks.md. The averages in bf16 are the one thing a resume does not restore bit for bit: every
forward through them runs in bf16 anyway, and the fp32 averages go on from the rounded values, off by at most
half a bf16 step, a difference each later step shrinks by the decay.
Randomness is derived from (seed, step) everywhere in the loop, so the counters above are all the RNG
state a resume needs. A checkpoint folder appears only once complete (written to a temp folder first).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import torch
from safetensors.torch import load_file

from ..atomic import atomic_dir, atomic_path
from ..errors import UserError
from ..models.checkpoints import adapter_file_writes
from ..tensor_files import save_file_streamed, write_side_by_side

logger = logging.getLogger("calligrapher_rl.training")

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
    if not os.path.isdir(value):
        raise UserError("no such checkpoint folder", where=value, field="--resume_from_checkpoint")
    if not os.path.isfile(os.path.join(value, "trainer_state", "state.json")):
        raise UserError("not a checkpoint folder (no trainer_state/state.json)", where=value,
                        field="--resume_from_checkpoint")
    return value


# What a checkpoint must agree with to be resumed: the model it adapts, the adapter's architecture, what
# trains (the optimizer's parameter groups) and the RL method (its policies and state).
IDENTITY_KEYS = ("model_type", "pretrained_model_name_or_path", "siglip_path", "tiny_width", "num_style_tokens",
                 "use_qformer", "trainable", "use_rl", "rl_method", "lora_target", "lora_rank", "lora_modules")
_PATH_KEYS = ("pretrained_model_name_or_path", "siglip_path")
ARCHITECTURE_KEYS = ("model_type", "tiny_width", "num_style_tokens", "use_qformer")  # never changed on resume


def identity(cfg) -> dict:
    """The part of a config recorded in each checkpoint's state.json and checked on resume."""
    return {k: getattr(cfg, k, None) for k in IDENTITY_KEYS}


def _fail(ckpt: str, file: str, problem: str):
    raise UserError(problem, where=os.path.join(ckpt, file), field="--resume_from_checkpoint")


def read_state(ckpt: str) -> dict:
    """trainer_state/state.json, checked: an object with integer step and rl_epoch."""
    name = os.path.join("trainer_state", "state.json")
    try:
        with open(os.path.join(ckpt, name), encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        _fail(ckpt, name, f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})")
    if not isinstance(state, dict):
        _fail(ckpt, name, "expected a JSON object")
    for key in ("step", "rl_epoch"):
        if not isinstance(state.get(key), int) or isinstance(state.get(key), bool) or state[key] < 0:
            _fail(ckpt, name, f"'{key}' missing or not a non-negative integer")
    return state


def _recorded_identity(ckpt: str, state: dict) -> dict | None:
    if isinstance(state.get("config"), dict):
        return state["config"]
    run_json = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "run.json")  # checkpoints of older versions
    try:
        with open(run_json, encoding="utf-8") as fh:
            data = json.load(fh)
        return {k: data.get(k) for k in IDENTITY_KEYS} if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _same(key: str, a, b) -> bool:
    if a == b:
        return True
    if key in _PATH_KEYS and isinstance(a, str) and isinstance(b, str):  # a moved or copied model folder
        a, b = os.path.normpath(os.path.expanduser(a)), os.path.normpath(os.path.expanduser(b))
        return os.path.realpath(a) == os.path.realpath(b) or os.path.basename(a) == os.path.basename(b)
    return False


def check_resume(cfg, ckpt: str) -> dict:
    """Before any model loads: the checkpoint's state is readable and it was made by a run of the same
    method on the same model. Returns the state."""
    state = read_state(ckpt)
    recorded = _recorded_identity(ckpt, state)
    if recorded:
        mine = identity(cfg)
        for key in IDENTITY_KEYS:
            theirs = recorded.get(key)
            if theirs is None or mine[key] is None:
                continue
            if key == "rl_method" and not (recorded.get("use_rl") and mine.get("use_rl")):
                continue  # a supervised checkpoint may start either method
            if key == "use_rl" or _same(key, theirs, mine[key]):
                continue
            changeable = key not in ARCHITECTURE_KEYS  # the others cannot load into this adapter at all
            if changeable and getattr(cfg, "allow_changed_settings", False):
                logger.warning("--allow_changed_settings: resuming with --%s %s (the checkpoint has %s)", key,
                               mine[key], theirs)
                continue
            raise UserError(f"the checkpoint was trained with --{key} {theirs}, this run has {mine[key]}: resume with "
                            f"the checkpoint's settings{', pass --allow_changed_settings to change it' if changeable else ''}"
                            f", or start a new run from its adapter with "
                            f"--initial_ip_adapter_path {os.path.join(ckpt, 'ip-adapter.safetensors')}",
                            where=ckpt, field="--resume_from_checkpoint")
    return state


def _prefixed(prefix: str, state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach() for k, v in (state or {}).items()}  # written where they are


# Below this size (the tiny adapter, LoRA merges) every checkpoint also carries the release .bin; above it (the
# full adapter: 12 GB, a third of a checkpoint) it is made on demand by `python -m calligrapher_rl.export`.
RELEASE_BIN_BYTES = 2**30
REFERENCE_FILE = "reference.safetensors"


def save_checkpoint(run_dir: str, step: int, *, adapter: dict | None, ema: dict | None, old: dict | None, optimizer,
                    scheduler, state: dict, total_limit: int | None = None, weights=None,
                    averages_dtype: torch.dtype | None = None) -> str:
    """`weights(folder)`, when given, writes the weight files instead of the adapter's (a LoRA run);
    `averages_dtype`: the floating-point dtype of the EMA's and the old policy's files (None: as held)."""
    final_dir = os.path.join(run_dir, f"checkpoint-{step}")
    if adapter is not None:
        size = sum(v.numel() * v.element_size() for v in adapter.values())
        # where they are (the GPU): compared and written a tensor at a time, never copied to the host as a whole
        adapter = {k: v.detach() for k, v in adapter.items()}
    old_is_adapter = bool(old) and adapter is not None and all(
        k in adapter and torch.equal(v.to(adapter[k].device), adapter[k].to(v.dtype)) for k, v in old.items())
    with atomic_dir(final_dir) as tmp:
        ts = os.path.join(tmp, "trainer_state")
        os.makedirs(ts)
        # a state dict already consolidated across processes (sharded moments), or the optimizer itself
        moments = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        # the big files (trainable `all`: 12 GB weights, 12 GB EMA, 6 GB moments) side by side, which the disk
        # takes faster than one after another (tensor_files.SIDE_BY_SIDE); the moments after the weights
        writes = [lambda: weights(tmp)] if weights is not None else adapter_file_writes(
            tmp, adapter, ema_state=ema, release_bin=size < RELEASE_BIN_BYTES, ema_dtype=averages_dtype)
        if old and not old_is_adapter:
            writes.append(lambda: save_file_streamed(_prefixed("old", old), os.path.join(ts, "policies.safetensors"),
                                                     dtype=averages_dtype))
        writes.append(lambda: torch.save(moments, os.path.join(ts, "optimizer.pt")))
        write_side_by_side(writes)
        # where the old policy is: the adapter's own weights (by name) or policies.safetensors
        state = {**state, "old_policy": {"equals_adapter": sorted(old)} if old_is_adapter else None}
        torch.save(scheduler.state_dict(), os.path.join(ts, "scheduler.pt"))
        with open(os.path.join(ts, "state.json"), "w", encoding="utf-8") as fh:
            json.dump({**state, "step": step}, fh, indent=2)
    if total_limit:
        for _, path in list_checkpoints(run_dir)[:-total_limit]:
            shutil.rmtree(path, ignore_errors=True)
    return final_dir


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def save_reference(run_dir: str, reference: dict) -> str:
    """The KL reference of a run whose RL began after a warmup: once per run, in the run folder."""
    path = os.path.join(run_dir, REFERENCE_FILE)
    with atomic_path(path) as tmp:
        # a LoRA reference may be views of one shared buffer: written view by view, each its own bytes
        save_file_streamed(_prefixed("ref", reference), tmp)
    return path


def load_reference(run_dir: str) -> dict:
    path = os.path.join(run_dir, REFERENCE_FILE)
    try:
        got = load_file(path)
    except Exception as exc:  # noqa: BLE001 - missing, truncated, not safetensors
        raise UserError(f"the run's KL reference is unreadable ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else ''})", where=path,
                        field="--resume_from_checkpoint") from None
    return {k[len("ref."):]: v for k, v in got.items() if k.startswith("ref.")}


def load_checkpoint(path: str) -> dict:
    """Returns {adapter, ema, old, ref, optimizer, scheduler, state}; tensors on CPU. Any unreadable or
    malformed file is a one-line UserError naming it (see check_against for the checks against a model)."""
    state = read_state(path)
    ts = "trainer_state"

    def tensors(name: str, required: bool) -> dict:
        full = os.path.join(path, name)
        if not required and not os.path.exists(full):
            return {}
        try:
            return load_file(full)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ...
            _fail(path, name, f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})")

    def torch_state(name: str) -> dict:
        try:
            out = torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated zip, pickle refused by weights_only, missing file
            _fail(path, name, f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})")
        if not isinstance(out, dict):
            _fail(path, name, f"expected a state dict, found {type(out).__name__}")
        return out

    lora = os.path.isfile(os.path.join(path, "lora.json"))  # a LoRA run's checkpoint (models/lora.py)
    adapter = tensors("ip-adapter.safetensors", not lora)
    policies = tensors(os.path.join(ts, "policies.safetensors"), False)
    ema_file = tensors("ip-adapter-ema.safetensors", False)
    optimizer = torch_state(os.path.join(ts, "optimizer.pt"))
    scheduler = torch_state(os.path.join(ts, "scheduler.pt"))

    def group(prefix: str) -> dict | None:
        out = {k[len(prefix) + 1:]: v for k, v in policies.items() if k.startswith(prefix + ".")}
        return out or None

    old = group("old")
    same = (state.get("old_policy") or {}).get("equals_adapter") if isinstance(state.get("old_policy"), dict) else None
    if same:  # equal to these weights of the adapter when saved
        missing = [k for k in same if k not in adapter]
        if missing:
            _fail(path, "ip-adapter.safetensors", f"lacks '{missing[0]}', the NFT old policy's weight")
        old = {k: adapter[k].to(torch.float32) for k in same}
    # checkpoints of earlier versions kept the EMA and the reference in policies.safetensors
    return {"adapter": adapter, "ema": group("ema") or ema_file or None, "old": old, "ref": group("ref"),
            "optimizer": optimizer, "scheduler": scheduler, "state": state, "path": path, "lora": lora}


def check_against(ck: dict, model_state: dict, trainable: dict, optimizer) -> None:
    """The loaded checkpoint fits this run's adapter (names and shapes), its trainable weights (the
    policies) and its optimizer (groups and moment shapes): a mismatch is one line naming the file, not a
    traceback later (an optimizer state of the wrong shape fails only at the next step)."""
    path = ck["path"]

    def shapes(file: str, got: dict, want: dict, exact: bool) -> None:
        missing = [k for k in want if k not in got]
        extra = [k for k in got if k not in want] if exact else []
        wrong = [k for k in want if k in got and tuple(got[k].shape) != tuple(want[k].shape)]
        if missing or extra or wrong:
            k = (wrong or missing or extra)[0]
            what = (f"'{k}' has shape {tuple(got[k].shape)}, this model needs {tuple(want[k].shape)}" if wrong else
                    f"'{k}' is missing" if missing else f"'{k}' is not a weight of this model")
            _fail(path, file, f"does not fit this run's adapter ({len(wrong)} wrong shapes, {len(missing)} missing, "
                              f"{len(extra)} unknown; e.g. {what})")

    if not ck.get("lora"):
        shapes("ip-adapter.safetensors", ck["adapter"], model_state, exact=True)
    pol = os.path.join("trainer_state", "policies.safetensors")
    for prefix in ("ref", "old"):
        if ck[prefix] is not None:
            shapes(pol, ck[prefix], trainable, exact=True)
    if ck["ema"] is not None:
        shapes(pol, ck["ema"], trainable, exact=False)

    opt_file = os.path.join("trainer_state", "optimizer.pt")
    sd = ck["optimizer"]
    groups = sd.get("param_groups")
    if not isinstance(sd.get("state"), dict) or not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        _fail(path, opt_file, "not an optimizer state (needs 'state' and 'param_groups')")
    mine = [list(g["params"]) for g in optimizer.param_groups]
    if [len(g["params"]) for g in groups] != [len(g) for g in mine]:
        _fail(path, opt_file, f"holds {sum(len(g['params']) for g in groups)} parameters in {len(groups)} group(s), "
                              f"this run trains {sum(map(len, mine))} in {len(mine)} (another --trainable?)")
    by_id = {pid: p for g, ps in zip(groups, mine) for pid, p in zip(g["params"], ps)}
    for pid, st in sd["state"].items():
        if pid not in by_id or not isinstance(st, dict):
            _fail(path, opt_file, f"state of an unknown parameter {pid!r}")
        for name, value in st.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(by_id[pid].shape):
                _fail(path, opt_file, f"'{name}' of parameter {pid} has shape {tuple(value.shape)}, "
                                      f"the parameter has {tuple(by_id[pid].shape)}")
    sched = ck["scheduler"]
    if not isinstance(sched.get("last_epoch"), int):
        _fail(path, os.path.join("trainer_state", "scheduler.pt"), "not a learning-rate scheduler state (no last_epoch)")


_ORPHAN_DIR = re.compile(r"^\.(checkpoint-\d+)\..+\.tmp(\.old)?$")


def remove_orphans(run_dir: str) -> list[str]:
    """Remove what writers killed mid-write left: `.checkpoint-N.*.tmp` folders and `.NAME.*.tmp` files
    (atomic.py's temporaries) at the top and in samples/. Only the folder's owner may call this (the
    run lock is held). A `.tmp.old` folder is the previous checkpoint-N moved aside by a re-save that was
    killed between its two renames: it is put back when checkpoint-N is missing."""
    removed = []
    for sub in ("", "samples"):
        folder = os.path.join(run_dir, sub)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            full = os.path.join(folder, name)
            m = _ORPHAN_DIR.match(name)
            if m and os.path.isdir(full) and not sub:
                final = os.path.join(folder, m.group(1))
                if m.group(2) and not os.path.exists(final):
                    os.replace(full, final)
                    logger.warning("restored %s from %s (a re-save was interrupted)", final, name)
                    continue
                shutil.rmtree(full, ignore_errors=True)
                removed.append(os.path.join(sub, name))
            elif name.startswith(".") and name.endswith(".tmp") and os.path.isfile(full):
                os.unlink(full)
                removed.append(os.path.join(sub, name))
    return removed
