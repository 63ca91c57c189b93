"""What a model stack will occupy on its device, known before anything loads: what the studio's GPU room
(app/gpu_room.py) checks before it puts a stack on a card a training run may be using."""

from __future__ import annotations

from .stack import lora_checkpoint_parts

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


def _stored_bytes(path: str | None) -> int:
    """Bytes of the weight files at `path` (one file, or a folder searched recursively)."""
    import os

    if not path or not os.path.exists(path):
        return 0
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
               for f in files if f.endswith(WEIGHT_FILES))


def _fp32_bytes(path: str) -> int:
    """An adapter file as `from_pretrained` holds it (fp32 masters, whatever the file stores): a .safetensors
    header gives the element counts without loading anything; another file counts as stored."""
    if not path.endswith(".safetensors"):
        return _stored_bytes(path)
    import math

    from safetensors import safe_open

    with safe_open(path, "pt") as fh:
        return sum(4 * math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())


def estimated_bytes(flux_path: str, siglip_path: str, adapter_path: str | None = None) -> int:
    """About what `CalligrapherStack.from_pretrained` puts on its device for these paths (resolved ones), before
    loading anything: FLUX.1-Fill's and SigLIP's folders as stored (the release stores bf16, as it runs), the
    adapter in fp32 and, for a LoRA checkpoint, its base adapter plus the LoRA files."""
    lora_path, base, *_ = lora_checkpoint_parts(adapter_path, 0, 0, True)
    total = _stored_bytes(flux_path) + _stored_bytes(siglip_path) + _stored_bytes(lora_path)
    if base:
        from .tiny import resolve_adapter_name

        total += _fp32_bytes(resolve_adapter_name(base))
    return total
