"""Data parallel through accelerate on two CPU (gloo) processes: what does not need a GPU.

The bench script `bench/multi_gpu_bench.py` is the same code the GPU measurement ran; in `--tiny` mode it
runs the tiny stack on CPU. One process accumulating two micro-batches (weight 1/2 each) must give the same
first-update gradient as two DDP processes holding one micro-batch each.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "multi_gpu_bench.py")


def _run(args: list[str], out: str, timeout: int = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(args + [BENCH, "--tiny", "--out", out, "--iters", "1"], cwd=os.path.dirname(BENCH), env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_ddp_update_equals_the_one_process_update(tmp_path):
    out = str(tmp_path)
    _run([sys.executable], out)
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--main_process_port", "0"], out)
    for method in ("grpo", "nft"):
        one = torch.load(os.path.join(out, f"grad-{method}-w1.pt"), weights_only=True)
        two = torch.load(os.path.join(out, f"grad-{method}-w2.pt"), weights_only=True)
        assert one.keys() == two.keys() and len(one) == 8
        for name in one:
            assert one[name].norm() > 0, f"{method}: no gradient reached {name}"
            rel = float((one[name] - two[name]).norm() / one[name].norm())
            assert rel < 1e-5, f"{method} {name}: 2-process gradient differs by {rel:.2e}"
    import json

    report = json.load(open(os.path.join(out, "scaling-w2.json")))
    assert report["world"] == 2 and "ZeroRedundancyOptimizer" in report["grpo"]["optimizer"]
