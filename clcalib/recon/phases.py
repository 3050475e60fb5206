"""Where a calibration's time goes, phase by phase (the report's ``phase_seconds``).

A phase ends with a device sync: CUDA work is queued, so without it a phase's kernels would be
billed to whichever phase next waits on the device. A handful of syncs per unit costs nothing
next to a unit's thousands of steps, and never changes what is computed."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

# the phases, in the order a run meets them: one place for their names (the report and the docs
# read them from here)
PHASES = {
    "setup": "the draw, its hash, the copy to the device, the model's conversion and its check",
    "weight_ranges": "every layer's weight scale search (MSE for the reconstructing methods)",
    "probe": "one sample through the units: which unit's output feeds the next",
    "inputs": "each unit's quantized and FP inputs and FP outputs over the calibration set, and their placement",
    "error": "each unit's error passes before and after (the first sets its activation ranges)",
    "loop": "the reconstruction steps, their terms' set-up and any CUDA-graph capture",
    "handover": "the next unit's inputs through a gap between units (recon.chain)",
    "resume": "saving the state after each unit, and loading it (with a resume directory)",
    "finish": "the integer runtime's biases",
}


class PhaseClock:
    """Seconds per phase, summed over the run's units."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
        self.device = device
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def __call__(self, phase: str):
        if phase not in PHASES:
            raise KeyError(f"unknown phase {phase!r}; add it to PHASES")
        t = time.perf_counter()
        try:
            yield
        finally:
            self.sync(self.device)
            self.seconds[phase] += time.perf_counter() - t

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}
