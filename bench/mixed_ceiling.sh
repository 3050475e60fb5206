#!/bin/bash
# The ceiling for issue 27's first goal: mobilenet_v2 with every weight at 8 bits (A4, qdrop, 500
# iterations, 3 seeds). No allocation at uniform W3's size can be expected to beat the model whose
# weights are all 8-bit; if this row is below uniform W3A4 + 1 point, that goal is out of reach at A4.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
python -m bench.accuracy --models mobilenet_v2 --bits W8A4 --methods qdrop --seeds 0,1,2 --iters 500 --jobs 1 --threads 1 \
  --out bench/results/cpu_mixed_w3_iters500.jsonl
