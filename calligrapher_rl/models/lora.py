"""LoRA on the style adapter and on the FLUX transformer, through peft (and diffusers' own helpers for FLUX).

`add_lora(stack, spec)` injects peft LoRA layers (`LoraConfig`; `transformer.add_adapter` for FLUX,
`inject_adapter_in_model` for the adapter) and returns the trainable names. Names are those of
`CalligrapherStack.velocity(params=...)`: the adapter's own names (`attn_adapter.0.to_k_ip.lora_A.default.weight`)
and `transformer.`-prefixed names for the transformer's LoRA, so other policies are still plain mappings.

Files of a LoRA checkpoint folder (`write_lora_files` / `read_lora_files`):

    lora.json                               what the LoRA adapts (base model, base adapter) and its shape
    pytorch_lora_weights.safetensors        the transformer's LoRA, diffusers' format (`FluxFillPipeline.load_lora_weights`)
    adapter_lora/adapter_model.safetensors  the adapter's LoRA, peft's format (+ adapter_config.json)

The faster forwards of a training run's transformer LoRA (`--lora_merged`) are in `lora_merged.py`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import UserError

# Flow-GRPO's FLUX list (scripts/train_flux.py of yifan123/flow_grpo): every attention projection of the double
# blocks (image and text streams) and their feed-forwards; `attn.to_q/k/v` also match the single blocks.
TRANSFORMER_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                       "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                       "ff_context.net.2")
# The adapter: each block's style key/value maps and the linear layers of both style projections.
ADAPTER_MODULES = ("to_k_ip", "to_v_ip", "image_proj_mlp.proj.0", "image_proj_mlp.proj.2",
                   "image_proj_qformer.id_proj.0", "image_proj_qformer.id_proj.2")
TARGETS = ("adapter", "transformer", "both")
LORA_JSON = "lora.json"
TRANSFORMER_FILE = "pytorch_lora_weights.safetensors"
ADAPTER_DIR = "adapter_lora"
ADAPTER_FILE = "adapter_model.safetensors"
EMA_DIR = "ema"
PREFIX = "transformer."  # names of the transformer's LoRA in a policy mapping


@dataclass(frozen=True)
class LoraSpec:
    target: str = "both"
    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    modules: tuple[str, ...] | None = None  # None = the defaults of each target

    @classmethod
    def from_config(cls, cfg) -> "LoraSpec":
        mods = tuple(m.strip() for m in cfg.lora_modules.split(",") if m.strip()) if cfg.lora_modules else None
        return cls(cfg.lora_target, cfg.lora_rank, float(cfg.lora_alpha), cfg.lora_dropout, mods)

    def peft_config(self, modules: list[str]):
        from peft import LoraConfig

        # gaussian A, zero B (Flow-GRPO, DiffusionNFT): the LoRA starts as the identity of the base model
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=modules,
                          init_lora_weights="gaussian")


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of target names


def split_modules(spec: LoraSpec, transformer: nn.Module, adapter: nn.Module) -> dict[str, list[str]]:
    """{'transformer': [...], 'adapter': [...]} of the spec's targets; every name must match a Linear there."""
    wanted = [t for t in ("transformer", "adapter") if spec.target in (t, "both")]
    linears = {"transformer": [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear)],
               "adapter": [n for n, m in adapter.named_modules() if isinstance(m, nn.Linear)]}
    if spec.modules is None:
        defaults = {"transformer": TRANSFORMER_MODULES, "adapter": ADAPTER_MODULES}
        return {t: [m for m in defaults[t] if any(_matches(n, m) for n in linears[t])] for t in wanted}
    out: dict[str, list[str]] = {t: [] for t in wanted}
    for m in spec.modules:
        hits = [t for t in wanted if any(_matches(n, m) for n in linears[t])]
        if not hits:
            raise UserError(f"{m!r} names no linear layer of the {' or '.join(wanted)} (--lora_target "
                            f"{spec.target})", field="--lora_modules")
        for t in hits:
            out[t].append(m)
    for t in wanted:
        if not out[t]:
            raise UserError(f"no module of the {t} is listed (--lora_target {spec.target}); e.g. "
                            f"{', '.join((TRANSFORMER_MODULES if t == 'transformer' else ADAPTER_MODULES)[:3])}",
                            field="--lora_modules")
    return out


def add_lora(transformer: nn.Module, adapter: nn.Module, spec: LoraSpec) -> dict[str, list[str]]:
    """Inject the LoRA layers (fp32 weights: the masters the optimizer updates); freeze everything else.
    Returns the modules targeted per part."""
    from peft import inject_adapter_in_model

    parts = split_modules(spec, transformer, adapter)
    device = next(iter([*adapter.parameters(), *transformer.parameters()])).device  # the masters stay beside the model
    if parts.get("transformer"):
        transformer.add_adapter(spec.peft_config(parts["transformer"]))  # diffusers' PeftAdapterMixin
    if parts.get("adapter"):
        inject_adapter_in_model(spec.peft_config(parts["adapter"]), adapter)
    for module in (transformer, adapter):
        for name, p in module.named_parameters():
            lora = "lora_" in name
            p.requires_grad_(lora)
            if lora and (p.dtype != torch.float32 or p.device != device):
                p.data = p.data.to(device, torch.float32)
    return parts


def lora_parameters(transformer: nn.Module, adapter: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(policy name, parameter) of every LoRA weight: the adapter's first, then `transformer.`-prefixed ones."""
    out = [(n, p) for n, p in adapter.named_parameters() if "lora_" in n]
    return out + [(PREFIX + n, p) for n, p in transformer.named_parameters() if "lora_" in n]


def count(params) -> int:
    return sum(p.numel() for _, p in params)


# ------------------------------------------------------------------------------------------- files
def _peft_dict(module: nn.Module, values: dict[str, torch.Tensor] | None, prefix: str = "",
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """peft's saved names (adapter name dropped) of `module`'s LoRA: its live weights, or `values` (policy names)."""
    from peft import get_peft_model_state_dict

    state = None
    if values is not None:
        state = {n[len(prefix):]: v for n, v in values.items() if n.startswith(prefix)}
    out = get_peft_model_state_dict(module, state_dict=state)
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in out.items()}


def _lora_config_of(module: nn.Module):
    cfg = getattr(module, "peft_config", {}).get("default")
    return cfg


def write_lora_files(folder: str, transformer: nn.Module, adapter: nn.Module, values: dict | None = None,
                     info: dict | None = None, dtype: torch.dtype = torch.float32) -> None:
    """The user-facing files of the live LoRA (or of `values`, a policy mapping such as the EMA) in `folder`,
    its weights as `dtype`."""
    from diffusers import FluxFillPipeline
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    t_cfg, a_cfg = _lora_config_of(transformer), _lora_config_of(adapter)
    if t_cfg is not None:
        layers = _peft_dict(transformer, values, PREFIX, dtype)
        # the metadata carries alpha and the targets, so load_lora_weights rebuilds the same LoraConfig
        FluxFillPipeline.save_lora_weights(folder, transformer_lora_layers=layers,
                                           transformer_lora_adapter_metadata=t_cfg.to_dict())
    if a_cfg is not None:
        sub = os.path.join(folder, ADAPTER_DIR)
        os.makedirs(sub, exist_ok=True)
        adapter_values = None if values is None else {n: v for n, v in values.items() if not n.startswith(PREFIX)}
        save_file(_peft_dict(adapter, adapter_values, dtype=dtype), os.path.join(sub, ADAPTER_FILE),
                  metadata={"format": "pt"})
        a_cfg.save_pretrained(sub)
    if info is not None:
        with open(os.path.join(folder, LORA_JSON), "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2)


def read_lora_files(folder: str, transformer: nn.Module | None, adapter: nn.Module | None) -> dict[str, torch.Tensor]:
    """The LoRA weights of `folder` as a policy mapping (names of the live modules); a part absent from the
    folder is absent from the mapping."""
    from diffusers import FluxFillPipeline
    from peft.utils import set_peft_model_state_dict  # noqa: F401 - the names below are peft's
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    t_file, a_file = os.path.join(folder, TRANSFORMER_FILE), os.path.join(folder, ADAPTER_DIR, ADAPTER_FILE)
    try:
        if transformer is not None and os.path.isfile(t_file):
            state = FluxFillPipeline.lora_state_dict(folder, weight_name=TRANSFORMER_FILE)
            state = state[0] if isinstance(state, tuple) else state
            out.update(_to_live(transformer, {k[len("transformer."):]: v for k, v in state.items()
                                              if k.startswith("transformer.")}, PREFIX))
        if adapter is not None and os.path.isfile(a_file):
            out.update(_to_live(adapter, load_file(a_file), ""))
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"unreadable LoRA weights ({str(exc).splitlines()[0][:160]})", where=folder) from None
    return out


def _to_live(module: nn.Module, saved: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """peft's saved names -> the live parameter names (`lora_A.weight` -> `lora_A.default.weight`)."""
    live = {n for n, _ in module.named_parameters() if "lora_" in n}
    out = {}
    for key, value in saved.items():
        for part in ("lora_A", "lora_B"):
            key = key.replace(f".{part}.weight", f".{part}.default.weight")
        if key not in live:
            raise UserError(f"LoRA weight {key!r} has no layer in this model (another --lora_modules or model?)")
        out[prefix + key] = value
    missing = live - {k[len(prefix):] for k in out}
    if saved and missing:
        raise UserError(f"{len(missing)} LoRA weights of this model are missing from the file, e.g. {sorted(missing)[0]}")
    return out


def lora_info(cfg, parts: dict[str, list[str]]) -> dict:
    """lora.json: what export and inference need to rebuild the model this LoRA adapts."""
    base = cfg.initial_ip_adapter_path
    if base is None and cfg.pretrained_model_name_or_path == "tiny-pretrained":
        base = "tiny-pretrained"  # the name loads its own pretrained adapter (CalligrapherStack.from_pretrained)
    return {"format": "calligrapher-rl/lora", **asdict(LoraSpec.from_config(cfg)), "modules": parts,
            "pretrained_model_name_or_path": cfg.pretrained_model_name_or_path, "siglip_path": cfg.siglip_path,
            "base_adapter": base, "num_style_tokens": cfg.num_style_tokens,
            "use_qformer": cfg.use_qformer, "seed": cfg.seed}


def find_lora(path: str) -> tuple[str, str, dict] | None:
    """(checkpoint folder, weights folder, lora.json) when `path` is a LoRA checkpoint: its folder (raw weights),
    its `ema/` folder (EMA weights), or a file in either; None otherwise."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.basename(folder) == ADAPTER_DIR:
        folder = os.path.dirname(folder)
    root = os.path.dirname(folder) if os.path.basename(folder) == EMA_DIR else folder
    info_path = os.path.join(root, LORA_JSON)
    if not os.path.isfile(info_path):
        return None
    try:
        with open(info_path, encoding="utf-8") as fh:
            info = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserError(f"unreadable ({exc})", where=info_path) from None
    return root, folder, info


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every peft LoRA layer of `module` into its base layer (peft's `merge`) and put the base layer back
    in its place: the module is then the plain architecture, with merged weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, child in list(module.named_modules()):
        if isinstance(child, BaseTunerLayer) and name:
            child.merge()
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, child.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config
    if hasattr(module, "_hf_peft_config_loaded"):
        module._hf_peft_config_loaded = False
    return module


def apply_lora_checkpoint(transformer: nn.Module, adapter: nn.Module, path: str, merge: bool = True) -> dict:
    """Give a loaded base model (transformer + base adapter) the LoRA of checkpoint `path` (raw or EMA folder),
    merged into the weights by default. Returns lora.json."""
    root, folder, info = find_lora(path)
    spec = LoraSpec(info["target"], info["rank"], float(info["alpha"]), 0.0,
                    tuple(dict.fromkeys(m for ms in info["modules"].values() for m in ms)))
    add_lora(transformer, adapter, spec)
    values = read_lora_files(folder, transformer, adapter)
    if not values:
        raise UserError("no LoRA weights here (pytorch_lora_weights.safetensors or adapter_lora/)", where=folder)
    with torch.no_grad():
        params = dict(lora_parameters(transformer, adapter))
        for name, value in values.items():
            params[name].copy_(value)
    for module in (transformer, adapter):
        module.requires_grad_(False)
    if merge:
        merge_lora(transformer)
        merge_lora(adapter)
    return info
