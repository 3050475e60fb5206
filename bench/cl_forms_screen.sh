#!/usr/bin/env bash
# Issue 17: diagnostics of the old and the relational CL term (200 it/unit, resnet18 W2A2,
# seed 0), then the screening of forms at 200 it/unit (resnet18 W2A2, seeds 0,1; W2A4 was cut
# for time), base qdrop rows in the same file and under the same load as the CL rows (time
# ratios). The first version of this script also screened lambda 1.0 and W2A4; cut to fit the
# session (runs took 3x longer than on an idle machine).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
OLD='{"mapping":"fp_tail","tail_end":"logits","critic":"nce","negatives":"batch","lambda":0.1,"tau":0.5}'
NEW='{"mapping":"fp_tail","tail_end":"logits","critic":"relational","negatives":"batch","lambda":10.0,"tau":0.5}'
if [ "${DIAG:-1}" = 1 ]; then
  python -m bench.cl_diagnose --bits W2A2 --iters 200 --cl "$OLD" --out bench/results/cl_diagnose_nce_default.json > bench/results/cl_diagnose_nce_default.md
  python -m bench.cl_diagnose --bits W2A2 --iters 200 --cl "$NEW" --out bench/results/cl_diagnose_relational.json > bench/results/cl_diagnose_relational.md
fi
OUT=bench/results/cpu_cl_forms_screen_iters200.jsonl
V='[{"cl_calib":{"mapping":"fp_tail","tail_end":"logits","critic":"relational","negatives":"batch","lambda":10.0,"tau":0.5,"every":1}},
    {"cl_calib":{"mapping":"pool","tail_end":"logits","critic":"relational","negatives":"batch","lambda":10.0,"tau":0.1,"every":1}}]'
for bits in ${BITS:-W2A2}; do
  python -m bench.accuracy --models resnet18 --bits $bits --methods qdrop --seeds 0,1 --iters 200 --jobs 1 --threads 1 --out $OUT --cl off
  python -m bench.accuracy --models resnet18 --bits $bits --methods qdrop --seeds 0,1 --iters 200 --jobs 1 --threads 1 --out $OUT --cl on --overrides "$V"
done
