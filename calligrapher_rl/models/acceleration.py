"""Speed options for the frozen FLUX transformer: `torch.compile` and an FP8 copy for rollouts.

Only the style adapter trains, so the 12 B transformer is a fixed function of its inputs. Two things follow:
- It is compiled in place with static shapes, at one of two scopes (`--compile_scope`):
  `whole`: one graph of the whole transformer per (batch shape, grad mode). The style processors are plain
  callables inside the blocks, compiled with them; a rollout hands every block its precomputed style
  keys/values as tensors, so no Python state changes between steps (no recompiles).
  `blocks` (regional compilation): one graph per block kind (double, single) per (shape, grad mode), shared by
  all 19 + 38 blocks; the code between the blocks runs eager. Dynamo reuses one graph across blocks only if
  nothing it guards on differs between them, and three things did (measured on the tiny, `tests/test_compile.py`):
  each block's processor handle picked its keys/values with its own int index (a constant to dynamo: one
  recompile per block, 57 on FLUX, past the recompile limit); the first single block gets contiguous streams
  where the others get slices of the joint sequence (a stride guard); and under autograd the first double
  blocks' streams carry no gradient yet where the later ones do (a requires_grad guard). So a block's call
  goes through a small eager step first: it picks that block's keys/values out of `style_kv` and passes them
  as the block's own tensors (`block_style_kv`), makes the two streams contiguous (a copy only for the
  single blocks' slices) and, under autograd, runs a block whose streams do not both carry gradient eager
  (the first two double blocks: eager speed for 2 of 57 blocks) rather than trace two more graphs for them.
- Gradient checkpointing may leave the last N blocks (forward order) un-checkpointed
  (`enable_gradient_checkpointing`, `--gradient_checkpointing_skip_blocks`): their activations are kept
  through the backward instead of recomputed, memory bought back as time (selective activation checkpointing).
- Sampling that needs no log-probabilities (NFT rollouts, evaluation) may run a float8 copy of the
  transformer (torchao, dynamic activation and weight scales, per row or per tensor). The copy shares nothing
  trainable: the adapter's processors are installed in both, so the copy always sees the live (or old) adapter.
  Being forward-only, its attention may run on cuDNN's fused kernel (`sampling_attention`), which the gradient
  path cannot use (its backward fails on FLUX's shapes with torch 2.11/cu130, docs/gpu-notes.md).
  Measured numbers and the output difference of FP8 against bf16 are in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.utils.checkpoint
from torch import nn

from ..errors import UserError

logger = logging.getLogger("calligrapher_rl.models")


def default_inductor_cache() -> str:
    """A persistent inductor cache (compiled kernels survive the process): ~/.cache/calligrapher_rl/inductor."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "calligrapher_rl", "inductor")


SCOPES = ("whole", "blocks")
# FLUX's block signature (both kinds): calls come by keyword, or positionally from gradient checkpointing
_BLOCK_ARGS = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs")
_STREAMS = _BLOCK_ARGS[:2]


def compile_transformer(transformer: nn.Module, cache_dir: str | None = None, backend: str = "inductor",
                        with_grad: bool = True, scope: str = "whole") -> None:
    """Compile the transformer in place (`nn.Module.compile`: the module object, its processors and
    `functional_call` all stay as they are); lazily: the first call of each shape pays.

    `scope`: `whole` compiles the transformer as one graph; `blocks` compiles each repeated block (diffusers'
    `_repeated_blocks`), one graph per block kind shared by all blocks of that kind (see the module docstring).

    `with_grad=False` compiles the no-gradient calls only; calls under autograd run the eager module. The
    compiled backward of a gradient-checkpointed 12 B transformer plans its memory over the whole graph
    and can hold more than eager checkpointing does (measured in docs/benchmarks.md), so on a card that is
    nearly full the update is better eager while sampling keeps the compiled speed.

    `dynamic=False`: a run has one group size and one resolution, so static shapes give the fastest
    kernels; a second shape recompiles once rather than making every shape symbolic. `backend` other than
    inductor is for tests (dynamo's "eager" traces the same graphs without generating kernels)."""
    if scope not in SCOPES:
        raise ValueError(f"compile scope must be one of {SCOPES}, got {scope!r}")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir or default_inductor_cache())
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True  # kernels survive the process: the next run starts faster
    # a run meets a handful of graphs (rollout, update with and without grad, evaluation, per batch shape);
    # keep dynamo's per-code cache well above that so a new shape never silently falls back to eager
    dynamo_config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    if scope == "blocks":
        kinds = set(getattr(transformer, "_repeated_blocks", None) or ())
        blocks = [m for m in transformer.modules() if type(m).__name__ in kinds]
        if not blocks:
            raise ValueError(f"{type(transformer).__name__} declares no repeated blocks to compile")
        for block in blocks:
            _compile_block(block, backend, with_grad)
        return
    if with_grad:
        transformer.compile(dynamic=False, backend=backend)
        return
    compiled = torch.compile(transformer._call_impl, dynamic=False, backend=backend)
    eager = transformer._call_impl

    def call(*args, **kwargs):
        return eager(*args, **kwargs) if torch.is_grad_enabled() else compiled(*args, **kwargs)

    transformer._compiled_call_impl = call  # what nn.Module.__call__ runs when set (as nn.Module.compile does)


def _compile_block(block: nn.Module, backend: str, with_grad: bool) -> None:
    """One block: `torch.compile` of its call (dynamo caches graphs per code object, so every block of a kind
    shares them) behind an eager step that makes the inputs of every block look alike to dynamo's guards."""
    eager = block._call_impl
    compiled = torch.compile(eager, dynamic=False, backend=backend)

    def call(*args, **kwargs):
        if len(args) > len(_BLOCK_ARGS) or not set(kwargs) <= set(_BLOCK_ARGS):
            return eager(*args, **kwargs)  # not FLUX's signature: nothing to align, never traced
        named = {**dict(zip(_BLOCK_ARGS, args)), **kwargs}
        for name in _STREAMS:  # the single blocks pass on slices of the joint sequence (other strides)
            t = named.get(name)
            if isinstance(t, torch.Tensor) and not t.is_contiguous():
                named[name] = t.contiguous()
        jak = named.get("joint_attention_kwargs")
        index = getattr(getattr(getattr(block, "attn", None), "processor", None), "index", None)
        if jak and jak.get("style_kv") is not None and index is not None:
            # this block's keys/values as its own inputs: the processor then never reads its int index
            named["joint_attention_kwargs"] = {**jak, "style_kv": None, "block_style_kv": jak["style_kv"][index]}
        if torch.is_grad_enabled() and not (with_grad and all(
                t.requires_grad for t in (named.get(n) for n in _STREAMS) if isinstance(t, torch.Tensor))):
            return eager(**named)
        return compiled(**named)

    block._compiled_call_impl = call


def enable_gradient_checkpointing(transformer: nn.Module, skip_blocks: int = 0) -> int:
    """Gradient checkpointing of every block but the last `skip_blocks` in forward order (FLUX: 19 double-stream,
    then 38 single-stream blocks; more than there are = none checkpointed). A skipped block runs as an
    ordinary call under autograd: its activations stay for the backward instead of being recomputed in it.
    0 is diffusers' own checkpointing, unchanged. Returns the number of blocks skipped.

    The blocks are recognised by identity (the modules themselves, whatever `--compile_scope` does: compiling
    sets a block's `_compiled_call_impl` and keeps the module), in diffusers' `gradient_checkpointing_func`,
    which the transformer's forward calls as `func(block, *args)` for each block under autograd."""
    if skip_blocks < 0:
        raise ValueError(f"skip_blocks must be >= 0, got {skip_blocks}")
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    skipped = blocks[len(blocks) - min(skip_blocks, len(blocks)):]
    func = partial_checkpointing(frozenset(id(b) for b in skipped)) if skipped else None
    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=func)
    return len(skipped)


def partial_checkpointing(skipped_ids: frozenset[int]):
    """A `gradient_checkpointing_func` that checkpoints each block as diffusers' default does (non-reentrant),
    except the blocks whose `id()` is in `skipped_ids`, which it calls directly."""

    def checkpoint_block(block, *args):
        if id(block) in skipped_ids:
            return block(*args)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    checkpoint_block.skipped_ids = skipped_ids
    return checkpoint_block


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


FP8_SCALES = ("row", "tensor")
SAMPLING_ATTENTION = ("default", "cudnn")


def sampling_attention(name: str):
    """The SDPA backends of a no-gradient call: `default` leaves torch's choice (flash attention on an H100);
    `cudnn` puts cuDNN's fused attention first, the others after it for shapes it does not take. Under
    torch.compile the choice is made while tracing, so a graph traced inside this context keeps it; the
    float8 copy is only ever called inside it."""
    if name not in SAMPLING_ATTENTION:
        raise ValueError(f"sampling attention must be one of {SAMPLING_ATTENTION}, got {name!r}")
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH], set_priority=True)


def sampling_copy(transformer: nn.Module) -> nn.Module:
    """A second transformer module over the same tensors (no memory of its own), frozen, with the same style
    processors: what `fp8_copy` quantizes. Built on the meta device and given the original's tensors."""
    with torch.device("meta"):
        copy = type(transformer).from_config(transformer.config)
    copy.load_state_dict(transformer.state_dict(), assign=True, strict=True)
    copy.requires_grad_(False).eval()
    copy.set_attn_processor(dict(transformer.attn_processors))  # the same adapter handles
    return copy


UNFUSED_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def fuse_qkv(copy: nn.Module) -> int:
    """Each attention of a sampling copy computes its query/key/value (and the text stream's) in one matmul
    (diffusers' `fuse_projections`: `to_qkv`, `to_added_qkv`), which the shared processors then use: one GEMM and,
    once quantized, one activation quantization where there were three. The separate projections stay in
    place, as the live transformer's shared tensors (no memory of their own), and unused. Returns how many
    attentions were fused. Only for a copy: the live transformer's fused weights would be a second copy."""
    fused = 0
    for module in copy.modules():
        if callable(getattr(module, "fuse_projections", None)) and hasattr(module, "to_q"):
            module.fuse_projections()
            fused += int(bool(getattr(module, "fused_projections", False)))
    return fused


def _fp8_eligible_fused(module: nn.Module, fqn: str) -> bool:
    # with fused projections, the separate ones are never called: quantizing them would only cost memory
    return _fp8_eligible(module, fqn) and fqn.rsplit(".", 1)[-1] not in UNFUSED_PROJECTIONS


def fp8_copy(transformer: nn.Module, scales: str = "row", fused_qkv: bool = False) -> nn.Module:
    """A float8 copy of the frozen transformer for no-gradient sampling, with the same style processors.

    Built on the meta device and given the original's tensors (`assign=True`), so no second bf16 copy is
    ever allocated: quantizing then replaces each eligible Linear weight by its fp8 version (half the
    bytes of bf16); norms, embeddings and biases stay shared with the original. `scales`: one scale per row
    of each weight and activation (the default: closer to bf16) or one per tensor (less scaling work per
    matmul; `bench/gpu_bench.py --fp8_variants` compares the two). `fused_qkv`: see `fuse_qkv`
    (--rollout_fp8_fused_qkv; `--fp8_variants row+qkv` times it)."""
    config = fp8_config(scales)
    ok, why = fp8_supported(next(transformer.parameters()).device)
    if not ok:
        raise UserError(why, field="--rollout_fp8")
    from torchao.quantization import quantize_

    copy = sampling_copy(transformer)
    if fused_qkv:
        fuse_qkv(copy)
    quantize_(copy, config, filter_fn=_fp8_eligible_fused if fused_qkv else _fp8_eligible)
    return copy


def fp8_config(scales: str = "row"):
    """torchao's float8 config for `fp8_copy`. `set_inductor_config=False`: by default quantizing also switches
    on inductor's coordinate-descent tuning for the whole process, so every graph the run compiles afterwards,
    the bf16 ones too, is tuned kernel by kernel. With it, on an H100, the float8 blocks' cold compile took 188 s
    against the bf16 blocks' 19 s, and a flux-nft run with --rollout_fp8 had no optimizer step 417 s after its
    command (docs/benchmarks.md). Quantizing changes nothing but the copy's weights now."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor

    if scales not in FP8_SCALES:
        raise ValueError(f"fp8 scales must be one of {FP8_SCALES}, got {scales!r}")
    granularity = PerRow() if scales == "row" else PerTensor()
    return Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False)
