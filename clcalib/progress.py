"""Progress events: the reconstruction loop yields them, callers (CLI bar, worker) display them."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ProgressEvent:
    # "prepare" | "sensitivity" | "search" | "reconstruct" | "unit_done" | "export" | "evaluate" | "warning" | "done"
    stage: str
    unit: int = 0  # 0-based index of the current reconstruction unit
    num_units: int = 0
    unit_name: str = ""
    iteration: int = 0  # iterations done in this unit
    iters: int = 0  # iterations per unit
    loss: float | None = None  # mean total loss over the last reporting window
    elapsed_s: float = 0.0
    eta_s: float | None = None
    message: str = ""  # a warning's text (stage "warning", see clcalib.traps); else what the run is doing

    def to_dict(self) -> dict:
        return asdict(self)


ProgressCallback = Callable[[ProgressEvent], None]


class PrintProgress:
    """What ``clcalib.calibrate`` reports when given no ``on_progress``: one line on stderr when
    the units are known and one per finished unit, and every warning (pass ``on_progress=lambda
    e: None`` for silence, or your own callback)."""

    def __init__(self, stream=None):
        self.stream = stream
        self.t0 = time.perf_counter()
        self.started = False

    def __call__(self, e: ProgressEvent) -> None:
        out = self.stream or sys.stderr
        if e.stage == "warning":
            print(f"clcalib: WARNING: {e.message}", file=out, flush=True)
        elif e.num_units and not self.started and e.stage in ("reconstruct", "unit_done"):
            self.started = True
            print(f"clcalib: {e.num_units} units, {e.iters} iterations each", file=out, flush=True)
        if e.stage == "unit_done":
            loss = f", loss {e.loss:.4g}" if e.loss is not None else ""
            print(f"clcalib: unit {e.unit + 1}/{e.num_units} {e.unit_name} done ({time.perf_counter() - self.t0:.0f} s"
                  f"{loss}{f', about {e.eta_s:.0f} s left' if e.eta_s else ''})", file=out, flush=True)
