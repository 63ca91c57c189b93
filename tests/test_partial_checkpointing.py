"""--gradient_checkpointing_skip_blocks: the last N transformer blocks keep their activations instead of being
recomputed in the backward. The gradients are the same bits; only the recompute of those blocks is gone."""

from __future__ import annotations

import pytest
import torch
from test_lora import RANDOM_TINY
from test_lora import _inputs as lora_inputs

from calligrapher_rl.config_parse import build_parser, parse_args
from calligrapher_rl.config_validate import ConfigError
from calligrapher_rl.models.acceleration import compile_transformer, enable_gradient_checkpointing
from calligrapher_rl.training import setup


def _cfg(tiny_paths, tmp_path, *extra):
    """The tiny LoRA preset (LoRA on transformer and adapter, merged layers) on the random tiny, not compiled."""
    return parse_args(["--preset", "tiny-grpo-lora", *RANDOM_TINY, "--pretrained_model_name_or_path", tiny_paths[0],
                       "--siglip_path", tiny_paths[1], "--compile", "false", "--output_dir", str(tmp_path / "run"),
                       *extra])


def _stack(tiny_paths, tmp_path, *extra):
    """A stack built as the trainer builds it, its LoRA moved off zero (every LoRA tensor then gets a gradient)."""
    stack = setup.build_stack(_cfg(tiny_paths, tmp_path, *extra), torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in sorted(stack.model.named_parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return stack


def _inputs(stack):
    fill, text, embeds = lora_inputs(stack)  # 2 images of 32 px
    return torch.randn(2, fill.seq_len, 64, generator=torch.Generator().manual_seed(4)), fill, text, embeds


def _blocks(stack):
    t = stack.pipe.transformer
    return [*t.transformer_blocks, *t.single_transformer_blocks]


def _forward_backward(stack, inputs, count=True):
    """One training forward and backward: (the trained parameters' gradients, each block's forward calls).
    `count=False` leaves the blocks without hooks (a compiled update would trace the hook's mutation)."""
    calls = [0] * len(_blocks(stack))
    # a pre-hook: a recompute may stop early, once it has rebuilt what the backward needs (checkpoint's early stop)
    hooks = [b.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(_blocks(stack))] if count else []
    try:
        x, fill, text, embeds = inputs
        v = stack.velocity(x, fill, text, 0.7, embeds, 30.0)
        (v * torch.linspace(-1, 1, v.shape[-1])).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    grads = {n: p.grad.clone() for n, p in stack.model.named_parameters() if p.requires_grad}
    return grads, calls


def test_skipped_blocks_keep_the_gradients_bit_identical_and_are_not_recomputed(tiny_paths, tmp_path):
    """Through the trainer's set-up: no checkpointing, every block checkpointed, the last 1, 2 (the single blocks),
    all 4 and more than there are left out. Each checkpointed block runs its forward twice (once more in the
    backward), a skipped one once; the gradients of every trained tensor are the same bits in all six."""
    base, inputs = None, None
    for ckpt, skip in (("false", 0), ("true", 0), ("true", 1), ("true", 2), ("true", 4), ("true", 99)):
        stack = _stack(tiny_paths, tmp_path, "--gradient_checkpointing", ckpt, "--gradient_checkpointing_skip_blocks",
                       str(skip))
        inputs = inputs or _inputs(stack)
        n = len(_blocks(stack))
        assert n == 4  # the tiny: 2 double, then 2 single blocks
        func = stack.pipe.transformer._gradient_checkpointing_func
        if ckpt == "true" and skip > 0:  # ours, holding the last blocks in forward order
            assert func.skipped_ids == {id(b) for b in _blocks(stack)[n - min(skip, n):]}
        else:  # diffusers' default (or none): 0 is today's checkpointing, unchanged
            assert getattr(func, "skipped_ids", None) is None
        grads, calls = _forward_backward(stack, inputs)
        kept = n if ckpt == "false" else min(skip, n)
        assert calls == [2] * (n - kept) + [1] * kept, (ckpt, skip)
        if base is None:
            base = grads
            transformer = [k for k in grads if k.startswith("transformer.")]
            assert transformer and len(transformer) < len(grads)  # the transformer's LoRA and the adapter's
            assert all(g.abs().sum() > 0 for g in grads.values())
        assert grads.keys() == base.keys()
        for name, g in grads.items():
            assert torch.equal(g, base[name]), (ckpt, skip, name)


@pytest.mark.parametrize(("scope", "with_grad"), [("blocks", False), ("blocks", True), ("whole", True)],
                         ids=["blocks-eager-update", "blocks-compiled-update", "whole-compiled-update"])
def test_skipping_under_compilation_gives_the_eager_gradients(tiny_paths, tmp_path, scope, with_grad):
    """The presets compile by blocks (`compile_scope = "blocks"`, `compile_update = false`): a compiled block is the
    same module (its `_compiled_call_impl` is set), so it is still recognised. With the update compiled too (by
    blocks, or the whole transformer, where dynamo traces the checkpointing function: one checkpoint in the graph
    per checkpointed block) the gradients are the eager, fully checkpointed ones, with no graph break."""
    from torch._dynamo.utils import counters

    expected, _ = _forward_backward(base := _stack(tiny_paths, tmp_path, "--gradient_checkpointing", "true"),
                                    inputs := _inputs(base))
    checkpoints = []  # per graph traced: its activation-checkpoint calls

    def backend(gm, example_inputs):  # dynamo's "eager" backend, counting
        checkpoints.append(sum(n.op == "call_function" and "checkpoint" in str(n.target) for n in gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    try:
        stack = _stack(tiny_paths, tmp_path, "--gradient_checkpointing", "true", "--gradient_checkpointing_skip_blocks",
                       "1")
        compile_transformer(stack.pipe.transformer, backend=backend, with_grad=with_grad, scope=scope)
        grads, calls = _forward_backward(stack, inputs, count=not with_grad)
        if not with_grad:  # the presets' path: eager blocks under autograd, the hooks count their calls
            assert calls == [2, 2, 2, 1] and not checkpoints
        elif scope == "whole":  # one graph: the 3 blocks of 4 that are checkpointed
            assert checkpoints == [3]
        else:  # the block graphs hold no checkpoint: it is called around them, eager
            assert checkpoints and not any(checkpoints)
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert grads.keys() == expected.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, expected[name], rtol=1e-6, atol=1e-7, msg=name)
    finally:
        torch._dynamo.reset()


def test_a_trainer_with_skipped_blocks_runs_a_step(tmp_path, tiny_paths):
    from calligrapher_rl.training.trainer import Trainer

    tr = Trainer(_cfg(tiny_paths, tmp_path, "--gradient_checkpointing", "true", "--gradient_checkpointing_skip_blocks",
                      "1", "--max_train_steps", "1", "--checkpointing_steps", "100"))
    transformer = tr.stack.pipe.transformer
    assert transformer._gradient_checkpointing_func.skipped_ids == {id(transformer.single_transformer_blocks[-1])}
    assert transformer.is_gradient_checkpointing
    assert tr.run() == "finished"


def test_the_models_function_refuses_a_negative_count(tiny_stack):
    with pytest.raises(ValueError, match="skip_blocks"):
        enable_gradient_checkpointing(tiny_stack.pipe.transformer, -1)


def test_the_flag_is_checked_listed_and_named_in_out_of_memory_advice(tiny_paths, tmp_path, capsys):
    assert _cfg(tiny_paths, tmp_path).gradient_checkpointing_skip_blocks == 0  # every block checkpointed
    with pytest.raises(ConfigError) as err:
        _cfg(tiny_paths, tmp_path, "--gradient_checkpointing", "true", "--gradient_checkpointing_skip_blocks", "-1")
    assert err.value.flag == "gradient_checkpointing_skip_blocks" and "\n" not in str(err.value)
    assert "must be >= 0" in str(err.value)
    with pytest.raises(ConfigError) as err:  # nothing is checkpointed to skip
        _cfg(tiny_paths, tmp_path, "--gradient_checkpointing", "false", "--gradient_checkpointing_skip_blocks", "2")
    assert err.value.flag == "gradient_checkpointing_skip_blocks" and "--gradient_checkpointing" in str(err.value)

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--gradient_checkpointing_skip_blocks" in out and "single-stream" in out

    from calligrapher_rl.training.memory import out_of_memory

    on = _cfg(tiny_paths, tmp_path, "--gradient_checkpointing", "true", "--gradient_checkpointing_skip_blocks", "3")
    assert "--gradient_checkpointing_skip_blocks 0" in str(out_of_memory(on, "update", "cpu"))
    off = _cfg(tiny_paths, tmp_path, "--gradient_checkpointing", "true")
    assert "skip_blocks" not in str(out_of_memory(off, "update", "cpu"))
