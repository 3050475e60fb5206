"""Builds .gpu_svc/, what the device call of bench/gpu_service.sh carries (the device tool
carries at most 64 MiB and reaches no package registry; its image has Python 3.12 with torch and
torchvision and nothing else of ours). Run here, with the registry: ``bash bench/make_gpu_service_carry.sh``.

What goes in, each group one .tar.xz (wheels re-zipped uncompressed first, so xz packs them about
a third smaller than their own deflate; pip installs them the same, their RECORD hashes the
files inside):

- ``core``: every wheel the library, the API and the worker import, for the device's Python
  (manylinux x86_64): the closure of pyproject's runtime dependencies, versions from
  constraints.txt, less torch, torchvision and what only they bring (numpy, pillow, the CUDA
  wheels, sympy, ...: the image has them), less scipy (imported only by mixed precision, 35 MiB),
  less uvicorn's optional extras (``uvicorn_extras`` below). typing-extensions, jinja2 and
  markupsafe are torch's dependencies too but are carried: pydantic needs typing-extensions >=
  4.16 and report.html jinja2 >= 3.1, floors the image's torch does not promise (0.2 MiB).
- ``data``: the Fashion-MNIST PNG zips of bench/accuracy.py's prepare_data (1024 train images,
  the 10k test images in class folders).
- ``resnet18``, ``mobilenet_v2``: the reference checkpoints (stages a, b, d; stage c).
- ``uvicorn_extras``: what uvicorn[standard] adds beyond httptools (uvloop, watchfiles,
  websockets, PyYAML): uvicorn uses them when present, runs without them.
- ``onnx``: onnx, onnxruntime and what only they need (config export ["onnx"]).

core and data always; the others in the order of --prefer while the total stays under
--limit-mib, the rest left out with the reason in MANIFEST.json (bench/gpu_service.py reads it
and says why a stage or the ONNX export is skipped).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# torch's and torchvision's own dependencies: in the device image with them
TORCH_SIDE = {"torch", "torchvision", "numpy", "pillow", "filelock", "sympy", "mpmath", "networkx", "fsspec",
              "setuptools", "triton"}
CARRIED_ANYWAY = {"typing-extensions", "jinja2", "markupsafe"}  # floors of ours the image need not meet
NOT_CARRIED = {"scipy": "imported only by mixed precision (clcalib/mixed), not run here; 35 MiB"}
ORDER = {"resnet18": ("resnet18", "mobilenet_v2", "uvicorn_extras", "onnx"),
         "onnx": ("onnx", "mobilenet_v2", "uvicorn_extras", "resnet18")}
USE = {"resnet18": "stages a, b and d (the reference resnet18 through the service, its download, the CLI run)",
       "mobilenet_v2": "stage c (the .pt2 program upload)",
       "uvicorn_extras": "uvicorn's optional speed-ups (uvloop, ...); it runs without them",
       "onnx": "the ONNX export and its ONNX Runtime check (config export [\"onnx\"]) in every stage"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def torch_side(name: str) -> bool:
    return (name in TORCH_SIDE or name.startswith(("nvidia-", "cuda-"))) and name not in CARRIED_ANYWAY


def resolve(reqs: list[str], py: str) -> dict:
    """pip's resolution of ``reqs`` for the device (no install): name -> its report entry."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", f"{tmp}/r.json", "--target", f"{tmp}/t", "--only-binary=:all:", "--python-version", py,
               "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)],
               "-c", str(ROOT / "constraints.txt"), *reqs]
        subprocess.run(cmd, check=True)
        report = json.loads(Path(f"{tmp}/r.json").read_text())
    return {norm(i["metadata"]["name"]): i for i in report["install"]}


def closure(roots: list[str], found: dict, py: str) -> set[str]:
    """Names reached from ``roots`` through the resolution's requires_dist, markers evaluated for
    the device (Linux x86_64, CPython ``py``), extras followed."""
    env = {**default_environment(), "python_version": py, "python_full_version": f"{py}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    seen: set[tuple[str, str]] = set()
    out: set[str] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        r = todo.pop()
        name = norm(r.name)
        if name not in found:  # pip judged its marker false (e.g. a python_full_version bound)
            continue
        for extra in ("", *sorted(r.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            out.add(name)
            for d in found[name]["metadata"].get("requires_dist") or []:
                dep = Requirement(d)
                if dep.marker is None or dep.marker.evaluate({**env, "extra": extra}):
                    todo.append(dep)
    return out


def restore_stored(src: Path, dst: Path) -> None:
    """The wheel re-zipped without compression (same members, same bytes)."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            zo.writestr(info, zi.read(info), compress_type=zipfile.ZIP_STORED)


def pack(dest: Path, name: str, files: list[tuple[Path, str]]) -> int:
    path = dest / f"{name}.tar.xz"
    with tarfile.open(path, "w:xz", preset=6) as t:
        for f, arc in files:
            t.add(f, arcname=arc)
    return path.stat().st_size


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python-version", default="3.12", help="the device image's Python (default 3.12)")
    p.add_argument("--dest", type=Path, default=ROOT / ".gpu_svc")
    p.add_argument("--limit-mib", type=float, default=60.0, help="the carry's size at most (the tool allows 64)")
    p.add_argument("--prefer", choices=sorted(ORDER), default="resnet18",
                   help="resnet18: the reference models first, ONNX if it still fits; onnx: ONNX first")
    p.add_argument("--reference-dir", type=Path, default=None, help="where fmnist_<arch>.safetensors are")
    p.add_argument("--cache", type=Path, default=ROOT / "bench" / "work" / "gpu_svc_wheels",
                   help="downloaded wheels (kept between builds)")
    a = p.parse_args()
    py = a.python_version
    import tomllib  # Python >= 3.11, as here (the package supports 3.10)

    sys.path.insert(0, str(ROOT))
    from bench.accuracy import prepare_data
    from clcalib.testing import REFERENCE

    ref = a.reference_dir or REFERENCE
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [d for d in deps["dependencies"] if norm(Requirement(d).name) not in TORCH_SIDE | set(NOT_CARRIED)]
    onnx_reqs = deps["optional-dependencies"]["onnx"]
    found = resolve(runtime + onnx_reqs, py)
    plain = [str(Requirement(d)).replace("uvicorn[standard]", "uvicorn") for d in runtime] + ["httptools"]
    core = closure(plain, found, py)
    extras = closure(runtime, found, py) - core
    onnx = closure(onnx_reqs, found, py) - core - extras
    groups = {"core": core, "uvicorn_extras": extras, "onnx": onnx}
    for g, names in groups.items():
        groups[g] = {n for n in names if not torch_side(n)}
    left = set(found) - set().union(*groups.values())
    assert all(torch_side(n) for n in left), left

    cache = a.cache / f"cp{py.replace('.', '')}"
    cache.mkdir(parents=True, exist_ok=True)
    pins = sorted(f"{found[n]['metadata']['name']}=={found[n]['metadata']['version']}"
                  for names in groups.values() for n in names)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", py, "--implementation", "cp", *[x for p in PLATFORMS for x in ("--platform", p)],
                    "-d", str(cache), *pins], check=True)
    wheels = {}
    for w in cache.glob("*.whl"):
        n = norm(w.name.split("-")[0])
        if n in found and f"-{found[n]['metadata']['version']}-" in w.name:
            wheels[n] = w
    missing = sorted(set().union(*groups.values()) - set(wheels))
    assert not missing, f"no wheel downloaded for {missing}"

    a.dest.mkdir(parents=True, exist_ok=True)
    for old in a.dest.glob("*.tar.xz"):
        old.unlink()
    sizes, manifest_wheels = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for g, names in groups.items():
            files = []
            for n in sorted(names):
                stored = tmp / wheels[n].name
                restore_stored(wheels[n], stored)
                files.append((stored, f"whl/{wheels[n].name}"))
                manifest_wheels.append({"name": found[n]["metadata"]["name"], "version": found[n]["metadata"]["version"],
                                        "file": wheels[n].name, "group": g, "wheel_bytes": wheels[n].stat().st_size})
            sizes[g] = pack(a.dest, g, files)
            for f, _ in files:
                f.unlink()
        calib, test = prepare_data(tmp / "data")
        sizes["data"] = pack(a.dest, "data", [(calib, calib.name), (test, test.name)])
        for arch in ("resnet18", "mobilenet_v2"):
            sizes[arch] = pack(a.dest, arch, [(ref / f"fmnist_{arch}.{ext}", f"fmnist_{arch}.{ext}")
                                              for ext in ("safetensors", "json")])

    limit = int(a.limit_mib * 2**20)
    total = sizes["core"] + sizes["data"]
    included, left_out = ["core", "data"], {}
    for g in ORDER[a.prefer]:
        if total + sizes[g] <= limit:
            included.append(g)
            total += sizes[g]
        else:
            left_out[g] = (f"left out of the carry: {sizes[g] / 2**20:.1f} MiB would make it "
                           f"{(total + sizes[g]) / 2**20:.1f} MiB, over its {a.limit_mib:g} MiB (--prefer {a.prefer}); "
                           f"needed for {USE[g]}")
    for g in left_out:
        (a.dest / f"{g}.tar.xz").unlink()
    manifest = {
        "python_version": py, "platforms": list(PLATFORMS), "prefer": a.prefer, "limit_bytes": limit,
        "total_bytes": total, "groups": {g: {"bytes": s, "included": g in included, "use": USE.get(g, "always"),
                                             **({"reason": left_out[g]} if g in left_out else {})}
                                         for g, s in sizes.items()},
        "left_out": left_out,
        "not_carried": {**NOT_CARRIED, **{n: "torch's or torchvision's: in the device image" for n in sorted(left)}},
        "wheels": sorted(manifest_wheels, key=lambda w: (w["group"], w["name"].lower())),
        "files": {f.name: sha256(f) for f in sorted(a.dest.glob("*.tar.xz"))},
    }
    (a.dest / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for g, s in sizes.items():
        print(f"{g:15s} {s / 2**20:6.2f} MiB  {'carried' if g in included else 'LEFT OUT'}")
    print(f"{a.dest}: {total / 2**20:.2f} MiB in all (limit {a.limit_mib:g} MiB); MANIFEST.json says what is where")
    for g, why in left_out.items():
        print(f"  {g}: {why}")


if __name__ == "__main__":
    main()
