"""Service subcommands of ``clcalib``: serve, submit, status, watch, download, cancel, delete,
jobs. Registered as a ``clcalib.commands`` entry point (pyproject.toml): ``clcalib.cli`` finds
and calls ``add_commands(subparsers)`` without importing this package by name."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from clcalib.config_flags import add_config_flags
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
    from clcalib.config import CalibConfig
    from clcalib.config_flags import config_overrides

    config = config_overrides(args, _config(args.config))
    CalibConfig.model_validate(config)  # a bad flag is one line here, not an upload later
    with _client(args) as c:
        job = c.submit(model=args.model, calibration=args.calibration, arch=args.arch,
                       num_classes=args.num_classes, config=config, evaluation=args.evaluation, labels=args.labels)
        if args.watch:
            print(job["id"], file=sys.stderr)
            if _estimate(job):
                print(_estimate(job), file=sys.stderr)
            return _watch(c, job["id"])
        _print(job) if args.json else print(job["id"])
        if not args.json and _estimate(job):
            print(_estimate(job), file=sys.stderr)
    return 0


def _estimate(j: dict) -> str:
    """'estimated time: about 12 min once running (...)', or '' without an estimate."""
    s = j.get("estimate_s")
    if not isinstance(s, (int, float)):
        return ""
    when = f"about {s / 60:.0f} min" if s >= 90 else f"about {max(s, 1):.0f} s"
    basis = (f"from the last {j['estimate_basis']} jobs on this service" if j.get("estimate_basis")
             else "from the upload check's own speed: no finished job to scale it by yet")
    return f"estimated time: {when} once running ({basis})"


def cmd_status(args) -> int:
    with _client(args) as c:
        j = c.status(args.job_id)
    if args.json:
        _print(j)
        return 0
    print(f"job {j['id']}: {j['state']}{_where(j)}")
    if j["state"] in (State.QUEUED, State.RUNNING) and _estimate(j):
        print(_estimate(j))
    if j.get("error"):
        print(f"error: {j['error']}")
    if j.get("metrics"):
        print(_summary(j["metrics"]))
    return 0


def _where(j: dict) -> str:
    """', unit 3/10 layer1.0, iteration 120/200' while it runs (never past the last unit)."""
    p = j.get("progress") or {}
    if j["state"] != State.RUNNING or not p.get("num_units"):
        return ""
    unit = min(p.get("unit", 0) + 1, p["num_units"])
    it = f", iteration {p['iteration']}/{p['iters']}" if p.get("iters") and p.get("iteration") is not None else ""
    return f", {p.get('stage', '')} unit {unit}/{p['num_units']} {p.get('unit_name', '')}{it}"


def _summary(m: dict) -> str:
    """One or two lines of a finished job's metrics."""
    parts = []
    if m.get("quant_top1") is not None:
        parts.append(f"top-1 {m['quant_top1']:.2f} % (FP {m.get('fp_top1', float('nan')):.2f} %)")
    if m.get("top1_agreement") is not None:
        parts.append(f"agreement {m['top1_agreement']:.2f} %")
    if m.get("weight_bytes"):
        parts.append(f"weights {m['weight_bytes'] / 1e6:.2f} MB ({m.get('compression_vs_fp32', 0):.1f}x smaller)")
    if m.get("calibration_seconds") is not None:
        parts.append(f"calibrated in {m['calibration_seconds']:.0f} s")
    if m.get("export_error"):
        parts.append(f"WARNING: the ONNX export failed after calibration ({m['export_error'][:300]}); the checkpoint "
                     "and report are published")
    return "; ".join(parts)


_FINAL_STAGES = {"export": "saving the checkpoint / exporting", "evaluate": "evaluating the reloaded checkpoint",
                 "done": "done"}


def _watch(c, job_id: str) -> int:
    """One progress bar over every unit's iterations, then a short summary."""
    from tqdm import tqdm

    bar, event = None, None
    for event, data in c.events(job_id):
        if event != "status":
            break
        p = data.get("progress") or {}
        if p.get("num_units") and p.get("iters"):
            total = p["num_units"] * p["iters"]
            unit = min(p.get("unit", 0), p["num_units"] - 1)
            done = min(total, unit * p["iters"] + (p.get("iteration") or 0))
            if bar is None:  # initial: the rate counts what was done while watching, not before
                bar = tqdm(total=total, initial=done, unit="it", dynamic_ncols=True, file=sys.stderr)
            bar.n = done
            loss = p.get("loss")
            bar.set_description(f"unit {unit + 1}/{p['num_units']} {p.get('unit_name', '')}", refresh=False)
            bar.set_postfix_str(f"{p.get('stage', '')}" + (f" loss={loss:.4g}" if loss is not None else ""), refresh=False)
            bar.refresh()
        elif bar is not None and p.get("stage") in _FINAL_STAGES:  # after the last unit: no iterations to count
            bar.n = bar.total
            bar.set_description(_FINAL_STAGES[p["stage"]], refresh=False)
            bar.set_postfix_str("", refresh=False)
            bar.refresh()
        elif bar is None:
            print(f"{data['state']} {p.get('stage', '')}".strip(), file=sys.stderr)
    if bar is not None:
        bar.close()
    final = c.status(job_id) if event != "deleted" else {"id": job_id, "state": "deleted"}
    if final["state"] == State.SUCCEEDED:
        print(f"job {job_id}: succeeded; {_summary(final.get('metrics') or {})}")
        return 0
    print(f"job {job_id}: {final['state']}: {final.get('error') or ''}", file=sys.stderr)
    return 1


def cmd_watch(args) -> int:
    with _client(args) as c:
        return _watch(c, args.job_id)


def cmd_download(args) -> int:
    from service.client import DigestMismatch

    out = Path(args.output)
    with _client(args) as c:
        listed = {a["name"]: a.get("sha256") for a in c.artifacts(args.job_id)}
        names = [args.name] if args.name else list(listed)
        if not names:
            j = c.status(args.job_id)
            why = {State.FAILED: f"it failed: {j.get('error') or 'no reason recorded'}",
                   State.CANCELED: "it was canceled", State.SUCCEEDED: "its files were removed (retention)"
                   if j.get("files_deleted") else "it succeeded without artifacts"}.get(
                       j["state"], f"it is {j['state']}; artifacts come when it succeeds (clcalib watch {args.job_id})")
            print(f"job {args.job_id} has no artifacts: {why}", file=sys.stderr)
            return 1
        if len(names) > 1 or out.is_dir():
            out.mkdir(parents=True, exist_ok=True)
        for n in names:
            try:  # each file's SHA-256 checked against what the server recorded
                print(c.download(args.job_id, n, out, sha256=listed.get(n)))
            except DigestMismatch as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
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
        page = c.jobs(limit=args.limit, cursor=args.cursor, state=args.state)
        for j in page["jobs"]:
            why = f"  {j['error'][:100]}" if j.get("error") and j["state"] == State.FAILED else ""
            if (j.get("metrics") or {}).get("export_error"):
                why = "  (calibrated; the ONNX export failed: see its report)"
            print(f"{j['id']}  {j['state']:9}  {j.get('model') or j['arch']:14} {j['created_at']}{_where(j)}{why}")
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

    p = sub.add_parser("submit", help="upload a model and calibration data to the service; print the job id",
                       allow_abbrev=False)
    _common(p)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="state_dict (.safetensors or torch file) with --arch, or a "
                   "torch.export program (.pt2) without it")
    g.add_argument("--arch", default=None, help="a registered architecture (GET /v1/archs); not for a .pt2")
    g.add_argument("--num-classes", type=int, default=None, help="the model's output classes (with --arch)")
    g.add_argument("--calibration", required=True, help="folder (zipped for the upload), zip or tar of images, "
                   "or an .npy/.safetensors tensor")
    g.add_argument("--evaluation", default=None, help="folder, zip or tar with one subfolder per class")
    g.add_argument("--labels", default=None, help="with --evaluation named by class: the model's class names, "
                   "one per line in index order")
    g.add_argument("--config", default=None, help="config JSON, or @file.json; the flags below override it")
    add_config_flags(p)
    g = p.add_argument_group("output")
    g.add_argument("--watch", action="store_true", help="then follow its progress until it ends")
    g.add_argument("--json", action="store_true", help="print the whole job, not only its id")
    p.set_defaults(func=_guard(cmd_submit))

    for name, fn, text in (("status", cmd_status, "print a job's state, progress and result (--json: all of it)"),
                           ("watch", cmd_watch, "follow a job's progress until it ends"),
                           ("cancel", cmd_cancel, "cancel a queued or running job"),
                           ("delete", cmd_delete, "delete a job and its files")):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("job_id")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the whole job as JSON")
        p.set_defaults(func=_guard(fn))

    p = sub.add_parser("download", help="download a job's artifacts")
    _common(p)
    p.add_argument("job_id")
    p.add_argument("--name", default=None, help="one artifact (default: all)")
    p.add_argument("-o", "--output", default=".", help="file or folder")
    p.set_defaults(func=_guard(cmd_download))

    p = sub.add_parser("jobs", help="list your jobs, newest first")
    _common(p)
    p.add_argument("--limit", type=int, default=20, help="jobs per page (default: 20)")
    p.add_argument("--cursor", default=None, help="the cursor printed after the previous page")
    p.add_argument("--state", choices=[s.value for s in State], default=None, help="only jobs in this state")
    p.set_defaults(func=_guard(cmd_jobs))


def _guard(fn):
    """A client error is one line on stderr and exit status 2, never a traceback: the server's
    message for a 4xx/5xx, the address for a server that cannot be reached."""

    def run(args) -> int:
        import httpx
        from pydantic import ValidationError

        from service.client import ApiError

        try:
            return fn(args)
        except ApiError as e:
            print(f"clcalib: {e}", file=sys.stderr)
        except httpx.TransportError as e:
            url = args.url or os.environ.get("CLCALIB_URL", "http://127.0.0.1:8000")
            print(f"clcalib: cannot reach the clcalib server at {url} ({type(e).__name__}: {e}); is "
                  "`clcalib serve` running there? (set --url or CLCALIB_URL)", file=sys.stderr)
        except ValidationError:
            raise  # clcalib.cli prints a bad config in one line
        except (OSError, ValueError) as e:  # a missing file, a bad --config
            print(f"clcalib: {e}", file=sys.stderr)
        return 2

    return run
