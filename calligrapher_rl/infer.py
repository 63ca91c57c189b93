"""Calligrapher inpainting with any adapter checkpoint (release, fork, or ours; raw or EMA; or none).

    python -m calligrapher_rl.infer --pretrained_model_name_or_path P --siglip_path S \
        [--ip_adapter FILE] --source IMG --mask IMG [--reference IMG] --text TEXT --out PNG

The denoising is diffusers' own `FluxFillPipeline.__call__`; the style enters as joint-attention kwargs.
"""

from __future__ import annotations

import argparse
import os

import torch
from PIL import Image

from .errors import UserError, cli_main
from .images import crop_to_mask, load_image, load_mask, mask_bbox

PROMPT_TEMPLATE = "The text is '{text}'."


def build_context_input(source: Image.Image, mask: Image.Image, reference: Image.Image, multiple: int = 16):
    """The release's in-context mode: the reference, resized to the image width (height a multiple of 16),
    pasted above the source with a zero mask. Returns (image, mask, strip_height)."""
    w, h = source.size
    strip_h = max(multiple, round(reference.height * w / reference.width / multiple) * multiple)
    strip = reference.convert("RGB").resize((w, strip_h), Image.BICUBIC)
    image = Image.new("RGB", (w, h + strip_h))
    image.paste(strip, (0, 0))
    image.paste(source, (0, strip_h))
    full_mask = Image.new("L", (w, h + strip_h), 0)
    full_mask.paste(mask, (0, strip_h))
    return image, full_mask, strip_h


def _fit(source: Image.Image, mask: Image.Image, resolution: int | None, multiple: int = 16):
    """Resize (optionally to a square) and round both sides down to a multiple of 16, mask with NEAREST."""
    if resolution:
        size = (resolution, resolution)
    else:
        size = (max(multiple, source.width // multiple * multiple), max(multiple, source.height // multiple * multiple))
    if size != source.size:
        source = source.resize(size, Image.BICUBIC)
        mask = mask.resize(size, Image.NEAREST)
    return source, mask


@torch.no_grad()
def inpaint(stack, source: Image.Image, mask: Image.Image, text: str, reference: Image.Image | None = None, *,
            steps: int = 30, guidance: float = 30.0, scale: float = 1.0, seed: int = 56, num_images: int = 1,
            use_context: bool = False, resolution: int | None = None) -> list[Image.Image]:
    if source.size != mask.size:
        raise UserError(f"mask is {mask.size[0]}x{mask.size[1]} but the source is {source.size[0]}x{source.size[1]}",
                        field="--mask")
    if mask_bbox(mask) is None:
        raise UserError("mask is empty (no white pixels)", field="--mask")
    reference = reference or crop_to_mask(source, mask)
    source, mask = _fit(source.convert("RGB"), mask, resolution)
    strip_h = 0
    if use_context:
        source, mask, strip_h = build_context_input(source, mask, reference)
    tokens, style_kv = stack.style_condition(stack.encode_style([reference]))
    tokens = tokens.to(stack.dtype).repeat_interleave(num_images, 0)
    style_kv = tuple((k.repeat_interleave(num_images, 0), v.repeat_interleave(num_images, 0)) for k, v in style_kv)
    text_cond = stack.encode_prompts([PROMPT_TEMPLATE.format(text=text)])
    generator = torch.Generator("cpu").manual_seed(seed)
    images = stack.pipe(
        prompt_embeds=text_cond.prompt_embeds, pooled_prompt_embeds=text_cond.pooled,
        image=source, mask_image=mask, height=source.height, width=source.width,
        num_inference_steps=steps, guidance_scale=guidance, generator=generator, num_images_per_prompt=num_images,
        max_sequence_length=stack.max_sequence_length,
        joint_attention_kwargs={"style_tokens": tokens, "style_scale": scale, "style_kv": style_kv},
    ).images
    return [im.crop((0, strip_h, im.width, im.height)) for im in images]


def _grid(images: list[Image.Image]) -> Image.Image:
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        grid.paste(im, (i * w, 0))
    return grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calligrapher_rl.infer", description=__doc__.splitlines()[0])
    p.add_argument("--pretrained_model_name_or_path", required=True, help="FLUX.1-Fill-dev folder, or 'tiny'")
    p.add_argument("--siglip_path", required=True, help="SigLIP vision folder, or 'tiny'")
    p.add_argument("--ip_adapter", default=None, help="adapter checkpoint (.bin/.safetensors, any layout), or a LoRA "
                   "checkpoint folder (checkpoint-N, or checkpoint-N/ema for its EMA); none = untrained")
    p.add_argument("--source", required=True, help="image with the text to replace")
    p.add_argument("--mask", required=True, help="white = region to repaint; same size as the source")
    p.add_argument("--reference", default=None, help="style reference (default: the source cropped to the mask)")
    p.add_argument("--text", required=True, help="the new text")
    p.add_argument("--out", required=True, help="output PNG (K>1: a grid here and NAME-i.png beside it)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=30.0, help="FLUX-Fill guidance (the release uses 30)")
    p.add_argument("--scale", type=float, default=1.0, help="style strength, 0-2 (0 = plain FLUX-Fill)")
    p.add_argument("--seed", type=int, default=56)
    p.add_argument("--num_images", type=int, default=1)
    p.add_argument("--use_context", action="store_true", help="paste the reference above the source (in-context)")
    p.add_argument("--resolution", type=int, default=None, help="resize to this square (default: keep, round to 16)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on GPU, fp32 on CPU")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.num_images < 1:
        raise UserError("must be >= 1", field="--steps/--num_images")
    if not 0 <= args.scale <= 2:
        raise UserError(f"style strength must be in [0, 2], got {args.scale}", field="--scale")
    source = load_image(args.source, field="--source")
    mask = load_mask(args.mask, field="--mask")
    reference = load_image(args.reference, field="--reference") if args.reference else None
    if source.size != mask.size:
        raise UserError(f"mask is {mask.size[0]}x{mask.size[1]}, source is {source.size[0]}x{source.size[1]}",
                        where=args.mask, field="--mask")
    from .models.stack import CalligrapherStack

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    stack = CalligrapherStack.from_pretrained(args.pretrained_model_name_or_path, args.siglip_path,
                                              adapter_path=args.ip_adapter, device=device, dtype=dtype)
    if args.ip_adapter:
        from .models.checkpoints import weights_problem

        problem = weights_problem(stack.adapter.named_parameters())
        if problem:  # it would paint black (or noise) and exit 0
            raise UserError(problem, where=args.ip_adapter, field="--ip_adapter")
    images = inpaint(stack, source, mask, args.text, reference, steps=args.steps, guidance=args.guidance,
                     scale=args.scale, seed=args.seed, num_images=args.num_images, use_context=args.use_context,
                     resolution=args.resolution)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if len(images) == 1:
        images[0].save(args.out)
    else:
        stem, ext = os.path.splitext(args.out)
        for i, im in enumerate(images):
            im.save(f"{stem}-{i}{ext or '.png'}")
        _grid(images).save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    cli_main(main)
