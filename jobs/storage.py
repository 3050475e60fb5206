"""The data directory: one folder per job under server-generated names.

    <data_dir>/jobs/<job id>/inputs/{model,calibration,evaluation}.<kind>   uploads
    <data_dir>/jobs/<job id>/out/                                           artifacts
    <data_dir>/jobs/<job id>/resume/                                        per-unit state
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from pathlib import Path

INPUTS, OUT, RESUME = "inputs", "out", "resume"
ARTIFACT_TYPES = {
    ".safetensors": "application/octet-stream",
    ".json": "application/json",
    ".html": "text/html; charset=utf-8",
    ".onnx": "application/octet-stream",
}


class LowOnDisk(Exception):
    """The data disk would go below its reserve (the API answers 507)."""

    def __init__(self, free: int, reserve: int):
        super().__init__(f"the server is low on disk space ({free >> 20} MiB free, {reserve >> 20} MiB kept in "
                         "reserve); try again later or send a smaller upload")
        self.free, self.reserve = free, reserve


class Storage:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.jobs = self.root / "jobs"
        self.tmp = self.root / "tmp"
        for d in (self.jobs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        if not job_id.isalnum():  # ids are uuid hex; never let a name walk out of jobs/
            raise ValueError(f"bad job id {job_id!r}")
        return self.jobs / job_id

    def inputs_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / INPUTS

    def out_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / OUT

    def resume_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / RESUME

    def artifacts(self, job_id: str) -> list[str]:
        return list_artifacts(self.out_dir(job_id))

    def artifact_path(self, job_id: str, name: str) -> Path | None:
        """The file of an artifact named in the job row, or None (never a path outside out/, never
        a link: a calibration's sandbox writes out/, and a link it planted would be followed)."""
        if "/" in name or "\\" in name or name.startswith(".") or name in ("", ".."):
            return None
        p = self.out_dir(job_id) / name
        return p if _plain_file(p) else None

    def sanitize(self, job_id: str) -> list[str]:
        """Remove what a sandboxed run may have left in the job's writable folders that is not a
        plain file or folder (links, fifos, sockets, hard links to elsewhere); returns their names.
        Run before a calibration starts and after its process is gone."""
        return sanitize_dirs(self.out_dir(job_id), self.resume_dir(job_id))

    def delete_job(self, job_id: str) -> None:
        remove_folder(self.job_dir(job_id), self.tmp, job_id)

    def delete_resume(self, job_id: str) -> None:
        shutil.rmtree(self.resume_dir(job_id), ignore_errors=True)

    def job_ids_on_disk(self) -> set[str]:
        return {p.name for p in self.jobs.iterdir() if p.is_dir()} if self.jobs.is_dir() else set()

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, reserve: int, incoming: int = 0) -> None:
        """Raise LowOnDisk unless ``incoming`` more bytes leave ``reserve`` free on the data disk."""
        free = self.free_bytes()
        if free - incoming < reserve:
            raise LowOnDisk(free, reserve)

    def writable(self) -> None:
        probe = self.tmp / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()


def _plain_file(p: Path) -> bool:
    """A regular file that is not a link and has no other name (no hard link to elsewhere)."""
    try:
        st = p.lstat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


def list_artifacts(folder: Path) -> list[str]:
    """The artifact files a run left in ``folder`` (plain files of a known type), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if _plain_file(p) and not p.name.startswith(".") and p.suffix in ARTIFACT_TYPES)


def sanitize_dirs(*folders: Path) -> list[str]:
    """Remove what a sandboxed run may have left in its writable ``folders`` that is not a plain
    file or folder (links, fifos, sockets, hard links to elsewhere); returns their names."""
    removed = []
    for top in folders:
        if not top.exists() and not top.is_symlink():
            continue
        if not stat.S_ISDIR(top.lstat().st_mode):
            top.unlink()
            removed.append(top.name)
            continue
        for root, dirs, files in os.walk(top):  # does not follow links
            for n in dirs + files:
                p = Path(root) / n
                st = p.lstat()
                if stat.S_ISDIR(st.st_mode):
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
                    p.unlink()
                    removed.append(str(p.relative_to(top.parent)))
    return removed


def remove_folder(d: Path, tmp: Path, tag: str) -> None:
    """Delete the folder ``d``: renamed into ``tmp`` first, so that a half-deleted folder is never
    mistaken for a job's files."""
    if d.exists():
        tmp.mkdir(parents=True, exist_ok=True)
        trash = tmp / f"del-{tag}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(d, trash)
        except OSError:
            trash = d
        shutil.rmtree(trash, ignore_errors=True)
