#!/bin/bash
# mixed precision, second queue (CPU, 500 iterations per unit, qdrop, one process):
# 1. weights at the size of uniform W3 with 8-bit activations (the weights' effect alone), mobilenet_v2, seeds 0,1
# 2. activations at the budget of uniform A3 (choices 2/4/8) with uniform W4 weights, against uniform A2/A3/A4, seed 0
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
A="python -m bench.accuracy --models mobilenet_v2 --methods qdrop --iters 500 --jobs 1 --threads 1"
$A --bits W3A8 --seeds 0,1 --overrides '[{}, {"budget": {"weight_mb": 0.988094}}]' --out bench/results/cpu_mixed_w3_iters500.jsonl
$A --bits W4A3 --seeds 0 --overrides '{"budget": {"a_bits_avg": 3.0}}' --out bench/results/cpu_mixed_a3_iters500.jsonl
$A --bits W4A2,W4A3,W4A4 --seeds 0 --out bench/results/cpu_mixed_a3_iters500.jsonl
