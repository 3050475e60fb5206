#!/usr/bin/env bash
# The short device call this session could afford (about 4 minutes of GPU): resnet18 at the
# official QDrop figures' iteration count (2000) for qdrop at every bit setting, brecq and
# adaround at W2A4/W4A2, CL-Calib and PD-Quant at W2A4, all in parallel on one GPU, and the
# 20000-iteration qdrop W4A4 run with its progress bar logged (its rate gives the wall time
# when the call ends first). Needs .gpu/ as bench/gpu_run.sh says.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 2
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
T=${TIMEOUT:-220}
c="--device cuda --threads 1 --data-dir .gpu --reference-dir .gpu --models resnet18 --iters 2000 --seeds 0 --jobs 1"
mkdir -p /tmp/res
b() { out=$1; shift; timeout "$T" python3 -m bench.accuracy $c --out "/tmp/res/$out.jsonl" "$@" > "/tmp/res/$out.log" 2>&1; }
for bits in W4A4 W2A4 W4A2 W2A2; do b "q_$bits" --methods qdrop --bits $bits & done
for bits in W2A4 W4A2; do b "b_$bits" --methods brecq --bits $bits & b "a_$bits" --methods adaround --bits $bits & done
b cl_W2A4 --methods qdrop --cl on --bits W2A4 --overrides '{"cl_calib": {"every": 1, "critic": "nce", "lambda": 0.1}}' &  # the form of then
b pd_W2A4 --methods pdquant --bits W2A4 &
timeout "$T" python3 -m clcalib.cli calibrate --arch resnet18 --num-classes 10 --weights .gpu/fmnist_resnet18.safetensors \
  --calib .gpu/fmnist_train_1024.zip --eval .gpu/fmnist_test_10k.zip --method qdrop --w-bits 4 --a-bits 4 --iters 20000 \
  --seed 0 --device cuda --resize none --crop none --mean 0.286 --std 0.353 --out /tmp/q20000 > "$OUT/q20000.log" 2>&1 &
wait
cp /tmp/q20000/report.json "$OUT/q20000_report.json" 2>/dev/null
cat /tmp/res/*.jsonl > "$OUT/all.jsonl"; tail -n 3 /tmp/res/*.log
tail -c 600 "$OUT/q20000.log" | tr '\r' '\n' | tail -3
python3 -m bench.summarize "$OUT/all.jsonl"
