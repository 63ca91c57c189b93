"""--trainable lora (peft): what trains, the free reference, exact resume, diffusers/peft files, export."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from calligrapher_rl.config_parse import parse_args
from calligrapher_rl.errors import UserError
from calligrapher_rl.models.lora import LoraSpec, add_lora
from calligrapher_rl.models.stack import CalligrapherStack
from calligrapher_rl.sampling import rollout
from calligrapher_rl.training.lora_policies import LoraPolicies
from calligrapher_rl.training.optim import FlatOptimizer
from calligrapher_rl.training.run_dir import read_metrics
from calligrapher_rl.training.trainer import Trainer, train

RANDOM_TINY = ["--pretrained_model_name_or_path", "tiny", "--siglip_path", "tiny", "--train_data_json", "bundled",
               "--rewards", "fidelity:1.0", "--rl_num_images_per_prompt", "4", "--train_batch_size", "4",
               "--resolution", "32", "--rl_num_inference_steps", "4", "--rl_eval_num_inference_steps", "4",
               "--num_style_tokens", "8", "--eval_steps", "0", "--eval_at_start", "false", "--report_to", "none",
               "--rl_warmup_steps", "0", "--learning_rate", "1e-2", "--ema_decay", "0.9"]


def _lora_stack(tiny_paths, target="both"):
    stack = CalligrapherStack.from_pretrained(*tiny_paths, num_style_tokens=8)
    add_lora(stack.pipe.transformer, stack.adapter, LoraSpec(target, rank=4, alpha=8.0))
    return stack


def _inputs(stack, b=2):
    g = torch.Generator().manual_seed(0)
    src = torch.rand(b, 3, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros(b, 1, 32, 32)
    mask[:, :, 8:24, 4:28] = 1
    fill = stack.prepare_fill(src, mask, generator=torch.Generator().manual_seed(1))  # the VAE samples its latents
    text = stack.encode_prompts([f"The text is '{i}'." for i in range(b)])
    return fill, text, torch.randn(b, stack.siglip.config.hidden_size, generator=g)


def _cfg(tmp_path, *extra):
    return parse_args(["--preset", "tiny-grpo-lora", *RANDOM_TINY, "--output_dir", str(tmp_path / "cfg"), *extra])


def test_only_lora_trains_and_the_reference_is_the_base_model_at_no_cost(tiny_paths, tiny_stack, tmp_path):
    stack = _lora_stack(tiny_paths)
    pol = LoraPolicies(stack, _cfg(tmp_path), use_ema=True, ema_decay=0.9, ema_update_interval=1)
    trainable = [n for n, p in stack.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(pol.params) == len(trainable) and len(pol.ema.shadow) == len(trainable)  # EMA over LoRA only
    pol.begin_rl(with_old=True)
    assert pol.reference_is_base
    lora_bytes = sum(p.numel() * p.element_size() for p in pol.params)
    ref = pol.reference
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ref.values()}
    largest_b = max(p.numel() * p.element_size() for n, p in pol.named if ".lora_B." in n)
    assert all(".lora_B." in n for n in ref) and len(held) == 1  # views of one zero buffer ...
    assert sum(held.values()) == largest_b < 0.25 * lora_bytes  # ... the size of the largest lora_B
    assert all(not t.any() for t in ref.values())
    old_bytes = sum(t.numel() * t.element_size() for t in pol.old.values())
    assert old_bytes == lora_bytes  # NFT's old policy: a LoRA-sized snapshot

    with torch.no_grad():  # training moves the LoRA; the reference stays the base model
        for p in pol.params:
            p.add_(0.05 * torch.randn_like(p))
    fill, text, embeds = _inputs(stack)
    x = torch.randn(2, fill.seq_len, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v_ref = stack.velocity(x, fill, text, 0.5, embeds, 30.0, params=ref)
        v_live = stack.velocity(x, fill, text, 0.5, embeds, 30.0)
        v_base = tiny_stack.velocity(x, fill, text, 0.5, embeds, 30.0)
    torch.testing.assert_close(v_ref, v_base, rtol=1e-5, atol=1e-5)
    assert (v_live - v_base).abs().max() > 1e-3


def test_lora_flags_are_one_line_errors(tmp_path, tiny_paths):
    base = ["--preset", "tiny-grpo", "--output_dir", str(tmp_path)]
    for extra, flag in ((["--lora_modules", "attn.to_q"], "--lora_modules"),
                        (["--trainable", "lora", "--lora_rank", "0"], "--lora_rank"),
                        (["--trainable", "lora", "--lora_dropout", "1"], "--lora_dropout"),
                        (["--trainable", "lora", "--rollout_fp8", "true"], "--rollout_fp8"),
                        (["--lora_merged", "true"], "--lora_merged"),  # without LoRA
                        (["--trainable", "lora", "--lora_merged", "true", "--lora_dropout", "0.1"], "--lora_merged")):
        with pytest.raises(UserError) as exc:
            parse_args([*base, *extra])
        assert flag in str(exc.value) and "\n" not in str(exc.value)
    stack = CalligrapherStack.from_pretrained(*tiny_paths, num_style_tokens=8)
    with pytest.raises(UserError, match="--lora_modules.*'to_nothing'"):
        add_lora(stack.pipe.transformer, stack.adapter, LoraSpec("both", modules=("attn.to_q", "to_nothing")))
    with pytest.raises(UserError, match="no module of the adapter"):
        add_lora(stack.pipe.transformer, stack.adapter, LoraSpec("both", modules=("attn.to_q",)))


def _trained(stack):
    with torch.no_grad():
        for name, p in stack.pipe.transformer.named_parameters():
            if "lora_" in name:  # a trained LoRA (lora_B starts at zero)
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return stack


def _lora_grads(stack, x, fill, text, embeds):
    for p in stack.pipe.transformer.parameters():
        p.grad = None
    v = stack.velocity(x, fill, text, 0.5, embeds, 30.0)
    v.float().square().mean().backward()
    return v.detach(), {n: p.grad.clone() for n, p in stack.pipe.transformer.named_parameters() if "lora_" in n}


def test_merged_lora_is_one_matmul_with_peft_velocity_and_gradients(tiny_paths, tmp_path):
    """--lora_merged: each transformer LoRA layer is F.linear(x, W + s B A) with and without gradient (so a GRPO
    rollout's numbers are its update's), the velocity and the LoRA's gradients are peft's within fp32 rounding,
    and the backward is exact (gradcheck in float64). Off for a bare --trainable lora, on in the LoRA presets."""
    from peft.tuners.lora import Linear as LoraLinear

    from calligrapher_rl.models.lora_merged import _merged_forward, _merged_weight, _MergedLoraLinear, use_merged_lora

    assert parse_args(["--preset", "tiny-nft", "--trainable", "lora", "--output_dir",
                       str(tmp_path / "n")]).lora_merged is False
    for preset in ("tiny-nft-lora", "tiny-grpo-lora", "flux-nft-lora", "flux-grpo-lora"):
        assert parse_args(["--preset", preset, "--output_dir", str(tmp_path / "m")]).lora_merged is True, preset
    stack = _trained(_lora_stack(tiny_paths))
    fill, text, embeds = _inputs(stack)
    x = torch.randn(2, fill.seq_len, 64, generator=torch.Generator().manual_seed(3))
    peft_v, peft_grads = _lora_grads(stack, x, fill, text, embeds)
    layers = [m for m in stack.pipe.transformer.modules() if isinstance(m, LoraLinear)]
    assert use_merged_lora(stack.pipe.transformer) == len(layers) > 0
    assert all(m.forward.__func__ is _merged_forward for m in layers)
    layer = layers[0]
    inp = torch.randn(5, layer.in_features)
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    with torch.no_grad():
        one_matmul = torch.nn.functional.linear(inp, layer.base_layer.weight + s * b @ a, layer.base_layer.bias)
        torch.testing.assert_close(layer(inp), one_matmul, rtol=1e-6, atol=1e-6)
        merged_v = stack.velocity(x, fill, text, 0.5, embeds, 30.0)
    torch.testing.assert_close(merged_v, peft_v, rtol=1e-5, atol=1e-5)
    assert not torch.equal(merged_v, peft_v)  # the merged matmuls ran: not bit-identical to peft's two passes
    v, grads = _lora_grads(stack, x, fill, text, embeds)
    assert torch.equal(v, merged_v)  # with gradient: the same numbers as without
    assert grads.keys() == peft_grads.keys() and len(grads) == 2 * len(layers)
    for n, g in grads.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(g, peft_grads[n], rtol=1e-4, atol=1e-6)
    # the backward itself, against finite differences (x, A and B; W and the bias are frozen)
    g64 = torch.Generator().manual_seed(5)
    args = [torch.randn(2, 3, 6, generator=g64, dtype=torch.float64, requires_grad=True),
            torch.randn(4, 6, generator=g64, dtype=torch.float64), torch.randn(4, generator=g64, dtype=torch.float64),
            torch.randn(2, 6, generator=g64, dtype=torch.float64, requires_grad=True),
            torch.randn(4, 2, generator=g64, dtype=torch.float64, requires_grad=True), 1.5]
    assert torch.autograd.gradcheck(_MergedLoraLinear.apply, args)
    torch.testing.assert_close(_merged_weight(args[1], args[3], args[4], 1.5), args[1] + 1.5 * args[4] @ args[3])


def test_lora_inputs_are_not_copied_to_fp32_under_autocast(tiny_paths):
    """Under autocast the LoRA matmuls run in bf16 whatever dtype their input has, so peft's cast of each input to
    the fp32 masters' dtype is a copy that changes nothing: without it, the same bits forward and backward."""
    from calligrapher_rl.models.lora_merged import skip_input_casts

    stack = CalligrapherStack.from_pretrained(*tiny_paths, num_style_tokens=8, dtype=torch.bfloat16)
    add_lora(stack.pipe.transformer, stack.adapter, LoraSpec("both", rank=4, alpha=8.0))
    _trained(stack)
    fill, text, embeds = _inputs(stack)
    x = torch.randn(2, fill.seq_len, 64, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v_cast, g_cast = _lora_grads(stack, x, fill, text, embeds)
        assert skip_input_casts(stack.pipe.transformer) > 0 and skip_input_casts(stack.adapter) > 0
        v, g = _lora_grads(stack, x, fill, text, embeds)
    assert stack.pipe.transformer.x_embedder.weight.dtype == torch.bfloat16 and torch.equal(v, v_cast)
    assert all(torch.equal(g[n], g_cast[n]) for n in g_cast)


@pytest.mark.parametrize("merged", ["false", "true"], ids=["peft-forward", "merged"])
def test_grpo_lora_first_ratio_is_exactly_one(tmp_path, merged):
    tr = Trainer(parse_args(["--preset", "tiny-grpo-lora", *RANDOM_TINY, "--max_train_steps", "1", "--lora_merged",
                             merged, "--checkpointing_steps", "100", "--output_dir", str(tmp_path / "g")]))
    assert isinstance(tr.optimizer, FlatOptimizer) and tr.optimizer.params == tr.policies.params
    assert tr.run() == "finished"
    first = [r for r in read_metrics(str(tmp_path / "g")) if r.get("phase") == "rl"][0]
    assert first["ratio/mean"] == 1.0 and first["clipfrac"] == 0


@pytest.fixture(scope="module")
def nft_lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    args = ["--preset", "tiny-nft-lora", *RANDOM_TINY, "--max_train_steps", "4", "--checkpointing_steps", "2",
            "--output_dir", str(out)]
    assert train(parse_args(args)) == "finished"
    return out, args


def test_lora_checkpoint_files_load_with_diffusers_and_peft(nft_lora_run, tiny_paths):
    from diffusers import FluxFillPipeline
    from peft import LoraConfig

    ck = nft_lora_run[0] / "checkpoint-4"
    assert {"lora.json", "pytorch_lora_weights.safetensors", "adapter_lora", "ema", "trainer_state"} <= set(os.listdir(ck))
    assert not (ck / "ip-adapter.bin").exists()  # the release .bin comes from export
    policies = load_file(ck / "trainer_state" / "policies.safetensors")
    assert not any(k.startswith("ref.") for k in policies)  # the reference is the base model: nothing to keep
    assert {k.split(".")[0] for k in policies} == {"old"}
    pipe = FluxFillPipeline.from_pretrained(tiny_paths[0])
    pipe.load_lora_weights(str(ck))
    loaded = {n: p for n, p in pipe.transformer.named_parameters() if "lora_" in n}
    saved = load_file(ck / "pytorch_lora_weights.safetensors")
    assert len(loaded) == len(saved) > 0
    cfg = LoraConfig.from_pretrained(str(ck / "adapter_lora"))
    assert cfg.r == 8 and cfg.lora_alpha == 16 and "to_k_ip" in cfg.target_modules
    assert pipe.transformer.peft_config[next(iter(pipe.transformer.peft_config))].lora_alpha == 16  # alpha kept
    state = json.loads((ck / "trainer_state" / "state.json").read_text())
    assert state["lora_reference"] == "base" and state["config"]["trainable"] == "lora"

    from app.run_files import checkpoint_files  # the studio's Inference/Compare choices: the folder and its ema/

    assert checkpoint_files(str(nft_lora_run[0]))[:2] == [("checkpoint-4 · EMA LoRA", str(ck / "ema")),
                                                          ("checkpoint-4 · raw LoRA", str(ck))]


def test_lora_run_resumes_exactly(nft_lora_run, tmp_path):
    """4 steps straight vs 2 steps, then a resume for 2 more: the same LoRA, EMA, old policy and metrics."""
    out, args = nft_lora_run
    resumed = tmp_path / "resumed"
    ck2 = out / "checkpoint-2"
    import shutil

    resumed.mkdir()
    shutil.copytree(ck2, resumed / "checkpoint-2")
    shutil.copy(out / "run.json", resumed / "run.json")
    rest = [*args[:-1], str(resumed), "--resume_from_checkpoint", "latest"]
    assert train(parse_args(rest)) == "finished"
    for rel in ("pytorch_lora_weights.safetensors", "adapter_lora/adapter_model.safetensors",
                "ema/pytorch_lora_weights.safetensors", "ema/adapter_lora/adapter_model.safetensors",
                "trainer_state/policies.safetensors"):
        a, b = load_file(out / "checkpoint-4" / rel), load_file(resumed / "checkpoint-4" / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    rows = lambda d: [{k: v for k, v in r.items() if not k.startswith(("time", "perf/", "sys/"))} for r in read_metrics(str(d))]  # noqa: E731
    assert rows(resumed)[-2:] == rows(out)[-2:]
    # the LoRA optimizer is the flat one (optim.FlatOptimizer): its checkpointed state is one tensor's
    opt = torch.load(resumed / "checkpoint-4" / "trainer_state" / "optimizer.pt", weights_only=True)
    assert [len(g["params"]) for g in opt["param_groups"]] == [1] and len(opt["state"]) == 1


def test_a_lora_runs_ema_in_bf16_with_checkpoint_averages_dtype(tmp_path, tiny_paths):
    """--checkpoint_averages_dtype bf16 writes the EMA LoRA's files in bf16 (the live LoRA stays fp32), and
    diffusers loads them."""
    from diffusers import FluxFillPipeline

    out = tmp_path / "run"
    assert train(parse_args(["--preset", "tiny-nft-lora", *RANDOM_TINY, "--max_train_steps", "1", "--output_dir",
                             str(out), "--checkpoint_averages_dtype", "bf16"])) == "finished"
    ck = out / "checkpoint-1"
    for rel, dtype in (("pytorch_lora_weights.safetensors", torch.float32),
                       ("adapter_lora/adapter_model.safetensors", torch.float32),
                       ("ema/pytorch_lora_weights.safetensors", torch.bfloat16),
                       ("ema/adapter_lora/adapter_model.safetensors", torch.bfloat16)):
        assert {v.dtype for v in load_file(ck / rel).values()} == {dtype}, rel
    pipe = FluxFillPipeline.from_pretrained(tiny_paths[0])
    pipe.load_lora_weights(str(ck / "ema"))
    assert any("lora_" in n for n, _ in pipe.transformer.named_parameters())


def test_export_then_load_gives_the_lora_runs_images(nft_lora_run, tmp_path, tiny_paths):
    """The run's stack with its live LoRA layers, the checkpoint loaded for inference (LoRA merged), the release
    export (adapter merged) + the transformer export: the same samples."""
    from calligrapher_rl.export import export

    out, args = nft_lora_run
    ck = out / "checkpoint-4"
    tr = Trainer(parse_args([*args[:-1], str(tmp_path / "again"), "--max_train_steps", "4"]))
    tr.policies.load_files(str(ck), json.loads((ck / "trainer_state" / "state.json").read_text()))

    def sample(stack):
        fill, text, embeds = _inputs(stack)
        ro = rollout(stack, fill, text, embeds, num_steps=3, guidance=30.0, generator=torch.Generator().manual_seed(3))
        return stack.decode(ro.final, fill.height, fill.width)

    live = sample(tr.stack)
    tr.run_dir.close()
    tr._release()
    merged = sample(CalligrapherStack.from_pretrained(*tiny_paths, adapter_path=str(ck)))
    export(str(ck), str(tmp_path / "rel"), fmt="transformer", dtype="fp32")
    exported = CalligrapherStack.from_pretrained(*tiny_paths, adapter_path=str(tmp_path / "rel" / "ip-adapter.bin"))
    from diffusers import FluxTransformer2DModel

    weights = FluxTransformer2DModel.from_pretrained(str(tmp_path / "rel" / "transformer")).state_dict()
    exported.pipe.transformer.load_state_dict(weights)
    for other in (merged, sample(exported)):
        torch.testing.assert_close(other, live, rtol=0, atol=2e-4)
    assert (live - sample(CalligrapherStack.from_pretrained(*tiny_paths))).abs().max() > 1e-3  # the LoRA matters


def test_compiled_lora_policies_trace_once(tiny_paths, tmp_path):
    """The live, reference (shared zeros), old and EMA-swapped LoRA weights run the compiled transformer's graphs:
    after the first iteration, changed weights and switching policies trace nothing new."""
    import contextlib

    from torch._dynamo.utils import counters

    from calligrapher_rl.models.acceleration import compile_transformer
    from calligrapher_rl.training.batches import Batch
    from calligrapher_rl.training.updates import grpo_backward, nft_backward

    torch._dynamo.reset()
    stack = _lora_stack(tiny_paths)
    compile_transformer(stack.pipe.transformer, backend="eager")
    pol = LoraPolicies(stack, _cfg(tmp_path), use_ema=True, ema_decay=0.9, ema_update_interval=1)
    pol.begin_rl(with_old=True)
    fill, text, embeds = _inputs(stack, 4)
    batch = Batch(list(range(4)), [{} for _ in range(4)], fill, text, embeds)
    common = dict(policies=pol, guidance=30.0, scale=1.0, kl_beta=0.01, adv_clip_max=5.0, autocast=contextlib.nullcontext)

    def iteration(seed):
        with torch.no_grad():
            ro = rollout(stack, fill, text, embeds, num_steps=2, guidance=30.0, noise_level=0.7,
                         generator=torch.Generator().manual_seed(seed))
            rollout(stack, fill, text, embeds, num_steps=2, guidance=30.0, params=pol.old)
        adv = torch.randn(4, generator=torch.Generator().manual_seed(seed))
        grpo_backward(stack, batch, ro, adv, ro.sde_steps, noise_level=0.7, sde_type="sde", clip_range=0.2,
                      loss_scale=1.0, **common)
        nft_backward(stack, batch, ro, adv, 2, beta=0.1, adv_mode="normal",
                     generator=torch.Generator().manual_seed(seed), loss_scale=1.0, **common)
        with torch.no_grad():
            for p in pol.params:
                p.add_(0.01 * torch.randn_like(p))
            pol.update_old(0.5)
            pol.ema_step(seed)
        with pol.evaluation_weights(), torch.no_grad():
            rollout(stack, fill, text, embeds, num_steps=2, guidance=30.0)
        stack.model.zero_grad(set_to_none=True)

    try:
        iteration(0)
        first = counters["stats"]["unique_graphs"]
        iteration(1)
        assert counters["stats"]["unique_graphs"] == first, dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
