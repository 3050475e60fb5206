#!/bin/bash
# mixed precision vs uniform W3 at the same weight size, qdrop W3A4, 500 iterations, 3 seeds
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
python -m bench.accuracy --models mobilenet_v2 --bits W3A4 --methods qdrop --seeds 0,1,2 --iters 500 --jobs 1 --threads 1 \
  --overrides '[{}, {"budget": {"weight_mb": 0.988094}}]' --out bench/results/cpu_mixed_w3_iters500.jsonl
python -m bench.accuracy --models resnet18 --bits W3A4 --methods qdrop --seeds 0,1,2 --iters 500 --jobs 1 --threads 1 \
  --overrides '[{}, {"budget": {"weight_mb": 4.241882}}]' --out bench/results/cpu_mixed_w3_iters500.jsonl
