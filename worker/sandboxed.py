"""What runs inside a calibration's sandboxed child (``jobs.sandbox``): the library's pipeline on
the job's inputs, its progress events sent to the worker as JSON. The worker process keeps the
job store, the heartbeat and the cancel; this child sees only the job's inputs and outputs."""

from __future__ import annotations

import json

# a stop signal to the worker's process group is the worker's to act on (it hands the job back)
STOP_SIGNALS_TO_CALLER = True


def warm_sandbox_child() -> None:
    """Before the child is confined: torch, the pipeline and the report's figures imported once."""
    import clcalib.pipeline  # noqa: F401
    from clcalib.report_html import preload

    preload()


def calibrate(*, model: dict, calibration: str, evaluation: str | None, labels: str | None, config: dict,
              out_dir: str, resume_dir: str, limits: dict, torch_threads: int | None, emit) -> dict:
    """``{"report": ...}``, or ``{"error": message}`` for an error the user's inputs caused."""
    import torch

    from clcalib.config import CalibConfig
    from clcalib.data import Limits, read_labels
    from clcalib.errors import CalibrationError
    from clcalib.pipeline import run_calibration
    from jobs.sandbox import is_out_of_memory

    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        report = run_calibration(
            **model, calibration=calibration, config=CalibConfig.model_validate(config), out_dir=out_dir,
            evaluation=evaluation, labels=read_labels(labels) if labels else None,
            on_progress=lambda ev: emit(ev.to_dict()), resume_dir=resume_dir, limits=Limits(**limits))
    except CalibrationError as e:
        if is_out_of_memory(e):  # e.g. reading the weights under the cap: the cap, not the file, is the cause
            raise MemoryError(str(e)) from None
        return {"error": str(e)}
    return {"report": json.loads(json.dumps(report, default=str))}
