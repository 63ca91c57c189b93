"""What a resume must agree with, checked before anything loads or is written (a refused start leaves the
run folder, its status.json included, as it was; a missing or unreadable checkpoint is not a refusal but
a failure of this start, reported later with status `failed`).

- The model, method and trainable set (checkpointing.check_resume), the resolution and the rewards: a
  different value changes what the run means, so it is refused unless --allow_changed_settings.
- Other differing settings (e.g. the learning rate) are legitimate changes: listed in the log.
- --max_train_steps at or below the checkpoint's step would train nothing: refused.
"""

from __future__ import annotations

import json
import logging
import os

from ..config import parse_reward_spec
from ..errors import UserError
from .checkpointing import check_resume, read_state, resolve_resume

logger = logging.getLogger("calligrapher_rl.training")

MEANING_KEYS = ("resolution", "rewards")  # beyond checkpointing.IDENTITY_KEYS
# Settings that differ between every two starts of one run, or only decide bookkeeping: never listed.
_BOOKKEEPING = {"output_dir", "resume_from_checkpoint", "overwrite_output_dir", "allow_changed_settings", "preset",
                "max_train_steps", "report_to", "logging_dir", "checkpointing_steps", "checkpoints_total_limit",
                "eval_steps", "eval_at_start", "num_eval_samples", "pause_timeout_s", "reward_server_url",
                "reward_timeout_s", "compile", "compile_scope", "gradient_checkpointing_skip_blocks", "train_data_json"}


def settings(cfg) -> dict:
    """What a checkpoint records (state.json `settings`) to be compared on resume."""
    return {k: getattr(cfg, k, None) for k in MEANING_KEYS}


def _recorded(ckpt: str, state: dict) -> tuple[dict, dict]:
    """(meaning settings, the whole configuration of the run that wrote the checkpoint, when known)."""
    run_json = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "run.json")
    try:
        with open(run_json, encoding="utf-8") as fh:
            full = json.load(fh)
        full = full if isinstance(full, dict) else {}
    except (OSError, ValueError):
        full = {}
    meaning = state.get("settings") if isinstance(state.get("settings"), dict) else {k: full.get(k) for k in MEANING_KEYS}
    return meaning, full


def _same(key: str, theirs, mine) -> bool:
    if key == "rewards" and isinstance(theirs, str) and isinstance(mine, str):
        try:
            return parse_reward_spec(theirs) == parse_reward_spec(mine)
        except UserError:
            return theirs == mine
    return theirs == mine


def refuse_mismatched_resume(cfg, *, custom_rewards: bool = False) -> None:
    """UserError when the run's checkpoint was made with other settings (see the module's docstring)."""
    try:
        ckpt = resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)
        if ckpt is None:
            return
        read_state(ckpt)
    except UserError:  # missing or unreadable: the trainer says so once it owns the status (failed)
        return
    check_resume_settings(cfg, ckpt, check_resume(cfg, ckpt), custom_rewards=custom_rewards)


def check_resume_settings(cfg, ckpt: str, state: dict, *, custom_rewards: bool = False) -> None:
    step = state["step"]
    if cfg.max_train_steps <= step:
        raise UserError(f"{cfg.max_train_steps} is at or below the checkpoint's step {step} ({ckpt}): nothing would "
                        "be trained; pass a larger --max_train_steps to train on", field="--max_train_steps")
    meaning, full = _recorded(ckpt, state)
    for key in MEANING_KEYS:
        theirs, mine = meaning.get(key), getattr(cfg, key, None)
        if theirs is None or mine is None or (key == "rewards" and custom_rewards) or _same(key, theirs, mine):
            continue
        if cfg.allow_changed_settings:
            logger.warning("--allow_changed_settings: resuming with --%s %s (the checkpoint's run had %s)", key, mine,
                           theirs)
            continue
        raise UserError(f"the checkpoint was trained with --{key} {theirs}, this run has {mine}, which changes what "
                        "the run means: resume with the checkpoint's value, or pass --allow_changed_settings to "
                        "continue with the new one", where=ckpt, field="--resume_from_checkpoint")
    mine_all = cfg.to_dict()
    changed = [f"{k} {full[k]!r} -> {mine_all[k]!r}" for k in sorted(full) if k in mine_all and k not in _BOOKKEEPING
               and k not in MEANING_KEYS and full[k] != mine_all[k]]
    if changed:
        logger.warning("resuming %s with changed settings: %s", ckpt, "; ".join(changed))
