#!/bin/bash
# mixed precision vs uniform W3 at the same weight size, qdrop W3A4, 2000 iterations per unit (the
# issue's schedule), seeds 0-2, mobilenet_v2 then resnet18; one process, 1 thread, rows appended as
# each run finishes:   nohup bench/mixed_w3_2000.sh > /tmp/mixed_w3_2000.log 2>&1 &
#   python -m bench.mixed_table bench/results/cpu_mixed_w3_iters2000.jsonl
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
OUT=bench/results/cpu_mixed_w3_iters2000.jsonl
for s in 0 1 2; do
  python -m bench.accuracy --models mobilenet_v2 --bits W3A4 --methods qdrop --seeds $s --iters 2000 --jobs 1 --threads 1 \
    --overrides '[{}, {"budget": {"weight_mb": 0.988094}}]' --out $OUT
done
for s in 0 1 2; do
  python -m bench.accuracy --models resnet18 --bits W3A4 --methods qdrop --seeds $s --iters 2000 --jobs 1 --threads 1 \
    --overrides '[{}, {"budget": {"weight_mb": 4.241882}}]' --out $OUT
done
