"""`checkpoint-0/`: every run keeps the weights it started from, so "before vs after" is always one comparison.

Started from a file (`--initial_ip_adapter_path`, or the shipped tiny-pretrained adapter): a pointer to it
(`initial-adapter.json`, models/adapter_refs.py), a few hundred bytes even when the file is 12 GB. Started
from the seeded random init: the weights themselves. The folder has no `trainer_state/`, so it is neither a
resume point (`--resume_from_checkpoint latest`) nor counted or deleted by `--checkpoints_total_limit`.
"""

from __future__ import annotations

import json
import logging
import os

from ..atomic import atomic_dir
from ..models.adapter_refs import POINTER, pointer_record
from ..models.checkpoints import save_adapter_files
from .callbacks import TrainerCallback

logger = logging.getLogger("calligrapher_rl.training")

NAME = "checkpoint-0"


def initial_adapter_source(cfg) -> str | None:
    """The adapter file a run starts from, as the user named it (None: the seeded random init)."""
    from ..models.tiny import PRETRAINED_NAME

    if cfg.initial_ip_adapter_path:
        return cfg.initial_ip_adapter_path
    if cfg.pretrained_model_name_or_path == PRETRAINED_NAME:  # the name stands for its whole stack
        return PRETRAINED_NAME
    return None


def write_starting_point(run_dir: str, cfg, adapter_state: dict) -> str:
    """Write `run_dir/checkpoint-0/` (once: an existing one is kept) and return its path."""
    final = os.path.join(run_dir, NAME)
    if os.path.isdir(final):
        return final
    source = initial_adapter_source(cfg)
    with atomic_dir(final) as tmp:
        if source is not None:
            from ..models.adapter_refs import resolve_adapter_path
            from ..models.tiny import resolve_adapter_name

            record = pointer_record(resolve_adapter_path(resolve_adapter_name(source)), source)
            with open(os.path.join(tmp, POINTER), "w", encoding="utf-8") as fh:
                json.dump(record, fh, indent=1)
        else:
            save_adapter_files(tmp, adapter_state)
    logger.info("kept the starting point in %s (%s)", final, f"points at {source}" if source else "its weights")
    return final


class StartingPointCallback(TrainerCallback):
    """Writes checkpoint-0 when a run begins at step 0 (main process only)."""

    def on_train_begin(self, trainer) -> None:
        if trainer.step == 0 and trainer.is_main:
            write_starting_point(trainer.cfg.output_dir, trainer.cfg, trainer.stack.adapter.state_dict())
