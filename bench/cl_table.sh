#!/usr/bin/env bash
# The CL-Calib ablation of issue 4 on the CPU, at one iteration count for every row (200, as the
# CPU table of issue 2). Every CL row names its whole cl_calib block in --overrides, so a row keeps
# its meaning whatever the shipped defaults become.
#   CL='{"mapping":"fp_tail","tail_end":"logits","critic":"nce","negatives":"batch","lambda":0.1,"tau":0.5,"every":1}' \
#     bench/cl_table.sh [all|table|sweeps|w4a4]
# Phases: the 2-bit table (both models), the sweeps (resnet18 W2A4, and the mappings at W4A2), then W4A4.
set -u
cd "$(dirname "$0")/.."
ITERS=${ITERS:-200}
OUT=bench/results/cpu_cl_iters${ITERS}.jsonl
PHASE=${1:-all}
: "${CL:?set CL to the JSON cl_calib block of the table (see the top of this file)}"
run() { python -m bench.accuracy --iters "$ITERS" --jobs "${JOBS:-2}" --threads 1 --out "$OUT" "$@"; }
# base and CL rows of one setting, run here in the same file and under the same load, so their
# time ratio means something
pair() {
  run --models "$1" --bits "$2" --methods qdrop,pdquant --cl off
  run --models "$1" --bits "$2" --methods qdrop,pdquant --cl on --overrides "{\"cl_calib\":$CL}"
}
# $CL with each move of the JSON list $1 applied (moves that change nothing dropped): an --overrides list
moved() {
  python -c 'import json, sys; b = json.loads(sys.argv[1])
print(json.dumps([{"cl_calib": {**b, **m}} for m in json.loads(sys.argv[2]) if any(b.get(k) != v for k, v in m.items())]))' "$CL" "$1"
}
if [ "$PHASE" = all ] || [ "$PHASE" = table ]; then
  for model in resnet18 mobilenet_v2; do pair $model W2A4,W4A2,W2A2; done
fi
if [ "$PHASE" = all ] || [ "$PHASE" = sweeps ]; then
  # resnet18 W2A4, each knob of $CL moved on its own
  run --models resnet18 --bits W2A4 --methods qdrop --cl on --overrides "$(moved '[{"mapping": "pool"}, {"mapping": "flatten"},
    {"critic": "infonce"}, {"negatives": "bank"}, {"rec_weight": 0.0}, {"lambda": 0.01}, {"lambda": 1.0}, {"tau": 0.1}, {"tau": 2.0}]')"
  # where CL does help (W4A2): does the gain need the FP tail? the two cheap mappings there
  M=$(moved '[{"mapping": "pool"}, {"mapping": "flatten"}]')
  run --models resnet18 --bits W4A2 --methods qdrop --cl on --overrides "$M"
fi
if [ "$PHASE" = all ] || [ "$PHASE" = w4a4 ]; then
  for model in resnet18 mobilenet_v2; do pair $model W4A4; done
fi
