"""The reference data moved to ``clcalib.testing``; this name stays for the benchmark scripts
that still import it (bench/cl_diagnose.py)."""

from clcalib.testing import (
           FMNIST,
           PREPROCESS,
           REFERENCE,
           calibration_indices,
           png,
           read_idx,
           require_dataset,
           split,
           write_zip,
)

__all__ = ["FMNIST", "PREPROCESS", "REFERENCE", "calibration_indices", "png", "read_idx", "require_dataset", "split",
           "write_zip"]
