"""Out of memory is the user's to fix, with a flag: one line naming the phase and what lowers the peak."""

from __future__ import annotations

import torch

from ..errors import UserError

# (flag, the value that lowers memory, why) in the order worth trying
_SAVINGS = (
    ("trainable", "lora", "train a LoRA instead of the full adapter (docs/lora.md)"),
    ("compile_update", False, "keep the update eager (compile only sampling)"),
    ("rl_num_images_per_prompt", None, "fewer images per rollout batch"),
    ("gradient_checkpointing", True, "recompute activations in the backward"),
    ("gradient_checkpointing_skip_blocks", 0, "recompute every block's activations"),
    ("use_8bit_adam", True, "8-bit AdamW moments"),
    ("snapshot_dtype", "bf16", "bf16 reference/old snapshots"),
    ("ema_on_cpu", True, "the EMA in host memory"),
    ("offload_text_encoder_two", True, "T5-XXL off the card"),
)


class OutOfGPUMemory(UserError):
    pass


def out_of_memory(cfg, phase: str, device) -> OutOfGPUMemory:
    """The one-line error of a run that ran out of GPU memory in `phase`, listing the flags of `cfg` that
    are not yet at their memory-saving value."""
    where = ""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        where = f" ({torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB peak of {total:.1f} GiB on {device})"
    hints = []
    for flag, value, _why in _SAVINGS:
        have = getattr(cfg, flag, None)
        if value is None:
            if isinstance(have, int) and have > 1:
                hints.append(f"--{flag} {max(1, have // 2)}")
        elif have != value and not (flag == "trainable" and have in ("lora", "attn")):
            hints.append(f"--{flag} {str(value).lower() if isinstance(value, bool) else value}")
    advice = f"; lower it with {', '.join(hints)}" if hints else ""
    return OutOfGPUMemory(f"out of GPU memory in the {phase or 'loading'} phase{where}{advice} "
                     f"(docs/benchmarks.md has each preset's peak)", field="--output_dir status")
