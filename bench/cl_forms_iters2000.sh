#!/usr/bin/env bash
# Issue 17: base vs base + CL-Calib in its relational form, 2000 it/unit, one run at a time, 1
# thread, seed by seed (the base run of a seed, then its CL run, so a cut session keeps pairs).
# Base rows at today's defaults that bench/results/cpu_iters2000.jsonl already holds (same
# config) are copied into the output with "copied_from" instead of being run again; runs that
# the output already holds are skipped (bench.accuracy). Rows: bench/results/cpu_cl_iters2000.jsonl.
#   bench/cl_forms_iters2000.sh                                   # resnet18 qdrop: W2A2, W4A2, W2A4
#   MODEL=mobilenet_v2 BITS="W2A4 W4A2" bench/cl_forms_iters2000.sh
#   METHOD=pdquant BITS=W2A2 SEEDS="0 1" bench/cl_forms_iters2000.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
CL=${CL:-'{"mapping":"fp_tail","tail_end":"logits","critic":"relational","negatives":"batch","lambda":10.0,"tau":0.5,"every":1}'}
MODEL=${MODEL:-resnet18} METHOD=${METHOD:-qdrop} SEEDS=${SEEDS:-0 1 2}
OUT=bench/results/cpu_cl_iters2000.jsonl
run() { python -m bench.accuracy --models "$MODEL" --bits "$1" --methods "$METHOD" --seeds "$2" --iters 2000 --jobs 1 \
  --threads 1 --out "$OUT" "${@:3}"; }
for bits in ${BITS:-W2A2 W4A2 W2A4}; do
  missing=$(python -m bench.copy_base_rows --from bench/results/cpu_iters2000.jsonl --to "$OUT" \
    --model "$MODEL" --method "$METHOD" --bits "$bits" --iters 2000 --seeds "$(echo $SEEDS | tr ' ' ,)")
  for seed in $SEEDS; do
    case ",$missing," in *",$seed,"*) run "$bits" "$seed";; esac
    run "$bits" "$seed" --cl on --overrides "{\"cl_calib\":$CL}"
  done
done
