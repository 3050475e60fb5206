#!/usr/bin/env bash
# Issue 17: qdrop vs qdrop + CL-Calib in its relational form, resnet18, 2000 it/unit, seeds 0,1,2,
# W2A2 first, then W4A2, then W2A4; one run at a time, 1 thread. The qdrop base rows at today's
# defaults were copied from bench/results/cpu_iters2000.jsonl (same config; "copied_from" in the
# row), so only the CL rows run here. Rows: bench/results/cpu_cl_iters2000.jsonl.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
CL=${CL:-'{"mapping":"fp_tail","tail_end":"logits","critic":"relational","negatives":"batch","lambda":10.0,"tau":0.5}'}
OUT=bench/results/cpu_cl_iters2000.jsonl
for bits in ${BITS:-W2A2 W4A2 W2A4}; do
  python -m bench.accuracy --models resnet18 --bits "$bits" --methods qdrop --seeds 0,1,2 --iters 2000 --jobs 1 --threads 1 \
    --out "$OUT" --cl on --overrides "{\"cl_calib\":$CL}"
done
