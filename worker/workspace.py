"""A job's private scratch folder on this worker, filled from the object store before the run and
emptied into it after (``jobs.objects``; the data folder in the embedded default, a bucket when
deployed). No worker reads the API's disk:

    <scratch>/<job id>/inputs/    the uploads, fetched before the run (read-only to the sandbox)
    <scratch>/<job id>/resume/    per-unit state: fetched from an earlier attempt, uploaded as it changes
    <scratch>/<job id>/out/       the artifacts, uploaded with their SHA-256 once the run succeeded

The folder is deleted when the job leaves this worker. Uploads are atomic (``Objects.put_file``)
and the caller records an artifact in the job row only after every upload succeeded, so a
partial upload is never visible as an artifact. An unreachable store is retried for
``object_retry_s`` (``retrying``), then ``ObjectStoreError`` names it in one line.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
from pathlib import Path

from jobs.objects import (
    ObjectMissing,
    Objects,
    ObjectStoreError,
    artifact_key,
    input_key,
    resume_key,
    retrying,
)
from jobs.storage import list_artifacts, sanitize_dirs

log = logging.getLogger("clcalib.worker")


class ArtifactMismatch(Exception):
    """An artifact's bytes differ from the SHA-256 its report states."""


class Workspace:
    def __init__(self, scratch: Path, objects: Objects, job_id: str, retry_s: float, sync_period_s: float = 1.0):
        self.objects, self.job_id, self.retry_s = objects, job_id, retry_s
        self.dir = Path(scratch) / job_id
        self.inputs, self.out, self.resume = self.dir / "inputs", self.dir / "out", self.dir / "resume"
        self.resume_file = self.resume / "units.safetensors"
        self._period = sync_period_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._synced: tuple | None = None
        self.resume_uploads = 0

    def fetch(self, inputs: dict[str, str]) -> dict[str, str]:
        """Download the job's inputs (role -> path as the row stores it) and any resume state of an
        earlier attempt; role -> local path."""
        shutil.rmtree(self.dir, ignore_errors=True)  # what a killed attempt on this host left
        for d in (self.inputs, self.out, self.resume):
            d.mkdir(parents=True, exist_ok=True)
        local = {}
        for role, rel in inputs.items():
            key = input_key(self.job_id, rel)
            dest = self.inputs / key.rsplit("/", 1)[1]
            retrying(lambda k=key, d=dest: self.objects.get_file(k, d), self.retry_s,
                     f"fetching the job's {role} upload", log)
            local[role] = str(dest)
        try:
            retrying(lambda: self.objects.get_file(resume_key(self.job_id), self.resume_file), self.retry_s,
                     "fetching the job's resume state", log)
            self._synced = self._stamp()
            log.info("job %s: resume state of an earlier attempt fetched", self.job_id)
        except ObjectMissing:
            pass
        return local

    def sanitize(self) -> list[str]:
        return sanitize_dirs(self.out, self.resume)

    # ---- resume state, uploaded while the run goes on -------------------------------------
    def _stamp(self) -> tuple | None:
        try:
            st = self.resume_file.lstat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def sync_resume(self) -> None:
        """Upload the resume state if it changed since the last upload (the run replaces the file
        atomically; a copy is uploaded, so a replacement during the upload cannot mix versions)."""
        stamp = self._stamp()
        if stamp is None or stamp == self._synced:
            return
        snap = self.dir / ".resume-upload"
        try:
            _copy_plain(self.resume_file, snap)
            self.objects.put_file(snap, resume_key(self.job_id))
            self._synced = stamp
            self.resume_uploads += 1
        except (ObjectStoreError, OSError) as e:  # the next change, or the next period, tries again
            log.warning("job %s: resume state not uploaded (%s); trying again", self.job_id, e)
        finally:
            snap.unlink(missing_ok=True)

    def start_sync(self) -> None:
        def loop():
            while not self._stop.wait(self._period):
                self.sync_resume()

        self._thread = threading.Thread(target=loop, name=f"resume-sync-{self.job_id[:8]}", daemon=True)
        self._thread.start()

    def stop_sync(self, final: bool) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if final:
            self.sync_resume()

    # ---- artifacts --------------------------------------------------------------------------
    def publish(self, report: dict | None) -> list[dict]:
        """Upload every artifact; ``[{"name", "sha256", "size"}]`` to record in the job once all are
        stored. The checkpoint's (and ONNX file's) hash must equal the one its report states."""
        stated = (report or {}).get("sha256") or {}
        done = []
        for name in list_artifacts(self.out):
            try:
                key = artifact_key(self.job_id, name)
            except ValueError:  # a name the run made up that no download could ask for
                log.warning("job %s: %r left in out/ is not an artifact name; not uploaded", self.job_id, name[:80])
                continue
            path = self.out / name
            d = retrying(lambda k=key, p=path: self.objects.put_file(p, k), self.retry_s, f"uploading {name}", log)
            if name in stated and stated[name] != d.sha256:
                raise ArtifactMismatch(f"{name} changed after its report was written (SHA-256 {d.sha256[:12]}… "
                                       f"uploaded, {str(stated[name])[:12]}… in the report)")
            done.append({"name": name, "sha256": d.sha256, "size": d.size})
        return done

    def close(self) -> None:
        self._stop.set()
        shutil.rmtree(self.dir, ignore_errors=True)


def _copy_plain(src: Path, dst: Path) -> None:
    """Copy ``src`` only if it is a plain file: the sandboxed run writes resume/, and this process
    (which may read what the run may not) must not follow a link it planted there."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise OSError(f"{src.name} is not a plain file")
        with open(dst, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)


def clear_stale(scratch: Path, store) -> list[str]:
    """At worker start: remove scratch folders a killed worker left, except a job still running
    (another worker on this host may share the folder); their names."""
    removed = []
    if not scratch.is_dir():
        return removed
    for d in scratch.iterdir():
        job = store.get(d.name) if d.name.isalnum() else None
        if job is None or job.state != "running":
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
            removed.append(d.name)
    return removed
