"""One FLUX-sized linear layer with a rank-32 peft LoRA, three ways: peft's forward as it is (input cast to the fp32
masters' dtype), peft's forward without that cast (`models.lora_merged.skip_input_casts`, what a bf16 run now does), and the
merged matmul (`--lora_merged`); forward without gradient (a rollout) and forward + backward (an update), under bf16
autocast, at the presets' 8 images x (1024 image + 512 text) tokens.

    python bench/lora_layer_bench.py [--rows 12288] [--repeat 20] [--out FILE]

Prints (and writes with --out) one JSON object: milliseconds per call for each layer shape and way. A piece, not
the loop: the loop's numbers are bench/gpu_e2e.py's."""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from calligrapher_rl.models.lora import LoraSpec  # noqa: E402
from calligrapher_rl.models.lora_merged import skip_input_casts, use_merged_lora  # noqa: E402

SHAPES = {"attn 3072->3072": (3072, 3072), "ff.net.0 3072->12288": (3072, 12288), "ff.net.2 12288->3072": (12288, 3072)}


def layer(d_in: int, d_out: int, device) -> nn.Module:
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(d_in, d_out).to(device, torch.bfloat16))
    inject_adapter_in_model(LoraSpec(rank=32, alpha=64.0).peft_config(["proj"]), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            p.data = p.data.float()
            if "lora_B" in name:
                p.data.normal_(0, 0.01)  # a trained LoRA
    return model


def timed(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8 * 1536)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    out = {"card": torch.cuda.get_device_name(0), "rows": args.rows, "ms": {}}
    for label, (d_in, d_out) in SHAPES.items():
        base = layer(d_in, d_out, device)
        ways = {"peft": base, "peft_no_cast": copy.deepcopy(base), "merged": copy.deepcopy(base)}
        skip_input_casts(ways["peft_no_cast"])
        skip_input_casts(ways["merged"])
        use_merged_lora(ways["merged"])
        x = torch.randn(args.rows, d_in, device=device, dtype=torch.bfloat16)
        xg = x.clone().requires_grad_(True)
        row = {}
        for name, model in ways.items():
            def fwd(model=model):
                with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                    model(x)

            def fwd_bwd(model=model):
                with torch.autocast("cuda", torch.bfloat16):
                    y = model(xg)
                y.backward(torch.ones_like(y))

            row[name] = {"no_grad": round(timed(fwd, args.repeat), 3), "fwd_bwd": round(timed(fwd_bwd, args.repeat), 3)}
        plain = nn.Linear(d_in, d_out).to(device, torch.bfloat16).requires_grad_(False)
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            row["base_only"] = {"no_grad": round(timed(lambda: plain(x), args.repeat), 3)}
        row["base_only"]["fwd_bwd"] = round(timed(lambda: plain(xg).backward(torch.ones(args.rows, d_out, device=device,
                                                                                   dtype=torch.bfloat16)), args.repeat), 3)
        out["ms"][label] = row
        print(label, json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
