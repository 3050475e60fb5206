#!/usr/bin/env bash
# The CPU table of issue 2, in phases so the most informative rows land first:
# every method once on resnet18, then the extra seeds, then mobilenet_v2.
set -u
cd "$(dirname "$0")/.."
ITERS=${ITERS:-200}
OUT=bench/results/cpu_iters${ITERS}.jsonl
run() { python -m bench.accuracy --iters "$ITERS" --jobs 2 --threads 1 --out "$OUT" "$@"; }
run --models resnet18 --methods minmax,mse,adaround,brecq,qdrop --seeds 0
run --models resnet18 --methods brecq,qdrop --seeds 0,1,2
run --models mobilenet_v2 --methods minmax,mse,adaround,brecq,qdrop --seeds 0
run --models mobilenet_v2 --methods brecq,qdrop --seeds 0,1,2
