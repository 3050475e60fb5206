"""The job store: one SQLAlchemy table, the source of truth for every job.

SQLite file by default, PostgreSQL by URL. Every state change is one conditional UPDATE, so
concurrent API processes, workers and reapers cannot move a job backwards:

    queued -> running -> succeeded | failed | canceled
    queued -> canceled
    running -> queued        by the reaper, when the worker's heartbeat went stale, or by the
                             worker itself when it is asked to stop (``hand_back``)

A late progress write or a late ``finish`` from a worker that lost the job (canceled, deleted,
re-queued to another worker) matches no row and is dropped; the worker sees that and stops.

A tenant's limit of active jobs is held at the insert (``create(max_active=...)``): the row is
inserted and the tenant's active rows counted in one transaction that no other insert of that
tenant can interleave with (SQLite: the insert takes the database's write lock before the count;
PostgreSQL: a transaction-scoped advisory lock on the tenant), so any number of API processes
hold it.

On a full disk the SQLite file's writes (its write-ahead log grows with each commit) fail: the
store keeps ``HEADROOM_BYTES`` of disk allocated beside the database (``<db>-headroom``) and
frees it when a write that must work there (cancel, delete, a worker's finish) hits a full disk,
then writes again; it re-allocates it once the disk has room.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from jobs.states import ACTIVE, TERMINAL, State

PROGRAM = "program"  # the arch of a job whose model is an uploaded torch.export program (.pt2)
HANDED_BACK = "handed_back"  # the history event of an attempt its worker gave back (not a lost worker)
MIN_WORK_S = 1.0  # check seconds below which a job's time is mostly the worker's start-up: not a speed


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "clcalib_jobs"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    arch: Mapped[str] = mapped_column(String(64))  # a registry name, or PROGRAM
    num_classes: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict] = mapped_column(JSON)
    inputs: Mapped[dict] = mapped_column(JSON)  # role -> path relative to the job folder
    upload_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    progress: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    enqueued_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    artifacts: Mapped[list] = mapped_column(JSON, default=list)
    files_deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    history: Mapped[list] = mapped_column(JSON, default=list)  # one entry per attempt/requeue


@dataclass(frozen=True)
class Job:
    """A snapshot of one row (what routes and the worker pass around)."""

    seq: int
    id: str
    owner: str
    state: str
    arch: str
    num_classes: int
    config: dict
    inputs: dict
    upload_bytes: int
    progress: dict | None
    attempts: int
    worker: str | None
    heartbeat_at: float | None
    enqueued_at: float | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    metrics: dict | None
    artifacts: list  # names
    files_deleted: bool
    history: list
    digests: dict  # artifact name -> {"sha256", "size"} (rows written before artifacts were checksummed have none)

    @classmethod
    def of(cls, row: JobRow) -> Job:
        d = {f: getattr(row, f) for f in cls.__dataclass_fields__ if f != "digests"}
        # the column holds names, or {"name", "sha256", "size"} since artifacts carry their hash
        arts = d["artifacts"] or []
        d["artifacts"] = [a["name"] if isinstance(a, dict) else a for a in arts]
        d["digests"] = {a["name"]: {"sha256": a["sha256"], "size": a["size"]} for a in arts if isinstance(a, dict)}
        return cls(**d)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def submitted(self) -> dict:
        """What the submit recorded beside the row's columns (the history's first entry, so rows
        need no new column): ``model_file``, the uploaded model's name as the client sent it
        (display only); ``work_s`` and ``estimate_s``, the time estimate (see ``speed_factor``)."""
        first = (self.history or [{}])[0]
        return first if isinstance(first, dict) and first.get("event") == "submitted" else {}

    @property
    def model_file(self) -> str | None:
        name = self.submitted.get("model_file")
        return name if isinstance(name, str) else None


def normalize_url(url: str) -> str:
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def new_job_id() -> str:
    return uuid.uuid4().hex


class TooManyJobs(Exception):
    """The tenant already has ``max_active`` queued or running jobs: nothing was inserted."""

    def __init__(self, active: int, limit: int):
        super().__init__(f"{active} active jobs, the limit is {limit}")
        self.active, self.limit = active, limit


class DiskFull(Exception):
    """The store's disk is full, even after its headroom was given back."""


HEADROOM_BYTES = 4 << 20  # kept allocated beside an SQLite store for the writes that must work on a full disk


def _is_disk_full(e: BaseException) -> bool:
    orig = getattr(e, "orig", e)
    return (getattr(orig, "sqlite_errorcode", None) == 13  # SQLITE_FULL
            or getattr(orig, "sqlstate", None) == "53100"  # PostgreSQL disk_full
            or "database or disk is full" in str(orig)
            or getattr(orig, "errno", None) in (errno.ENOSPC, errno.EDQUOT))


def _tenant_lock_key(owner: str) -> int:
    return int.from_bytes(hashlib.sha256(b"clcalib-tenant:" + owner.encode()).digest()[:8], "big", signed=True)


def _uses_headroom(method):
    """A write that must work on a full disk: on a full-disk error, free the headroom and write
    once more; still full: DiskFull."""

    @wraps(method)
    def run(self, *args, **kwargs):
        try:
            out = method(self, *args, **kwargs)
        except OperationalError as e:
            if not _is_disk_full(e):
                raise
            if not self._release_headroom():
                raise DiskFull(f"the job store's disk is full ({str(getattr(e, 'orig', e))[:120]})") from None
            try:
                out = method(self, *args, **kwargs)
            except OperationalError as e2:
                if _is_disk_full(e2):
                    raise DiskFull(f"the job store's disk is full ({str(getattr(e2, 'orig', e2))[:120]})") from None
                raise
        self._restore_headroom()
        return out

    return run


class Store:
    def __init__(self, url: str, *, create: bool = True, clock: Callable[[], float] = time.time):
        """``clock``: wall-clock seconds for every timestamp the store writes and compares
        (tests pass a fake one to age rows without sleeping)."""
        self.clock = clock
        self.url = normalize_url(url)
        kwargs: dict[str, Any] = {"pool_size": 10, "max_overflow": 40}
        if self.url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True  # survive a database restart
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        if create:
            Base.metadata.create_all(self.engine)
        db = self.engine.url.database if self.url.startswith("sqlite") else None
        self.headroom: Path | None = Path(db + "-headroom") if db and db != ":memory:" else None
        self._headroom_checked = 0.0
        self._restore_headroom(force=True)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as c:
            c.execute(text("SELECT 1"))

    # ---- full disk --------------------------------------------------------------------
    def _release_headroom(self) -> bool:
        """Free the headroom file; False when there was none to free (in this or another process)."""
        if self.headroom is None:
            return False
        try:
            self.headroom.unlink()
        except FileNotFoundError:
            return False
        self._headroom_checked = 0.0
        return True

    def _restore_headroom(self, force: bool = False) -> None:
        """Allocate the headroom file when it is missing and the disk has room for it (checked at
        most every 10 s; a failure leaves no partial file)."""
        if self.headroom is None or (not force and time.monotonic() - self._headroom_checked < 10):
            return
        self._headroom_checked = time.monotonic()
        if self.headroom.exists():
            return
        tmp = self.headroom.with_name(f"{self.headroom.name}.{os.getpid()}.tmp")
        try:
            st = os.statvfs(self.headroom.parent)
            if st.f_bavail * st.f_frsize < 2 * HEADROOM_BYTES:
                return
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, HEADROOM_BYTES)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    for _ in range(HEADROOM_BYTES >> 20):  # a file system without fallocate
                        os.write(fd, b"\1" * (1 << 20))
            finally:
                os.close(fd)
            os.replace(tmp, self.headroom)
        except OSError:
            tmp.unlink(missing_ok=True)

    # ---- API side ---------------------------------------------------------------------
    def create(self, *, id: str, owner: str, arch: str, num_classes: int, config: dict,
               inputs: dict, upload_bytes: int, max_active: int | None = None,
               submitted: dict | None = None) -> Job:
        """Insert a queued job. ``max_active``: only if the owner then has at most that many queued
        or running jobs, counted in the insert's transaction (see the module docstring); else
        TooManyJobs and nothing is inserted. ``submitted``: see ``Job.submitted``."""
        now = self.clock()
        history = [{"event": "submitted", **submitted, "at": now}] if submitted else []
        row = JobRow(
            id=id, owner=owner, state=State.QUEUED, arch=arch, num_classes=num_classes, config=config,
            inputs=inputs, upload_bytes=upload_bytes, attempts=0, created_at=now, updated_at=now,
            artifacts=[], history=history, files_deleted=False,
        )
        with self.session.begin() as s:
            if max_active is not None and self.engine.dialect.name == "postgresql":
                s.execute(select(func.pg_advisory_xact_lock(_tenant_lock_key(owner))))
            s.add(row)
            s.flush()  # SQLite: the INSERT, the transaction's first statement, takes the write lock
            if max_active is not None:
                active = s.scalar(select(func.count()).select_from(JobRow)
                                  .where(JobRow.owner == owner, JobRow.state.in_(ACTIVE))) or 0
                if active > max_active:
                    raise TooManyJobs(active - 1, max_active)  # rolls the insert back
        return Job.of(row)

    def speed_factor(self, owner: str, recent: int = 20) -> tuple[float | None, int]:
        """(median of calibration seconds / the upload check's ``work_s``, jobs it is from) over
        ``owner``'s last ``recent`` succeeded jobs that have both and at least ``MIN_WORK_S`` of
        work: how much faster or slower this service's workers are than the check's measure.
        (None, 0) before any such job. One tenant's jobs only: another's cannot skew it (a run of
        tiny jobs once made every tenant's estimate 45x too long) nor read their times from it;
        tiny jobs, whose time is the worker's fixed start-up cost, do not count."""
        with self.session() as s:
            rows = s.execute(select(JobRow.history, JobRow.metrics)
                             .where(JobRow.state == State.SUCCEEDED, JobRow.owner == owner)
                             .order_by(JobRow.finished_at.desc()).limit(5 * recent)).all()
        ratios = []
        for history, metrics in rows:
            first = (history or [{}])[0]
            work = first.get("work_s") if isinstance(first, dict) else None
            took = (metrics or {}).get("total_seconds")
            if isinstance(work, (int, float)) and work >= MIN_WORK_S and isinstance(took, (int, float)) and took > 0:
                ratios.append(took / work)
            if len(ratios) >= recent:
                break
        if not ratios:
            return None, 0
        ratios.sort()
        return ratios[len(ratios) // 2], len(ratios)

    def mark_enqueued(self, job_id: str) -> None:
        with self.session.begin() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id).values(enqueued_at=self.clock()))

    def get(self, job_id: str) -> Job | None:
        with self.session() as s:
            row = s.scalar(select(JobRow).where(JobRow.id == job_id))
            return Job.of(row) if row else None

    def list(self, owner: str, limit: int = 20, before_seq: int | None = None,
             state: str | None = None) -> list[Job]:
        """Newest first; ``before_seq`` is the cursor (the last seq of the previous page)."""
        q = select(JobRow).where(JobRow.owner == owner)
        if before_seq is not None:
            q = q.where(JobRow.seq < before_seq)
        if state is not None:
            q = q.where(JobRow.state == state)
        q = q.order_by(JobRow.seq.desc()).limit(limit)
        with self.session() as s:
            return [Job.of(r) for r in s.scalars(q)]

    @_uses_headroom
    def cancel(self, job_id: str) -> bool:
        """queued/running -> canceled. A running worker notices at its next heartbeat."""
        now = self.clock()
        with self.session.begin() as s:
            r = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.state.in_(ACTIVE))
                .values(state=State.CANCELED, finished_at=now, updated_at=now, error="canceled by the user")
            )
            return r.rowcount == 1

    @_uses_headroom
    def delete(self, job_id: str) -> bool:
        with self.session.begin() as s:
            row = s.scalar(select(JobRow).where(JobRow.id == job_id))
            if row is None:
                return False
            s.delete(row)
            return True

    def usage(self, owner: str, exclude: Collection[str] = ()) -> tuple[int, int]:
        """(queued + running jobs, upload bytes of jobs whose files are kept) of one tenant; jobs
        in ``exclude`` (an API process's reservations, counted by it) are not counted as active."""
        q = select(func.count()).select_from(JobRow).where(JobRow.owner == owner, JobRow.state.in_(ACTIVE))
        if exclude:
            q = q.where(JobRow.id.not_in(list(exclude)))
        with self.session() as s:
            active = s.scalar(q) or 0
            stored = s.scalar(select(func.coalesce(func.sum(JobRow.upload_bytes), 0))
                              .where(JobRow.owner == owner, JobRow.files_deleted.is_(False))) or 0
            return int(active), int(stored)

    def counts_by_state(self) -> dict[str, int]:
        with self.session() as s:
            rows = s.execute(select(JobRow.state, func.count()).group_by(JobRow.state)).all()
        out = dict.fromkeys(State, 0)
        out.update({state: n for state, n in rows})
        return out

    def durations(self, limit: int = 10000) -> list[float]:
        """Run time (first start to finish) of the most recent finished jobs."""
        q = (
            select(JobRow.finished_at - JobRow.started_at)
            .where(JobRow.state.in_((State.SUCCEEDED, State.FAILED)), JobRow.started_at.is_not(None),
                   JobRow.finished_at.is_not(None))
            .order_by(JobRow.seq.desc())
            .limit(limit)
        )
        with self.session() as s:
            return [float(d) for d in s.scalars(q)]

    # ---- worker side ------------------------------------------------------------------
    def claim(self, job_id: str, worker: str, *, stale_after_s: float, max_attempts: int) -> Job | None:
        """queued -> running (or take over a running job whose heartbeat is stale), one
        attempt more. None: someone else has it, or it is finished, canceled or gone."""
        now = self.clock()
        with self.session.begin() as s:
            row = s.scalar(select(JobRow).where(JobRow.id == job_id))
            if row is None:
                return None
            takeover = row.state == State.RUNNING and (row.heartbeat_at or 0) < now - stale_after_s
            if row.state != State.QUEUED and not takeover:
                return None
            if _lost_attempts(row) >= max_attempts:
                self._fail_exhausted(s, row, now, max_attempts)
                return None
            r = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.state == row.state, JobRow.attempts == row.attempts)
                .values(
                    state=State.RUNNING, attempts=row.attempts + 1, worker=worker, heartbeat_at=now,
                    started_at=func.coalesce(JobRow.started_at, now), updated_at=now,
                    history=list(row.history or []) + [
                        {"attempt": row.attempts + 1, "event": "claimed", "worker": worker, "at": now}
                    ],
                )
            )
            if r.rowcount != 1:
                return None
        return self.get(job_id)

    def claim_next(self, worker: str, *, stale_after_s: float, max_attempts: int,
                   hint: str | None = None) -> Job | None:
        """The fairest queued job -> running. A message is a turn, not a job: whichever job it
        was sent for, the worker takes the oldest queued job of the tenant that has the fewest
        running jobs, ties going to the tenant that started a job least recently. So a tenant
        with 50 queued jobs and one with 1 alternate, and a lost or duplicate message delays
        nobody in particular. With nothing queued, ``hint`` (the message's job) is claimed if it
        is a running job whose heartbeat is stale (a redelivery after a lost worker)."""
        for _ in range(50):  # another worker may win the race for the pick: take the next
            with self.session() as s:
                queued = s.execute(select(JobRow.id, JobRow.owner).where(JobRow.state == State.QUEUED)
                                   .order_by(JobRow.seq)).all()
                if not queued:
                    break
                owners = {o for _, o in queued}
                running = dict(s.execute(select(JobRow.owner, func.count()).where(
                    JobRow.state == State.RUNNING, JobRow.owner.in_(owners)).group_by(JobRow.owner)).all())
                last = dict(s.execute(select(JobRow.owner, func.max(JobRow.started_at)).where(
                    JobRow.owner.in_(owners)).group_by(JobRow.owner)).all())
            first: dict[str, str] = {}
            for job_id, owner in queued:  # in seq order: each tenant's oldest
                first.setdefault(owner, job_id)
            owner = min(first, key=lambda o: (running.get(o, 0), last.get(o) or 0.0))
            job = self.claim(first[owner], worker, stale_after_s=stale_after_s, max_attempts=max_attempts)
            if job is not None:
                return job
        return self.claim(hint, worker, stale_after_s=stale_after_s, max_attempts=max_attempts) if hint else None

    def heartbeat(self, job_id: str, attempt: int, progress: dict | None = None) -> bool:
        """False: this attempt no longer owns the job (canceled, deleted, re-queued)."""
        now = self.clock()
        values: dict[str, Any] = {"heartbeat_at": now}
        if progress is not None:
            values.update(progress=progress, updated_at=now)
        return self._update_running(job_id, attempt, values)

    @_uses_headroom
    def _update_running(self, job_id: str, attempt: int, values: dict[str, Any]) -> bool:
        """Update the row only while this attempt still owns it (running, same attempt)."""
        with self.session.begin() as s:
            r = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.state == State.RUNNING, JobRow.attempts == attempt)
                .values(**values)
            )
            return r.rowcount == 1

    def note(self, job_id: str, attempt: int, entry: dict) -> None:
        """Append to the job's history (e.g. the unit an attempt resumed from)."""
        with self.session.begin() as s:
            row = s.scalar(select(JobRow).where(JobRow.id == job_id, JobRow.attempts == attempt))
            if row is not None:
                row.history = list(row.history or []) + [{"attempt": attempt, **entry, "at": self.clock()}]

    def finish(self, job_id: str, attempt: int, state: str, *, error: str | None = None,
               metrics: dict | None = None, artifacts: list | None = None,
               progress: dict | None = None) -> bool:
        """``artifacts``: names, or ``{"name", "sha256", "size"}`` of each (recorded only once uploaded)."""
        assert state in TERMINAL
        now = self.clock()
        values: dict[str, Any] = {"state": state, "finished_at": now, "updated_at": now,
                                  "error": error, "heartbeat_at": now}
        if metrics is not None:
            values["metrics"] = metrics
        if artifacts is not None:
            values["artifacts"] = artifacts
        if progress is not None:
            values["progress"] = progress
        return self._update_running(job_id, attempt, values)

    def hand_back(self, job_id: str, attempt: int, reason: str) -> bool:
        """running -> queued by the attempt that runs it, when its worker is asked to stop (a
        deploy, a scale-down, Ctrl-C): another worker resumes it at once from its stored units
        instead of after the stale timeout, and the attempt does not count against
        ``max_attempts`` (its worker was not lost). False: this attempt no longer owns the job."""
        now = self.clock()
        with self.session.begin() as s:
            row = s.scalar(select(JobRow).where(JobRow.id == job_id, JobRow.state == State.RUNNING,
                                                JobRow.attempts == attempt))
            if row is None:
                return False
            r = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.state == State.RUNNING, JobRow.attempts == attempt)
                .values(state=State.QUEUED, updated_at=now, enqueued_at=None, worker=None,
                        history=list(row.history or []) + [
                            {"attempt": attempt, "event": HANDED_BACK, "reason": reason, "at": now}])
            )
            return r.rowcount == 1

    # ---- reaper -----------------------------------------------------------------------
    def reap_stale(self, *, stale_after_s: float, max_attempts: int) -> tuple[list[str], list[str]]:
        """Running jobs whose heartbeat is older than ``stale_after_s``: back to queued (to be
        re-enqueued by the caller), or failed once ``max_attempts`` deliveries were used."""
        now = self.clock()
        requeued, failed = [], []
        with self.session.begin() as s:
            rows = s.scalars(
                select(JobRow).where(JobRow.state == State.RUNNING, JobRow.heartbeat_at < now - stale_after_s)
            ).all()
            for row in rows:
                if _lost_attempts(row) >= max_attempts:
                    if self._fail_exhausted(s, row, now, max_attempts):
                        failed.append(row.id)
                    continue
                r = s.execute(
                    update(JobRow)
                    .where(JobRow.id == row.id, JobRow.state == State.RUNNING, JobRow.attempts == row.attempts,
                           JobRow.heartbeat_at == row.heartbeat_at)
                    .values(
                        state=State.QUEUED, updated_at=now, enqueued_at=None, worker=None,
                        history=list(row.history or []) + [{
                            "attempt": row.attempts, "event": "requeued",
                            "reason": f"no heartbeat from {row.worker} for {now - (row.heartbeat_at or now):.0f}s",
                            "at": now,
                        }],
                    )
                )
                if r.rowcount == 1:
                    requeued.append(row.id)
        return requeued, failed

    @staticmethod
    def _fail_exhausted(s, row: JobRow, now: float, max_attempts: int) -> bool:
        r = s.execute(
            update(JobRow)
            .where(JobRow.id == row.id, JobRow.state == row.state, JobRow.attempts == row.attempts)
            .values(
                state=State.FAILED, finished_at=now, updated_at=now,
                error=(f"the worker running this job was lost {_lost_attempts(row)} times "
                       f"(max_attempts={max_attempts}); giving up"),
            )
        )
        return r.rowcount == 1

    def fail_overdue(self, max_runtime_s: float) -> list[str]:
        """Running jobs started (first attempt) more than ``max_runtime_s`` ago -> failed. Their
        worker finds its row gone at the next heartbeat and stops."""
        now = self.clock()
        with self.session.begin() as s:
            ids = list(s.scalars(select(JobRow.id).where(JobRow.state == State.RUNNING,
                                                         JobRow.started_at < now - max_runtime_s)))
            for job_id in ids:
                s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.state == State.RUNNING).values(
                    state=State.FAILED, finished_at=now, updated_at=now,
                    error=f"the job ran longer than the service's limit of {max_runtime_s:.0f}s "
                          "(CLCALIB_MAX_JOB_RUNTIME_S); use fewer iterations or calibration images"))
        return ids

    def queued_not_enqueued(self, older_than_s: float = 0.0) -> list[str]:
        """Queued jobs whose message was never sent (broker down at submit, or re-queued)."""
        cutoff = self.clock() - older_than_s
        with self.session() as s:
            return list(s.scalars(
                select(JobRow.id).where(JobRow.state == State.QUEUED, JobRow.enqueued_at.is_(None),
                                        JobRow.created_at <= cutoff).order_by(JobRow.seq)
            ))

    def queued_ids(self, older_than_s: float = 0.0) -> list[str]:
        cutoff = self.clock() - older_than_s
        with self.session() as s:
            return list(s.scalars(
                select(JobRow.id).where(JobRow.state == State.QUEUED, JobRow.updated_at <= cutoff)
                .order_by(JobRow.seq)
            ))

    def expired(self, retention_s: float) -> list[str]:
        cutoff = self.clock() - retention_s
        with self.session() as s:
            return list(s.scalars(
                select(JobRow.id).where(JobRow.state.in_(TERMINAL), JobRow.finished_at < cutoff,
                                        JobRow.files_deleted.is_(False))
            ))

    @_uses_headroom
    def mark_files_deleted(self, job_id: str) -> None:
        with self.session.begin() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id)
                      .values(files_deleted=True, artifacts=[], updated_at=self.clock()))

    def all_ids(self) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(JobRow.id)))


def _lost_attempts(row: JobRow) -> int:
    """Attempts that ended with their worker lost: all of them but those handed back."""
    return row.attempts - sum(1 for h in row.history or [] if h.get("event") == HANDED_BACK)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
