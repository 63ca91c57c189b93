"""Pieces shared by the GPU benchmarks: the real-size stack with random weights, synthetic batches, timing,
and a JSON result that is rewritten after every measurement (a timeout or an OOM late in a call keeps the
earlier numbers)."""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from calligrapher_rl.models.stack import CalligrapherStack, FillCondition, TextCondition  # noqa: E402
from calligrapher_rl.models.style_adapter import StyleAdapter, install_style_adapter  # noqa: E402


class Results(dict):
    """A dict that writes itself to `path` (atomically) on every `put`."""

    def __init__(self, path: str, **initial):
        super().__init__(**initial)
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.flush()

    def put(self, key, value):
        self[key] = value
        self.flush()
        print(f"[result] {key} = {json.dumps(value)}", flush=True)

    def flush(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self, fh, indent=2)
        os.replace(tmp, self.path)


def real_components(tiny: bool):
    """FLUX.1-Fill-dev / SigLIP so400m configs (or the tiny ones), built directly on the device."""
    from calligrapher_rl.models import tiny as t

    if tiny:
        pipe = t.build_tiny_pipeline(0)
        siglip, proc = t.build_tiny_siglip(0)
        return pipe, siglip, proc, 32
    from calligrapher_rl.models.realsize import flux_fill_pipeline, siglip_so400m

    pipe = flux_fill_pipeline()
    siglip, proc = siglip_so400m()
    return pipe, siglip, proc, 512


def build_stack(tiny: bool, device, dtype):
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            pipe, siglip, proc, seq = real_components(tiny)
        finally:
            torch.set_default_dtype(prev)
        adapter = StyleAdapter.for_transformer(pipe.transformer, siglip.config.hidden_size, num_style_tokens=128)
    install_style_adapter(pipe.transformer, adapter)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, siglip):
        m.requires_grad_(False).eval()
    adapter.float().requires_grad_(True)
    return CalligrapherStack(pipe, siglip, proc, adapter, device, dtype, seq)


def synthetic_batch(stack, b: int, res: int):
    lh = stack.latent_hw(res, res)[0]
    L, dev, dt = (lh // 2) ** 2, stack.device, stack.dtype
    fill = FillCondition(torch.randn(b, L, 320, device=dev, dtype=dt),
                         stack.pipe._prepare_latent_image_ids(b, lh // 2, lh // 2, dev, dt), res, res)
    t5_dim = stack.pipe.text_encoder_2.config.d_model
    pooled = stack.pipe.text_encoder.config.hidden_size
    text = TextCondition(torch.randn(b, stack.max_sequence_length, t5_dim, device=dev, dtype=dt),
                         torch.randn(b, pooled, device=dev, dtype=dt), torch.zeros(stack.max_sequence_length, 3, device=dev, dtype=dt))
    embeds = torch.randn(b, stack.siglip.config.hidden_size, device=dev)
    return fill, text, embeds


def timed(fn, repeat: int = 2) -> float:
    """Seconds of the fastest of `repeat` calls after one warm-up."""
    return timed_with_first(fn, repeat)[1]


def timed_with_first(fn, repeat: int = 2) -> tuple[float, float]:
    """(seconds of the first call - compilation included, if any -, seconds of the fastest of `repeat` more)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return first, best


