#!/usr/bin/env bash
# Issue 28's draws table on one GPU at the papers' schedule (2000 iterations per unit), in one
# device call (device tool: carry [".gpu"], timeout_s 600; .gpu/ from `bash bench/make_gpu_carry.sh`):
# bench/cl_draws.sh per setting (draws 0..4 of 128 of the 1024 carried train images; qdrop, then
# qdrop + CL in the shipped form: every 8th iteration held between, two CUDA graphs; CL='{"every": 1}'
# for the every-iteration form of the CPU table's first rows), each row appended to
# $OUT/gpu_cl_draws.jsonl as it finishes; whatever runs at $DEADLINE seconds is stopped.
# Settings, in order: where CL helped on the CPU at 500 it (mobilenet_v2 W4A2, W2A2, resnet18
# W4A2), then where it did not (mobilenet_v2 W2A4). Afterwards, here:
#   python -m bench.cl_draws_table <files>/gpu_cl_draws.jsonl
# Its plumbing runs on the CPU with tiny settings:
#   OUT=/tmp/gcd DEV=cpu ITERS=2 DRAWS="0 1" SETTINGS="resnet18:W4A2" NO_INSTALL=1 bash bench/gpu_cl_draws.sh
set -u
DEADLINE=${DEADLINE:-540} OUT=${OUT:-/tmp/gpu_cl_draws}
SETTINGS=${SETTINGS:-mobilenet_v2:W4A2 mobilenet_v2:W2A2 resnet18:W4A2 mobilenet_v2:W2A4}
mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
[ -n "${NO_INSTALL:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 2
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
for setting in $SETTINGS; do
  [ "$(left)" -gt 20 ] || { echo "deadline: stopped before $setting"; break; }
  MODEL=${setting%%:*} BITS=${setting##*:} ITERS=${ITERS:-2000} DRAWS=${DRAWS:-0 1 2 3 4} DEVICE=${DEV:-cuda} THREADS=4 \
    EXTRA="--data-dir .gpu --reference-dir .gpu" OUT="$OUT/gpu_cl_draws.jsonl" \
    timeout "$(left)" bash bench/cl_draws.sh >> "$OUT/gpu_cl_draws.log" 2>&1
  python3 -m bench.cl_draws_table "$OUT/gpu_cl_draws.jsonl" | tail -n +3
done
echo "done after $(( $(date +%s) - T0 )) s"
