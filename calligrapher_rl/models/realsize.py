"""Real-size models with random weights: FLUX.1-Fill-dev, SigLIP so400m and the full Calligrapher adapter.

Memory and speed do not depend on the weight values, so this is how to try a GPU server (or a preset, or a
change) at the real size before downloading ~35 GB of weights:

    python -m calligrapher_rl.realsize --out /dev/shm/realsize --device cuda
    python -m calligrapher_rl.train --preset flux-grpo \\
        --pretrained_model_name_or_path /dev/shm/realsize/flux-fill --siglip_path /dev/shm/realsize/siglip \\
        --initial_ip_adapter_path /dev/shm/realsize/calligrapher-random.safetensors ...

The folders are written with `save_pretrained`, so what a run then executes is the real `from_pretrained`
path. The configurations are those of the released models (the published config.json values); the
tokenizers are the tiny model's offline ones (no vocabulary files can be downloaded here): they produce valid
ids for the real vocabularies, and a prompt's embedding has the real shape.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

FLUX_FILL_TRANSFORMER = dict(in_channels=384, out_channels=64, num_layers=19, num_single_layers=38,
                             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                latent_channels=16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
T5_XXL_ENCODER = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     image_size=384, patch_size=14)
NUM_STYLE_TOKENS = 128  # the release's


def flux_fill_pipeline():
    """FluxFillPipeline at FLUX.1-Fill-dev's configuration, random weights, on the current default device."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .tiny import _clip_tokenizer, _t5_tokenizer

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxFillPipeline(scheduler=scheduler, vae=AutoencoderKL(**FLUX_VAE),
                            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)), tokenizer=_clip_tokenizer(),
                            text_encoder_2=T5EncoderModel(T5Config(**T5_XXL_ENCODER)), tokenizer_2=_t5_tokenizer(),
                            transformer=FluxTransformer2DModel(**FLUX_FILL_TRANSFORMER))


def siglip_so400m():
    """(SiglipVisionModel, its image processor) at so400m-patch14-384's configuration, random weights."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    try:
        from transformers import SiglipImageProcessorPil as Processor
    except ImportError:
        from transformers import SiglipImageProcessor as Processor
    return SiglipVisionModel(SiglipVisionConfig(**SIGLIP_SO400M)), Processor(size={"height": 384, "width": 384})


def full_adapter(transformer, siglip_width: int = SIGLIP_SO400M["hidden_size"]):
    """The release's adapter (MLP + QFormer projection, to_k_ip/to_v_ip in all 57 attention blocks), random."""
    from .style_adapter import StyleAdapter

    return StyleAdapter.for_transformer(transformer, siglip_width, num_style_tokens=NUM_STYLE_TOKENS)


def parameter_counts() -> dict[str, int]:
    """Parameters of each real-size part, counted on the meta device (no memory, about a second)."""
    with torch.device("meta"):
        pipe = flux_fill_pipeline()
        siglip, _ = siglip_so400m()
        adapter = full_adapter(pipe.transformer)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    attn = sum(p.numel() for n, p in adapter.named_parameters() if n.startswith("attn_adapter."))
    return {"transformer": count(pipe.transformer), "t5_encoder": count(pipe.text_encoder_2),
            "clip_text": count(pipe.text_encoder), "vae": count(pipe.vae), "siglip_vision": count(siglip),
            "adapter": count(adapter), "adapter_attn": attn}


def write(out: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16, log=print) -> dict[str, str]:
    """Build and write `out/flux-fill`, `out/siglip` and `out/calligrapher-random.safetensors` (bf16, as the
    release ships its adapter); returns their paths. ~33 GB; about a minute on a GPU server into /dev/shm."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    paths = {"flux": os.path.join(out, "flux-fill"), "siglip": os.path.join(out, "siglip"),
             "adapter": os.path.join(out, "calligrapher-random.safetensors")}
    prev = torch.get_default_dtype()
    torch.manual_seed(0)
    t0 = time.time()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            pipe = flux_fill_pipeline()
            siglip, processor = siglip_so400m()
            torch.set_default_dtype(torch.float32)
            adapter = full_adapter(pipe.transformer)
    finally:
        torch.set_default_dtype(prev)
    log(f"built on {device} in {time.time() - t0:.1f} s")
    pipe.save_pretrained(paths["flux"], max_shard_size="10GB")
    siglip.save_pretrained(paths["siglip"])
    processor.save_pretrained(paths["siglip"])
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in adapter.state_dict().items()}, paths["adapter"],
              metadata={"format": "pt", "layout": "calligrapher-rl/flat"})
    log(f"written to {out} in {time.time() - t0:.1f} s")
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calligrapher_rl.realsize", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder to write flux-fill/, siglip/ and calligrapher-random.safetensors into")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the random weights are drawn (cuda is much faster)")
    ap.add_argument("--counts", action="store_true", help="print the parameter counts (meta device) and exit")
    args = ap.parse_args(argv)
    if args.counts:
        print(json.dumps(parameter_counts()))
        return 0
    if not args.out:
        from ..errors import UserError

        raise UserError("required unless --counts", field="--out")
    write(args.out, args.device)
    return 0
