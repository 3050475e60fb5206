"""The Celery app, configured from settings: the API sends with it, the worker consumes with
it. Light: no torch here. The job store is the source of truth; see ``worker.tasks`` for what a
message means.

Redis (``CLCALIB_REDIS_URL``) in every deployed setting; without it, kombu's filesystem
transport in ``<data_dir>/queue`` (the embedded one-command default).
"""

from __future__ import annotations

from celery import Celery

from jobs.settings import Settings

TASK_NAME = "clcalib.calibrate"


def make_celery(settings: Settings, include: tuple[str, ...] = ()) -> Celery:
    app = Celery("clcalib")
    conf = dict(
        task_acks_late=True,  # a message is acked after the task returns; the task is idempotent
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a worker holds one message: the one it runs
        worker_concurrency=1,
        task_ignore_result=True,  # results live in the job store
        task_default_queue=settings.queue_name,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a restarting Redis is waited for, not fatal
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        include=list(include),
    )
    if settings.redis_url:
        conf.update(
            broker_url=settings.redis_url,
            broker_transport_options={
                # Redis redelivers an unacked message after this; it must exceed any job's run
                # time. A redelivery while the job runs is dropped anyway (the row is claimed).
                "visibility_timeout": settings.visibility_timeout_s,
                "socket_connect_timeout": 5,
            },
            worker_send_task_events=True,  # for flower
            task_send_sent_event=True,
        )
    else:
        q = settings.queue_dir.resolve()  # made by ensure_queue_dirs when a process starts
        conf.update(
            broker_url="filesystem://",
            broker_transport_options={
                "data_folder_in": str(q / "messages"),
                "data_folder_out": str(q / "messages"),
                "control_folder": str(q / "control"),
                "store_processed": False,
                "polling_interval": 0.5,
            },
            worker_enable_remote_control=False,
        )
    app.conf.update(conf)
    return app


def send_job(app: Celery, settings: Settings, job_id: str) -> None:
    """A job's message (a turn: see ``worker.runner``), with a short retry; raises if the broker
    cannot be reached (the job stays queued in the store; the API's sweeper sends it later)."""
    app.send_task(TASK_NAME, args=[job_id], queue=settings.queue_name, retry=True,
                  retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0})


def ensure_queue_dirs(settings: Settings) -> None:
    """The embedded queue's folders, made when the API or a worker starts (never on import)."""
    if not settings.redis_url:
        for sub in ("messages", "control"):
            (settings.queue_dir / sub).mkdir(parents=True, exist_ok=True)

