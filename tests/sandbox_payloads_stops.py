"""``sandbox_payloads`` in a child whose module leaves stop signals to its caller, as the
calibration's (``worker.sandboxed``) does."""

from sandbox_payloads import linger  # noqa: F401

STOP_SIGNALS_TO_CALLER = True
