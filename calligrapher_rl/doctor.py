"""python -m calligrapher_rl.doctor: the deployment check of the guide, one line per check.

    [ok]   diffusers 0.42.1
    [FAIL] --siglip_path /x: not a SigLIP model folder (no config.json)
    [warn] no CUDA GPU: training will run on the CPU

Exit status 1 when something needed is missing (FAIL); warnings do not fail.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from typing import Callable

from .errors import UserError, cli_main

OK, WARN, FAIL = "ok", "warn", "FAIL"

REQUIRED = {  # module -> (distribution name, version prefix required or None)
    "torch": ("torch", None),
    "diffusers": ("diffusers", "0.42."),
    "transformers": ("transformers", None),
    "accelerate": ("accelerate", None),
    "safetensors": ("safetensors", None),
    "peft": ("peft", None),
    "gradio": ("gradio", None),
    "plotly": ("plotly", None),
    "tensorboard": ("tensorboard", None),
    "rapidocr_onnxruntime": ("rapidocr-onnxruntime", None),
    "fastapi": ("fastapi", None),
    "uvicorn": ("uvicorn", None),
    "httpx": ("httpx", None),
}


def check_packages() -> list[tuple[str, str]]:
    from importlib.metadata import PackageNotFoundError, version

    out = [(OK, f"python {sys.version.split()[0]}")]
    for module, (dist, prefix) in REQUIRED.items():
        try:
            importlib.import_module(module)
            ver = version(dist)
        except (ImportError, PackageNotFoundError) as exc:
            out.append((FAIL, f"{dist}: not importable ({type(exc).__name__}); pip install -e ."))
            continue
        if prefix and not ver.startswith(prefix):
            out.append((FAIL, f"{dist} {ver}: this release needs {prefix}x"))
        else:
            out.append((OK, f"{dist} {ver}"))
    try:
        importlib.import_module("torchvision")
        out.append((WARN, "torchvision is installed: not needed, and some builds break transformers"))
    except ImportError:
        pass
    return out


def check_gpu() -> list[tuple[str, str]]:
    import torch

    if not torch.cuda.is_available():
        return [(WARN, "no CUDA GPU: training and inference run on the CPU (fine for the tiny model only)")]
    lines = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append((OK, f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 "
                          f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}"))
    return lines


def check_paths(flux: str | None, siglip: str | None, data: str | None) -> list[tuple[str, str]]:
    out = []
    if flux or siglip:
        from .models.hub import resolve_model

        for kind, name, label in (("flux", flux, "FLUX-Fill"), ("siglip", siglip, "SigLIP")):
            try:
                out.append((OK, f"{label}: {resolve_model(name or 'tiny', kind).describe()}"))
            except UserError as exc:
                out.append((FAIL, str(exc)))
    if data:
        from .data.dataset import load_dataset

        try:
            ds = load_dataset(data, resolution=64)
            out.append((OK, f"dataset {data}: {len(ds)} entries (run `python -m calligrapher_rl.data validate` "
                            "for a full check)"))
        except UserError as exc:
            out.append((FAIL, str(exc)))
    return out


def check_ocr() -> list[tuple[str, str]]:
    try:
        from .rewards.ocr import OcrReward

        OcrReward()
        return [(OK, "OCR engine (rapidocr-onnxruntime, weights inside the wheel) loads")]
    except Exception as exc:  # noqa: BLE001 - any failure is reported as one line
        return [(FAIL, f"OCR engine does not load: {type(exc).__name__}: {exc}")]


def check_servers(urls: str | None, rewards: str) -> list[tuple[str, str]]:
    if not urls:
        return []
    from .rewards.client import RemoteRewards
    from .rewards.registry import parse_spec

    out = []
    for url in (u.strip() for u in urls.split(",") if u.strip()):
        client = RemoteRewards([url], list(parse_spec(rewards)), timeout_s=5, retries=0)
        try:
            client.check_health()
            out.append((OK, f"reward server {url} serves {rewards}"))
        except UserError as exc:
            out.append((FAIL, str(exc)))
        finally:
            client.close()
    return out


def check_disk(output_dir: str | None) -> list[tuple[str, str]]:
    path = output_dir or "."
    probe = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(probe):
        return [(FAIL, f"--output_dir {path}: parent folder does not exist")]
    free = shutil.disk_usage(probe).free / 2**30
    level = OK if free > 20 else WARN
    return [(level, f"{free:.0f} GiB free at {probe}{'' if level == OK else ' (a FLUX checkpoint run wants > 20 GiB)'}")]


def check_adapter(path: str | None) -> list[tuple[str, str]]:
    """--ip_adapter: an adapter file of any layout, or a LoRA checkpoint folder (raw or ema/), readable and whole."""
    if not path:
        return []
    from .models.lora import ADAPTER_DIR, ADAPTER_FILE, TRANSFORMER_FILE, find_lora

    try:
        found = find_lora(path) if os.path.exists(path) else None
        if found is None:
            from .models.checkpoints import read_adapter_file

            layout, flat = read_adapter_file(path)
            return [(OK, f"--ip_adapter {path}: {layout} adapter, {len(flat)} tensors")]
        from safetensors import safe_open

        root, folder, info = found
        counts = []
        for name in (TRANSFORMER_FILE, os.path.join(ADAPTER_DIR, ADAPTER_FILE)):
            if os.path.isfile(os.path.join(folder, name)):
                with safe_open(os.path.join(folder, name), "pt") as fh:
                    counts.append(f"{len(list(fh.keys()))} tensors in {name}")
        out = [(OK if counts else FAIL, f"--ip_adapter {path}: LoRA r={info.get('rank')} alpha={info.get('alpha')} on "
                                        f"{info.get('target')}: {', '.join(counts) or 'no LoRA weight file'}")]
        base = info.get("base_adapter")
        if base and base != "tiny-pretrained" and not os.path.isfile(base):
            out.append((FAIL, f"its base adapter {base} (lora.json) is missing: loading needs it"))
        return out
    except (UserError, OSError, ValueError) as exc:
        return [(FAIL, f"--ip_adapter {path}: {exc}")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m calligrapher_rl.doctor", description="deployment check")
    p.add_argument("--pretrained_model_name_or_path", default=None)
    p.add_argument("--siglip_path", default=None)
    p.add_argument("--train_data_json", default=None)
    p.add_argument("--output_dir", default=None)
    p.add_argument("--reward_server_url", default=None)
    p.add_argument("--rewards", default="ocr")
    p.add_argument("--skip_ocr", action="store_true", help="do not load the OCR engine")
    p.add_argument("--ip_adapter", default=None, help="an adapter file or a LoRA checkpoint (checkpoint-N, its ema/)")
    args = p.parse_args(argv)
    checks: list[Callable[[], list[tuple[str, str]]]] = [
        check_packages, check_gpu,
        lambda: check_paths(args.pretrained_model_name_or_path, args.siglip_path, args.train_data_json),
        lambda: [] if args.skip_ocr else check_ocr(),
        lambda: check_servers(args.reward_server_url, args.rewards),
        lambda: check_disk(args.output_dir),
        lambda: check_adapter(args.ip_adapter),
    ]
    failed = False
    for check in checks:
        for level, line in check():
            print(f"[{level}]{' ' * (5 - len(level))}{line}")
            failed |= level == FAIL
    return 1 if failed else 0


if __name__ == "__main__":
    cli_main(main)
