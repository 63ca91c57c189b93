"""Style-adapter checkpoint layouts: read any of them, write ours plus the release's.

| layout    | file                 | top level                                         |
| release   | calligrapher.bin     | image_proj_mlp / image_proj_qformer / attn_adapter |
| fork      | ip-adapter.bin       | image_proj (MLP only) / ip_adapter                 |
| ours      | *.safetensors        | flat, dotted: image_proj_mlp.proj.0.weight, ...    |

Everything is read into the flat dotted layout, which is exactly `StyleAdapter.state_dict()`.
Pickled files are opened with `weights_only=True`: a checkpoint can never run code.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import replace

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..atomic import atomic_path
from ..errors import UserError
from ..tensor_files import save_file_streamed, write_side_by_side
from .style_adapter import StyleAdapter, StyleAdapterConfig

FLAT_METADATA = {"format": "pt", "layout": "calligrapher-rl/flat"}
RELEASE_GROUPS = ("image_proj_mlp", "image_proj_qformer", "attn_adapter")
FORK_GROUPS = {"image_proj": "image_proj_mlp", "ip_adapter": "attn_adapter"}


def _flatten(groups: dict, rename: dict[str, str], path: str) -> dict[str, torch.Tensor]:
    flat = {}
    for group, inner in groups.items():
        if not isinstance(inner, dict):
            raise UserError(f"group {group!r} is not a dict of tensors", where=path)
        for key, value in inner.items():
            if not isinstance(value, torch.Tensor):
                raise UserError(f"{group}.{key} is not a tensor", where=path)
            flat[f"{rename.get(group, group)}.{key}"] = value
    return flat


def read_adapter_file(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """Returns (layout, flat state dict). Layout is `release`, `fork` or `safetensors`. A folder stands for the
    file it holds or points at (a checkpoint folder, a run's `checkpoint-0`: adapter_refs.py)."""
    from .adapter_refs import resolve_adapter_path

    path = resolve_adapter_path(path)
    if not os.path.isfile(path):
        raise UserError("checkpoint file not found", where=path)
    if path.endswith(".safetensors"):
        try:
            return "safetensors", load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"not a readable safetensors file ({exc})", where=path) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"not a readable torch checkpoint ({first[:200]})", where=path) from None
    if not isinstance(obj, dict):
        raise UserError(f"expected a dict of weights, found {type(obj).__name__}", where=path)
    if set(obj) & set(RELEASE_GROUPS) and all(isinstance(obj[k], dict) for k in obj if k in RELEASE_GROUPS):
        return "release", _flatten({k: v for k, v in obj.items() if k in RELEASE_GROUPS}, {}, path)
    if set(obj) & set(FORK_GROUPS):
        return "fork", _flatten({k: v for k, v in obj.items() if k in FORK_GROUPS}, FORK_GROUPS, path)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "flat", dict(obj)
    raise UserError(
        f"unknown checkpoint layout (top-level keys {sorted(obj)[:6]}); expected {list(RELEASE_GROUPS)} "
        f"or {list(FORK_GROUPS)} or flat dotted keys",
        where=path,
    )


def config_from_state_dict(flat: dict[str, torch.Tensor], base: StyleAdapterConfig) -> StyleAdapterConfig:
    """Token counts and the projection kind come from the file's shapes (128/32 in the release)."""
    changes = {}
    d = base.cross_attention_dim
    mlp_out = flat.get("image_proj_mlp.proj.2.weight")
    if mlp_out is not None and mlp_out.ndim == 2 and mlp_out.shape[0] % d == 0:
        changes["num_style_tokens"] = mlp_out.shape[0] // d
    kv_out = flat.get("image_proj_qformer.id_proj.2.weight")
    if kv_out is not None and kv_out.ndim == 2 and kv_out.shape[0] % d == 0:
        changes["num_qformer_tokens"] = kv_out.shape[0] // d
    changes["use_qformer"] = any(k.startswith("image_proj_qformer.") for k in flat)
    return replace(base, **changes)


def _describe(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}{f' (+{len(keys) - limit} more)' if len(keys) > limit else ''}"


def load_into_adapter(adapter: StyleAdapter, flat: dict[str, torch.Tensor], path: str = "checkpoint") -> None:
    """Strict load: one message naming the missing, unexpected and mis-shaped keys."""
    own = adapter.state_dict()
    missing = sorted(set(own) - set(flat))
    unexpected = sorted(set(flat) - set(own))
    misshaped = sorted(
        f"{k} {tuple(flat[k].shape)} != {tuple(own[k].shape)}" for k in set(own) & set(flat) if flat[k].shape != own[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_describe(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {len(misshaped)} keys: {_describe(misshaped)}")
    if problems:
        raise UserError("does not fit this model: " + "; ".join(problems), where=path)
    adapter.load_state_dict({k: v.to(own[k].dtype) for k, v in flat.items()}, strict=True)


def load_adapter_file(adapter: StyleAdapter, path: str | os.PathLike) -> str:
    layout, flat = read_adapter_file(path)
    load_into_adapter(adapter, flat, os.fspath(path))
    return layout


def release_layout(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Nest a flat state dict into the release's three groups (what its `torch.load` loader expects)."""
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        group, inner = key.split(".", 1)
        nested.setdefault(group, {})[inner] = value
    return nested


# A trained adapter's weights are O(1) (layer norms, projections); one above this has diverged, e.g. an update
# at a learning rate of 1e30 leaves weights of about 1e30 that decode every picture to black.
DIVERGED_MAGNITUDE = 1e4


@torch.no_grad()
def nonfinite_tensors(named) -> list[str]:
    """Names of the floating-point tensors of `named` ((name, tensor) pairs) holding a NaN or an infinity."""
    return [n for n, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


@torch.no_grad()
def weights_problem(named) -> str | None:
    """Why these adapter weights cannot be used (None: they can): non-finite values, or a magnitude no
    trained adapter has (a diverged run's)."""
    named = list(named)
    bad = nonfinite_tensors(named)
    if bad:
        return f"non-finite values in {len(bad)} tensor(s), e.g. {bad[0]}: the run that wrote it diverged"
    big = max(((float(t.detach().abs().max()), n) for n, t in named if t.is_floating_point() and t.numel()),
              default=(0.0, ""))
    if big[0] > DIVERGED_MAGNITUDE:
        return (f"weights of magnitude {big[0]:.3g} (in {big[1]}; a trained adapter's are below "
                f"{DIVERGED_MAGNITUDE:g}): the run that wrote it diverged")
    return None


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def adapter_file_writes(folder: str, state: dict[str, torch.Tensor], ema_state: dict | None = None,
                        release_bin: bool = True, ema_dtype: torch.dtype | None = None) -> list:
    """The writes of `save_adapter_files`, largest first, for a caller that runs them beside others
    (`tensor_files.write_side_by_side`); `ema_dtype`: the EMA file's floating-point dtype (None: as held)."""
    os.makedirs(folder, exist_ok=True)

    def streamed(name: str, tensors: dict, dtype=None) -> None:
        # the tensors may stay on the GPU: each file is written a piece at a time (tensor_files.py), never with
        # a host copy of the whole adapter (12 GB at real size)
        with atomic_path(os.path.join(folder, name)) as tmp:
            save_file_streamed(tensors, tmp, metadata=FLAT_METADATA, dtype=dtype)

    def release() -> None:  # small adapters only (training/checkpointing.py): the pickle needs host tensors
        with atomic_path(os.path.join(folder, "ip-adapter.bin")) as tmp:
            torch.save(release_layout(_contiguous_cpu(state)), tmp)

    writes = [lambda: streamed("ip-adapter.safetensors", state)]
    if ema_state is not None:
        writes.append(lambda: streamed("ip-adapter-ema.safetensors", ema_state, ema_dtype))
    if release_bin:
        writes.append(release)
    return writes


def save_adapter_files(folder: str, state: dict[str, torch.Tensor], ema_state: dict | None = None,
                       release_bin: bool = True) -> None:
    """`ip-adapter.safetensors` (+ `-ema`) and (unless `release_bin` is False) the release-compatible
    `ip-adapter.bin`, each atomic, written side by side."""
    write_side_by_side(adapter_file_writes(folder, state, ema_state, release_bin))
