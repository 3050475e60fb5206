"""A job's states, written once: the store, the API's schemas, the worker and the client use these.

    queued -> running -> succeeded | failed | canceled
    queued -> canceled
    running -> queued        only by the reaper, when the worker's heartbeat went stale
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


ACTIVE = (State.QUEUED, State.RUNNING)  # what counts against a tenant's active-job limit
TERMINAL = (State.SUCCEEDED, State.FAILED, State.CANCELED)
