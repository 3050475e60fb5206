#!/usr/bin/env bash
# GPU speed in one device call (device tool, carry [".gpu"], timeout_s 600): the CUDA-graph step
# against the eager one and clcalib against the official QDrop code, same card, same data.
#   1. the CUDA cases of tests/test_recon_step.py: graph replays give the eager steps' model bit
#      for bit (qdrop, brecq, adaround; eager twice as the baseline), and so do host-memory caches,
#      steps captured with CL/PD terms, a failed capture's eager fallback, and the chained capture
#      (tests/test_recon_chain.py) against the per-unit prefix;
#   2. iterations/s eager vs graph with the GPU's busy fraction (bench.gpu_profile), resnet18 and
#      mobilenet_v2;
#   3. timed one at a time: resnet18 W2A4 2000 it/unit at 28 px, clcalib (seed 0) then the
#      official code; 224 px (images resized: times only, the 28 px model is near chance on
#      them) W4A4 200 it/unit, both; mobilenet_v2 W2A4 2000 it; resnet18 W2A4 2000 it with
#      CL-Calib on every iteration, and mobilenet_v2 with three forms of it (their times against
#      the qdrop runs': the terms replay inside the CUDA graphs);
#   4. then together (times not compared): resnet18 qdrop W4A4 and W2A4 at 20000 it/unit;
#      resnet50 (seeded random init, no trained weights here) at 224 px, 1024 images, with its
#      peak GPU memory. (A session's 15 device minutes hold this script once; the CL draws
#      table is bench/gpu_cl_draws.sh, another call.)
# Rows land in $W/*.jsonl as runs finish; every run is stopped at $DEADLINE seconds, then the
# tables are printed and $W is packed into $OUT/gpu_speed.tgz (a call brings back 8 files at most).
# Needs .gpu/ from `bash bench/make_gpu_carry.sh` (wheels, reference models, data, the
# official code in .gpu/peer). Ran on an H200 on 2026-12-04 (bench/RESULTS.md, "The step replayed
# from a CUDA graph"; the whole script needs about 10 minutes there, more than one call's share
# of a session's device time once the 20000-it runs are in). Its plumbing runs on the CPU with
# tiny settings:
#   OUT=/tmp/o16 DEV=cpu LONG=4 MID=2 HUGE=4 PX=56 DEADLINE=3000 NO_INSTALL=1 bash bench/gpu_speed.sh
set -u
DEV=${DEV:-cuda} LONG=${LONG:-2000} MID=${MID:-200} HUGE=${HUGE:-20000} PX=${PX:-224}
W=${W:-/tmp/gpu_speed}
rm -rf "$W"; mkdir -p "$W" "$OUT"
T0=$(date +%s)
DEADLINE=${DEADLINE:-530}
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
# a rerun can pick stages (STAGES="1 3 4"), tests (TESTS_K, pytest -k), the 20000-it settings (HUGE_BITS)
# and leave out the official code (PEER=0)
STAGES=${STAGES:-1 2 3 4} TESTS_K=${TESTS_K:-cuda} PEER=${PEER:-1}
stage() { case " $STAGES " in *" $1 "*) [ "$(left)" -gt 60 ];; *) false;; esac; }
[ -n "${NO_INSTALL:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 2
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 CLCALIB_FMNIST_DIR=$PWD/.gpu/fmnist CLCALIB_REFERENCE_DIR=$PWD/.gpu
nvidia-smi -L || echo "no nvidia-smi"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA",
  "capture of seeded generators:", hasattr(torch.cuda.CUDAGraph, "register_generator_state"))' | tee "$W/env.txt"

# 1. equivalence (pytest from the carry; -o addopts= drops the suite's xdist options)
stage 1 && { timeout 180 python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_recon_step.py tests/test_recon_chain.py -k "$TESTS_K" \
  > "$W/equivalence.txt" 2>&1; tail -3 "$W/equivalence.txt"; }

# 2. rates and busy fraction
stage 2 && timeout 120 python3 -m bench.gpu_profile --device "$DEV" --data-dir .gpu --reference-dir .gpu --no-profile \
  --models resnet18,mobilenet_v2 --iters $(( MID * 3 / 2 )) --out "$W/rates.jsonl" > "$W/rates.log" 2>&1; cat "$W/rates.jsonl"

acc() { out=$1; shift; timeout "$(left)" python3 -m bench.accuracy --device "$DEV" --threads 4 --jobs 1 --data-dir .gpu \
  --reference-dir "${REF:-.gpu}" --seeds 0 --out "$W/$out.jsonl" "$@" > "$W/$out.log" 2>&1; tail -n 1 "$W/$out.jsonl" 2>/dev/null | cut -c1-240; }
peer() { [ "$PEER" = 1 ] || return 0; out=$1; shift; timeout "$(left)" python3 -m bench.peer_qdrop --peer-dir .gpu/peer --device "$DEV" --threads 4 \
  --data-dir .gpu --reference-dir .gpu --out "$W/$out.jsonl" "$@" > "$W/$out.log" 2>&1; tail -n 1 "$W/$out.jsonl" 2>/dev/null | cut -c1-240; }
UP='{"preprocess": {"resize": '$PX', "crop": null, "mean": [0.286], "std": [0.353]}}'

# 3. timed, one at a time
stage 3 && acc r18_W2A4_2000 --models resnet18 --bits W2A4 --methods qdrop --iters $LONG
stage 3 && peer peer_r18_W2A4_2000 --bits W2A4 --iters $LONG
stage 3 && acc r18_W4A4_200_224px --models resnet18 --bits W4A4 --methods qdrop --iters $MID --overrides "$UP"
stage 3 && peer peer_r18_W4A4_200_224px --bits W4A4 --iters $MID --resize $PX --eval-limit 1000
stage 3 && acc mbv2_W2A4_2000 --models mobilenet_v2 --bits W2A4 --methods qdrop --iters $LONG
stage 3 && acc r18_W2A4_2000_cl --models resnet18 --bits W2A4 --methods qdrop --iters $LONG --cl on \
  --overrides '{"cl_calib": {"every": 1}}'
# CL's overhead on the GPU (issue 28: <= 1.3x), against the runs above without it: the whole FP tail on every
# iteration (one graph), two units of it, and the shipped form, the tail on every 8th iteration with its gradient
# held between (two graphs: the turns, the rest)
stage 3 && acc mbv2_W2A4_2000_cl --models mobilenet_v2 --bits W2A4 --methods qdrop --iters $LONG --cl on \
  --overrides '{"cl_calib": {"every": 1}}'
stage 3 && acc mbv2_W2A4_2000_cl_tail2 --models mobilenet_v2 --bits W2A4 --methods qdrop --iters $LONG --cl on \
  --overrides '{"cl_calib": {"every": 1, "tail_units": 2}}'
stage 3 && acc mbv2_W2A4_2000_cl_hold8 --models mobilenet_v2 --bits W2A4 --methods qdrop --iters $LONG --cl on \
  --overrides '{"cl_calib": {"every": 8, "hold": true}}'

# 4. together, as time allows
if stage 4; then
  mkdir -p /tmp/r50 && python3 -c 'import torch, torchvision; from safetensors.torch import save_file
torch.manual_seed(0); m = torchvision.models.resnet50(num_classes=10)
save_file({k: v.contiguous() for k, v in m.state_dict().items()}, "/tmp/r50/fmnist_resnet50.safetensors")'
  REF=/tmp/r50 acc r50_W4A4_200_224px --models resnet50 --bits W4A4 --methods qdrop --iters $MID --overrides "$UP" &
  for b in ${HUGE_BITS:-W4A4 W2A4}; do acc r18_${b}_20000 --models resnet18 --bits $b --methods qdrop --iters $HUGE & done
  wait
fi
nvidia-smi --query-gpu=name,memory.used --format=csv || true
wc -l "$W"/*.jsonl
python3 -m bench.gpu_speed_table "$W"
tar czf "$OUT/gpu_speed.tgz" -C "$W" .
