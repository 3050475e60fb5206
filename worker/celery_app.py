"""The worker's Celery app (``celery -A worker.celery_app``): the shared configuration of
``jobs.queue`` with this package's task registered."""

from __future__ import annotations

from jobs.queue import make_celery
from jobs.settings import get_settings

app = make_celery(get_settings(), include=("worker.tasks",))
