"""Progress events: the reconstruction loop yields them, callers (CLI bar, worker) display them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # "prepare" | "reconstruct" | "unit_done" | "export" | "evaluate" | "warning" | "done"
    unit: int = 0  # 0-based index of the current reconstruction unit
    num_units: int = 0
    unit_name: str = ""
    iteration: int = 0  # iterations done in this unit
    iters: int = 0  # iterations per unit
    loss: float | None = None  # mean total loss over the last reporting window
    elapsed_s: float = 0.0
    eta_s: float | None = None
    message: str = ""  # a warning's text (stage "warning"), see clcalib.traps

    def to_dict(self) -> dict:
        return asdict(self)


ProgressCallback = Callable[[ProgressEvent], None]
