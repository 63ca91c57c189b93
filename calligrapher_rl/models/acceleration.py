"""Speed options for the frozen FLUX transformer: `torch.compile` and an FP8 copy for rollouts.

Only the style adapter trains, so the 12 B transformer is a fixed function of its inputs. Two things follow:
- It is compiled in place, as a whole, with static shapes: one graph per (batch shape, grad mode). The style
  processors are plain callables inside the blocks, compiled with them; a rollout hands every block its
  precomputed style keys/values as tensors, so no Python state changes between steps (no recompiles).
  Regional compilation (diffusers' `compile_repeated_blocks`) does not suit the adapter: each block's processor
  is a distinct object (it picks its own keys/values by index), so dynamo guards on it and recompiles the
  shared block code once per block - 57 graphs on FLUX, past dynamo's recompile limit.
- Sampling that needs no log-probabilities (NFT rollouts, evaluation) may run a float8 copy of the
  transformer (torchao, dynamic per-row activation and weight scales). The copy shares nothing trainable:
  the adapter's processors are installed in both, so the copy always sees the live (or old) adapter.
  Measured numbers and the output difference of FP8 against bf16 are in docs/benchmarks.md.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from ..errors import UserError

logger = logging.getLogger("calligrapher_rl.models")


def default_inductor_cache() -> str:
    """A persistent inductor cache (compiled kernels survive the process): ~/.cache/calligrapher_rl/inductor."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "calligrapher_rl", "inductor")


def compile_transformer(transformer: nn.Module, cache_dir: str | None = None, backend: str = "inductor",
                        with_grad: bool = True) -> None:
    """Compile the transformer in place (`nn.Module.compile`: the module object, its processors and
    `functional_call` all stay as they are); lazily: the first call of each shape pays.

    `with_grad=False` compiles the no-gradient calls only; calls under autograd run the eager module. The
    compiled backward of a gradient-checkpointed 12 B transformer plans its memory over the whole graph
    and can hold more than eager checkpointing does (measured in docs/benchmarks.md), so on a card that is
    nearly full the update is better eager while sampling keeps the compiled speed.

    `dynamic=False`: a run has one group size and one resolution, so static shapes give the fastest
    kernels; a second shape recompiles once rather than making every shape symbolic. `backend` other than
    inductor is for tests (dynamo's "eager" traces the same graphs without generating kernels)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir or default_inductor_cache())
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True  # kernels survive the process: the next run starts faster
    # a run meets a handful of graphs (rollout, update with and without grad, evaluation, per batch shape);
    # keep dynamo's per-code cache well above that so a new shape never silently falls back to eager
    dynamo_config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    if with_grad:
        transformer.compile(dynamic=False, backend=backend)
        return
    compiled = torch.compile(transformer._call_impl, dynamic=False, backend=backend)
    eager = transformer._call_impl

    def call(*args, **kwargs):
        return eager(*args, **kwargs) if torch.is_grad_enabled() else compiled(*args, **kwargs)

    transformer._compiled_call_impl = call  # what nn.Module.__call__ runs when set (as nn.Module.compile does)


def fp8_supported(device) -> tuple[bool, str]:
    """FP8 matmuls need a CUDA card of compute capability 8.9 or newer (Ada, Hopper, Blackwell)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "FP8 rollouts need a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"FP8 rollouts need compute capability >= 8.9 (this card: {major}.{minor})"
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        return False, "FP8 rollouts need torchao (pip install torchao)"
    return True, ""


def _fp8_eligible(module: nn.Module, fqn: str) -> bool:
    # float8 rowwise GEMMs need both matrix dims divisible by 16; tiny layers are not worth it either
    return (isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0
            and module.in_features >= 256)


def fp8_copy(transformer: nn.Module) -> nn.Module:
    """A float8 copy of the frozen transformer for no-gradient sampling, with the same style processors.

    Built on the meta device and given the original's tensors (`assign=True`), so no second bf16 copy is
    ever allocated: quantizing then replaces each eligible Linear weight by its fp8 version (half the
    bytes of bf16); norms, embeddings and biases stay shared with the original."""
    ok, why = fp8_supported(next(transformer.parameters()).device)
    if not ok:
        raise UserError(why, field="--rollout_fp8")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    with torch.device("meta"):
        copy = type(transformer).from_config(transformer.config)
    copy.load_state_dict(transformer.state_dict(), assign=True, strict=True)
    copy.requires_grad_(False).eval()
    copy.set_attn_processor(dict(transformer.attn_processors))  # the same adapter handles
    quantize_(copy, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=_fp8_eligible)
    return copy
