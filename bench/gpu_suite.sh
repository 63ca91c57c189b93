#!/usr/bin/env bash
# What the GPU benchmark calls run on a lent machine (no network, no diffusers there):
#   bash bench/gpu_suite.sh single OUT     the one-GPU benchmark  -> OUT/latest.json, OUT/latest.log
#   bash bench/gpu_suite.sh multi OUT      1, 2 and 4 GPUs         -> OUT/multi/scaling-w*.json, grads
# Wheels for the machine's Python (diffusers, torchao) are expected in .gpu_wheels/ (see docs/gpu-notes.md).
set -uo pipefail
cd "$(dirname "$0")/.."
what=$1; out=$2
mkdir -p "$out" /tmp/pylib
pip install -q --no-deps --target /tmp/pylib .gpu_wheels/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/pylib:$PWD TORCHINDUCTOR_CACHE_DIR=/tmp/inductor PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
cd bench
if [[ $what == single ]]; then
  python gpu_bench.py --out "$out/latest.json" --budget_s "${BUDGET_S:-470}" 2>&1 | grep -v "UserWarning\|warnings.warn" | tee "$out/latest.log"
else
  n=$(nvidia-smi -L | wc -l)
  for w in 1 2 4; do
    (( w > n )) && break
    devs=$(seq -s, 0 $((w - 1)))
    if (( w == 1 )); then
      CUDA_VISIBLE_DEVICES=$devs python multi_gpu_bench.py --out "$out/multi" 2>&1 | tail -4 | tee -a "$out/multi.log"
    else
      CUDA_VISIBLE_DEVICES=$devs python -m accelerate.commands.launch --multi_gpu --num_processes $w \
        --mixed_precision bf16 multi_gpu_bench.py --out "$out/multi" 2>&1 | tail -6 | tee -a "$out/multi.log"
    fi
  done
fi
