#!/bin/bash
# activations at the budget of uniform A3 (choices 2/4/8, element-weighted average), weights uniform W4, against
# uniform A2/A3/A4; mobilenet_v2, qdrop, 200 iterations per unit on the CPU (what the session's time allowed); SEEDS=0,1,2 (default 0; rows already in the file are skipped)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
A="python -m bench.accuracy --models mobilenet_v2 --methods qdrop --iters 200 --jobs 1 --threads 1 --seeds ${SEEDS:-0}"
$A --bits W4A3 --overrides '{"budget": {"a_bits_avg": 3.0}}' --out bench/results/cpu_mixed_a3_iters200.jsonl
$A --bits W4A3,W4A2,W4A4 --out bench/results/cpu_mixed_a3_iters200.jsonl
