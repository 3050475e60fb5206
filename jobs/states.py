"""A job's states, written once: the store, the API's schemas, the worker and the client use these.

    queued -> running -> succeeded | failed | canceled
    queued -> canceled
    running -> queued        by the reaper, when the worker's heartbeat went stale, or by the
                             worker itself when it is asked to stop (``Store.hand_back``)
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
