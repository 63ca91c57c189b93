"""Checks of a TrainConfig: one-line errors naming the flag and the expectation, and soft warnings.

Works on any TrainConfig-shaped dataclass (no import of `config`, which imports this module).
Paths are not checked here (a preset's placeholders validate); the loaders report missing files.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any

from calligrapher_rl.errors import UserError

_REWARD_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")
REQUIRED = ("pretrained_model_name_or_path", "siglip_path", "train_data_json", "output_dir")


class ConfigError(UserError):
    """A bad flag value: `--flag: expectation, got value`. `.flag` names the field."""

    def __init__(self, flag: str, message: str):
        super().__init__(message, field=f"--{flag}")
        self.flag = flag


def _fail(flag: str, expectation: str, value: Any) -> None:
    raise ConfigError(flag, f"{expectation}, got {value!r}")


def parse_reward_spec(spec: str, flag: str = "rewards", known: list[str] | None = None) -> dict[str, float]:
    """'ocr:0.7,style:0.3' -> {'ocr': 0.7, 'style': 0.3}; a bare name weighs 1.

    The one parser of the reward spec: the config checks the syntax; the reward registry passes
    `known` (its registered names) so an unknown name lists the valid ones.
    """
    expect = "expected NAME[:WEIGHT],... (e.g. ocr:0.7,style:0.3)"
    valid = f" (valid: {', '.join(known)})" if known is not None else ""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(flag, f"no reward given; {expect}{valid}, got {spec!r}")
    weights: dict[str, float] = {}
    for part in spec.split(","):
        if not part.strip():
            raise ConfigError(flag, f"empty entry in {spec!r}; {expect}")
        name, sep, weight = part.strip().partition(":")
        name = name.strip()
        if not _REWARD_NAME.match(name):
            _fail(flag, f"{expect}; reward names are lowercase words", spec)
        if known is not None and name not in known:
            raise ConfigError(flag, f"unknown reward {name!r}{valid}")
        if name in weights:
            raise ConfigError(flag, f"reward {name!r} given twice in {spec!r}")
        try:
            w = float(weight) if sep else 1.0
        except ValueError:
            w = math.nan
        if not math.isfinite(w):
            raise ConfigError(flag, f"weight {weight.strip()!r} of {name!r} is not a finite number")
        weights[name] = w
    if not any(weights.values()):
        _fail(flag, "at least one reward weight must be non-zero", spec)
    return weights


def sde_window_bounds(cfg) -> tuple[int, int] | None:
    """(lo, hi) of --rl_sde_window_range, or None when there is no window."""
    if not cfg.rl_sde_window_size or cfg.rl_sde_window_range is None:
        return None
    parts = str(cfg.rl_sde_window_range).split(",")
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        _fail("rl_sde_window_range", "expected 'lo,hi' (two integers)", cfg.rl_sde_window_range)
    return lo, hi


def has_type(value: Any, base: type) -> bool:
    """isinstance, except that bool is not an int and an int is a float."""
    if base in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if base is float else isinstance(value, base)


def _check_types(cfg) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if value is None:
            if not args:
                _fail(f.name, f"expected {base.__name__}", value)
            continue
        if not has_type(value, base) or (base is float and not math.isfinite(value)):
            _fail(f.name, f"expected a{'' if base is not float else ' finite'} {base.__name__}", value)
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            _fail(f.name, f"expected one of {', '.join(map(str, f.metadata['choices']))}", value)


def validate(cfg) -> None:
    """Raise ConfigError on the first bad value. Checks the resolved configuration."""
    _check_types(cfg)
    c = cfg.resolved()
    for name in REQUIRED:
        if not (getattr(c, name) or "").strip():
            _fail(name, "required (see --help)", getattr(c, name))

    def need(ok: bool, flag: str, expectation: str) -> None:
        if not ok:
            _fail(flag, expectation, getattr(c, flag))

    need(c.resolution % 16 == 0 and c.resolution >= 32, "resolution", "must be a multiple of 16 and at least 32")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "rl_num_images_per_prompt",
                 "rl_num_batches_per_epoch", "rl_num_inference_steps", "rl_eval_num_inference_steps",
                 "rl_num_inner_epochs", "checkpointing_steps", "num_eval_samples", "num_eval_noises",
                 "ema_update_interval", "max_nonfinite_steps"):
        need(getattr(c, name) >= 1, name, "must be at least 1")
    for name in ("rl_warmup_steps", "lr_warmup_steps", "rl_lr_warmup_steps", "eval_steps", "rl_sde_window_size",
                 "sample_prompts_steps"):
        need(getattr(c, name) >= 0, name, "must be >= 0")
    for name in ("checkpoints_total_limit", "num_style_tokens", "nft_num_timesteps", "awm_num_timesteps"):
        need(getattr(c, name) is None or getattr(c, name) >= 1, name, "must be at least 1 or none")
    need(0 <= c.seed < 2**32, "seed", "must be in [0, 2^32)")

    # optimisation
    for name in ("learning_rate", "adam_epsilon", "max_grad_norm", "reward_timeout_s"):
        need(getattr(c, name) > 0, name, "must be > 0")
    for name in ("adam_beta1", "adam_beta2"):
        need(0 <= getattr(c, name) < 1, name, "must be in [0, 1)")
    need(c.adam_weight_decay >= 0, "adam_weight_decay", "must be >= 0")
    need(c.max_weight_norm_growth == 0 or c.max_weight_norm_growth > 1, "max_weight_norm_growth", "must be > 1, or 0 (off)")
    need(c.ip_adapter_scale >= 0, "ip_adapter_scale", "must be >= 0")
    need(c.gradient_checkpointing_skip_blocks >= 0, "gradient_checkpointing_skip_blocks", "must be >= 0")
    need(c.gradient_checkpointing or not c.gradient_checkpointing_skip_blocks, "gradient_checkpointing_skip_blocks",
         "is read only with --gradient_checkpointing (without it no block is checkpointed)")
    if not c.rollout_fp8:
        need(c.rollout_fp8_scales == "row", "rollout_fp8_scales", "is read only with --rollout_fp8 true")
        need(c.rollout_fp8_attention == "default", "rollout_fp8_attention", "is read only with --rollout_fp8 true")
        need(not c.rollout_fp8_fused_qkv, "rollout_fp8_fused_qkv", "is read only with --rollout_fp8 true")

    _check_lora(c, need)

    # RL
    n = c.rl_num_inference_steps
    need(0 < c.rl_timestep_fraction <= 1, "rl_timestep_fraction", "must be in (0, 1]")
    need(int(n * c.rl_timestep_fraction) >= 1, "rl_timestep_fraction",
         f"trains no step: rl_num_inference_steps ({n}) x fraction must be at least 1")
    need(c.rl_grpo_clip_range > 0, "rl_grpo_clip_range", "must be > 0")
    need(c.rl_adv_clip_max > 0, "rl_adv_clip_max", "must be > 0")
    need(c.rl_kl_beta >= 0, "rl_kl_beta", "must be >= 0")
    need(c.rl_guidance_scale >= 0, "rl_guidance_scale", "must be >= 0")
    need(c.nft_beta > 0, "nft_beta", "must be > 0")
    need(0 <= c.ema_decay < 1, "ema_decay", "must be in [0, 1)")
    need(c.rl_noise_level >= 0, "rl_noise_level", "must be >= 0")
    need(c.rl_sde_type != "cps" or c.rl_noise_level <= 1, "rl_noise_level", "must be <= 1 with --rl_sde_type cps")
    need(0 <= c.rl_reward_failure_limit <= 1, "rl_reward_failure_limit", "must be a fraction in [0, 1]")
    need(c.pause_timeout_s >= 0, "pause_timeout_s", "must be >= 0 (0 = wait for the user)")
    if c.use_rl:
        need(c.rl_num_images_per_prompt >= 2, "rl_num_images_per_prompt",
             "must be at least 2 with --use_rl (advantages compare the images of one prompt; the guide "
             "recommends 4-8)")
        need(c.rl_method != "grpo" or c.rl_noise_level > 0, "rl_noise_level",
             "must be > 0 for GRPO (a deterministic step has no log-probability to optimise)")
    # the last step (into sigma 0) is never stochastic: a window fits in the first n - 1 steps
    need(c.rl_sde_window_size <= n - 1, "rl_sde_window_size",
         f"must be <= rl_num_inference_steps - 1 ({n - 1}; the last step is never stochastic)")
    bounds = sde_window_bounds(c)
    if bounds is not None:
        lo, hi = bounds
        need(0 <= lo and lo + c.rl_sde_window_size <= hi <= n - 1, "rl_sde_window_range",
             f"has no room for the window: need 0 <= lo and lo + window ({c.rl_sde_window_size}) <= hi <= "
             f"steps - 1 ({n - 1}; the last step is never stochastic)")
    need(c.nft_num_timesteps <= n, "nft_num_timesteps", f"must be <= rl_num_inference_steps ({n})")
    _validate_awm_and_guard(c, need)

    # rewards
    parse_reward_spec(c.rewards)
    if c.reward_server_url is not None:
        urls = [u.strip() for u in c.reward_server_url.split(",")]
        need(all(re.match(r"^https?://[^\s/]+", u) for u in urls), "reward_server_url",
             "expected 'http(s)://host:port[,...]'")
    need(c.resume_from_checkpoint is None or bool(c.resume_from_checkpoint.strip()), "resume_from_checkpoint",
         "expected 'latest' or a checkpoint folder")


def _validate_awm_and_guard(c, need) -> None:
    """AWM's flags and GRPO-Guard's constraint."""
    room = int(c.rl_num_inference_steps * c.rl_timestep_fraction) - 1
    need(c.rl_method != "awm" or c.awm_num_timesteps <= room, "awm_num_timesteps",
         f"must be <= int(rl_num_inference_steps x rl_timestep_fraction) - 1 ({room}): one timestep per stratum of "
         "schedule indices [1, that), the pure-noise index 0 excluded")
    for name in ("awm_ghuber_power", "awm_advantage_max", "awm_clip_range"):
        need(getattr(c, name) > 0, name, "must be > 0")
    need(c.awm_ema_kl_beta >= 0, "awm_ema_kl_beta", "must be >= 0")
    need(0 <= c.awm_ema_kl_decay <= 1, "awm_ema_kl_decay", "must be in [0, 1]")
    need(not c.rl_grpo_ratio_norm or c.rl_sde_type == "sde", "rl_grpo_ratio_norm",
         "needs --rl_sde_type sde (GRPO-Guard normalises the sde step's Gaussian log-ratio)")


def _check_lora(c, need) -> None:
    """--lora_* flags: sane values, given only with --trainable lora, and what LoRA cannot combine with."""
    lora = c.trainable == "lora"
    need(c.lora_rank >= 1, "lora_rank", "must be at least 1")
    need(c.lora_alpha > 0, "lora_alpha", "must be > 0")
    need(0 <= c.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
    if c.lora_modules is not None:
        need(lora, "lora_modules", "is read only with --trainable lora")
        need(bool([m for m in c.lora_modules.split(",") if m.strip()]), "lora_modules",
             "expected comma-separated module names (e.g. attn.to_q,attn.to_v)")
    if c.lora_merged:
        need(lora, "lora_merged", "is read only with --trainable lora")
        need(c.lora_dropout == 0, "lora_merged", "needs --lora_dropout 0 (a merged weight cannot drop inputs)")
    if lora and c.lora_target != "adapter":
        # the float8 copy is built from the plain transformer's state dict: it would sample without the LoRA
        need(not c.rollout_fp8, "rollout_fp8", "cannot sample a transformer LoRA (--lora_target adapter, or false)")


def warnings(cfg) -> list[str]:
    """Legal settings that are probably a mistake, one line each."""
    c, out = cfg.resolved(), []
    real_flux = c.pretrained_model_name_or_path not in (None, "tiny")
    if c.use_rl and c.max_train_steps <= c.rl_warmup_steps:
        out.append(f"--max_train_steps {c.max_train_steps} <= --rl_warmup_steps {c.rl_warmup_steps}: "
                   "no RL step will run")
    if real_flux and c.rl_guidance_scale < 10:
        out.append(f"--rl_guidance_scale {c.rl_guidance_scale}: FLUX.1-Fill and the Calligrapher release use 30")
    if real_flux and c.mixed_precision == "fp16":
        out.append("--mixed_precision fp16: FLUX activations overflow in fp16; use bf16")
    if c.use_rl and c.rl_method == "grpo" and c.rl_sde_type == "cps" and c.rl_grpo_clip_range > 1e-3:
        out.append("--rl_sde_type cps: its log-probabilities drop the constants; use a clip range near 1e-5")
    ships_adapter = c.pretrained_model_name_or_path == "tiny-pretrained"  # the name loads its pretrained adapter
    if c.use_rl and not c.initial_ip_adapter_path and not ships_adapter and c.rl_warmup_steps == 0:
        out.append("RL from a randomly initialised style adapter with no supervised warmup")
    return out
