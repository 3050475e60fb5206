"""A small client of the clcalib API (httpx)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

from clcalib.atomic import atomic_path
from jobs.states import TERMINAL


def _zip_folder(folder: Path, dest: Path) -> Path:
    """Every file under ``folder`` (not hidden ones), stored under its path relative to it."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as z:
        for f in sorted(folder.rglob("*")):
            rel = f.relative_to(folder)
            if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                z.write(f, rel.as_posix())
    return dest


class ApiError(Exception):
    def __init__(self, status: int, body: Any):
        self.status, self.body = status, body
        detail = body.get("detail") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {detail}")


class DigestMismatch(Exception):
    """A download whose bytes do not hash to what the server recorded."""


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0):
        url = url or os.environ.get("CLCALIB_URL", "http://127.0.0.1:8000")
        key = api_key if api_key is not None else os.environ.get("CLCALIB_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = r.text
            raise ApiError(r.status_code, body)
        return r

    def submit(self, *, model: str | Path, calibration: str | Path, arch: str | None = None,
               num_classes: int | None = None, config: dict | None = None,
               evaluation: str | Path | None = None, labels: str | Path | None = None) -> dict:
        """Upload and queue a job. ``calibration`` and ``evaluation`` may be folders: they are
        zipped (paths relative to the folder) into a temporary file first. ``arch`` and
        ``num_classes`` may be left out when ``model`` is a torch.export program (.pt2).
        ``labels``: the model's class names in index order, for class-named evaluation folders."""
        paths = {"model": model, "calibration": calibration}
        if evaluation is not None:
            paths["evaluation"] = evaluation
        if labels is not None:
            paths["labels"] = labels
        with ExitStack() as stack:
            files = {}
            for role, p in paths.items():
                p = Path(p)
                if p.is_dir():
                    p = _zip_folder(p, Path(stack.enter_context(tempfile.TemporaryDirectory())) / f"{role}.zip")
                files[role] = (p.name, stack.enter_context(open(p, "rb")))
            data = {"config": json.dumps(config or {})}
            if arch is not None:
                data["arch"] = arch
            if num_classes is not None:
                data["num_classes"] = str(num_classes)
            return self._check(self.http.post("/v1/jobs", data=data, files=files, timeout=None)).json()

    def status(self, job_id: str) -> dict:
        return self._check(self.http.get(f"/v1/jobs/{job_id}")).json()

    def jobs(self, limit: int = 20, cursor: str | None = None, state: str | None = None) -> dict:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        if state:
            params["state"] = state
        return self._check(self.http.get("/v1/jobs", params=params)).json()

    def cancel(self, job_id: str) -> dict:
        return self._check(self.http.post(f"/v1/jobs/{job_id}/cancel")).json()

    def delete(self, job_id: str) -> None:
        self._check(self.http.delete(f"/v1/jobs/{job_id}"))

    def archs(self) -> list[str]:
        return self._check(self.http.get("/v1/archs")).json()["archs"]

    def artifacts(self, job_id: str) -> list[dict]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}/artifacts")).json()["artifacts"]

    def download(self, job_id: str, name: str, dest: str | Path, sha256: str | None = None) -> Path:
        """The artifact, written atomically; its SHA-256 must equal the one the server recorded (the
        X-Checksum-Sha256 header, and ``sha256`` when given, e.g. from the artifact list), else
        DigestMismatch and nothing is written."""
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / name
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}", timeout=None) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            expected = {e.lower() for e in (r.headers.get("x-checksum-sha256"), sha256) if e}
            h = hashlib.sha256()
            with atomic_path(dest) as tmp, open(tmp, "wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
                got = h.hexdigest()
                if expected - {got}:
                    raise DigestMismatch(f"{name}: the download's SHA-256 is {got}, the server recorded "
                                         f"{' and '.join(sorted(expected))}; nothing was written, download it again")
        return dest

    def events(self, job_id: str) -> Iterator[tuple[str, dict]]:
        """(event, data) from the server-sent-event stream, until the job ends."""
        with connect_sse(self.http, "GET", f"/v1/jobs/{job_id}/events",
                         timeout=httpx.Timeout(60, read=None)) as source:
            r = source.response
            if r.status_code >= 400:
                r.read()
                self._check(r)
            for sse in source.iter_sse():
                if not sse.data:  # a keep-alive ping (httpx-sse repeats the last id for it)
                    continue
                yield sse.event, sse.json()
                if sse.event in ("end", "deleted"):
                    return

    def wait(self, job_id: str, timeout: float = 3600, poll: float = 1.0) -> dict:
        end = time.monotonic() + timeout
        while True:
            j = self.status(job_id)
            if j["state"] in TERMINAL:
                return j
            if time.monotonic() > end:
                raise TimeoutError(f"job {job_id} still {j['state']} after {timeout}s")
            time.sleep(poll)
