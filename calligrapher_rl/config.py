"""The training configuration: every flag of the user's guide, and run.json.

Precedence: dataclass defaults < preset file (`--preset NAME_OR_PATH`) < flags typed on the command line.
The guide's flags keep the guide's names and defaults (`RL_TRAINING_GUIDE.zh.md`); the extra fields are
what a correct implementation needs, each with a documented default. Checks live in `config_validate`;
reading values from outside (preset files, the command line: `parse_args`, `load_preset`, ...) lives in
`config_parse`, which imports this module.
No torch import here: the studio and `--help` load this module cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from calligrapher_rl import __version__
from calligrapher_rl.config_validate import ConfigError, has_type, parse_reward_spec, sde_window_bounds
from calligrapher_rl.config_validate import validate as _validate
from calligrapher_rl.config_validate import warnings as _warnings
from calligrapher_rl.errors import UserError

__all__ = ["TrainConfig", "parse_reward_spec", "ConfigError", "SEED_GUIDE_FLAGS", "VERSION_KEY", "FIELDS", "field_type",
           "coerce_values"]


VERSION_KEY = "calligrapher_rl_version"  # the package version, stored beside the fields in run.json
# Flags that were read by nothing and are gone; an earlier run's run.json may still hold them.
RETIRED_FIELDS = ("dataloader_num_workers", "tiny_width", "use_context")
DEFAULT_KL_BETA = {"grpo": 0.1, "nft": 0.01, "awm": 0.003}  # the guide's two; AWM's is its authors' (OCR)
DEFAULT_NUM_STYLE_TOKENS = 128  # the release's count

# Every flag the seed guide names (tensorboard's --logdir/--port and --help are not ours).
SEED_GUIDE_FLAGS = (
    "model_type", "pretrained_model_name_or_path", "siglip_path", "train_data_json", "output_dir",
    "resolution", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "max_train_steps",
    "mixed_precision", "gradient_checkpointing", "offload_text_encoder_two", "use_rl", "rl_method",
    "rl_warmup_steps", "rl_num_images_per_prompt", "rl_num_batches_per_epoch", "rl_num_inference_steps",
    "rl_guidance_scale", "rl_timestep_fraction", "rl_num_inner_epochs", "rl_adv_clip_max",
    "rl_per_prompt_stat_tracking", "rl_grpo_clip_range", "rl_kl_beta", "nft_beta", "nft_adv_mode",
    "nft_decay_type", "use_ema", "ema_decay", "ema_update_interval", "checkpointing_steps", "report_to",
    "initial_ip_adapter_path",
)


def _section(title: str):
    """A field factory whose fields are listed under `title` in --help."""

    def opt(default: Any, help: str, *, choices: tuple | None = None) -> Any:
        meta = {"help": help, "group": title}
        if choices is not None:
            meta["choices"] = tuple(choices)
        return field(default=default, metadata=meta)

    return opt


_MODEL = _section("model and data")
_OUT = _section("output, logging and checkpoints")
_OPTIM = _section("optimisation")
_RL = _section("RL (both methods)")
_SDE = _section("rollout sampler")
_GRPO = _section("GRPO")
_NFT = _section("DiffusionNFT")
_AWM = _section("AWM (Advantage Weighted Matching)")
_REWARD = _section("rewards")
_EMA = _section("EMA")
_EVAL = _section("evaluation")


@dataclass
class TrainConfig:
    """One training run. Build it with `parse_args`, check it with `validate()`, record it with `to_json()`."""

    # --- model and data ---
    model_type: str = _MODEL("flux", "base model family (FLUX.1-Fill)", choices=("flux",))
    pretrained_model_name_or_path: str | None = _MODEL(
        None, "FLUX.1-Fill-dev: a diffusers folder, a Hub id from the local Hugging Face cache "
              "(black-forest-labs/FLUX.1-Fill-dev), 'tiny-pretrained' (the shipped tiny that writes) or 'tiny' "
              "(the random tiny) (required)")
    siglip_path: str | None = _MODEL(None, "SigLIP so400m-patch14-384 (style encoder): a folder, a Hub id from the local "
                                           "cache, 'tiny-pretrained' or 'tiny' (required)")
    initial_ip_adapter_path: str | None = _MODEL(
        None, "style adapter to start from: the release's calligrapher.bin, a fork ip-adapter.bin or this "
              "project's .safetensors; none = random initialisation")
    num_style_tokens: int | None = _MODEL(
        None, "style tokens of the adapter; none = read from --initial_ip_adapter_path's shapes, else 128")
    use_qformer: bool = _MODEL(True, "style projection = MLP + QFormer (the release); false = the fork's MLP only")
    train_data_json: str | None = _MODEL(
        None, "dataset (.json/.jsonl file or folder), or 'bundled' for the bundled synthetic set (required)")
    resolution: int = _MODEL(512, "training image size in pixels (multiple of 16; the release trained at 512)")

    # --- output, logging and checkpoints ---
    output_dir: str | None = _OUT(None, "run directory: metrics.jsonl, logs/, samples/, checkpoint-*/, run.json (required)")
    logging_dir: str = _OUT("logs", "TensorBoard folder, relative to --output_dir")
    report_to: str = _OUT("tensorboard", "trackers, through accelerate: tensorboard (events in --logging_dir), wandb "
                                         "(pip install wandb), all (tensorboard + wandb if installed), none; "
                                         "metrics.jsonl is always written",
                          choices=("tensorboard", "wandb", "all", "none"))
    checkpointing_steps: int = _OUT(500, "save checkpoint-{step}/ every N optimizer steps")
    checkpoints_total_limit: int | None = _OUT(None, "keep only the newest N checkpoints; none = keep all")
    resume_from_checkpoint: str | None = _OUT(None, "'latest' (newest checkpoint in --output_dir) or a checkpoint folder")
    allow_changed_settings: bool = _OUT(False, "resume even though a setting that changes the run's meaning (resolution, "
                                               "rewards, method, model, trainable set) differs from the checkpoint's")
    overwrite_output_dir: bool = _OUT(False, "start a new run in a non-empty --output_dir, deleting the earlier run's "
                                             "metrics, logs, samples and checkpoints (without it such a start is refused)")
    seed: int = _OUT(42, "random seed of data order, rollout noise and initialisation")
    preset: str | None = _OUT(None, "preset name (presets/NAME.toml) or a .toml/.json file; typed flags override it")

    # --- optimisation ---
    train_batch_size: int = _OPTIM(
        1, "prompts per batch; an RL rollout batch holds train_batch_size x rl_num_images_per_prompt images")
    gradient_accumulation_steps: int = _OPTIM(1, "batches accumulated into one optimizer step")
    learning_rate: float = _OPTIM(1e-4, "AdamW learning rate")
    max_train_steps: int = _OPTIM(10000, "optimizer steps in all, supervised warmup included")
    lr_scheduler: str = _OPTIM("constant", "learning-rate schedule after --lr_warmup_steps (constant with warmup "
                                           "steps > 0 = diffusers' constant_with_warmup)",
                               choices=("constant", "cosine", "linear"))
    lr_warmup_steps: int = _OPTIM(0, "linear learning-rate warmup steps (not the same as --rl_warmup_steps)")
    rl_lr_warmup_steps: int | None = _OPTIM(None, "linear learning-rate warmup after RL resets AdamW's moments (RL "
                                                  "after a supervised warmup): without it the first RL steps are "
                                                  "sign-like steps of size lr on every weight; 0 = none; none = 10% "
                                                  "of the RL steps, between 1 and 20")
    use_8bit_adam: bool = _OPTIM(False, "8-bit AdamW moments (torchao, else bitsandbytes): 6 GB instead of 24 GB for the "
                                        "full adapter; CPU parameters keep fp32 AdamW")
    shard_optimizer_state: bool = _OPTIM(True, "on several processes, shard the AdamW moments across them (ZeRO-1, "
                                               "ZeroRedundancyOptimizer); checkpoints hold the consolidated state")
    snapshot_dtype: str = _OPTIM("fp32", "dtype of the reference/old policy snapshots on the device: bf16 halves them "
                                         "(their forwards run under bf16 autocast anyway; NFT's old-policy average "
                                         "then keeps an fp32 master in host memory)", choices=("fp32", "bf16"))
    ema_on_cpu: bool = _OPTIM(False, "keep the fp32 EMA of the trainable weights in host memory (each EMA update "
                                     "copies them over PCIe: pair with --ema_update_interval > 1)")
    compile: bool | None = _OPTIM(None, "torch.compile the frozen transformer, whole, static shapes (lazily: the first "
                                        "call of each shape compiles, about a minute on FLUX; kernels cached on disk); "
                                        "none = on with CUDA, off on CPU; false = eager")
    compile_update: bool = _OPTIM(True, "with --compile, compile the update's gradient forward/backward too; false "
                                        "compiles only the no-gradient sampling and keeps the update eager (less "
                                        "memory on a nearly full card: docs/benchmarks.md)")
    compile_scope: str = _OPTIM("whole", "with --compile, what a graph holds: whole = the whole transformer (the measured "
                                         "path); blocks = one double and one single block, each graph shared by every "
                                         "block of its kind (regional compilation: far less to compile at the start, "
                                         "the same speed once compiled: docs/benchmarks.md)",
                                choices=("whole", "blocks"))
    rollout_fp8: bool = _OPTIM(False, "sample NFT rollouts and evaluations with a float8 copy of the transformer "
                                      "(torchao, compute capability >= 8.9; +6 GB); GRPO rollouts stay in the "
                                      "training precision so their log-probs match the update's")
    rollout_fp8_scales: str = _OPTIM("row", "with --rollout_fp8, the float8 scales of weights and activations: one per "
                                            "row (closer to bf16) or one per tensor (less scaling work per matmul); "
                                            "speed and difference to bf16: docs/benchmarks.md", choices=("row", "tensor"))
    rollout_fp8_attention: str = _OPTIM("default", "with --rollout_fp8, the float8 copy's attention kernel: default "
                                                   "(torch's choice) or cudnn (cuDNN's fused attention, forward only: "
                                                   "the copy never runs a backward)", choices=("default", "cudnn"))
    rollout_fp8_fused_qkv: bool = _OPTIM(False, "with --rollout_fp8, the float8 copy computes each attention's query, "
                                                "key and value in one matmul (diffusers' fuse_projections; the live "
                                                "transformer is untouched); speed: docs/benchmarks.md")
    adam_beta1: float = _OPTIM(0.9, "AdamW beta1")
    adam_beta2: float = _OPTIM(0.999, "AdamW beta2")
    adam_weight_decay: float = _OPTIM(1e-4, "AdamW weight decay")
    adam_epsilon: float = _OPTIM(1e-8, "AdamW epsilon")
    max_grad_norm: float = _OPTIM(1.0, "gradient-norm clipping")
    mixed_precision: str = _OPTIM("no", "compute dtype of the frozen model (FLUX wants bf16); fp16 trains with "
                                        "dynamic loss scaling (a GradScaler)", choices=("no", "fp16", "bf16"))
    max_nonfinite_steps: int = _OPTIM(5, "optimizer steps in a row with a non-finite loss or gradient norm (each one "
                                         "skipped: no update, no EMA step), or RL epochs in a row with non-finite "
                                         "rollout samples, after which the run stops as failed")
    max_weight_norm_growth: float = _OPTIM(100.0, "the run fails as diverged once the trainable weight norm exceeds "
                                                  "this many times its value before the first update (no checkpoint "
                                                  "is written from such weights); 0 = no norm alarm")
    gradient_checkpointing: bool = _OPTIM(False, "recompute transformer activations in backward (less memory)")
    gradient_checkpointing_skip_blocks: int = _OPTIM(
        0, "with --gradient_checkpointing: the last N transformer blocks in forward order (FLUX: 19 double-stream, "
           "then 38 single-stream) are not checkpointed: their activations (and --lora_merged weights) are kept "
           "(memory, about one block's at the update's micro-batch each) instead of recomputed (time); 0 = every "
           "block checkpointed (docs/lora.md, Speed)")
    offload_text_encoder_two: bool = _OPTIM(False, "keep T5 off the GPU except while encoding prompts")
    trainable: str = _OPTIM("all", "what trains: all = whole style adapter, attn = only to_k_ip/to_v_ip, "
                                   "proj = only the style projections, lora = LoRA layers (peft) on --lora_target "
                                   "(docs/lora.md)", choices=("all", "attn", "proj", "lora"))
    lora_target: str = _OPTIM("both", "with --trainable lora: where the LoRA layers go (the transformer's LoRA is what "
                                      "can change how FLUX spells)", choices=("adapter", "transformer", "both"))
    lora_rank: int = _OPTIM(32, "with --trainable lora: LoRA rank r (Flow-GRPO, DiffusionNFT: 32)")
    lora_alpha: float = _OPTIM(64.0, "with --trainable lora: LoRA alpha; the update is scaled by alpha / r "
                                     "(Flow-GRPO, DiffusionNFT: 64)")
    lora_dropout: float = _OPTIM(0.0, "with --trainable lora: dropout on the LoRA input, in [0, 1)")
    lora_modules: str | None = _OPTIM(
        None, "with --trainable lora: comma-separated module names (peft target_modules, suffix match); none = "
              "Flow-GRPO's FLUX list (attention projections + feed-forwards) on the transformer, to_k_ip/to_v_ip + "
              "the projection linears on the adapter")
    lora_merged: bool = _OPTIM(
        False, "with --trainable lora: each transformer LoRA layer runs as one matmul with W + (alpha/r) B A, "
               "recomputed at every call from the live LoRA weights (its backward gives the LoRA its gradient from "
               "rank-r products), instead of peft's second pass over the layer's input; rollouts and updates use "
               "the same numbers, so GRPO's log-probabilities agree. The merged weight is rounded to the base's "
               "precision, as a fused LoRA is at inference. (docs/lora.md, Speed)")
    ip_adapter_scale: float = _OPTIM(1.0, "style strength: weight of the style attention (release: 1.0, range 0-2)")

    # --- RL (both methods) ---
    use_rl: bool = _RL(False, "online RL after --rl_warmup_steps supervised steps (off = supervised only)")
    rl_method: str = _RL("grpo", "RL algorithm: grpo (Flow-GRPO), nft (DiffusionNFT), awm (Advantage Weighted "
                                 "Matching)", choices=("grpo", "nft", "awm"))
    rl_warmup_steps: int = _RL(1000, "supervised steps before RL starts")
    rl_num_images_per_prompt: int = _RL(1, "group size: images rolled out per prompt (>= 2 with --use_rl)")
    rl_num_batches_per_epoch: int = _RL(1, "rollout batches per RL epoch (advantages are computed per epoch)")
    rl_num_inference_steps: int = _RL(50, "sampler steps of a training rollout")
    rl_guidance_scale: float = _RL(3.5, "FLUX guidance embedding, used in rollout, training and evaluation "
                                        "(the FLUX-Fill release uses 30)")
    rl_timestep_fraction: float = _RL(1.0, "fraction of the rollout's steps that are trained, in (0, 1]")
    rl_num_inner_epochs: int = _RL(1, "passes over each epoch's rollouts")
    rl_adv_clip_max: float = _RL(5.0, "advantages are clipped to [-max, max]")
    rl_per_prompt_stat_tracking: bool = _RL(False, "normalise rewards per prompt (group) instead of per batch")
    rl_global_std: bool = _RL(False, "with per-prompt tracking: divide by the std of all rewards of the batch")
    rl_kl_beta: float | None = _RL(None, "KL weight towards the policy at the start of RL; none = 0.1 for grpo, "
                                         "0.01 for nft (the guide's defaults), 0.003 for awm (its authors' OCR value)")

    # --- rollout sampler ---
    rl_noise_level: float = _SDE(0.7, "SDE noise level a of rollouts (0 = deterministic ODE; GRPO needs > 0)")
    rl_sde_type: str = _SDE("sde", "stochastic step: sde (Flow-GRPO) or cps (coefficients-preserving)",
                            choices=("sde", "cps"))
    rl_sde_window_size: int = _SDE(0, "stochastic, trained steps per rollout in a window; 0 = all steps")
    rl_sde_window_range: str | None = _SDE(
        None, "'lo,hi': the window lies inside steps [lo, hi), its start drawn in [lo, hi - size]; hi <= N - 1 "
              "(the last step is never stochastic); none = '0,max(N/2, size)' when a window is used")

    # --- GRPO ---
    rl_grpo_clip_range: float = _GRPO(0.2, "PPO ratio clip epsilon")
    rl_grpo_ratio_norm: bool = _GRPO(
        False, "GRPO-Guard's RatioNorm (sde steps only): each step's log-ratio is de-biased and scaled by the step's "
               "std, and its loss reweighted by 1/|dt|; the ratio's scale changes (its authors clip at 2e-6)")

    # --- DiffusionNFT ---
    nft_beta: float = _NFT(0.5, "mixing of current and old velocity (> 0)")
    nft_adv_mode: str = _NFT("normal", "advantage transform before the optimality probability",
                             choices=("normal", "positive_only", "negative_only", "one_only", "binary"))
    nft_decay_type: int = _NFT(
        0, "old (rollout) model after each epoch: old <- eta old + (1 - eta) current, eta from the count of RL "
           "optimizer steps (warmup not counted): 0 = eta 0, the old model becomes the current one; 1 = "
           "min(0.001 step, 0.5); 2 = eta 0 for 75 steps, then min(0.0075 (step - 75), 0.999), lagging ever more",
        choices=(0, 1, 2))
    nft_num_timesteps: int | None = _NFT(
        None, "timesteps trained per sample; none = int(rl_num_inference_steps x rl_timestep_fraction)")

    # --- AWM ---
    awm_num_timesteps: int | None = _AWM(
        None, "timesteps trained per rollout, one in each of as many strata of schedule indices [1, "
              "int(rl_num_inference_steps x rl_timestep_fraction)); none = min(6, that count - 1)")
    awm_weighting: str = _AWM("ghuber", "weight of the flow-matching error e in the log-likelihood surrogate: uniform "
                                        "(-e), t, t2, huber, ghuber (-t ((e + 1e-10)^p - 1e-10^p) / p)",
                              choices=("uniform", "t", "t2", "huber", "ghuber"))
    awm_ghuber_power: float = _AWM(0.25, "power p of the ghuber weighting (> 0)")
    awm_advantage_max: float = _AWM(1.0, "advantages are rescaled from [-rl_adv_clip_max, rl_adv_clip_max] to "
                                         "[-max, max]")
    awm_clip_range: float = _AWM(1.0, "PPO clip of the surrogate ratio (1 = the authors' loose clip)")
    awm_ema_kl_beta: float = _AWM(1.0, "weight of the velocity MSE to the EMA policy (a slowly following copy of "
                                       "the weights, updated after each epoch); 0 = off")
    awm_ema_kl_decay: float = _AWM(0.3, "decay of the EMA policy, in [0, 1]")
    awm_ema_kl_decay_type: str = _AWM("linear", "linear = min(decay, 0.001 x RL optimizer steps), constant = decay",
                                      choices=("linear", "constant"))

    # --- rewards ---
    rewards: str = _REWARD("ocr:0.7,style:0.3", "weighted reward sum 'name:weight,...' (a bare name weighs 1)")
    reward_server_url: str | None = _REWARD(None, "reward server(s) 'URL[,URL]'; none = score in this process")
    reward_timeout_s: float = _REWARD(60.0, "timeout of one reward server request (--reward_server_url) or VLM-judge "
                                            "call, in seconds")
    rl_reward_failure_limit: float = _REWARD(
        0.1, "fraction of failed reward calls in an epoch above which the run pauses (failed samples are "
             "left out of the update, never scored 0)")
    pause_timeout_s: float = _REWARD(1800.0, "a run paused by reward failures ends failed (its checkpoint kept) after "
                                             "this many seconds without control/resume; 0 = wait for the user")

    # --- EMA ---
    use_ema: bool = _EMA(False, "keep an EMA of the trainable weights (used for evaluation, saved beside the raw ones)")
    ema_decay: float = _EMA(0.9999, "EMA decay in [0, 1) (guide: 0.9999 for GRPO, 0.999 for NFT)")
    ema_update_interval: int = _EMA(1, "fold the weights into the EMA every N optimizer steps (the horizon in steps "
                                       "does not change: a fold weighs N steps)")
    checkpoint_averages_dtype: str = _EMA("fp32", "dtype the averages (the EMA, NFT's old policy) are written in: bf16 "
                                                   "halves them (6 GB instead of 12 each for the full adapter); their "
                                                   "forwards run in bf16, and a resume continues the fp32 averages from "
                                                   "the rounded values; fp32 resumes bit-exactly", choices=("fp32", "bf16"))

    # --- evaluation ---
    eval_steps: int = _EVAL(100, "write a sample grid every N steps (0 = never)")
    num_eval_samples: int = _EVAL(4, "fixed evaluation examples in each grid")
    num_eval_noises: int = _EVAL(1, "initial noises per evaluation example (the same at every evaluation): the eval "
                                    "reward is a mean over num_eval_samples x this many samples (docs/evaluation.md)")
    eval_at_start: bool = _EVAL(True, "step-0 baseline grid before any update")
    sample_prompts: str | None = _EVAL(None, "your texts to paint during training, separated by '|' (samples/prompts/)")
    sample_references: str | None = _EVAL(None, "style reference images of the sample prompts, '|'-separated, one per "
                                                 "text ('' = the first example's own)")
    sample_prompts_steps: int = _EVAL(0, "paint the sample prompts every N steps, with fixed seeds (0 = never)")
    rl_eval_num_inference_steps: int | None = _EVAL(None, "sampler steps of evaluation; none = --rl_num_inference_steps")

    # ----------------------------------------------------------------------------------------------------
    def resolved(self) -> "TrainConfig":
        """A copy with derived defaults filled in (idempotent)."""
        n = self.rl_num_inference_steps
        upd: dict[str, Any] = {}
        if self.rl_kl_beta is None and self.rl_method in DEFAULT_KL_BETA:
            upd["rl_kl_beta"] = DEFAULT_KL_BETA[self.rl_method]
        if self.rl_eval_num_inference_steps is None:
            upd["rl_eval_num_inference_steps"] = n
        if self.rl_sde_window_size and self.rl_sde_window_range is None and isinstance(n, int):
            upd["rl_sde_window_range"] = f"0,{max(n // 2, self.rl_sde_window_size)}"  # validation checks the room
        if self.nft_num_timesteps is None and isinstance(n, int) and isinstance(self.rl_timestep_fraction, (int, float)):
            upd["nft_num_timesteps"] = max(1, int(n * self.rl_timestep_fraction))
        if self.rl_lr_warmup_steps is None and isinstance(self.max_train_steps, int) and isinstance(self.rl_warmup_steps, int):
            upd["rl_lr_warmup_steps"] = min(20, max(1, (self.max_train_steps - self.rl_warmup_steps) // 10))
        if self.awm_num_timesteps is None and isinstance(n, int) and isinstance(self.rl_timestep_fraction, (int, float)):
            upd["awm_num_timesteps"] = max(1, min(6, int(n * self.rl_timestep_fraction) - 1))
        if self.num_style_tokens is None and not self.initial_ip_adapter_path:
            upd["num_style_tokens"] = DEFAULT_NUM_STYLE_TOKENS
        return dataclasses.replace(self, **upd) if upd else self

    def validate(self) -> "TrainConfig":
        """Raise ConfigError (a UserError: one line naming the flag) on the first bad value; returns self."""
        _validate(self)
        return self

    def warnings(self) -> list[str]:
        """Legal but probably unintended settings, one line each (the trainer prints them)."""
        return _warnings(self)

    def reward_weights(self) -> dict[str, float]:
        return parse_reward_spec(self.rewards)

    def sde_window(self) -> tuple[int, int] | None:
        """(lo, hi) of the SDE window's range, or None when every step is stochastic."""
        return sde_window_bounds(self.resolved())

    def num_trained_timesteps(self) -> int:
        """Trained timesteps per rollout sample: the window, or the fraction (GRPO); nft_num_timesteps (NFT);
        awm_num_timesteps (AWM)."""
        r = self.resolved()
        if r.rl_method == "nft":
            return r.nft_num_timesteps
        if r.rl_method == "awm":
            return r.awm_num_timesteps
        return r.rl_sde_window_size or max(1, int(r.rl_num_inference_steps * r.rl_timestep_fraction))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.resolved()), VERSION_KEY: __version__}

    def to_json(self) -> str:
        """run.json: the full resolved configuration and the package version."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | dict, where: str = "run.json") -> "TrainConfig":
        """Read run.json (text or parsed dict); unknown keys and wrong types are UserErrors."""
        if isinstance(text, dict):
            data = dict(text)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"not valid JSON ({exc})", where=where) from None
        if not isinstance(data, dict):
            raise UserError("expected a JSON object of flag values", where=where)
        data.pop(VERSION_KEY, None)
        for key in RETIRED_FIELDS:
            data.pop(key, None)
        return cls(**coerce_values(data, where, allow_preset=True))


# ---------------------------------------------------------------------------------------------------------
# Types of the fields
_HINTS = typing.get_type_hints(TrainConfig)
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def field_type(name: str) -> tuple[type, bool]:
    """(base type, optional) of a field's annotation."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    if args:  # X | None
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _type_name(name: str) -> str:
    base, optional = field_type(name)
    return base.__name__ + (" or null" if optional else "")


def coerce_values(data: dict[str, Any], where: str, *, allow_preset: bool = False) -> dict[str, Any]:
    """Check the keys and value types of a preset / run.json mapping; ints are accepted for floats."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key == "preset" and not allow_preset:
            raise UserError("a preset cannot name another preset", where=where, field=key)
        if key not in FIELDS:
            raise UserError("unknown key (not a flag of calligrapher_rl.train); see --help", where=where, field=key)
        base, optional = field_type(key)
        if value is None and optional:
            out[key] = None
            continue
        if key == "rl_sde_window_range" and isinstance(value, list) and len(value) == 2 \
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            value = f"{value[0]},{value[1]}"
        if not has_type(value, base):
            raise UserError(f"expected {_type_name(key)}, got {type(value).__name__} {value!r}", where=where, field=key)
        out[key] = float(value) if base is float else value
    return out
