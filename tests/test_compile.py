"""torch.compile of the transformer with the style adapter inside: what makes it pay is that a run compiles a
handful of graphs and then never again. These tests trace with dynamo's "eager" backend (the same graphs and
guards as inductor, without generating kernels) and count them."""

from __future__ import annotations

import contextlib

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

from calligrapher_rl.config_parse import parse_args
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


BLOCK_KINDS = (FluxTransformerBlock, FluxSingleTransformerBlock)


def _block_graphs() -> tuple[int, ...]:
    """Graphs dynamo holds for each block kind's code (double, single): what every block of the kind reuses,
    one more for each recompile. Dynamo's cache is per code object and this process's own (not xdist's)."""
    entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list
    return tuple(len(entries(kind.forward.__code__)) for kind in BLOCK_KINDS)


def _training_iterations(stack):
    """A function that runs one RL iteration of batch 4: a rollout, GRPO and NFT updates (with the old and reference
    policies' no-gradient forwards), then new live weights, as an optimizer step gives."""
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

    return iteration


def test_compiled_rollouts_and_updates_trace_once_per_shape_and_grad_mode(compiled_stack):
    from torch._dynamo.utils import counters

    iteration = _training_iterations(compiled_stack)
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


@pytest.mark.parametrize("scope", ["whole", "blocks"])
@pytest.mark.parametrize("merged", ["", "merged"], ids=["peft-forward", "merged"])
def test_a_lora_reference_runs_in_the_live_weights_graph_and_equals_functional_call(tiny_paths, tmp_path, merged,
                                                                                   scope):
    """A LoRA run's reference (every lora_B zero) and old policy reach the transformer's own LoRA layers. Without
    gradient their tensors take the live parameters' places for the call (`weights_in_place`): one compiled graph
    for every policy (by blocks: one per block kind), and the same velocity `functional_call` gives with peft's own
    forward (grad on); the live weights are back afterwards. `merged`: the layers run merged
    (--lora_merged)."""
    from torch._dynamo.utils import counters

    from calligrapher_rl.models.lora import LoraSpec, add_lora
    from calligrapher_rl.models.lora_merged import use_merged_lora
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
            compile_transformer(stack.pipe.transformer, backend="eager", with_grad=False, scope=scope)
            before = _graphs()
            ro_tokens, ro_kv = stack.style_condition(embeds)
            stack.velocity(x, fill, text, 0.5, embeds, 30.0, style_tokens=ro_tokens, style_kv=ro_kv)  # live: the rollout
            traced = _graphs()
            got = stack.velocity(x, fill, text, 0.5, embeds, 30.0, params=reference, style_tokens=tokens, style_kv=kv)
        kinds = 1 if scope == "whole" else len(BLOCK_KINDS)
        assert traced == before + kinds and _graphs() == traced, dict(counters["stats"])
        if scope == "blocks":
            assert _block_graphs() == (1, 1)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # merged: (W + sBA)x against Wx + sB(Ax)
        for n, p in pol.named:
            assert torch.equal(p, live[n]) and isinstance(p, torch.nn.Parameter), n
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------ regional compilation (--compile_scope blocks)
@pytest.fixture(scope="module")
def deep_tiny(tiny_paths, tmp_path_factory):
    """The tiny with three blocks of each kind: under autograd only a third double block gets streams that both
    carry gradient (the first ones run eager), so the gradient graph of the double block is traced too."""
    from calligrapher_rl.models.tiny import build_tiny_pipeline

    flux = str(tmp_path_factory.mktemp("deep-tiny") / "flux-fill")
    with torch.random.fork_rng(devices=[]):
        build_tiny_pipeline(0, transformer={"num_layers": 3, "num_single_layers": 3}).save_pretrained(flux)
    return flux, tiny_paths[1]


def test_block_compile_traces_one_graph_per_block_kind_and_grad_mode(deep_tiny):
    """By blocks, every block of a kind runs its kind's graph: the first rollout step traces one per kind; the rest
    of the rollouts, the old and reference policies' forwards (other weights, their own style keys/values), the
    checkpointed GRPO and NFT updates and changed weights add one per kind for the gradient, then nothing."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    try:
        stack = CalligrapherStack.from_pretrained(*deep_tiny, num_style_tokens=8)
        stack.pipe.transformer.enable_gradient_checkpointing()  # the presets' update: blocks called positionally
        compile_transformer(stack.pipe.transformer, backend="eager", scope="blocks")
        assert stack.pipe.transformer._compiled_call_impl is None  # the code between the blocks stays eager
        iteration = _training_iterations(stack)
        fill, text, embeds = _inputs(stack, 4)
        before = _graphs()
        with torch.no_grad():  # a rollout's first step
            tokens, kv = stack.style_condition(embeds)
            stack.velocity(stack.noise_like(fill, 4), fill, text, 1.0, embeds, 30.0, style_tokens=tokens, style_kv=kv)
        assert _block_graphs() == (1, 1) and _graphs() == before + 2, dict(counters["stats"])
        iteration(0)
        assert _block_graphs() == (2, 2) and _graphs() == before + 4, dict(counters["stats"])
        iteration(1)  # new live, old and rollout weights: the same graphs
        assert _block_graphs() == (2, 2) and _graphs() == before + 4, dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()


def test_block_compiled_velocity_and_gradients_equal_eager(deep_tiny):
    """The same numbers by blocks as eager (and so as whole, which test_compiled_velocity_equals_eager holds to
    eager): the no-gradient velocity from precomputed style keys/values (each block must get its own), the
    gradient velocity and the adapter's gradients."""
    torch._dynamo.reset()
    try:
        results, first = {}, None
        for scope in ("eager", "blocks"):
            stack = CalligrapherStack.from_pretrained(*deep_tiny, num_style_tokens=8)
            if first is None:  # one set of inputs and weights for all three (the VAE samples its latents)
                first = stack
                fill, text, embeds = _inputs(stack, 2, seed=3)
                x = torch.randn(2, fill.seq_len, 64, generator=torch.Generator().manual_seed(4))
            stack.adapter.load_state_dict(first.adapter.state_dict())
            if scope != "eager":
                compile_transformer(stack.pipe.transformer, backend="eager", scope=scope)
            with torch.no_grad():
                tokens, kv = stack.style_condition(embeds)
                sampled = stack.velocity(x, fill, text, 0.7, embeds, 30.0, style_tokens=tokens, style_kv=kv)
            trained = stack.velocity(x, fill, text, 0.7, embeds, 30.0)
            (trained * torch.linspace(-1, 1, trained.shape[-1])).sum().backward()
            results[scope] = (sampled, trained.detach(), {n: p.grad for n, p in stack.adapter.named_parameters()})
        torch.testing.assert_close(results["blocks"][:2], results["eager"][:2])
        torch.testing.assert_close(results["blocks"][2], results["eager"][2])
        assert any(g is not None and g.abs().sum() > 0 for g in results["blocks"][2].values())
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("scope", ["whole", "blocks"])
def test_the_sampling_copy_compiles_in_the_runs_scope_and_only_without_gradient(tiny_paths, scope):
    """`--rollout_fp8` samples with a second transformer (`fp8_copy`: `sampling_copy`, then quantized, which needs
    a GPU). `enable_compile` compiles that copy in the run's scope: by blocks its blocks share their kinds'
    graphs (a whole graph took most of a device call to compile at FLUX size), and a call under autograd
    never traces it."""
    from calligrapher_rl.models.acceleration import sampling_copy
    from calligrapher_rl.models.stack import CalligrapherModel

    torch._dynamo.reset()
    try:
        stack = CalligrapherStack.from_pretrained(*tiny_paths, num_style_tokens=8)
        copy = sampling_copy(stack.pipe.transformer)
        stack.quantized_model = CalligrapherModel(copy, stack.adapter)
        stack.enable_compile(with_grad=False, scope=scope, backend="eager")
        blocks = [*copy.transformer_blocks, *copy.single_transformer_blocks]
        assert (copy._compiled_call_impl is None) == (scope == "blocks")
        assert all((b._compiled_call_impl is not None) == (scope == "blocks") for b in blocks)
        fill, text, embeds = _inputs(stack, 2)
        x = stack.noise_like(fill, 2, generator=torch.Generator().manual_seed(3))
        with torch.enable_grad():  # autograd: the copy runs eager, nothing is traced
            before = _graphs()
            stack.velocity(x, fill, text, 0.5, embeds, 30.0, quantized=True)
            assert _graphs() == before
        with torch.no_grad():
            sampled = stack.velocity(x, fill, text, 0.5, embeds, 30.0, quantized=True)
            assert _graphs() == before + (len(BLOCK_KINDS) if scope == "blocks" else 1)
            if scope == "blocks":
                assert _block_graphs() == (1, 1)
            live = stack.velocity(x, fill, text, 0.5, embeds, 30.0)
        torch.testing.assert_close(sampled, live)  # the same tensors: the copy holds no weights of its own
    finally:
        torch._dynamo.reset()


def test_the_sampling_copys_attention_backends_hold_for_its_no_gradient_calls_only(tiny_paths):
    """`--rollout_fp8_attention cudnn`: the float8 copy (here its unquantized `sampling_copy`: quantizing needs a
    GPU) attends with cuDNN's fused kernel first, and only in its no-gradient calls; the live transformer, which
    also runs the update's backward, keeps torch's order. The samples are the same function either way."""
    from torch.nn.attention import SDPBackend

    from calligrapher_rl.models.acceleration import sampling_attention, sampling_copy
    from calligrapher_rl.models.stack import CalligrapherModel

    stack = CalligrapherStack.from_pretrained(*tiny_paths, num_style_tokens=8)
    copy = sampling_copy(stack.pipe.transformer)
    stack.quantized_model, stack.quantized_attention = CalligrapherModel(copy, stack.adapter), "cudnn"
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, _: seen.append((mod is copy, torch._C._get_sdp_priority_order()[0])))
             for m in (copy, stack.pipe.transformer)]
    default_first = torch._C._get_sdp_priority_order()[0]
    cudnn = int(SDPBackend.CUDNN_ATTENTION)
    assert default_first != cudnn
    fill, text, embeds = _inputs(stack, 2)
    x = stack.noise_like(fill, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sampled = stack.velocity(x, fill, text, 0.5, embeds, 30.0, quantized=True)
        live = stack.velocity(x, fill, text, 0.5, embeds, 30.0)
    with torch.enable_grad():
        stack.velocity(x, fill, text, 0.5, embeds, 30.0, quantized=True)
    for h in hooks:
        h.remove()
    assert seen == [(True, cudnn), (False, default_first), (True, default_first)]
    assert torch._C._get_sdp_priority_order()[0] == default_first  # restored after each call
    torch.testing.assert_close(sampled, live)
    with pytest.raises(ValueError, match="sampling attention"):
        sampling_attention("flash3")


def test_the_float8_config_leaves_the_process_inductor_settings_alone():
    """torchao's float8 config switches on inductor's coordinate-descent tuning for the whole process unless told
    not to: every later graph of the run (the bf16 ones too) would then be tuned kernel by kernel at compile time.
    Quantizing needs a GPU; the config and what it would apply are checked here."""
    pytest.importorskip("torchao")
    from torchao.quantization import PerRow, PerTensor

    from calligrapher_rl.models.acceleration import fp8_config

    for scales, granularity in (("row", PerRow), ("tensor", PerTensor)):
        config = fp8_config(scales)
        assert config.set_inductor_config is False
        assert all(isinstance(g, granularity) for g in config.granularity)
    with pytest.raises(ValueError, match="fp8 scales"):
        fp8_config("block")


def test_a_copy_with_fused_qkv_samples_the_same_and_holds_only_the_fused_weights():
    """`fuse_qkv` (the float8 copy's `+qkv` variant in bench/gpu_bench.py): each attention of the sampling copy
    computes q/k/v in one matmul through the shared style processors, with the same velocity as the live
    transformer; its separate projections remain the live transformer's tensors, and the float8 filter skips
    them (they are never called)."""
    from calligrapher_rl.models.acceleration import _fp8_eligible_fused, fuse_qkv, sampling_copy
    from calligrapher_rl.models.hub import resolve_model
    from calligrapher_rl.models.stack import CalligrapherModel

    stack = CalligrapherStack.from_pretrained(resolve_model("tiny", "flux").path, resolve_model("tiny", "siglip").path,
                                              num_style_tokens=8)
    live = stack.pipe.transformer
    copy = sampling_copy(live)
    n_blocks = len(copy.transformer_blocks) + len(copy.single_transformer_blocks)
    assert fuse_qkv(copy) == n_blocks
    attn, live_attn = copy.transformer_blocks[0].attn, live.transformer_blocks[0].attn
    assert attn.fused_projections and not getattr(live_attn, "fused_projections", False)
    torch.testing.assert_close(attn.to_qkv.weight, torch.cat([live_attn.to_q.weight, live_attn.to_k.weight,
                                                              live_attn.to_v.weight]))
    assert attn.to_q.weight.data_ptr() == live_attn.to_q.weight.data_ptr()  # shared, not copied
    names = {n for n, m in copy.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "transformer_blocks.0.attn.to_added_qkv" in names
    big = torch.nn.Linear(256, 256)  # the tiny's own layers are below the float8 size floor
    assert _fp8_eligible_fused(big, "transformer_blocks.0.attn.to_qkv")
    assert not _fp8_eligible_fused(big, "transformer_blocks.0.attn.to_q")
    assert not _fp8_eligible_fused(big, "transformer_blocks.0.attn.add_v_proj")
    assert _fp8_eligible_fused(big, "transformer_blocks.0.attn.to_out.0")
    stack.quantized_model = CalligrapherModel(copy, stack.adapter)
    calls = {"fused": 0, "separate": 0}
    for block in [*copy.transformer_blocks, *copy.single_transformer_blocks]:
        block.attn.to_qkv.register_forward_hook(lambda *_: calls.__setitem__("fused", calls["fused"] + 1))
        block.attn.to_q.register_forward_hook(lambda *_: calls.__setitem__("separate", calls["separate"] + 1))
    fill, text, embeds = _inputs(stack, 2)
    x = stack.noise_like(fill, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sampled = stack.velocity(x, fill, text, 0.5, embeds, 30.0, quantized=True)
        reference = stack.velocity(x, fill, text, 0.5, embeds, 30.0)
    assert calls == {"fused": n_blocks, "separate": 0}  # the processors took the fused path
    torch.testing.assert_close(sampled, reference)
