"""The Calligrapher model on diffusers: style attention, checkpoint layouts, the tiny stack, inference."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from calligrapher_rl.errors import UserError
from calligrapher_rl.models.checkpoints import load_adapter_file, read_adapter_file, release_layout, save_adapter_files
from calligrapher_rl.models.stack import CalligrapherStack
from calligrapher_rl.models.style_adapter import StyleAdapter, StyleAdapterConfig


def _images(tmp_path, size=(64, 64), mask_size=None):
    src = Image.new("RGB", size, (200, 180, 160))
    ImageDraw.Draw(src).text((10, 25), "Hi", fill=(0, 0, 0))
    mask = Image.new("L", mask_size or size, 0)
    ImageDraw.Draw(mask).rectangle((8, 16, 40, 40), fill=255)
    sp, mp = tmp_path / "src.png", tmp_path / "mask.png"
    src.save(sp), mask.save(mp)
    return str(sp), str(mp), src, mask


def test_real_size_keys_and_shapes_match_the_release():
    with torch.device("meta"):
        adapter = StyleAdapter(StyleAdapterConfig())
    shapes = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    E, D, N, Q, H = 1152, 4096, 128, 32, 3072
    expected = {
        "image_proj_mlp.proj.0.weight": (2 * E, E), "image_proj_mlp.proj.0.bias": (2 * E,),
        "image_proj_mlp.proj.2.weight": (D * N, 2 * E), "image_proj_mlp.proj.2.bias": (D * N,),
        "image_proj_mlp.norm.weight": (D,), "image_proj_mlp.norm.bias": (D,),
        "image_proj_qformer.query_embeds": (N, D),
        "image_proj_qformer.id_proj.0.weight": (2 * E, E), "image_proj_qformer.id_proj.0.bias": (2 * E,),
        "image_proj_qformer.id_proj.2.weight": (D * Q, 2 * E), "image_proj_qformer.id_proj.2.bias": (D * Q,),
        "image_proj_qformer.cross_attn.in_proj_weight": (3 * D, D), "image_proj_qformer.cross_attn.in_proj_bias": (3 * D,),
        "image_proj_qformer.cross_attn.out_proj.weight": (D, D), "image_proj_qformer.cross_attn.out_proj.bias": (D,),
        "image_proj_qformer.cross_attn_norm.weight": (D,), "image_proj_qformer.cross_attn_norm.bias": (D,),
        "image_proj_qformer.norm.weight": (D,), "image_proj_qformer.norm.bias": (D,),
    }
    for i in range(57):
        expected[f"attn_adapter.{i}.to_k_ip.weight"] = (H, D)
        expected[f"attn_adapter.{i}.to_v_ip.weight"] = (H, D)
    assert shapes == expected


def test_real_size_transformer_has_57_processors_in_release_order():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(in_channels=384, out_channels=64, guidance_embeds=True)
    names = list(transformer.attn_processors)
    assert len(names) == 57
    assert names[0].startswith("transformer_blocks.0.") and names[18].startswith("transformer_blocks.18.")
    assert names[19].startswith("single_transformer_blocks.0.") and names[56].startswith("single_transformer_blocks.37.")


def test_scale_zero_equals_plain_fluxfill(tiny_paths, tiny_stack, tmp_path):
    from diffusers import FluxFillPipeline

    from calligrapher_rl.infer import inpaint

    _, _, src, mask = _images(tmp_path)
    plain = FluxFillPipeline.from_pretrained(tiny_paths[0], dtype=torch.float32)
    ref = plain(prompt="The text is 'Hello'.", image=src, mask_image=mask, height=64, width=64, num_inference_steps=3,
                guidance_scale=30.0, generator=torch.Generator("cpu").manual_seed(7), max_sequence_length=32,
                output_type="np").images[0]
    ours = inpaint(tiny_stack, src, mask, "Hello", steps=3, guidance=30.0, scale=0.0, seed=7)[0]
    styled = inpaint(tiny_stack, src, mask, "Hello", steps=3, guidance=30.0, scale=1.0, seed=7)[0]
    ref_u8 = np.round(ref * 255).astype(np.int16)
    assert np.abs(np.asarray(ours, np.int16) - ref_u8).max() <= 1  # PIL rounding only
    assert np.abs(np.asarray(styled, np.int16) - ref_u8).max() > 0  # the style branch does act


def test_ode_rollout_equals_the_pipeline_loop(tiny_stack, tmp_path):
    """Our sampler with noise 0 is FluxFillPipeline's Euler loop (same schedule, same shift)."""
    from calligrapher_rl.sampling import rollout

    _, _, src, mask = _images(tmp_path)
    stack = tiny_stack
    pipe = stack.pipe
    img = pipe.image_processor.preprocess(src, height=64, width=64)
    m = pipe.mask_processor.preprocess(mask, height=64, width=64)
    fill = stack.prepare_fill(img, m, generator=torch.Generator().manual_seed(0))
    text = stack.encode_prompts(["The text is 'Hi'."])
    embeds = stack.encode_style([src])
    noise = stack.noise_like(fill, 1, torch.Generator().manual_seed(1))
    ours = rollout(stack, fill, text, embeds, num_steps=4, guidance=30.0, initial_noise=noise).final
    tokens = stack.adapter.style_tokens(embeds)
    with torch.no_grad():
        # Given the noise, the pipeline's only random draw is the masked-image VAE sample: same seed as ours.
        theirs = pipe(prompt_embeds=text.prompt_embeds, pooled_prompt_embeds=text.pooled, image=src, mask_image=mask,
                      height=64, width=64, num_inference_steps=4, guidance_scale=30.0, latents=noise,
                      generator=torch.Generator().manual_seed(0), output_type="latent",
                      joint_attention_kwargs={"style_tokens": tokens, "style_scale": 1.0}).images
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)


def test_sde_rollout_logprobs_and_window(tiny_stack, tmp_path):
    from calligrapher_rl.sampling import SDEWindow, rollout

    _, _, src, mask = _images(tmp_path)
    pipe = tiny_stack.pipe
    fill = tiny_stack.prepare_fill(pipe.image_processor.preprocess(src, height=64, width=64).repeat(3, 1, 1, 1),
                                   pipe.mask_processor.preprocess(mask, height=64, width=64).repeat(3, 1, 1, 1))
    text = tiny_stack.encode_prompts(["p"] * 3)
    embeds = tiny_stack.encode_style([src] * 3)
    ro = rollout(tiny_stack, fill, text, embeds, num_steps=6, guidance=3.5, noise_level=0.8,
                 window=SDEWindow(1, 3), generator=torch.Generator().manual_seed(0))
    assert ro.sde_steps == [1, 2, 3]
    assert ro.latents.shape[:2] == (3, 7) and ro.log_probs.shape == (3, 6)
    assert torch.all(ro.log_probs[:, [0, 4, 5]] == 0) and torch.all(ro.log_probs[:, 1:4] != 0)
    assert not torch.allclose(ro.final[0], ro.final[1])  # SDE noise differs within the group


def _one_sample(stack, tmp_path, seed):
    """(x, fill, text, embeds) of one image with noise `seed`."""
    _, _, src, mask = _images(tmp_path)
    fill = stack.prepare_fill(stack.pipe.image_processor.preprocess(src, height=64, width=64),
                              stack.pipe.mask_processor.preprocess(mask, height=64, width=64))
    return stack.noise_like(fill, 1, torch.Generator().manual_seed(seed)), fill, stack.encode_prompts(["p"]), \
        stack.encode_style([src])


def test_functional_params_equal_loaded_params(tiny_stack, tmp_path):
    x, fill, text, embeds = _one_sample(tiny_stack, tmp_path, 3)
    live = {k: v.detach().clone() for k, v in tiny_stack.adapter.state_dict().items()}
    other = {k: v + 0.05 * torch.randn_like(v) for k, v in live.items()}
    with torch.no_grad():
        v_other = tiny_stack.velocity(x, fill, text, 0.5, embeds, 30.0, params=other)
        v_live = tiny_stack.velocity(x, fill, text, 0.5, embeds, 30.0)
        tiny_stack.adapter.load_state_dict(other)
        v_loaded = tiny_stack.velocity(x, fill, text, 0.5, embeds, 30.0)
        tiny_stack.adapter.load_state_dict(live)
    torch.testing.assert_close(v_other, v_loaded)
    assert not torch.allclose(v_other, v_live)


def test_release_fork_and_safetensors_layouts_load(tiny_paths, tmp_path):
    stack = CalligrapherStack.from_pretrained(*tiny_paths, num_style_tokens=128)
    cfg = stack.adapter.config
    assert (cfg.num_style_tokens, cfg.num_qformer_tokens) == (128, 32)  # the release's counts at tiny width
    donor = StyleAdapter(cfg)
    flat = donor.state_dict()
    torch.save(release_layout(flat), tmp_path / "calligrapher.bin")
    fork_cfg = StyleAdapterConfig(**{**cfg.to_dict(), "use_qformer": False, "num_style_tokens": 16})
    fork = StyleAdapter(fork_cfg).state_dict()
    nested = release_layout(fork)
    torch.save({"image_proj": nested["image_proj_mlp"], "ip_adapter": nested["attn_adapter"]}, tmp_path / "fork.bin")
    save_adapter_files(str(tmp_path / "ckpt"), flat, ema_state=flat)

    assert read_adapter_file(tmp_path / "calligrapher.bin")[0] == "release"
    assert read_adapter_file(tmp_path / "fork.bin")[0] == "fork"
    for name in ("calligrapher.bin", "ckpt/ip-adapter.safetensors", "ckpt/ip-adapter-ema.safetensors", "ckpt/ip-adapter.bin"):
        s = CalligrapherStack.from_pretrained(*tiny_paths, adapter_path=str(tmp_path / name))
        for k, v in flat.items():
            assert torch.equal(s.adapter.state_dict()[k], v), (name, k)
    s = CalligrapherStack.from_pretrained(*tiny_paths, adapter_path=str(tmp_path / "fork.bin"))
    assert s.adapter.image_proj_qformer is None and s.adapter.config.num_style_tokens == 16


def test_mismatched_and_corrupt_checkpoints_fail_with_one_message(tiny_stack, tmp_path):
    flat = {k: v.clone() for k, v in tiny_stack.adapter.state_dict().items()}
    flat.pop("attn_adapter.0.to_k_ip.weight")
    flat["attn_adapter.1.to_v_ip.weight"] = torch.zeros(3, 3)
    flat["image_proj_mlp.extra"] = torch.zeros(1)
    torch.save(release_layout(flat), tmp_path / "bad.bin")
    adapter = StyleAdapter(tiny_stack.adapter.config)
    with pytest.raises(UserError) as e:
        load_adapter_file(adapter, tmp_path / "bad.bin")
    msg = str(e.value)
    assert "\n" not in msg and "missing 1 keys: attn_adapter.0.to_k_ip.weight" in msg
    assert "unexpected 1 keys: image_proj_mlp.extra" in msg and "mis-shaped 1 keys: attn_adapter.1.to_v_ip.weight" in msg
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable torch checkpoint"):
        read_adapter_file(tmp_path / "junk.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="safetensors"):
        read_adapter_file(tmp_path / "junk.safetensors")


def test_full_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"image_proj_mlp": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(UserError):
        read_adapter_file(tmp_path / "evil.bin")
    assert not (tmp_path / "pwned").exists()


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def test_tiny_cli_is_deterministic_per_seed(tmp_path):
    a, b = _run("calligrapher_rl.tiny", "--out", str(tmp_path / "a")), _run("calligrapher_rl.tiny", "--out", str(tmp_path / "b"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr
    from safetensors.torch import load_file

    rel = "flux-fill/transformer/diffusion_pytorch_model.safetensors"
    ta, tb = load_file(tmp_path / "a" / rel), load_file(tmp_path / "b" / rel)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    size = sum(f.stat().st_size for f in (tmp_path / "a").rglob("*") if f.is_file())
    assert size < 10 * 2**20


def test_infer_cli_and_its_one_line_errors(tiny_paths, tiny_stack, tmp_path):
    sp, mp, _, _ = _images(tmp_path)
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in tiny_stack.adapter.state_dict().items()}
    first = next(k for k, v in state.items() if v.is_floating_point())
    for name, value in (("nan", float("nan")), ("huge", 1e30)):  # a diverged run's adapter paints black, exit 0
        broken = dict(state)
        broken[first] = torch.full_like(state[first], value)
        save_file(broken, str(tmp_path / f"{name}.safetensors"))
    flux, siglip = tiny_paths
    base = ["calligrapher_rl.infer", "--pretrained_model_name_or_path", flux, "--siglip_path", siglip, "--text", "Hello",
            "--steps", "2"]
    out = tmp_path / "out.png"
    ok = _run(*base, "--source", sp, "--mask", mp, "--out", str(out), "--num_images", "2", "--use_context")
    assert ok.returncode == 0, ok.stderr
    assert Image.open(out).size == (128, 64) and Image.open(tmp_path / "out-1.png").size == (64, 64)

    (tmp_path / "small").mkdir()
    _, small_mask, _, _ = _images(tmp_path / "small", mask_size=(32, 32))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "bad.bin").write_bytes(b"nope")
    cases = {
        "no model_index.json": ["--pretrained_model_name_or_path", str(tmp_path / "missing")],
        "mask is 32x32": ["--mask", small_mask],
        "not a readable image": ["--source", str(tmp_path / "broken.png")],
        "not a readable torch checkpoint": ["--ip_adapter", str(tmp_path / "bad.bin")],
        "non-finite values in 1 tensor(s)": ["--ip_adapter", str(tmp_path / "nan.safetensors")],
        "weights of magnitude 1e+30": ["--ip_adapter", str(tmp_path / "huge.safetensors")],
    }
    for expect, override in cases.items():
        args = dict(zip(base[1::2], base[2::2]))
        args.update({"--source": sp, "--mask": mp, "--out": str(out)})
        args.update(dict(zip(override[::2], override[1::2])))
        flat = [x for kv in args.items() for x in kv]
        r = _run("calligrapher_rl.infer", *flat)
        assert r.returncode == 2, (expect, r.stderr)
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and expect in lines[0] and "Traceback" not in r.stderr, (expect, r.stderr)


def test_precomputed_style_kv_changes_nothing_and_is_unused_with_gradients(tiny_stack, tmp_path):
    x, fill, text, embeds = _one_sample(tiny_stack, tmp_path, 4)
    with torch.no_grad():
        tokens, style_kv = tiny_stack.style_condition(embeds)
        plain = [tiny_stack.velocity(x, fill, text, s, embeds, 30.0) for s in (0.9, 0.4)]
        reused = [tiny_stack.velocity(x, fill, text, s, embeds, 30.0, style_tokens=tokens, style_kv=style_kv)
                  for s in (0.9, 0.4)]
    assert len(style_kv) == len(tiny_stack.adapter.attn_adapter)  # one (key, value) per block
    for a, b in zip(plain, reused):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # with gradients the maps are recomputed from the live weights (a detached copy would cut the gradient)
    zeros = tuple((torch.zeros_like(k), torch.zeros_like(v)) for k, v in style_kv)
    v = tiny_stack.velocity(x, fill, text, 0.5, embeds, 30.0, style_kv=zeros)
    with torch.no_grad():
        torch.testing.assert_close(v, tiny_stack.velocity(x, fill, text, 0.5, embeds, 30.0))
    v.sum().backward()
    assert tiny_stack.adapter.attn_adapter[0].to_k_ip.weight.grad is not None
    tiny_stack.adapter.zero_grad(set_to_none=True)
