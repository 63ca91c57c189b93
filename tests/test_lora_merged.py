"""--lora_merged without gradient: each policy's W + s B A formed once (models/lora_merged.py, MergedBase), and
formed again whenever what it came from changed, however it changed."""

from __future__ import annotations

import pytest
import torch
from test_lora import RANDOM_TINY, _inputs

from calligrapher_rl.config import parse_args
from calligrapher_rl.models.lora import LoraSpec, add_lora
from calligrapher_rl.models.lora_merged import MergedBase, use_merged_lora
from calligrapher_rl.models.stack import CalligrapherStack
from calligrapher_rl.training.lora_policies import LoraPolicies
from calligrapher_rl.training.run_dir import read_metrics
from calligrapher_rl.training.trainer import Trainer


@pytest.fixture(scope="module")
def merged_stack(tiny_paths, tmp_path_factory):
    stack = CalligrapherStack.from_pretrained(*tiny_paths, num_style_tokens=8)
    add_lora(stack.pipe.transformer, stack.adapter, LoraSpec("both", rank=4, alpha=8.0))
    assert use_merged_lora(stack.pipe.transformer) > 0
    cfg = parse_args(["--preset", "tiny-nft-lora", "--pretrained_model_name_or_path", "tiny", "--siglip_path", "tiny",
                      "--lora_rank", "4", "--lora_alpha", "8", "--output_dir", str(tmp_path_factory.mktemp("cfg"))])
    pol = LoraPolicies(stack, cfg, use_ema=False, ema_decay=0.9, ema_update_interval=1)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in pol.params:  # a trained LoRA: every policy below differs from the base
            p.add_(0.05 * torch.randn_like(p))
    return stack, pol


def _velocity(stack, inputs, params=None):
    fill, text, embeds, x = inputs
    with torch.no_grad():
        return stack.velocity(x, fill, text, 0.5, embeds, 30.0, params=params)


def test_each_policy_is_formed_once_and_again_after_any_change(merged_stack):
    stack, pol = merged_stack
    fill, text, embeds = _inputs(stack, 2)
    inputs = (fill, text, embeds, torch.randn(2, fill.seq_len, 64, generator=torch.Generator().manual_seed(2)))
    torch.manual_seed(1)
    stack.merged_base = None
    try:
        want_live = _velocity(stack, inputs)  # the merged forward, formed at every call: what must not change
        old = {n: (p.detach() + 0.03 * torch.randn_like(p)) for n, p in pol.named}
        want_old = _velocity(stack, inputs, old)
        want_base = _velocity(stack, inputs, pol.base_reference())
    finally:
        stack.merged_base = merged = MergedBase(stack.pipe.transformer)
    assert len(merged.layers) > 0

    def check(want, params=None, formed=None):
        got = _velocity(stack, inputs, params)
        assert torch.equal(got, want)  # the same bits as forming at the call
        if formed is not None:
            assert merged.formed == formed
        assert not any(layer.disable_adapters for layer in merged.layers)  # the layers are back as they were

    base_weights = {id(layer): layer.get_base_layer().weight.data_ptr() for layer in merged.layers}
    check(want_live, formed=1)
    check(want_live, formed=1)  # nothing changed: nothing formed
    check(want_base, pol.base_reference(), formed=1)  # the zero reference runs the base weights: keeps the live set
    check(want_live, formed=1)
    check(want_old, old, formed=2)  # another policy in the parameters' places
    check(want_old, old, formed=2)
    check(want_live, formed=3)
    assert {id(layer): layer.get_base_layer().weight.data_ptr() for layer in merged.layers} == base_weights

    # an in-place write to the live factors (an optimizer step, a loaded checkpoint)
    with torch.no_grad():
        for p in pol.params:
            p.mul_(1.5)
    stack.merged_base = None
    want_scaled = _velocity(stack, inputs)
    stack.merged_base = merged
    check(want_scaled, formed=4)
    assert not torch.equal(want_scaled, want_live)

    # an in-place write to a policy mapping (the old policy or an EMA averaged in place): the parameters it stands
    # in for show no change of their own, the mapping's tensors do
    check(want_old, old, formed=5)
    with torch.no_grad():
        for v in old.values():
            v.mul_(0.5)
    stack.merged_base = None
    want_halved = _velocity(stack, inputs, old)
    stack.merged_base = merged
    check(want_halved, old, formed=6)
    assert not torch.equal(want_halved, want_old)

    merged.release()
    check(want_scaled, formed=7)
    with torch.enable_grad():  # gradient calls never use the formed set: the merged forward's own path
        fill, text, embeds, x = inputs
        out = stack.velocity(x, fill, text, 0.5, embeds, 30.0)
    assert out.requires_grad and merged.formed == 7
    stack.merged_base = None


@pytest.mark.parametrize("preset", ["tiny-grpo-lora", "tiny-nft-lora", "tiny-awm"])
def test_a_run_is_the_same_with_the_weights_formed_once(tmp_path, preset):
    """Whole runs, evaluation with the EMA included, with and without forming the weights once: the same metrics
    to the bit. A formed set used after the weights it came from changed would show here. AWM's update makes
    no-gradient calls (its rollout weights, reference and EMA policies) between gradient ones: none holds a set."""
    lora = ["--trainable", "lora", "--lora_merged", "true", "--lora_rank", "4"] if preset == "tiny-awm" else []

    def run(name, formed_once):
        tr = Trainer(parse_args(["--preset", preset, *RANDOM_TINY, *lora, "--max_train_steps", "4", "--eval_steps", "2",
                                 "--num_eval_samples", "2", "--checkpointing_steps", "100",
                                 "--output_dir", str(tmp_path / name)]))
        assert tr.stack.merged_base is not None  # what a --lora_merged run sets up
        if not formed_once:
            tr.stack.merged_base = None
        held, velocity = [], tr.stack.velocity

        def watched(*args, **kwargs):  # the gradient passes run with no formed set on the card
            if torch.is_grad_enabled() and tr.stack.merged_base is not None:
                held.append(tr.stack.merged_base._weights is not None)
            return velocity(*args, **kwargs)

        tr.stack.velocity = watched
        assert tr.run() == "finished"
        assert not any(held) and (len(held) > 0) == formed_once
        keep = lambda r: {k: v for k, v in r.items() if not k.startswith(("time", "perf/", "sys/"))}  # noqa: E731
        return [keep(r) for r in read_metrics(str(tmp_path / name))], tr.stack.merged_base

    plain, _ = run("plain", False)
    once, merged = run("once", True)
    assert merged.formed > 0
    assert any("eval" in str(r.get("phase")) or any(k.startswith("eval") for k in r) for r in once)
    assert once == plain
