#!/usr/bin/env bash
# Pretraining variants of the tiny model in parallel on a lent GPU machine (no network), variant i on GPU i:
#   bash bench/tiny_pretrain_gpu.sh OUT "--max_minutes 8.5 --heads 6" "--max_minutes 8.5 --heads 8" ...
# Each argument string goes to one `python -m calligrapher_rl.tiny pretrain` (the flags it sets, plus --out
# /tmp/pre/v{i}, --snapshot_dir OUT/v{i} and --workers = cores / variants, which this script sets).
# What comes back per variant, flat in OUT/v{i}/: its final snapshot (EMA, fp16 unless the args say otherwise)
# and its pretrain.json - nothing else (the layout and the full log stay in /tmp/pre; each log's tail is printed).
# With --max_minutes M in a variant's args, that variant is killed at M minutes + 25 s as a last resort (its
# own guard stops it at M); wheels for the machine's Python are expected in .gpu_wheels/ (see gpu_suite.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: tiny_pretrain_gpu.sh OUT "ARGS A" ["ARGS B" ...]}; shift
n=$#
(( n >= 1 )) || { echo "no variants given"; exit 2; }
gpus=$(nvidia-smi -L | wc -l)
(( n <= gpus )) || { echo "$n variants but $gpus GPUs"; exit 2; }
mkdir -p "$out" /tmp/pylib /tmp/pre
if compgen -G ".gpu_wheels/*.whl" >/dev/null; then
  pip install -q --no-deps --target /tmp/pylib .gpu_wheels/*.whl >/dev/null 2>&1
fi
export PYTHONPATH=/tmp/pylib:$PWD PYTHONUNBUFFERED=1
workers=$(( $(nproc) / n )); (( workers >= 1 )) || workers=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -"$n"
pids=()
i=0
for args in "$@"; do
  rm -rf "/tmp/pre/v$i" "$out/v$i"; mkdir -p "$out/v$i"
  minutes=$(grep -oE -- '--max_minutes[ =][0-9.]+' <<<"$args" | tail -1 | grep -oE '[0-9.]+$')
  limit=$(python3 -c "print(int(float('${minutes:-0}') * 60 + 25) if float('${minutes:-0}') > 0 else 0)")
  # shellcheck disable=SC2086  # the variant's flags split on spaces on purpose
  CUDA_VISIBLE_DEVICES=$i OMP_NUM_THREADS=$workers timeout -s INT -k 10 "$limit" \
    python -m calligrapher_rl.tiny pretrain $args --out "/tmp/pre/v$i" --snapshot_dir "$out/v$i" \
    --workers "$workers" >"/tmp/pre/v$i.log" 2>&1 &
  pids+=($!)
  echo "v$i (GPU $i, pid $!, limit ${limit}s): $args"
  i=$((i + 1))
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; rc=$?
  (( rc == 0 )) || status=1
  dir="$out/v$i"
  rm -f "$dir"/*.tmp
  # keep the last snapshot only (the final one, or the one the time guard wrote)
  mapfile -t snaps < <(for s in "$dir"/weights-step*.safetensors; do [[ -e $s ]] || continue
    step=${s##*weights-step}; echo "${step%%.*} $s"; done | sort -n | cut -d' ' -f2-)
  for s in "${snaps[@]:0:${#snaps[@]}-1}"; do rm -f "$s"; done
  echo "== v$i rc=$rc: $(ls "$dir" | tr '\n' ' ')"
  for f in "$dir"/*; do
    size=$(stat -c %s "$f")
    (( size <= 15 * 2**20 )) || echo "WARNING: $f is $size bytes (> 15 MiB, will not come back)"
  done
  grep -v "UserWarning\|warnings.warn\|Writing model shards" "/tmp/pre/v$i.log" | tail -6
done
exit $status
