#!/usr/bin/env bash
# A short device call (about 4 minutes): resnet18 at the official QDrop figures' iteration
# count (2000) with the current defaults, qdrop at every bit setting and 3 seeds, brecq at W4A2
# and W2A4 (seed 0), every run in its own process on one GPU. On an H200 (fourth session) none
# of the 14 finished in 225 s, where 11 sharing an H100 in session 1 (TF32 on, cuDNN free to
# pick non-deterministic kernels) took 136-148 s each; which of the two differences, or the
# time-slicing of 14 processes, cost it is not measured (bench.gpu_profile is the next step).
# Alone a 2000-iteration run takes about 2 minutes there; give it fewer runs before calling
# it again.
# Needs .gpu/ as bench/gpu_20000.sh says.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 2
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
c="--device cuda --threads 1 --data-dir .gpu --reference-dir .gpu --models resnet18 --iters 2000 --jobs 1"
b() { out=$1; shift; timeout "${T:-230}" python3 -m bench.accuracy $c --out "$OUT/$out.jsonl" "$@" > "$OUT/$out.log" 2>&1; }
for bits in W4A4 W2A4 W4A2 W2A2; do for s in 0 1 2; do b "q_${bits}_$s" --methods qdrop --bits $bits --seeds $s & done; done
for bits in W4A2 W2A4; do b "b_$bits" --methods brecq --bits $bits --seeds 0 & done
wait
cat "$OUT"/*.jsonl > "$OUT/all.jsonl"
python3 -m bench.summarize "$OUT/all.jsonl"
