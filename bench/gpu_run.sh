#!/usr/bin/env bash
# One device call (see the device tool): a CUDA smoke test, then in parallel on one GPU
#  - resnet18 qdrop W4A4 at 20000 iterations (the GPU figure),
#  - the method table at 2000 iterations (the official QDrop figures are at 2000),
#  - the CL-Calib / PD-Quant comparison at 2000 iterations.
# Rows land in $OUT/*.jsonl as runs finish; no new run starts after $DEADLINE seconds.
# Needs .gpu/ (not committed; `bash bench/make_gpu_carry.sh` makes it), carried by the call.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 2
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
T=${TIMEOUT:-480}
common="--device cuda --threads 1 --data-dir .gpu --reference-dir .gpu --deadline ${DEADLINE:-330}"
bench() { out=$1; shift; timeout "$T" python3 -m bench.accuracy $common --out "$OUT/$out.jsonl" "$@" > "$OUT/$out.log" 2>&1; }
timeout 150 python3 -m bench.accuracy --device cuda --data-dir .gpu --reference-dir .gpu --models resnet18 --bits W2A4 \
  --methods pdquant --cl on --seeds 0 --iters 20 --jobs 1 --out "$OUT/smoke.jsonl" || { cat "$OUT/smoke.jsonl"; exit 3; }
cat "$OUT/smoke.jsonl"
if grep -q '"error"' "$OUT/smoke.jsonl"; then exit 3; fi
bench gpu_r18_qdrop_20000 --models resnet18 --bits W4A4 --methods qdrop --seeds 0 --iters 20000 --jobs 1 &
bench gpu_table_r18 --models resnet18 --methods qdrop,brecq,adaround,mse,minmax --iters 2000 --jobs 3 &
bench gpu_table_mbv2 --models mobilenet_v2 --methods qdrop,brecq,adaround,mse,minmax --iters 2000 --jobs 2 &
# CL-Calib ablation on resnet18 W2A4, one seed per variant, around the defaults of then (nce,
# lambda 0.1, every iteration; stated here since the shipped default is now relational, lambda 10,
# every 8th iteration held between)
O='"every": 1, "critic": "nce", "lambda"'
bench gpu_cl_sweep --models resnet18 --bits W2A4 --methods qdrop --cl on --seeds 0 --iters 2000 --jobs 2 --overrides "[
 {\"cl_calib\": {$O: 0.01}}, {\"cl_calib\": {$O: 1.0}}, {\"cl_calib\": {$O: 0.1, \"tau\": 0.1}}, {\"cl_calib\": {$O: 0.1, \"tau\": 1.0}},
 {\"cl_calib\": {$O: 0.1, \"mapping\": \"pool\"}}, {\"cl_calib\": {$O: 0.1, \"mapping\": \"flatten\"}}, {\"cl_calib\": {\"every\": 1, \"critic\": \"infonce\", \"lambda\": 0.1}},
 {\"cl_calib\": {$O: 0.1, \"negatives\": \"bank\"}}, {\"cl_calib\": {$O: 0.1, \"symmetric\": true}}, {\"cl_calib\": {$O: 0.1, \"rec_weight\": 0.0}}]" &
bench gpu_cl_r18 --models resnet18 --bits W2A4,W4A2,W2A2,W4A4 --methods qdrop,pdquant --cl on --iters 2000 --jobs 2 \
  --overrides '{"cl_calib": {"every": 1, "critic": "nce", "lambda": 0.1}}' &
bench gpu_pd_r18 --models resnet18 --bits W2A4,W4A2,W2A2,W4A4 --methods pdquant --iters 2000 --jobs 1 &
wait
nvidia-smi --query-gpu=name,memory.used --format=csv
wc -l "$OUT"/*.jsonl
