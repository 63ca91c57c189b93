"""Export a checkpoint's weights to the files other code loads.

    python -m calligrapher_rl.export --checkpoint RUN/checkpoint-N [--ema] --out OUT [--format release|safetensors|transformer]

- release (default): `OUT/ip-adapter.safetensors` and `OUT/ip-adapter.bin`, the release's nested layout that the
  original Calligrapher inference code loads; a LoRA on the adapter is merged into its base adapter first. A
  transformer LoRA is copied beside them as `pytorch_lora_weights.safetensors` (`FluxFillPipeline.load_lora_weights`).
- safetensors: only `OUT/ip-adapter.safetensors` (flat dotted keys, what this project loads).
- transformer: a LoRA checkpoint's transformer LoRA merged into FLUX.1-Fill's transformer, `OUT/transformer/`
  (diffusers `save_pretrained`), plus the adapter files of `release`.

A full-rank checkpoint's raw or EMA adapter is exported as it is (it has nothing to merge).
"""

from __future__ import annotations

import argparse
import os
import shutil

import torch

from .errors import UserError, cli_main

FORMATS = ("release", "safetensors", "transformer")


def _adapter_from_flat(flat: dict[str, torch.Tensor]):
    """A StyleAdapter shaped by a flat state dict (widths, block count and token counts from its tensors)."""
    from .models.checkpoints import config_from_state_dict, load_into_adapter
    from .models.style_adapter import StyleAdapter, StyleAdapterConfig

    to_k = flat["attn_adapter.0.to_k_ip.weight"]
    cross = to_k.shape[1]
    base = StyleAdapterConfig(image_embed_dim=flat["image_proj_mlp.proj.0.weight"].shape[1], cross_attention_dim=cross,
                              inner_dim=to_k.shape[0],
                              num_processors=sum(k.endswith(".to_k_ip.weight") for k in flat),
                              qformer_heads=8 if cross % 8 == 0 else 1)
    adapter = StyleAdapter(config_from_state_dict(flat, base))
    load_into_adapter(adapter, flat)
    return adapter


def merged_adapter_state(root: str, folder: str, info: dict, base_adapter: str | None) -> dict[str, torch.Tensor]:
    """The full adapter of a LoRA checkpoint: its base adapter with the adapter LoRA (if any) merged in."""
    from .models.checkpoints import read_adapter_file
    from .models.lora import LoraSpec, add_lora, merge_lora, read_lora_files
    from .models.tiny import resolve_adapter_name

    base = base_adapter or info.get("base_adapter")
    if not base:  # a fresh adapter (lora.json's seed): the stack rebuilds it, with the LoRA merged in
        from .models.stack import CalligrapherStack

        stack = CalligrapherStack.from_pretrained(info["pretrained_model_name_or_path"], info["siglip_path"],
                                                  adapter_path=folder)
        return {k: v.detach() for k, v in stack.adapter.state_dict().items()}
    _, flat = read_adapter_file(resolve_adapter_name(base))
    adapter = _adapter_from_flat(flat)
    modules = info.get("modules", {}).get("adapter")
    if modules:
        add_lora(torch.nn.Module(), adapter, LoraSpec("adapter", info["rank"], float(info["alpha"]), 0.0, tuple(modules)))
        values = read_lora_files(folder, None, adapter)
        with torch.no_grad():
            live = dict(adapter.named_parameters())
            for name, value in values.items():
                live[name].copy_(value)
        merge_lora(adapter)
    return {k: v.detach() for k, v in adapter.state_dict().items()}


def merged_transformer(root: str, folder: str, info: dict, model_path: str | None, dtype=torch.bfloat16):
    """FLUX.1-Fill's transformer with the checkpoint's transformer LoRA merged in."""
    from diffusers import FluxTransformer2DModel

    from .models.hub import resolve_model
    from .models.lora import LoraSpec, add_lora, merge_lora, read_lora_files

    modules = info.get("modules", {}).get("transformer")
    if not modules:
        raise UserError("this LoRA checkpoint trains no transformer LoRA: use --format release", where=root,
                        field="--format")
    flux = resolve_model(model_path or info["pretrained_model_name_or_path"], "flux").path
    try:
        transformer = FluxTransformer2DModel.from_pretrained(flux, subfolder="transformer", dtype=dtype,
                                                             local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the FLUX transformer ({str(exc).splitlines()[0][:160]})", where=flux,
                        field="--pretrained_model_name_or_path") from None
    holder = torch.nn.Module()
    add_lora(transformer, holder, LoraSpec("transformer", info["rank"], float(info["alpha"]), 0.0, tuple(modules)))
    values = read_lora_files(folder, transformer, None)
    with torch.no_grad():
        live = dict(transformer.named_parameters())
        for name, value in values.items():
            live[name[len("transformer."):]].copy_(value)
    return merge_lora(transformer)


def export(checkpoint: str, out: str, *, ema: bool = False, fmt: str = "release", base_adapter: str | None = None,
           model_path: str | None = None, dtype: str = "bf16") -> list[str]:
    """Write the export; returns the files written."""
    from .atomic import atomic_path
    from .models.checkpoints import read_adapter_file, release_layout
    from .models.lora import EMA_DIR, TRANSFORMER_FILE, find_lora

    if fmt not in FORMATS:
        raise UserError(f"expected one of {', '.join(FORMATS)}, got {fmt!r}", field="--format")
    if not os.path.isdir(checkpoint):
        raise UserError("no such checkpoint folder", where=checkpoint, field="--checkpoint")
    found = find_lora(checkpoint)
    os.makedirs(out, exist_ok=True)
    written = []
    if found is None:
        name = "ip-adapter-ema.safetensors" if ema else "ip-adapter.safetensors"
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            raise UserError(f"no {name} here (a checkpoint of this project, {'run with --use_ema' if ema else 'raw'})",
                            where=checkpoint, field="--ema" if ema else "--checkpoint")
        if fmt == "transformer":
            raise UserError("a full-rank checkpoint trains no transformer weights: use --format release",
                            where=checkpoint, field="--format")
        _, state = read_adapter_file(path)
    else:
        root, _, info = found
        folder = os.path.join(root, EMA_DIR) if ema else root
        if not os.path.isdir(folder):
            raise UserError("no ema/ folder: the run had no --use_ema", where=root, field="--ema")
        state = merged_adapter_state(root, folder, info, base_adapter)
        if fmt == "transformer":
            target = os.path.join(out, "transformer")
            torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
            merged_transformer(root, folder, info, model_path, torch_dtype).save_pretrained(target)
            written.append(target)
        elif fmt == "release" and os.path.isfile(os.path.join(folder, TRANSFORMER_FILE)):
            shutil.copyfile(os.path.join(folder, TRANSFORMER_FILE), os.path.join(out, TRANSFORMER_FILE))
            written.append(os.path.join(out, TRANSFORMER_FILE))
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(os.path.join(out, "ip-adapter.safetensors")) as tmp:
        save_file(state, tmp, metadata={"format": "pt", "layout": "calligrapher-rl/flat"})
    written.append(os.path.join(out, "ip-adapter.safetensors"))
    if fmt != "safetensors":
        with atomic_path(os.path.join(out, "ip-adapter.bin")) as tmp:
            torch.save(release_layout(state), tmp)
        written.append(os.path.join(out, "ip-adapter.bin"))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m calligrapher_rl.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint-N folder (full-rank or LoRA)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", default="release", choices=FORMATS)
    p.add_argument("--base_adapter", default=None, help="the adapter a LoRA merges into (default: lora.json's)")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="FLUX.1-Fill for --format transformer (default: lora.json's)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"),
                   help="weights of the merged transformer (FLUX is released in bf16)")
    args = p.parse_args(argv)
    for path in export(args.checkpoint, args.out, ema=args.ema, fmt=args.format, base_adapter=args.base_adapter,
                       model_path=args.pretrained_model_name_or_path, dtype=args.dtype):
        print(path)
    return 0


if __name__ == "__main__":
    cli_main(main)
