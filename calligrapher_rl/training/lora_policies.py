"""The policies of a `--trainable lora` run: everything that trains, and every snapshot, is LoRA-sized.

    current    the live LoRA weights (peft layers in the transformer and/or the adapter)
    reference  the base model: a mapping that sets every lora_B to zeros, one shared zero tensor per shape,
               so it holds a few lora_B-sized tensors and no copy of anything. After a supervised warmup
               (the LoRA is not zero any more) it is a snapshot of the LoRA weights instead.
    old        NFT's old policy: a snapshot of the LoRA weights
    ema        the EMA of the LoRA weights

All of them are plain name -> tensor mappings evaluated by `stack.velocity(..., params=...)`, exactly as the
full-rank policies: without gradient their tensors stand in the live parameters' places for the call
(`models.stack.weights_in_place`), so the compiled transformer runs every policy in one graph (only tensor
values change between calls); with gradient through torch.func.functional_call.
"""

from __future__ import annotations

import logging
import os

import torch

from ..models.lora import EMA_DIR, count, lora_info, lora_parameters, read_lora_files, write_lora_files
from .policies import Policies

logger = logging.getLogger("calligrapher_rl.training")


def build_policies(stack, cfg, **kwargs) -> Policies:
    """The run's policies: full-rank adapter weights, or LoRA weights with --trainable lora."""
    if cfg.trainable == "lora":
        policies = LoraPolicies(stack, cfg, **kwargs)
    else:
        policies = Policies(stack.adapter, cfg.trainable, **kwargs)
    logger.info("trains %s", describe(policies, cfg))
    return policies


def describe(policies: Policies, cfg) -> str:
    """One line for the log and the run page: what trains and how many parameters."""
    n = count(policies.named)
    size = f"{n:,} parameters ({n * 4 / 2**20:.1f} MiB in fp32)"
    if cfg.trainable != "lora":
        return f"the style adapter (--trainable {cfg.trainable}): {size}"
    parts = []
    for part, names in (("transformer", [x for x in policies.names if x.startswith("transformer.")]),
                        ("adapter", [x for x in policies.names if not x.startswith("transformer.")])):
        if names:
            parts.append(f"{len(names) // 2} {part} layers")
    return f"LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha:g} on {' + '.join(parts)}: {size}"


class LoraPolicies(Policies):
    def __init__(self, stack, cfg, **kwargs):
        self.transformer = stack.pipe.transformer
        named = lora_parameters(self.transformer, stack.adapter)
        if not named:
            raise RuntimeError("--trainable lora: the stack has no LoRA layers (setup.build_stack adds them)")
        super().__init__(stack.adapter, "lora", named=named, **kwargs)
        self.info = lora_info(cfg, self._parts())
        self.reference_is_base = False

    def _parts(self) -> dict[str, list[str]]:
        out = {}
        for part, module in (("transformer", self.transformer), ("adapter", self.adapter)):
            config = getattr(module, "peft_config", {}).get("default")
            if config is not None:
                out[part] = sorted(config.target_modules)
        return out

    # ------------------------------------------------------------ reference and old policies
    def base_reference(self) -> dict[str, torch.Tensor]:
        """Every lora_B set to zeros: the base model. All of them are contiguous views of ONE zero buffer the
        size of the largest lora_B (per dtype and device): the same shapes and strides as the live weights,
        so a compiled transformer runs them with the graph of any other snapshot."""
        b_weights = [(n, p) for n, p in self.named if ".lora_B." in n]
        buffers: dict[tuple, torch.Tensor] = {}
        for _, p in b_weights:
            key = (p.dtype, p.device)
            if key not in buffers or buffers[key].numel() < p.numel():
                buffers[key] = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        return {n: buffers[(p.dtype, p.device)][:p.numel()].view(p.shape) for n, p in b_weights}

    def _move(self, snap, kind, device):
        if kind == "ref" and self.reference_is_base:
            return snap  # a few lora_B-sized views of one zero buffer: nothing to gain from moving them
        return super()._move(snap, kind, device)

    def _lora_is_zero(self) -> bool:
        return all(not p.detach().any() for n, p in self.named if ".lora_B." in n)

    def begin_rl(self, with_old: bool) -> None:
        super().begin_rl(with_old)
        # the LoRA still zero (no warmup, or a warmup that did not move it): the reference is the base itself
        self.reference_is_base = self._lora_is_zero()
        if self.reference_is_base:
            self.reference = self.base_reference()

    def reference_state(self) -> dict[str, torch.Tensor] | None:
        """What a checkpoint keeps of the reference: nothing when it is the base model."""
        return None if self.reference_is_base else self.reference

    def load_snapshots(self, reference: dict | None, old: dict | None, device) -> None:
        super().load_snapshots(reference, old, device)
        if self.reference_is_base:
            self.reference = self.base_reference()

    # ------------------------------------------------------------ EMA and files
    def ema_state(self) -> None:
        return None  # the EMA is written as LoRA files of its own (ema/), by write_files

    def ema_values(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.ema.shadow))

    def write_files(self, folder: str, ema_dtype: torch.dtype | None = None) -> None:
        """The checkpoint's weight files: the live LoRA, and the EMA LoRA in ema/ (models/lora.py), its weights
        as `ema_dtype` when given (--checkpoint_averages_dtype)."""
        write_lora_files(folder, self.transformer, self.adapter, info=self.info)
        if self.ema is not None:
            write_lora_files(os.path.join(folder, EMA_DIR), self.transformer, self.adapter, values=self.ema_values(),
                             dtype=ema_dtype or torch.float32)

    def checkpoint_state(self) -> dict:
        return {"lora_reference": "base" if self.reference_is_base else "snapshot"}

    @torch.no_grad()
    def load_files(self, folder: str, state: dict) -> None:
        """Exact resume: the live LoRA, its EMA (with its update count), whether the reference is the base."""
        live = dict(self.named)
        for name, value in read_lora_files(folder, self.transformer, self.adapter).items():
            live[name].copy_(value)
        if self.ema is not None and os.path.isdir(os.path.join(folder, EMA_DIR)):
            shadow = read_lora_files(os.path.join(folder, EMA_DIR), self.transformer, self.adapter)
            for name, e in zip(self.names, self.ema.shadow):
                e.copy_(shadow[name].to(e.device, torch.float32))
            self.ema.num_updates = int(state.get("ema_updates", 0))
        self.reference_is_base = state.get("lora_reference") == "base"
