"""``clcalib worker`` / ``python -m worker``: one Celery worker process, one job at a time."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from jobs.settings import env_summary, get_settings


def run_worker(argv: list[str] | None = None) -> None:
    s = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("clcalib.worker").info("clcalib worker starting: %s device=%s", env_summary(s), s.device)
    from jobs.queue import ensure_queue_dirs
    from worker.celery_app import app

    ensure_queue_dirs(s)

    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    name = f"clcalib-{s.device.replace(':', '')}{'-gpu' + gpu if gpu else ''}-{os.getpid()}@{socket.gethostname()}"
    args = ["worker", "--pool=solo", "--concurrency=1", "-Q", s.queue_name, "--loglevel=INFO",
            "-n", name, "--without-mingle", "--without-gossip"]
    app.worker_main(args + list(argv or []))


def add_commands(sub) -> None:
    """``clcalib worker``; a ``clcalib.commands`` entry point (pyproject.toml)."""
    p = sub.add_parser("worker", help="start one calibration worker (one job at a time)")
    p.add_argument("celery_args", nargs=argparse.REMAINDER, help="extra celery worker arguments")
    p.set_defaults(func=lambda args: run_worker(args.celery_args) or 0)


if __name__ == "__main__":
    run_worker(sys.argv[1:])
