#!/usr/bin/env bash
# Builds .gpu_svc/ (ignored by git), what the device call of bench/gpu_service.sh carries:
# the service's and worker's wheels for the device's Python, the reference checkpoints and the
# Fashion-MNIST zips, each group one .tar.xz, under 60 MiB, with MANIFEST.json saying what was
# left out to fit and why (bench/gpu_service_carry.py). Run here: it needs the registry, the
# Debian Fashion-MNIST package and shared/reference.
#   bash bench/make_gpu_service_carry.sh                       # Python 3.12, .gpu_svc/
#   bash bench/make_gpu_service_carry.sh --prefer onnx         # ONNX Runtime before the models
#   bash bench/make_gpu_service_carry.sh --python-version 3.11 --dest /tmp/carry311   # to rehearse here
set -eu
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} python bench/gpu_service_carry.py "$@"
