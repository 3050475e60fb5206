#!/bin/bash
# accuracy target 1.0 point (qdrop, A8, 500 iterations per unit on the CPU): the smallest candidate found, its
# size against W8 and the search's wall time; one row per model in bench/results/cpu_mixed_target_iters500.jsonl
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
python -m bench.accuracy --models resnet18,mobilenet_v2 --bits W4A8 --methods qdrop --seeds 0 --iters 500 --jobs 1 \
  --threads 1 --overrides '{"target": {"max_top1_drop": 1.0}}' --out bench/results/cpu_mixed_target_iters500.jsonl
