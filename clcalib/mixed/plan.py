"""Mixed precision in a calibration run: measure the sites' sensitivity, then either calibrate
the allocation a budget allows, or search the budgets for the smallest model within an accuracy
target (``config.target``), returning the best model found when the time budget runs out.

Each candidate is a full calibration by the job's method; its top-1 is measured on the
evaluation set in memory, and the run's report measures the chosen one again from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from clcalib.config import CalibConfig
from clcalib.errors import ConfigError
from clcalib.mixed.allocate import Allocation, allocate, check_budget, size_of, smallest
from clcalib.mixed.sensitivity import SiteCost, measure
from clcalib.progress import ProgressCallback, ProgressEvent


class OutOfTime(Exception):
    """Raised from the progress callback when target.time_budget_s has passed."""


@dataclass
class Probe:
    w_bits_avg: float  # the candidate's budget
    weight_bytes: int
    top1: float | None  # None: stopped by the time budget before it finished
    meets: bool
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def choices(config: CalibConfig) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None, int]:
    """(weight widths, activation widths, images) the budget or the target measures; None: not
    allocated, so not measured."""
    b, t = config.budget, config.target
    if b is not None:
        weights = b.weight_mb is not None or b.w_bits_avg is not None
        return (b.w_choices if weights else None), (b.a_choices if b.a_bits_avg is not None else None), b.images
    return t.w_choices, None, t.images


def sensitivity(fp_model, calib: Tensor, config: CalibConfig, emit: ProgressCallback,
                w_choices: tuple[int, ...] | None, a_choices: tuple[int, ...] | None, images: int,
                evaluation: tuple[Tensor, Tensor] | None = None) -> tuple[list[SiteCost], float]:
    """The sites' costs at these widths on the first ``images`` calibration images, and the
    seconds it took. Sites named in config.layer_bits, like first/last, are fixed."""
    from clcalib.calibration import exact_numerics, resolve_device
    from clcalib.graph.partition import QuantModel, QuantSpec

    device = resolve_device(config.device)
    t = time.perf_counter()
    x = calib[:images].to(device)
    if evaluation is not None:
        evaluation = (evaluation[0].to(device), evaluation[1].to(device))
    with exact_numerics():
        qm = QuantModel(fp_model, QuantSpec.from_config(config), x[:2], config.partition).to(device)
        check_budget(qm, config, x)  # a budget no model meets: refused before minutes of measuring

        def on_site(i: int, total: int, name: str) -> None:
            emit(ProgressEvent(stage="sensitivity", unit=i - 1, num_units=total, unit_name=name,
                               elapsed_s=time.perf_counter() - t))

        costs = measure(qm, x, w_choices, a_choices, config.method.spec.range_search, evaluation=evaluation,
                        on_site=on_site)
    for c in costs:
        c.fixed = c.fixed or c.name in config.layer_bits
    return costs, time.perf_counter() - t


def with_bits(config: CalibConfig, alloc: Allocation) -> CalibConfig:
    return config.model_copy(update={"layer_bits": {**alloc.layer_bits, **config.layer_bits}})


def budget_allocation(costs: list[SiteCost], config: CalibConfig) -> Allocation:
    b = config.budget
    return allocate(costs, weight_bytes=round(b.weight_mb * 1e6) if b.weight_mb is not None else None,
                    w_bits_avg=b.w_bits_avg, a_bits_avg=b.a_bits_avg)


def candidates(costs: list[SiteCost], config: CalibConfig) -> tuple[list[tuple[float, Allocation]], list[float]]:
    """The target's ladder of average weight bits as allocations, smallest first, each size once;
    and the rungs below the smallest model these choices allow (left out)."""
    _, lo = smallest(costs)
    out: list[tuple[float, Allocation]] = []
    skipped = [b for b in config.target.w_bits_avg if b < lo]
    for b in config.target.w_bits_avg:
        if b < lo:
            continue
        alloc = allocate(costs, w_bits_avg=b)
        if not out or alloc.weight_bytes > out[-1][1].weight_bytes:
            out.append((b, alloc))
    if not out:
        raise ConfigError(f"no candidate of target.w_bits_avg {list(config.target.w_bits_avg)} is possible: the smallest "
                          f"model these choices allow has {lo:.3f} average weight bits; add larger averages")
    return out, skipped


def search(cands: list[tuple[float, Allocation]], run: Callable[[int], float], fp_top1: float, max_drop: float,
           deadline: float | None, emit: ProgressCallback) -> tuple[int | None, list[Probe], bool]:
    """Binary search for the smallest candidate within ``max_drop`` of ``fp_top1`` (accuracy grows
    with size, mostly: every probe is kept, so the frontier shows where it does not).
    ``run(i)`` calibrates candidate i and returns its top-1 (it may raise OutOfTime). Returns
    (the candidate to keep, the probes, whether the time budget stopped the search). The one
    kept: the smallest that met the target, else the most accurate finished."""
    lo, hi, best, probes, stopped = 0, len(cands) - 1, None, [], False
    while lo <= hi:
        mid = (lo + hi) // 2
        bits, alloc = cands[mid]
        emit(ProgressEvent(stage="search", unit=mid, num_units=len(cands), unit_name=f"{bits:g} bits",
                           message=f"candidate {len(probes) + 1}: average {bits:g} weight bits, "
                           f"{alloc.weight_bytes / 1e6:.3f} MB"))
        t = time.perf_counter()
        try:
            top1 = run(mid)
        except OutOfTime:
            probes.append(Probe(bits, alloc.weight_bytes, None, False, time.perf_counter() - t))
            stopped = True
            break
        ok = fp_top1 - top1 <= max_drop
        probes.append(Probe(bits, alloc.weight_bytes, top1, ok, time.perf_counter() - t))
        if ok:
            best, hi = mid, mid - 1
        else:
            lo = mid + 1
        if deadline is not None and time.monotonic() > deadline:
            stopped = lo <= hi
            break
    if best is None:
        done = [(p.top1, i) for i, p in zip(_indices(cands, probes), probes, strict=True) if p.top1 is not None]
        best = max(done)[1] if done else None
    return best, probes, stopped


def _indices(cands: list[tuple[float, Allocation]], probes: list[Probe]) -> list[int]:
    where = {b: i for i, (b, _a) in enumerate(cands)}
    return [where[p.w_bits_avg] for p in probes]


def deadline_guard(on_progress: ProgressCallback | None, deadline: float | None, label: str) -> ProgressCallback:
    """``on_progress`` that names the candidate (``label``) in each event's message and raises
    OutOfTime once ``deadline`` (monotonic) has passed."""
    def guarded(e: ProgressEvent) -> None:
        if on_progress is not None:
            on_progress(e if e.stage == "warning" else dataclasses.replace(e, message=e.message or label))
        if deadline is not None and time.monotonic() > deadline:
            raise OutOfTime()
    return guarded


def section(costs: list[SiteCost], seconds: float, config: CalibConfig, alloc: Allocation | None,
            probes: list[Probe] | None = None, stopped: bool = False, skipped: list[float] | None = None) -> dict:
    """The report's ``mixed_precision``: the sensitivity table, the allocation, the search."""
    from clcalib.mixed.sensitivity import proxy_check

    uniform = size_of(costs, {})
    out = {"sensitivity": [c.to_dict() for c in costs], "sensitivity_seconds": round(seconds, 2),
           "proxy_check": proxy_check(costs),
           "uniform": {"weight_bytes": uniform[0], "w_bits_avg": uniform[1], "a_bits_avg": uniform[2]}}
    if alloc is not None:
        out["allocation"] = alloc.to_dict()
    if probes is not None:
        out["search"] = {"probes": [p.to_dict() for p in probes], "stopped_by_time_budget": stopped,
                         "max_top1_drop": config.target.max_top1_drop, "skipped_w_bits_avg": skipped or []}
    return out


def calibrate_mixed(fp_model, calib: Tensor, config: CalibConfig, on_progress: ProgressCallback | None,
                    resume_dir: str | Path | None, evalset, fp_logits: Tensor | None, device: torch.device):
    """(CalibrationResult, the config it ran with (layer_bits filled), the report's section, warnings)."""
    from clcalib.calibration import calibrate, exact_numerics
    from clcalib.metrics import predict, top1

    emit = on_progress or (lambda e: None)
    costs, seconds = sensitivity(fp_model, calib, config, emit, *choices(config))
    if config.budget is not None:
        alloc = budget_allocation(costs, config)
        cfg = with_bits(config, alloc)
        result = calibrate(fp_model, calib, cfg, on_progress, resume_dir=resume_dir)
        return result, cfg, section(costs, seconds, config, alloc), []

    target = config.target
    cands, skipped = candidates(costs, config)
    fp_top1 = top1(fp_logits, evalset.labels)
    deadline = time.monotonic() + target.time_budget_s if target.time_budget_s else None
    kept: dict[int, tuple] = {}  # candidate -> (result, config, top1): only those that may be returned

    def run(i: int) -> float:
        cfg = with_bits(config, cands[i][1])
        label = f"search: candidate {cands[i][0]:g} average weight bits ({cands[i][1].weight_bytes / 1e6:.3f} MB)"
        # one resume state for the whole search (a worker syncs one file): the candidate being
        # calibrated resumes; the search's order is deterministic, so a rerun reaches it again
        result = calibrate(fp_model, calib, cfg, deadline_guard(on_progress, deadline, label), resume_dir=resume_dir)
        with exact_numerics():
            acc = top1(predict(result.model, evalset.images(), device=device), evalset.labels)
        kept[i] = (result, cfg, acc)
        meeting = [j for j, k in kept.items() if fp_top1 - k[2] <= target.max_top1_drop]
        keep = {min(meeting)} if meeting else {max(kept, key=lambda j: kept[j][2])}
        for j in set(kept) - keep:  # a larger model or a less accurate one: never returned
            del kept[j]
        return acc

    best, probes, stopped = search(cands, run, fp_top1, target.max_top1_drop, deadline, emit)
    if best is None:
        raise ConfigError(f"target.time_budget_s of {target.time_budget_s:g} s ended before the first candidate "
                          f"finished calibrating ({probes[0].seconds:.0f} s spent on it); raise the time budget or "
                          "lower config.iters")
    result, cfg, acc = kept[best]
    warnings = []
    drop = fp_top1 - acc
    if drop > target.max_top1_drop:
        warnings.append(f"no candidate met the target of {target.max_top1_drop:g} points: the most accurate found "
                        f"loses {drop:.2f} ({cands[best][0]:g} average weight bits, {cands[best][1].weight_bytes / 1e6:.3f} "
                        "MB); allow a larger drop, more bits (a_bits, target.w_bits_avg) or more iterations")
    if stopped:
        warnings.append(f"target.time_budget_s ({target.time_budget_s:g} s) stopped the search after {len(probes)} "
                        "candidate(s): this is the best model found so far, not necessarily the smallest that meets "
                        "the target")
    info = section(costs, seconds, config, cands[best][1], probes, stopped, skipped)
    info["search"].update(chosen_w_bits_avg=cands[best][0], fp_top1=fp_top1, met=drop <= target.max_top1_drop)
    return result, cfg, info, warnings
