"""torch.compile of the transformer with the style adapter inside: what makes it pay is that a run compiles a
handful of graphs and then never again. These tests trace with dynamo's "eager" backend (the same graphs and
guards as inductor, without generating kernels) and count them."""

from __future__ import annotations

import contextlib

import pytest
import torch

from calligrapher_rl.config import parse_args
from calligrapher_rl.models.acceleration import compile_transformer
from calligrapher_rl.models.stack import CalligrapherStack
from calligrapher_rl.sampling import rollout
from calligrapher_rl.training.batches import Batch
from calligrapher_rl.training.policies import Policies
from calligrapher_rl.training.updates import grpo_backward, nft_backward


@pytest.fixture()
def compiled_stack(tiny_paths):
    torch._dynamo.reset()
    stack = CalligrapherStack.from_pretrained(*tiny_paths, num_style_tokens=8)
    compile_transformer(stack.pipe.transformer, backend="eager")
    yield stack
    torch._dynamo.reset()


def _inputs(stack, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.rand(b, 3, 64, 64, generator=g) * 2 - 1
    mask = torch.zeros(b, 1, 64, 64)
    mask[:, :, 16:40, 8:56] = 1
    fill = stack.prepare_fill(src, mask)
    text = stack.encode_prompts([f"The text is '{i}'." for i in range(b)])
    embeds = torch.randn(b, stack.siglip.config.hidden_size, generator=g)
    return fill, text, embeds


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled_rollouts_and_updates_trace_once_per_shape_and_grad_mode(compiled_stack):
    from torch._dynamo.utils import counters

    stack = compiled_stack
    fill, text, embeds = _inputs(stack, 4)
    pol = Policies(stack.adapter, "attn", use_ema=False, ema_decay=0.9, ema_update_interval=1)
    pol.begin_rl(with_old=True)
    batch = Batch(list(range(4)), [{} for _ in range(4)], fill, text, embeds)
    common = dict(policies=pol, guidance=30.0, scale=1.0, kl_beta=0.01, adv_clip_max=5.0,
                  autocast=contextlib.nullcontext)

    def iteration(seed):
        with torch.no_grad():
            ro = rollout(stack, fill, text, embeds, num_steps=4, guidance=30.0, noise_level=0.7,
                         generator=torch.Generator().manual_seed(seed))
        adv = torch.randn(4, generator=torch.Generator().manual_seed(seed))
        grpo_backward(stack, batch, ro, adv, ro.sde_steps, noise_level=0.7, sde_type="sde", clip_range=0.2,
                      loss_scale=1.0, **common)
        nft_backward(stack, batch, ro, adv, 2, beta=0.1, adv_mode="normal",
                     generator=torch.Generator().manual_seed(seed), loss_scale=1.0, **common)
        with torch.no_grad():  # the old policy after an update is a different set of weights: no new graph
            for p in stack.adapter.parameters():
                p.add_(0.01 * torch.randn_like(p))
        stack.adapter.zero_grad(set_to_none=True)

    before = _graphs()  # the counters are the process's: other tests may have traced before this one
    iteration(0)
    # rollout and old/reference forwards (no grad, precomputed style K/V), training forward (grad)
    first = _graphs()
    assert 1 <= first - before <= 2, dict(counters["stats"])
    for seed in (1, 2):  # more rollouts, steps, updates and changed weights: nothing new to trace
        iteration(seed)
    assert _graphs() == first, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_velocity_equals_eager(compiled_stack, tiny_paths):
    eager = CalligrapherStack.from_pretrained(*tiny_paths, num_style_tokens=8)
    eager.adapter.load_state_dict(compiled_stack.adapter.state_dict())
    fill, text, embeds = _inputs(compiled_stack, 2, seed=3)
    x = torch.randn(2, fill.seq_len, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        tokens, style_kv = compiled_stack.style_condition(embeds)
        a = compiled_stack.velocity(x, fill, text, 0.7, embeds, 30.0, style_tokens=tokens, style_kv=style_kv)
        b = eager.velocity(x, fill, text, 0.7, embeds, 30.0)
    torch.testing.assert_close(a, b)
    assert compiled_stack.pipe.transformer._compiled_call_impl is not None
    assert eager.pipe.transformer._compiled_call_impl is None


def test_nft_old_and_reference_forwards_reuse_the_rollout_graph(tiny_paths):
    """The presets compile the no-gradient calls only. NFT's old- and reference-policy predictions are such calls
    with other adapter weights: given each policy's style keys/values, as a rollout is, they run in the rollout's
    graph. Computing the keys/values inside the compiled model from another policy's weights instead traced a
    second and a third graph of the whole transformer (minutes each at FLUX size, in the first update)."""
    from torch._dynamo.utils import counters

    from calligrapher_rl.training.updates import nft_targets

    torch._dynamo.reset()
    try:
        stack = CalligrapherStack.from_pretrained(*tiny_paths, num_style_tokens=8)
        compile_transformer(stack.pipe.transformer, backend="eager", with_grad=False)
        fill, text, embeds = _inputs(stack, 4)
        pol = Policies(stack.adapter, "all", use_ema=False, ema_decay=0.9, ema_update_interval=1)
        pol.begin_rl(with_old=True)
        with torch.no_grad():
            for p in stack.adapter.parameters():  # the live weights move on: old and reference differ from them
                p.add_(0.01 * torch.randn_like(p))
        batch = Batch(list(range(4)), [{} for _ in range(4)], fill, text, embeds)
        before = _graphs()  # the counters are the process's: other tests traced before this one
        with torch.no_grad():
            ro = rollout(stack, fill, text, embeds, num_steps=4, guidance=30.0, generator=torch.Generator().manual_seed(0))
        rollout_graphs = _graphs()
        assert rollout_graphs == before + 1, dict(counters["stats"])
        targets = nft_targets(stack, batch, ro, 2, policies=pol, guidance=30.0, scale=1.0, kl_beta=0.01,
                              generator=torch.Generator().manual_seed(1), autocast=contextlib.nullcontext)
        assert _graphs() == rollout_graphs, dict(counters["stats"])
        # and they are the old and reference policies' predictions, not the live weights'
        live = stack.velocity(targets[0].x_t, fill, text, targets[0].t, embeds, 30.0)
        assert not torch.allclose(targets[0].v_old.float(), live)
        with torch.no_grad():
            for p, name in zip(pol.params, pol.names):
                p.copy_(pol.old[name])
        torch.testing.assert_close(targets[0].v_old.float(),
                                   stack.velocity(targets[0].x_t, fill, text, targets[0].t, embeds, 30.0))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("merged", [False, True], ids=["peft-forward", "merged"])
def test_a_lora_reference_runs_in_the_live_weights_graph_and_equals_functional_call(tiny_paths, tmp_path, merged):
    """A LoRA run's reference (every lora_B zero) and old policy reach the transformer's own LoRA layers. Without
    gradient their tensors take the live parameters' places for the call (`weights_in_place`): one compiled graph
    for every policy, and the same velocity `functional_call` gives with peft's own forward (grad on); the live
    weights are back afterwards. `merged`: the layers run merged without gradient (--lora_merged)."""
    from torch._dynamo.utils import counters

    from calligrapher_rl.models.lora import LoraSpec, add_lora, use_merged_lora
    from calligrapher_rl.training.lora_policies import LoraPolicies

    torch._dynamo.reset()
    try:
        stack = CalligrapherStack.from_pretrained(*tiny_paths, num_style_tokens=8)
        add_lora(stack.pipe.transformer, stack.adapter, LoraSpec("both", rank=4, alpha=8.0))
        if merged:
            assert use_merged_lora(stack.pipe.transformer) > 0
        cfg = parse_args(["--preset", "tiny-grpo-lora", "--pretrained_model_name_or_path", "tiny", "--siglip_path", "tiny",
                          "--lora_rank", "4", "--lora_alpha", "8", "--output_dir", str(tmp_path)])
        pol = LoraPolicies(stack, cfg, use_ema=False, ema_decay=0.9, ema_update_interval=1)
        with torch.no_grad():
            for p in pol.params:  # a trained LoRA: the base model (the reference) differs from it
                p.add_(0.05 * torch.randn_like(p))
        live = {n: p.detach().clone() for n, p in pol.named}
        reference = pol.base_reference()
        fill, text, embeds = _inputs(stack, 2)
        x = torch.randn(2, fill.seq_len, 64, generator=torch.Generator().manual_seed(2))
        with torch.enable_grad():  # functional_call with gradient: the expected velocity of each forward
            expected = torch.func.functional_call(
                stack.model, {k if k.startswith("transformer.") else f"adapter.{k}": v for k, v in reference.items()},
                (x, fill, text, 0.5, embeds, 30.0), strict=False).float().detach()
        with torch.no_grad():
            tokens, kv = stack.style_condition(embeds, reference)
            compile_transformer(stack.pipe.transformer, backend="eager", with_grad=False)
            before = _graphs()
            ro_tokens, ro_kv = stack.style_condition(embeds)
            stack.velocity(x, fill, text, 0.5, embeds, 30.0, style_tokens=ro_tokens, style_kv=ro_kv)  # live: the rollout
            traced = _graphs()
            got = stack.velocity(x, fill, text, 0.5, embeds, 30.0, params=reference, style_tokens=tokens, style_kv=kv)
        assert traced == before + 1 and _graphs() == traced, dict(counters["stats"])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # merged: (W + sBA)x against Wx + sB(Ax)
        for n, p in pol.named:
            assert torch.equal(p, live[n]) and isinstance(p, torch.nn.Parameter), n
    finally:
        torch._dynamo.reset()
