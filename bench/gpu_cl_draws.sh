#!/usr/bin/env bash
# Issue 28's draws table on one GPU at the papers' schedule (2000 iterations per unit), in one
# device call (device tool: carry [".gpu"], timeout_s 600; .gpu/ from `bash bench/make_gpu_carry.sh`):
# per setting and draw (calib_seed 0..4, 128 of the 1024 carried train images), qdrop and then
# qdrop + CL (the shipped form, its step captured in the CUDA graph), one run at a time, each
# row appended to $OUT/gpu_cl_draws.jsonl as it finishes; runs stop at $DEADLINE seconds.
# Settings, in order: where CL helped on the CPU at 500 it (mobilenet_v2 W4A2, W2A2, resnet18
# W4A2), then where it did not (mobilenet_v2 W2A4). Afterwards, here:
#   python -m bench.cl_draws_table <files>/gpu_cl_draws.jsonl
# Its plumbing runs on the CPU with tiny settings:
#   OUT=/tmp/gcd DEV=cpu ITERS=2 DRAWS="0 1" SETTINGS="resnet18:W4A2" NO_INSTALL=1 bash bench/gpu_cl_draws.sh
set -u
DEV=${DEV:-cuda} ITERS=${ITERS:-2000} DEADLINE=${DEADLINE:-540} DRAWS=${DRAWS:-0 1 2 3 4}
SETTINGS=${SETTINGS:-mobilenet_v2:W4A2 mobilenet_v2:W2A2 resnet18:W4A2 mobilenet_v2:W2A4}
OUT=${OUT:-/tmp/gpu_cl_draws}
mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
[ -n "${NO_INSTALL:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 2
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
for setting in $SETTINGS; do
  model=${setting%%:*} bits=${setting##*:}
  for d in $DRAWS; do
    for cl in off on; do
      [ "$(left)" -gt 20 ] || { echo "deadline: stopped before $model $bits draw $d CL $cl"; break 3; }
      timeout "$(left)" python3 -m bench.accuracy --device "$DEV" --threads 4 --jobs 1 --data-dir .gpu --reference-dir .gpu \
        --models "$model" --bits "$bits" --methods qdrop --seeds 0 --iters "$ITERS" --cl $cl \
        --overrides "{\"calib_size\": 128, \"calib_seed\": $d}" --out "$OUT/gpu_cl_draws.jsonl" >> "$OUT/gpu_cl_draws.log" 2>&1
      tail -n 1 "$OUT/gpu_cl_draws.jsonl" 2>/dev/null | python3 -c 'import json, sys
r = json.loads(sys.stdin.read() or "{}")
print(r.get("model"), r.get("bits"), "CL" if r.get("cl") else "base", r.get("overrides"), r.get("quant_top1"), r.get("calib_seconds"),
      sorted(set(r.get("unit_steps") or [])), r.get("error", ""))'
    done
  done
done
echo "done after $(( $(date +%s) - T0 )) s"
