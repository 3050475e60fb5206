#!/usr/bin/env bash
# Builds .gpu/, what a device call carries (device tool: carry [".gpu"], ~35 MB) for the
# bench/gpu_*.sh scripts: the device image has torch and torchvision but not pydantic, and
# reaches no package registry, so the wheels for its Python go along, with the reference
# models and the two Fashion-MNIST PNG zips. Run here (needs the registry and shared/).
# It also exports the official QDrop code (github wimh966/QDrop, branch qdrop; never committed
# here) into .gpu/peer/ with its commit in .gpu/peer/COMMIT, for bench/peer_qdrop.py. It comes
# from a bare mirror: $QDROP_GIT_DIR, else the one the session's fetch tool leaves under
# /work/.mirror (fetch github:wimh966/QDrop first).
#   bash bench/make_gpu_carry.sh [python version of the device image, default 3.12]
#   bash bench/make_gpu_carry.sh --peer-only   # just .gpu/peer/ (no registry needed)
set -eu
cd "$(dirname "$0")/.."

export_peer() {
  local git_dir=${QDROP_GIT_DIR:-}
  if [ -z "$git_dir" ]; then
    for d in /work/.mirror/wimh966+QDrop/repo /work/.mirror/*QDrop*/repo; do
      if [ -d "$d" ]; then git_dir=$d; break; fi
    done
  fi
  if [ -z "$git_dir" ] || ! git --git-dir="$git_dir" rev-parse -q --verify qdrop^{commit} >/dev/null 2>&1; then
    echo "make_gpu_carry: no git dir with branch qdrop of wimh966/QDrop (looked at \$QDROP_GIT_DIR," \
      "/work/.mirror/*QDrop*/repo); fetch github:wimh966/QDrop or set QDROP_GIT_DIR to a clone's .git" >&2
    exit 1
  fi
  rm -rf .gpu/peer && mkdir -p .gpu/peer
  # only the code and configs: the repository's figure is not needed on the device
  git --git-dir="$git_dir" archive qdrop -- qdrop exp README.md | tar -x -C .gpu/peer
  git --git-dir="$git_dir" rev-parse qdrop^{commit} > .gpu/peer/COMMIT
  # their configs as JSON too: the device image may lack PyYAML (bench/peer_qdrop.py reads the
  # YAML where it can and this copy where it cannot)
  python -c 'import json, pathlib, sys, yaml
root = pathlib.Path(sys.argv[1])
json.dump({str(p.relative_to(root)): yaml.safe_load(p.read_text()) for p in sorted(root.glob("exp/*/*/config.yaml"))},
          open(root / "CONFIGS.json", "w"), indent=1)' .gpu/peer
  echo "exported wimh966/QDrop qdrop@$(cat .gpu/peer/COMMIT) from $git_dir to .gpu/peer"
}

if [ "${1:-}" = --peer-only ]; then export_peer; exit 0; fi
PY=${1:-3.12}
rm -rf .gpu/whl && mkdir -p .gpu/whl  # stale wheels of another version would clash at install
# the versions installed here, so the device runs what the tests ran
# pydantic for the library; matplotlib (report.html's figures) and pytest (the device runs the
# CUDA cases of tests/test_recon_step.py) with their dependencies the image lacks
pins=$(python -c 'from importlib.metadata import version as v
print(" ".join(f"{p}=={v(p)}" for p in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
  "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "python-dateutil", "six", "packaging",
  "pytest", "pluggy", "iniconfig", "jinja2", "markupsafe", "safetensors")))')
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .gpu/whl $pins  # 2_28: contourpy 1.3.3 has no older tag
cp ../shared/reference/fmnist_resnet18.* ../shared/reference/fmnist_mobilenet_v2.* .gpu/
python -c 'from pathlib import Path; from bench.accuracy import prepare_data; prepare_data(Path(".gpu"))'
# the tests' Fashion-MNIST (clcalib.testing, $CLCALIB_FMNIST_DIR): the first 1024 train images and
# the test split as IDX files (4 MB; the whole train split would not fit the carry)
python - <<'PY'
import gzip
from pathlib import Path
from clcalib.testing import FMNIST
dest = Path(".gpu/fmnist"); dest.mkdir(parents=True, exist_ok=True)
for name, keep in (("train", 1024), ("t10k", None)):
    for kind, header in (("images-idx3", 16), ("labels-idx1", 8)):
        data = gzip.open(FMNIST / f"{name}-{kind}-ubyte.gz").read()
        n = int.from_bytes(data[4:8], "big") if keep is None else keep
        row = (len(data) - header) // int.from_bytes(data[4:8], "big")
        out = data[:4] + n.to_bytes(4, "big") + data[8:header] + data[header : header + n * row]
        (dest / f"{name}-{kind}-ubyte.gz").write_bytes(gzip.compress(out))
PY
export_peer
du -sh .gpu && ls .gpu .gpu/whl
