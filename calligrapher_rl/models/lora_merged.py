"""The transformer LoRA's fast forward in a training run (`--lora_merged`).

Each peft LoRA Linear runs as one matmul with W + s B A (`use_merged_lora`, `_MergedLoraLinear`): peft's own
forward makes a second pass over the layer's input and a full-size add, which at FLUX size costs more than the
rank-r matmuls themselves. The merged weight is formed at each call, with or without gradient. Keeping each
policy's formed weights between no-gradient calls was tried and measured on an H100 (docs/lora.md, "Speed"): a
bf16 copy of the LoRA'd layers (10.8 GB for flux-grpo-lora) on the card while rolling out, and no faster an
epoch: putting a few hundred weights in place and back at every call costs host time that forming them does not.
"""

from __future__ import annotations

import torch
from torch import nn


def _merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A in the base weight's dtype: one GEMM whose epilogue adds W, so a bf16 base is rounded
    once (as a fused LoRA at inference is), and nothing is written back into the base."""
    return torch.addmm(weight, lora_b.to(weight.dtype), lora_a.to(weight.dtype), alpha=scaling)


class _MergedLoraLinear(torch.autograd.Function):
    """y = x (W + s B A)^T + b with the LoRA factors' gradient from rank-r products.

    Forward: one matmul with the merged weight (`_merged_weight`), under whatever autocast is active. Backward
    (W and b are frozen): dx = g (W + s B A) with the forward's merged weight, saved: under gradient checkpointing
    (every real-size preset) a saved tensor lives only from its block's recompute to that block's backward, so
    keeping it costs one block's merged weights and saves forming them a third time; dA = s (g B)^T x and
    dB = s g^T (x A^T), the two rank-r products peft's autograd forms too, so the factors' gradients are peft's.
    Nothing of size d_out x d_in is formed besides the merged weight itself."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        merged = _merged_weight(weight, lora_a, lora_b, scaling)
        y = torch.nn.functional.linear(x, merged, bias)
        ctx.save_for_backward(x, merged, lora_a, lora_b)
        ctx.scaling, ctx.dtype = scaling, y.dtype  # y's dtype is the compute dtype autocast chose
        return y

    @staticmethod
    def backward(ctx, grad):
        x, merged, lora_a, lora_b = ctx.saved_tensors
        dt, s = ctx.dtype, ctx.scaling
        g = grad.reshape(-1, grad.shape[-1]).to(dt)
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        a, b = lora_a.to(dt), lora_b.to(dt)
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            dx = (g @ merged.to(dt)).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[3]:
            da = ((g @ b).t() @ x2).mul_(s).to(lora_a.dtype)
        if ctx.needs_input_grad[4]:
            db = (g.t() @ (x2 @ a.t())).mul_(s).to(lora_b.dtype)
        return dx, None, None, da, db, None


def merge_factors(layer) -> tuple | None:
    """(A, B, scaling) of a peft LoRA Linear whose forward is one merged matmul; None for what the merge does not
    cover (adapters off or merged, several adapters, a variant such as DoRA, dropout): peft's own forward."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [n for n in layer.active_adapters if n in layer.lora_A.keys()]
    if len(active) != 1 or active[0] in layer.lora_variant or not isinstance(layer.lora_dropout[active[0]], nn.Identity):
        return None
    name = active[0]
    return layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]


def _merged_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A peft LoRA Linear's forward as one matmul with W + scaling * B @ A (`--lora_merged`).

    peft computes `base(x) + B(A(x)) * scaling`: a second pass over the layer's input and a full-size add, which at
    FLUX size (thousands of rows per layer) costs more than the rank-r matmuls themselves. Merging at the call reads
    and writes one weight-sized tensor instead, and leaves the base untouched (no in-place merge/unmerge, whose
    bf16 round trips would drift it). The product comes from whatever the LoRA parameters hold at the call, so
    another policy's weights put in place (models.stack.weights_in_place) are the ones merged. The same numbers
    with and without gradient: a GRPO rollout's log-probabilities are those its update recomputes. Anything this
    does not cover (dropout, DoRA-like variants, several adapters, adapters disabled) runs peft's own forward."""
    factors = None if args or kwargs else merge_factors(self)
    if factors is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    a, b, s = factors
    if not torch.is_grad_enabled():
        return torch.nn.functional.linear(x, _merged_weight(base.weight, a, b, s), base.bias)
    return _MergedLoraLinear.apply(x, base.weight, base.bias, a, b, s)


def use_merged_lora(module: nn.Module) -> int:
    """Give every peft LoRA Linear of `module` the merged forward (`_merged_forward`); returns how many. Call it
    before compiling: the compiled graphs then hold the merged matmuls."""
    import types

    from peft.tuners.lora import Linear as LoraLinear

    layers = [m for m in module.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        layer.forward = types.MethodType(_merged_forward, layer)
    return len(layers)


def skip_input_casts(module: nn.Module) -> int:
    """Stop peft casting each LoRA layer's input to the fp32 masters' dtype. Under autocast the LoRA matmuls run in
    the autocast dtype anyway, so the cast only costs an fp32 copy of every input (and its round trip back, and the
    same again in the backward); the results are the same bits. Only for modules that always run under autocast."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False  # the attribute peft.helpers.disable_input_dtype_casting sets
    return len(layers)
