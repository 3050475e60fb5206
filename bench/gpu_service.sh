#!/usr/bin/env bash
# One device call (issue 29): a real service job on a CUDA worker. Unpacks the carry, installs
# its wheels beside the image's torch (no registry there), then bench/gpu_service.py: `clcalib
# serve` with CLCALIB_DEVICE=cuda, the reference resnet18 and a .pt2 mobilenet_v2 through the
# service, their checkpoints downloaded and re-evaluated on the CPU, the same calibration with
# the CLI. Rows in $OUT/gpu_service.jsonl as they finish, the server's log in $OUT/server*.log.
# Needs .gpu_svc/ (not committed: `bash bench/make_gpu_service_carry.sh`), carried by the call:
#   device tool: command "bash bench/gpu_service.sh", carry [".gpu_svc"], timeout_s 600
# Settings (environment): ITERS (1000: all four stages fit the deadline even if the steps run
# eagerly, 222 it/s for resnet18 on an H200, bench/results/gpu_h200_speed.jsonl), DEADLINE
# (seconds for gpu_service.py's stages, 470: the unpacking and install take about a minute of
# the call's 600), THREADS (4), DEVICE (cuda), and to rehearse elsewhere PYTHON, CARRY, SITE,
# UNPACK, OUT, and EXTRA (more gpu_service.py flags).
set -u
PY=${PYTHON:-python3}
CARRY=${CARRY:-.gpu_svc} SITE=${SITE:-/tmp/site} UNPACK=${UNPACK:-/tmp/gpusvc}
OUT=${OUT:-/tmp/gpusvc-out} DEADLINE=${DEADLINE:-470}
mkdir -p "$OUT"
t0=$(date +%s)
# Python's tarfile, not tar -J: the image need not have xz
"$PY" -c 'import glob, sys, tarfile
for f in sorted(glob.glob(sys.argv[1] + "/*.tar.xz")):
    with tarfile.open(f) as t:
        t.extractall(sys.argv[2], filter="data")' "$CARRY" "$UNPACK" || exit 2
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$UNPACK"/whl/*.whl || exit 2
export PYTHONPATH=$PWD:$SITE PYTHONUNBUFFERED=1
nvidia-smi -L 2>/dev/null
echo "unpacked and installed in $(( $(date +%s) - t0 )) s"
timeout $((DEADLINE + 45)) "$PY" bench/gpu_service.py --device "${DEVICE:-cuda}" --iters "${ITERS:-1000}" \
  --threads "${THREADS:-4}" --deadline "$DEADLINE" --data-dir "$UNPACK" --reference-dir "$UNPACK" \
  --manifest "$CARRY/MANIFEST.json" --out "$OUT" ${EXTRA:-} > "$OUT/gpu_service.out" 2>&1
rc=$?
echo "gpu_service.py exited $rc after $(( $(date +%s) - t0 )) s"
[ -s "$OUT/gpu_service.jsonl" ] || tail -40 "$OUT/gpu_service.out"
cut -c1-900 "$OUT/gpu_service.jsonl" 2>/dev/null
exit $rc
