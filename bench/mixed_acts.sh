#!/bin/bash
# activations at the budget of uniform A3 (choices 2/4/8, element-weighted average), weights uniform W4, against
# uniform A2/A3/A4; mobilenet_v2, qdrop, 200 iterations per unit on the CPU (what the session's time allowed); SEEDS=0,1,2 (default 0; rows already in the file are skipped)
# ITERS, DEVICE, THREADS, OUT and EXTRA (more bench.accuracy flags) for other runs, e.g. the issue's 2000
# iterations on a GPU from the device carry (.gpu/, bench/make_gpu_carry.sh; its wheels installed first):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl && PYTHONPATH=/tmp/site \
#     ITERS=2000 DEVICE=cuda THREADS=4 SEEDS=0,1,2 OUT=$OUT/gpu_mixed_a3_iters2000.jsonl \
#     EXTRA="--data-dir .gpu --reference-dir .gpu" bash bench/mixed_acts.sh
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
ITERS=${ITERS:-200}
OUT=${OUT:-bench/results/cpu_mixed_a3_iters$ITERS.jsonl}
A="python3 -m bench.accuracy --models mobilenet_v2 --methods qdrop --iters $ITERS --jobs 1 --threads ${THREADS:-1} --device ${DEVICE:-cpu} --seeds ${SEEDS:-0} ${EXTRA:-}"
$A --bits W4A3 --overrides '{"budget": {"a_bits_avg": 3.0}}' --out "$OUT"
$A --bits W4A3,W4A2,W4A4 --out "$OUT"
