"""Copies base rows (no CL, today's defaults) of one model/method/bits/iters from a results file
into another, marked ``copied_from``, so a base + CL comparison does not rerun a base that is
already measured; prints the seeds it found no row for (comma-separated, empty when none).

    python -m bench.copy_base_rows --from bench/results/cpu_iters2000.jsonl \\
        --to bench/results/cpu_cl_iters2000.jsonl --model mobilenet_v2 --method qdrop --bits W2A4 \\
        --iters 2000 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.summarize import load, settings


def is_base(r: dict, model: str, method: str, bits: str, iters: int | None = None) -> bool:
    """A base row of a base + CL comparison: the method without CL, at today's defaults."""
    return ("error" not in r and not r.get("cl") and not settings(r) and r["model"] == model
            and r["method"] == method and r["bits"] == bits and (iters is None or r["iters"] == iters))


def _is_base(r: dict, a: argparse.Namespace) -> bool:
    return is_base(r, a.model, a.method, a.bits, a.iters)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="src", required=True)
    p.add_argument("--to", dest="dst", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--bits", required=True)
    p.add_argument("--iters", type=int, required=True)
    p.add_argument("--seeds", required=True)
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    have = {r["seed"] for r in load([a.dst]) if _is_base(r, a)} if Path(a.dst).exists() else set()
    found = {}
    for r in load([a.src]):
        if _is_base(r, a) and r["seed"] in seeds and r["seed"] not in have:
            found.setdefault(r["seed"], r)  # the first row of a seed, as the tables take it
    with open(a.dst, "a") as f:
        for _seed, r in sorted(found.items()):
            f.write(json.dumps({**r, "copied_from": a.src}) + "\n")
    print(",".join(str(s) for s in seeds if s not in have and s not in found))


if __name__ == "__main__":
    main()
