"""Service subcommands of ``clcalib``: serve, submit, status, watch, download, cancel, delete,
jobs. Registered as a ``clcalib.commands`` entry point (pyproject.toml): ``clcalib.cli`` finds
and calls ``add_commands(subparsers)`` without importing this package by name."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs.states import State


def _client(args):
    from service.client import Client

    return Client(args.url, args.api_key)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="API base URL (default $CLCALIB_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="API key (default $CLCALIB_API_KEY)")


def _print(obj) -> None:
    print(json.dumps(obj, indent=2))


def cmd_serve(args) -> int:
    from service.serve import serve

    serve(host=args.host, port=args.port, worker=args.worker)
    return 0


def _config(text: str | None) -> dict:
    if not text:
        return {}
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    return json.loads(text)


def cmd_submit(args) -> int:
    with _client(args) as c:
        job = c.submit(model=args.model, calibration=args.calibration, arch=args.arch,
                       num_classes=args.num_classes, config=_config(args.config),
                       evaluation=args.evaluation)
        if args.watch:
            print(job["id"], file=sys.stderr)
            return _watch(c, job["id"])
        _print(job) if args.json else print(job["id"])
    return 0


def cmd_status(args) -> int:
    with _client(args) as c:
        _print(c.status(args.job_id))
    return 0


def _watch(c, job_id: str) -> int:
    from tqdm import tqdm

    bar, last, state = None, None, State.QUEUED
    for event, data in c.events(job_id):
        if event == "status":
            state = data["state"]
            p = data.get("progress") or {}
            key = (p.get("unit"), p.get("num_units"))
            if p.get("num_units") and key != last:
                if bar is not None:
                    bar.close()
                bar = tqdm(total=p.get("iters") or 1, desc=f"unit {p['unit'] + 1}/{p['num_units']} {p.get('unit_name', '')}",
                           unit="it", leave=False)
                last = key
            if bar is not None and p:
                bar.n = min(p.get("iteration", 0), bar.total)
                loss = p.get("loss")
                bar.set_postfix_str(f"{state} {p.get('stage', '')}" + (f" loss={loss:.4g}" if loss is not None else ""))
                bar.refresh()
            elif bar is None:
                print(f"{state} {p.get('stage', '')}".strip(), file=sys.stderr)
        elif event in ("end", "deleted"):
            break
    if bar is not None:
        bar.close()
    final = c.status(job_id) if event != "deleted" else {"state": "deleted"}
    if final["state"] == State.SUCCEEDED:
        print(json.dumps(final.get("metrics"), indent=2))
        return 0
    print(f"job {job_id}: {final['state']}: {final.get('error') or ''}", file=sys.stderr)
    return 1


def cmd_watch(args) -> int:
    with _client(args) as c:
        return _watch(c, args.job_id)


def cmd_download(args) -> int:
    out = Path(args.output)
    with _client(args) as c:
        names = [args.name] if args.name else [a["name"] for a in c.artifacts(args.job_id)]
        if not names:
            print(f"job {args.job_id} has no artifacts (yet)", file=sys.stderr)
            return 1
        if len(names) > 1 or out.is_dir():
            out.mkdir(parents=True, exist_ok=True)
        for n in names:
            print(c.download(args.job_id, n, out))
    return 0


def cmd_cancel(args) -> int:
    with _client(args) as c:
        _print(c.cancel(args.job_id))
    return 0


def cmd_delete(args) -> int:
    with _client(args) as c:
        c.delete(args.job_id)
    return 0


def cmd_jobs(args) -> int:
    with _client(args) as c:
        page = c.jobs(limit=args.limit, cursor=args.cursor)
        for j in page["jobs"]:
            p = j.get("progress") or {}
            where = f"unit {p.get('unit', 0) + 1}/{p['num_units']}" if p.get("num_units") else ""
            print(f"{j['id']}  {j['state']:9}  {j['arch']:14} {j['created_at']}  {where}")
        if page.get("next_cursor"):
            print(f"more: --cursor {page['next_cursor']}", file=sys.stderr)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="start the API (and a local worker when no Redis is configured)")
    p.add_argument("--host", default=None, help="default $CLCALIB_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default $CLCALIB_PORT or 8000")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--worker", dest="worker", action="store_true", default=None,
                   help="also start a local worker (default: only without CLCALIB_REDIS_URL)")
    g.add_argument("--no-worker", dest="worker", action="store_false")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("submit", help="upload a model and calibration data; print the job id")
    _common(p)
    p.add_argument("--model", required=True, help="safetensors or state_dict file")
    p.add_argument("--arch", required=True)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--calibration", required=True, help="zip/tar of images, or .npy/.safetensors tensor")
    p.add_argument("--evaluation", default=None, help="zip/tar of class folders")
    p.add_argument("--config", default=None, help="config JSON, or @file.json")
    p.add_argument("--watch", action="store_true", help="then follow its progress")
    p.add_argument("--json", action="store_true", help="print the whole job, not only its id")
    p.set_defaults(func=_guard(cmd_submit))

    for name, fn, text in (("status", cmd_status, "print a job's status as JSON"),
                           ("watch", cmd_watch, "follow a job's progress until it ends"),
                           ("cancel", cmd_cancel, "cancel a queued or running job"),
                           ("delete", cmd_delete, "delete a job and its files")):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("job_id")
        p.set_defaults(func=_guard(fn))

    p = sub.add_parser("download", help="download a job's artifacts")
    _common(p)
    p.add_argument("job_id")
    p.add_argument("--name", default=None, help="one artifact (default: all)")
    p.add_argument("-o", "--output", default=".", help="file or folder")
    p.set_defaults(func=_guard(cmd_download))

    p = sub.add_parser("jobs", help="list your jobs, newest first")
    _common(p)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--cursor", default=None)
    p.set_defaults(func=_guard(cmd_jobs))


def _guard(fn):
    """API errors print their message and exit 2, not a traceback."""

    def run(args) -> int:
        from service.client import ApiError

        try:
            return fn(args)
        except ApiError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run
