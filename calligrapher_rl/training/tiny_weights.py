"""The pretrained tiny's architecture and weight files: an untrained stack of a given architecture, flat
snapshots (`weights-step{N}.safetensors`: every weight under `component.` keys, the architecture and the VAE's
shift/scale in the metadata) and the layout of `tiny` (a FluxFillPipeline folder, a SigLIP folder and
`ip-adapter.safetensors`), which the real loaders read.

tiny_pretrain.py trains the stack and writes through these; `python -m calligrapher_rl.tiny export` turns a
snapshot into the layout.
"""

from __future__ import annotations

import copy
import json
import os

import torch

from ..models.style_adapter import StyleAdapter
from ..models.tiny import build_tiny_pipeline, build_tiny_siglip

NUM_STYLE_TOKENS = 8
DEFAULT_ARCH = {"heads": 4, "double_blocks": 2, "single_blocks": 3}  # head dim stays 32 (RoPE axes 8+12+12)
SAVE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
COMPONENTS = ("vae", "transformer", "text_encoder", "text_encoder_2")


def arch_sizes(heads: int = 4, double_blocks: int = 2, single_blocks: int = 3) -> dict:
    """The keyword sizes `build_tiny_pipeline` takes for a transformer of this many heads and blocks."""
    return {
        "text_dim": 64, "pooled_dim": 64,
        "transformer": {"num_layers": double_blocks, "num_single_layers": single_blocks, "attention_head_dim": 32,
                        "num_attention_heads": heads, "axes_dims_rope": (8, 12, 12)},
        "vae": {"block_out_channels": [16, 32, 64, 64]},
    }


ARCH = arch_sizes(**DEFAULT_ARCH)


def build_untrained(seed: int, arch: dict | None = None):
    pipe = build_tiny_pipeline(seed, **arch_sizes(**(arch or DEFAULT_ARCH)))
    siglip, processor = build_tiny_siglip(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        adapter = StyleAdapter.for_transformer(pipe.transformer, siglip.config.hidden_size,
                                               num_style_tokens=NUM_STYLE_TOKENS, use_qformer=True)
    return pipe, siglip, processor, adapter


def flat_state(pipe, siglip, adapter, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Every weight under `component.` keys, cloned (tied weights must not share storage in safetensors)."""
    state = {}
    for name in COMPONENTS:
        for k, v in getattr(pipe, name).state_dict().items():
            state[f"{name}.{k}"] = v.detach().to("cpu", dtype).contiguous().clone()
    for prefix, module in (("siglip", siglip), ("adapter", adapter)):
        for k, v in module.state_dict().items():
            state[f"{prefix}.{k}"] = v.detach().to("cpu", dtype).contiguous().clone()
    return state


def save_snapshot(path: str, pipe, siglip, adapter, meta: dict, arch: dict | None = None,
                  save_dtype: str = "fp16") -> None:
    """Flat weights with what rebuilds them in the metadata: the VAE's shift/scale and the architecture."""
    from safetensors.torch import save_file

    tmp = f"{path}.tmp"
    vae = pipe.vae.config
    info = {"shift_factor": str(vae.shift_factor), "scaling_factor": str(vae.scaling_factor),
            "arch": json.dumps(arch or DEFAULT_ARCH), "dtype": save_dtype}
    state = flat_state(pipe, siglip, adapter, SAVE_DTYPES[save_dtype])
    save_file(state, tmp, metadata=info | {k: str(v) for k, v in meta.items()})
    os.replace(tmp, path)


def load_snapshot(path: str, seed: int = 0):
    """The stack of a snapshot, in float32, with the architecture its metadata records (older ones: the default)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    pipe, siglip, processor, adapter = build_untrained(seed, json.loads(meta.get("arch", json.dumps(DEFAULT_ARCH))))
    state = {k: v.float() for k, v in load_file(path).items()}
    for name in COMPONENTS:
        getattr(pipe, name).load_state_dict({k[len(name) + 1:]: v for k, v in state.items()
                                             if k.startswith(name + ".")})
    siglip.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("siglip.")})
    adapter.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("adapter.")})
    pipe.vae.register_to_config(shift_factor=float(meta["shift_factor"]), scaling_factor=float(meta["scaling_factor"]))
    return pipe, siglip, processor, adapter


def write_layout(out: str, pipe, siglip, processor, adapter, save_dtype: str = "fp16") -> tuple[str, str, str]:
    """`out/flux-fill`, `out/siglip`, `out/ip-adapter.safetensors` (the release's names, flattened).

    FLUX-Fill and the adapter in `save_dtype` (the loaders cast to the stack's dtype); SigLIP in float32, as the
    style reward loads it without a dtype."""
    from safetensors.torch import save_file

    dtype = SAVE_DTYPES[save_dtype]
    flux_dir, siglip_dir = os.path.join(out, "flux-fill"), os.path.join(out, "siglip")
    if dtype != torch.float32:
        pipe = copy.deepcopy(pipe)
        for name in COMPONENTS:  # nn.Module's cast: diffusers' own warns about fp32 modules these models lack
            torch.nn.Module.to(getattr(pipe, name), dtype=dtype)
    pipe.save_pretrained(flux_dir, safe_serialization=True)
    siglip.save_pretrained(siglip_dir, safe_serialization=True)
    processor.save_pretrained(siglip_dir)
    adapter_file = os.path.join(out, "ip-adapter.safetensors")
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in adapter.state_dict().items()}
    save_file(state, adapter_file, metadata={"format": "pt", "layout": "calligrapher-rl/flat"})
    return flux_dir, siglip_dir, adapter_file


def parameter_counts(pipe, siglip, adapter) -> dict[str, int]:
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in COMPONENTS}
    return counts | {"siglip": sum(p.numel() for p in siglip.parameters()),
                     "adapter": sum(p.numel() for p in adapter.parameters())}
