"""An offline, tiny Calligrapher stack: the real classes at toy sizes with random weights.

It is a real diffusers `FluxFillPipeline` folder and a real transformers SigLIP folder, so every code path
that loads FLUX.1-Fill-dev and SigLIP from disk is exercised by it. The structure that matters is kept:
16 latent channels, an 8x VAE (so the mask packs into 256 channels and `in_channels` is 384), guidance
embeddings, double and single blocks, RoPE axes that sum to the head dim, a CLIP byte-level tokenizer
and a T5 unigram tokenizer (both built here with `tokenizers`, no download).
"""

from __future__ import annotations

import os
import string

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from ..cache import build_once, cache_dir

TINY_TEXT_DIM = 32  # T5 width == transformer joint_attention_dim
TINY_POOLED_DIM = 32  # CLIP width == pooled_projection_dim
TINY_SIGLIP_SIZE = 64


def tiny_transformer_config(**overrides) -> dict:
    return dict(
        patch_size=1,
        in_channels=384,  # 64 noisy + 64 masked-image + 256 mask features per packed token
        out_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_TEXT_DIM,
        pooled_projection_dim=TINY_POOLED_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ) | overrides


def tiny_vae_config(**overrides) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,  # FLUX's values: both the shift and the scale apply
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ) | overrides


def _clip_tokenizer() -> CLIPTokenizer:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer() -> T5TokenizerFast:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.printable if not c.isspace()]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_letters + string.digits]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def build_tiny_pipeline(seed: int = 0, *, text_dim: int = TINY_TEXT_DIM, pooled_dim: int = TINY_POOLED_DIM,
                        transformer: dict | None = None, vae: dict | None = None) -> FluxFillPipeline:
    """Random weights, deterministic per seed; the keyword sizes are the pretrained tiny's (tiny_weights.py)."""
    torch.manual_seed(seed)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=pooled_dim, intermediate_size=37 if pooled_dim == TINY_POOLED_DIM
            else 2 * pooled_dim, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
            projection_dim=pooled_dim, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(t5_tok), d_model=text_dim, d_kv=8 if text_dim == TINY_TEXT_DIM else text_dim // 4,
                 d_ff=37 if text_dim == TINY_TEXT_DIM else 2 * text_dim, num_layers=2, num_heads=4,
                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    )
    transformer = FluxTransformer2DModel(**tiny_transformer_config(joint_attention_dim=text_dim,
                                                                   pooled_projection_dim=pooled_dim,
                                                                   **(transformer or {})))
    vae = AutoencoderKL(**tiny_vae_config(**(vae or {})))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxFillPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
        tokenizer_2=t5_tok, transformer=transformer,
    )


def build_tiny_siglip(seed: int = 0):
    torch.manual_seed(seed + 1)
    model = SiglipVisionModel(
        SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                           image_size=TINY_SIGLIP_SIZE, patch_size=8)
    )
    try:  # the PIL processor needs no torchvision (and warns about nothing)
        from transformers import SiglipImageProcessorPil as processor_cls
    except ImportError:
        from transformers import SiglipImageProcessor as processor_cls
    processor = processor_cls(size={"height": TINY_SIGLIP_SIZE, "width": TINY_SIGLIP_SIZE})
    return model, processor


def write_tiny(out: str, seed: int = 0) -> tuple[str, str]:
    """Write `out/flux-fill` and `out/siglip`; returns their paths."""
    flux_dir, siglip_dir = os.path.join(out, "flux-fill"), os.path.join(out, "siglip")
    build_tiny_pipeline(seed).save_pretrained(flux_dir, safe_serialization=True)
    model, processor = build_tiny_siglip(seed)
    model.save_pretrained(siglip_dir, safe_serialization=True)
    processor.save_pretrained(siglip_dir)
    return flux_dir, siglip_dir


def ensure_tiny(seed: int = 0) -> tuple[str, str]:
    """The embedded default model, built once into the cache folder."""
    def build(tmp) -> None:
        with torch.random.fork_rng(devices=[]):  # building it must not move the caller's RNG
            write_tiny(str(tmp), seed)

    final = build_once(cache_dir() / f"tiny-seed{seed}", "siglip/config.json", build)
    return os.path.join(final, "flux-fill"), os.path.join(final, "siglip")


# The pretrained tiny (training/tiny_pretrain.py) ships in the package: no build, no download.
PRETRAINED_NAME = "tiny-pretrained"
PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", PRETRAINED_NAME)


def resolve_tiny_names(flux_path: str, siglip_path: str) -> tuple[str, str]:
    """`tiny` = the random tiny (built once into the cache); `tiny-pretrained` = the shipped one that writes."""
    if "tiny" in (flux_path, siglip_path):
        tiny_flux, tiny_siglip = ensure_tiny()
        flux_path = tiny_flux if flux_path == "tiny" else flux_path
        siglip_path = tiny_siglip if siglip_path == "tiny" else siglip_path
    if flux_path == PRETRAINED_NAME:
        flux_path = os.path.join(PRETRAINED_DIR, "flux-fill")
    if siglip_path == PRETRAINED_NAME:
        siglip_path = os.path.join(PRETRAINED_DIR, "siglip")
    return flux_path, siglip_path


def resolve_adapter_name(path: str | None) -> str | None:
    """`tiny-pretrained` as an adapter path = the shipped pretrained adapter (release names, safetensors)."""
    return os.path.join(PRETRAINED_DIR, "ip-adapter.safetensors") if path == PRETRAINED_NAME else path
