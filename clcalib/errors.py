"""The library's exception tree. Every error a user can cause is one of these.

    CalibrationError
     ├── ConfigError          a config value is invalid or inconsistent
     ├── ModelMismatchError   a state_dict does not fit the architecture / unknown arch
     │    └── UnsupportedModel  the model's structure is outside what clcalib handles
     ├── DataError            calibration or evaluation data unreadable, empty or malformed
     ├── ExportError          a checkpoint cannot be written or read back
     └── Canceled             the progress callback asked calibration to stop

Messages say what was expected, what came, and what to do.
"""


class CalibrationError(Exception):
    """Base of every error clcalib raises on purpose."""


class ConfigError(CalibrationError, ValueError):
    pass


class ModelMismatchError(CalibrationError, ValueError):
    pass


class UnsupportedModel(ModelMismatchError, NotImplementedError):
    """The model's structure is outside what the partitioner handles."""


class DataError(CalibrationError, ValueError):
    pass


class ExportError(CalibrationError):
    pass


class Canceled(CalibrationError):
    """Raised from an ``on_progress`` callback to stop a calibration between iterations."""
