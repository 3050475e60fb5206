#!/usr/bin/env bash
# CL-Calib in the paper's regime: few calibration images, several draws of them. Per draw
# (calib_seed), the base and base + CL (the shipped --cl-calib form, or the cl_calib block in CL)
# one after the other, one process, 1 thread; each row is appended to $OUT as it finishes (a cut
# session keeps them). The whole-tail rows of sessions 16-18 ran the term on every iteration, the
# shipped form then: CL='{"every": 1}' reruns them.
#   nohup bench/cl_draws.sh > /tmp/cl_draws.log 2>&1 &
#   SIZE=1024 SUPPLY=8192 ...: draws of 1024 images out of 8192 (1024 of 1024 would be one set)
#   DEVICE, THREADS and EXTRA (more bench.accuracy flags): other machines (bench/gpu_cl_draws.sh)
#   python -m bench.cl_draws_table bench/results/cpu_cl_draws_iters500.jsonl
set -u
MODEL=${MODEL:-resnet18}; BITS=${BITS:-W2A4}; METHOD=${METHOD:-qdrop}; ITERS=${ITERS:-500}
SIZE=${SIZE:-128}; SUPPLY=${SUPPLY:-1024}; DRAWS=${DRAWS:-"0 1 2 3 4"}
OUT=${OUT:-bench/results/cpu_cl_draws_iters${ITERS}.jsonl}
for d in $DRAWS; do
  for cl in off on; do
    block=""; [ "$cl" = on ] && [ -n "${CL:-}" ] && block=", \"cl_calib\": $CL"  # the base runs stay as they are
    python3 -m bench.accuracy --models "$MODEL" --bits "$BITS" --methods "$METHOD" --seeds 0 --iters "$ITERS" \
      --jobs 1 --threads "${THREADS:-1}" --device "${DEVICE:-cpu}" --supply "$SUPPLY" --cl $cl ${EXTRA:-} \
      --overrides "{\"calib_size\": $SIZE, \"calib_seed\": $d$block}" --out "$OUT"
  done
done
