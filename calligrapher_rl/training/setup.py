"""Building a run's parts from a validated config: accelerator, stack, data, rewards, optimizer."""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from ..config import TrainConfig
from ..errors import UserError

logger = logging.getLogger("calligrapher_rl.training")

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def tracker_names(report_to: str) -> list[str]:
    """--report_to -> accelerate tracker names; `wandb` must be installed, `all` takes it only if it is."""
    import importlib.util

    has_wandb = importlib.util.find_spec("wandb") is not None
    if report_to == "wandb" and not has_wandb:
        raise UserError("wandb is not installed (pip install wandb), or use tensorboard", field="--report_to")
    return {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"],
            "all": ["tensorboard"] + (["wandb"] if has_wandb else [])}[report_to]


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.tracking import TensorBoardTracker
    from accelerate.utils import ProjectConfiguration

    # Gradient accumulation and sync are done by the loop itself (see distributed.py).
    # cpu=True on a machine without CUDA lets `accelerate launch --multi_gpu` (torchrun) run gloo processes.
    # TensorBoard writes straight into <output_dir>/<logging_dir> (run name ""), where the docs say it is.
    logging_dir = os.path.join(cfg.output_dir, cfg.logging_dir)
    log_with = [TensorBoardTracker("", logging_dir) if name == "tensorboard" else name
                for name in tracker_names(cfg.report_to)]
    configure_cuda_allocator()
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(), log_with=log_with or None,
                      project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=logging_dir))
    if acc.device.type == "cuda":
        # cuDNN SDPA backward fails on FLUX's attention shapes on torch 2.11/cu130 (docs/gpu-notes.md).
        torch.backends.cuda.enable_cudnn_sdp(False)
        limit_gpu_memory(acc.device)
    return acc


def configure_cuda_allocator() -> None:
    """Expandable segments unless the user configured the allocator: a run near the card's capacity
    otherwise fragments the cache, and each failed cudaMalloc frees and retries (a device-wide sync) -
    the retries show as `sys/alloc_retries`. Must run before the first CUDA allocation."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def limit_gpu_memory(device) -> None:
    """CALLIGRAPHER_GPU_MEMORY_GIB caps this process's GPU memory (e.g. 78 on a 141 GB card, to check that a
    preset fits an 80 GB one: docs/benchmarks.md). Allocations past the cap fail as out of memory."""
    cap = os.environ.get("CALLIGRAPHER_GPU_MEMORY_GIB")
    if not cap:
        return
    try:
        gib = float(cap)
    except ValueError:
        raise UserError(f"expected a number of GiB, got {cap!r}", field="CALLIGRAPHER_GPU_MEMORY_GIB") from None
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), device)
    logger.info("GPU memory capped at %.1f GiB of %.1f (CALLIGRAPHER_GPU_MEMORY_GIB)", gib, total / 2**30)


def start_trackers(acc, cfg: TrainConfig) -> None:
    """accelerate's init_trackers on the main process: the run's configuration as hyperparameters."""
    if acc.log_with:
        name = os.path.basename(os.path.abspath(cfg.output_dir))
        acc.init_trackers("calligrapher-rl", config=cfg.to_dict(),
                          init_kwargs={"wandb": {"name": name, "dir": cfg.output_dir}})


def autocast_for(accelerator, cfg: TrainConfig):
    """Autocast of the frozen model's dtype around forwards; nothing in fp32 runs."""
    if cfg.mixed_precision == "no":
        return contextlib.nullcontext
    return accelerator.autocast


def build_stack(cfg: TrainConfig, device):
    from accelerate.utils import set_seed

    from ..models.stack import CalligrapherStack

    set_seed(cfg.seed)  # python/numpy/torch global RNGs; the loop itself draws from (seed, step) streams
    if cfg.model_type != "flux":  # the only family the style adapter is written for
        raise UserError(f"unsupported model family {cfg.model_type!r}", field="--model_type")
    stack = CalligrapherStack.from_pretrained(
        cfg.pretrained_model_name_or_path, cfg.siglip_path, adapter_path=cfg.initial_ip_adapter_path,
        device=device, dtype=DTYPES[cfg.mixed_precision], num_style_tokens=cfg.num_style_tokens or 128,
        use_qformer=cfg.use_qformer, offload_text_encoder_two=cfg.offload_text_encoder_two, seed=cfg.seed,
    )
    if cfg.trainable == "lora":  # before compiling: the compiled graphs include the LoRA layers
        from ..models.lora import LoraSpec, add_lora
        from ..models.lora_merged import skip_input_casts, use_merged_lora

        add_lora(stack.pipe.transformer, stack.adapter, LoraSpec.from_config(cfg))
        if cfg.mixed_precision != "no":  # every forward of the run is under autocast (autocast_for)
            skip_input_casts(stack.pipe.transformer)
            skip_input_casts(stack.adapter)
        if cfg.lora_merged:  # the transformer's layers: the adapter's see only the style tokens
            use_merged_lora(stack.pipe.transformer)
    if cfg.gradient_checkpointing:  # the last --gradient_checkpointing_skip_blocks blocks keep their activations
        from ..models.acceleration import enable_gradient_checkpointing

        enable_gradient_checkpointing(stack.pipe.transformer, cfg.gradient_checkpointing_skip_blocks)
    if cfg.rollout_fp8:
        # a one-line error without a CUDA card of capability >= 8.9 or torchao
        stack.enable_fp8_rollouts(cfg.rollout_fp8_scales, cfg.rollout_fp8_attention, cfg.rollout_fp8_fused_qkv)
    if cfg.compile or (cfg.compile is None and stack.device.type == "cuda"):
        if stack.device.type != "cuda":
            logger.warning("--compile: compiling on %s (slow to start; meant for CUDA)", stack.device.type)
        stack.enable_compile(with_grad=cfg.compile_update, scope=cfg.compile_scope)
    return stack


def build_dataset(cfg: TrainConfig, dataset=None):
    """The dataset of --train_data_json, or `dataset` (any sequence of the dataset's items) checked."""
    if dataset is not None:
        return check_items(dataset, cfg.resolution)
    from ..data import BUNDLED, ensure_default_dataset
    from ..data.dataset import load_dataset

    # "bundled" is rendered at the run's resolution (built once per resolution), not upscaled from 64 px
    bundled = cfg.train_data_json.strip().lower() == BUNDLED
    path = ensure_default_dataset(resolution=cfg.resolution) if bundled else cfg.train_data_json
    dataset = load_dataset(path, resolution=cfg.resolution, seed=cfg.seed)
    if len(dataset) == 0:
        raise UserError("the dataset has no entries", where=path, field="--train_data_json")
    return dataset


def check_items(dataset, resolution: int):
    """A Python dataset: a sequence of dicts like TextImageDataset's items (docs/library.md): source [3,R,R] in
    [-1,1] (the target WITH text), mask [1,R,R] in {0,1}, reference (PIL), text, prompt. The first item is
    checked here so a wrong one fails now with its field named; masked_source is derived when missing."""
    try:
        n = len(dataset)
        first = dataset[0] if n else None
    except Exception as exc:  # noqa: BLE001 - any failure to index is the user's dataset
        raise UserError(f"expected a sequence of items (len and [i]): {type(exc).__name__}: {exc}",
                        field="dataset") from None
    if not n:
        raise UserError("the dataset has no entries", field="dataset")
    shapes = {"source": (3, resolution, resolution), "mask": (1, resolution, resolution)}
    for key in ("source", "mask", "reference", "text", "prompt"):
        if not isinstance(first, dict) or key not in first:
            raise UserError(f"item 0 has no {key!r} (items need source, mask, reference, text, prompt)", field="dataset")
        if key in shapes and (not isinstance(first[key], torch.Tensor) or tuple(first[key].shape) != shapes[key]):
            got = tuple(first[key].shape) if isinstance(first[key], torch.Tensor) else type(first[key]).__name__
            raise UserError(f"item 0 {key!r}: expected a tensor of shape {shapes[key]} (--resolution "
                            f"{resolution}), got {got}", field="dataset")
    return dataset if "masked_source" in first else _WithMaskedSource(dataset)


class _WithMaskedSource:
    """Adds masked_source = source * (1 - mask), as TextImageDataset builds it (the model's input)."""

    def __init__(self, items):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.items[index])
        item["masked_source"] = item["source"] * (1.0 - item["mask"])
        return item


def build_rewards(cfg: TrainConfig, siglip_path: str, device, rewards=None):
    """The rewards of --rewards, or `rewards` (the Python API's list of names, Reward objects, callables);
    --reward_timeout_s bounds each server request (and each local reward call that makes one, e.g. VLM)."""
    from ..rewards import build_rewards as _build

    urls = [u.strip() for u in cfg.reward_server_url.split(",")] if cfg.reward_server_url else None
    rewards = _build(cfg.rewards if rewards is None else rewards, siglip_path=siglip_path, server_urls=urls,
                     device=str(device), timeout_s=cfg.reward_timeout_s)
    if urls:
        rewards.check_health()  # a server that is down stops the run now, not after the first rollout
    return rewards


def build_optimizer(cfg: TrainConfig, params, num_processes: int = 1):
    from .optim import make_optimizer

    # LoRA's many small tensors are stepped as one flat tensor (optim.FlatOptimizer: one optimizer call instead
    # of ~900); full-rank training never is (its flat copy would be 24 GB). Not under fp16: GradScaler.unscale_
    # unscales the grads of the optimizer's parameters, which must then be the model's (the clip reads them).
    flat = cfg.trainable == "lora" and cfg.mixed_precision != "fp16"
    optimizer = make_optimizer(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                               weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, use_8bit=cfg.use_8bit_adam,
                               shard=num_processes > 1 and cfg.shard_optimizer_state, flat=flat)
    from diffusers.optimization import get_scheduler

    # diffusers' "constant" ignores warmup steps; with warmup asked for, use its warmup variant
    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps > 0 else cfg.lr_scheduler
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                              num_training_steps=cfg.max_train_steps)
    from .optim import with_restart_warmup

    return optimizer, with_restart_warmup(scheduler, cfg.rl_lr_warmup_steps)  # RL's moments reset: warm up again


def make_grad_scaler(accelerator, cfg: TrainConfig):
    """fp16 needs loss scaling or small gradients underflow to 0: accelerate's GradScaler where it makes
    one (CUDA), torch's on other devices. None for bf16/fp32, which need none."""
    if cfg.mixed_precision != "fp16":
        return None
    return accelerator.scaler or torch.amp.GradScaler(accelerator.device.type)


def resolved_siglip_path(cfg: TrainConfig) -> str:
    from ..models.stack import resolve_model_paths

    return resolve_model_paths(cfg.pretrained_model_name_or_path, cfg.siglip_path)[1]


def check_output_dir(cfg: TrainConfig) -> None:
    """The run folder can be made: not a file, under a folder that exists (missing parents are created,
    as `mkdir -p` would, and the log says so) and that is writable."""
    out = os.path.abspath(cfg.output_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError("exists and is not a folder", where=cfg.output_dir, field="--output_dir")
    parent = os.path.dirname(out)
    ancestor = parent
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UserError(f"{ancestor} is a file, not a folder", where=cfg.output_dir, field="--output_dir")
    if ancestor != parent:
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise UserError(f"the parent folder does not exist and could not be created under {ancestor} "
                            f"({exc.strerror})", where=parent, field="--output_dir") from None
        logger.info("created the missing parent folder %s of --output_dir", parent)
    if not os.path.isdir(out) and not os.access(parent, os.W_OK):
        raise UserError("parent folder is not writable", where=parent, field="--output_dir")
