#!/usr/bin/env bash
# The issue's GPU figure: resnet18 qdrop W4A4 at 20000 iterations per unit, seed 0 and the
# current defaults (the CPU twin's command, --device cuda), alone on the GPU so that its wall
# time means something. A device call that ends first leaves the per-unit resume state in
# bench/work (kept on a warm machine) and in $OUT/units.safetensors (5 MB): the same command
# again continues after the last finished unit, on a fresh machine too when that file is put
# at .gpu/units.safetensors and carried, or, for a later session (nothing outside the
# repository survives a session), committed as bench/results/gpu_20000_units.safetensors
# (delete it in the commit that adds the finished row: it would be resumed again, and its
# resume key covers config, data and weights, not the code version).
# (The 2000-iteration table is bench/gpu_defaults_2000.sh.)
# Needs .gpu/ (not committed; `bash bench/make_gpu_carry.sh` makes it), carried by the call.
set -u
[ -n "${DEVICE:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 2
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
I=${ITERS:-20000}  # ITERS/DEVICE: a dry run here on the CPU with few iterations
c="--device ${DEVICE:-cuda} --threads 1 --data-dir .gpu --reference-dir .gpu --models resnet18"
R=bench/work/gpu_$I.jsonl
# one line per finished unit: the resume store rewrites its file after each unit
state=bench/work/runs/resnet18_W4A4_qdrop_False_0_$I/resume/units.safetensors
mkdir -p "$(dirname "$state")"
for saved in .gpu/units.safetensors bench/results/gpu_20000_units.safetensors; do
  [ -f "$state" ] || [ ! -f "$saved" ] || { cp "$saved" "$state"; echo "resuming from $saved"; }
done
( last=$(stat -c %Y "$state" 2>/dev/null); while sleep 2; do m=$(stat -c %Y "$state" 2>/dev/null); [ -n "$m" ] && [ "$m" != "$last" ] && echo "unit saved $m" && last=$m; done ) > "$OUT/units.log" &
mon=$!
date +%s > "$OUT/start"
timeout "${BUDGET:-540}" python3 -m bench.accuracy $c --bits W4A4 --methods qdrop --seeds 0 --iters $I --jobs 1 --out $R > "$OUT/q20000.log" 2>&1
date +%s > "$OUT/end"
cp "$state" "$OUT/" 2>/dev/null
cp $R "$OUT/" 2>/dev/null && cat $R
kill $mon
nvidia-smi --query-gpu=name,memory.used --format=csv
