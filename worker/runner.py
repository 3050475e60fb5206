"""One job, start to finish, on this worker. Called by the Celery task; testable without it.

Each message is one turn of a worker: the fairest queued job is claimed (queued -> running, one
attempt more; ``Store.claim_next``) with a conditional update, whichever job the message was
sent for. There is one message per queued job, so every job gets a turn; a duplicate delivery
(a Redis redelivery, a re-send by the sweeper) finds nothing queued and does nothing. While the library runs, a heartbeat thread writes the heartbeat and the latest progress
every ``heartbeat_s``; if that write matches no row (canceled, deleted, or re-queued after the
heartbeat went stale) it sets ``lost`` and ``halt``, the run's stop: the sandboxed child is killed within
``jobs.sandbox.STOP_POLL_S`` whatever it is doing (a long evaluation pass sends no progress), so
the worker is free within about one heartbeat period.

A worker asked to stop (SIGTERM from a deploy or a scale-down, Ctrl-C; ``request_hand_back``)
does not wait for its job: the child is killed the same way, the resume state of the finished
units is stored, and the job goes back to the queue with a new message (``Store.hand_back``), so
another worker resumes it within seconds and the attempt does not count as a lost worker.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from jobs.objects import Objects, ObjectStoreError, objects_for, resume_key
from jobs.sandbox import STOP_POLL_S, Child, ChildFailed, Jail, zygote_for
from jobs.settings import Settings
from jobs.states import State
from jobs.store import PROGRAM, Store
from worker.workspace import ArtifactMismatch, Workspace

log = logging.getLogger("clcalib.worker")
_stores: dict[str, Store] = {}
_objects: dict[tuple, Objects] = {}
_running: list[Heartbeat] = []  # the heartbeat of the job this worker runs (at most one)
_stop_requested: list[str] = []  # why this worker was asked to stop, once it was


def store_for(settings: Settings) -> Store:
    url = settings.store_url
    if url not in _stores:
        _stores[url] = Store(url)
    return _stores[url]


def objects_of(settings: Settings) -> Objects:
    key = (settings.s3_bucket, settings.s3_endpoint_url, str(settings.data_dir))
    if key not in _objects:
        _objects[key] = objects_for(settings)
    return _objects[key]


class Heartbeat:
    def __init__(self, store: Store, job_id: str, attempt: int, period: float):
        self.store, self.job_id, self.attempt, self.period = store, job_id, attempt, period
        self.lost = threading.Event()  # this attempt no longer owns the job
        self.halt = threading.Event()  # the run's stop: lost, or handing the job back
        self._stop = threading.Event()
        self._progress: dict | None = None
        self._sent: dict | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{job_id[:8]}", daemon=True)
        self.handing_back: str | None = None  # why, once the worker is asked to stop

    def hand_back(self, why: str) -> None:
        """Stop the run so that the job goes back to the queue. Called from a signal handler, so
        it only sets an attribute (no lock): the heartbeat thread acts on it within STOP_POLL_S."""
        self.handing_back = why

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def set_progress(self, p: dict) -> None:
        with self._lock:
            self._progress = p

    @property
    def progress(self) -> dict | None:
        """The last progress set (what the next beat sends, or sent)."""
        with self._lock:
            return self._progress

    def beat(self) -> None:
        with self._lock:
            p = self._progress
        try:
            ok = self.store.heartbeat(self.job_id, self.attempt, progress=p if p is not self._sent else None)
        except Exception as e:  # store briefly unreachable: keep running, try again
            log.warning("heartbeat of job %s failed: %s", self.job_id, e)
            return
        self._sent = p
        if not ok:
            self.lost.set()
            self.halt.set()

    def _loop(self) -> None:
        next_beat = time.monotonic() + self.period
        while not self._stop.wait(min(self.period, STOP_POLL_S)):
            if self.handing_back:
                self.halt.set()  # its child is killed; beats go on while the run winds down
            if time.monotonic() >= next_beat:
                next_beat += self.period
                self.beat()
                if self.lost.is_set():
                    return


def stop_requested() -> bool:
    """This worker was asked to stop: it takes no further job."""
    return bool(_stop_requested)


def request_hand_back(why: str) -> None:
    """The worker is asked to stop: the running job, if any, goes back to the queue (see the
    module's docstring). Safe in a signal handler."""
    _stop_requested.append(why)  # a job claimed just after this is handed back too
    for hb in list(_running):
        hb.hand_back(why)


CALIBRATE = "worker.sandboxed:calibrate"
MAX_WARNINGS = 50  # warnings of one attempt kept in the job's history


def _event(d: dict):
    """A progress event from a sandboxed child's message: known fields of the right types only."""
    import dataclasses

    from clcalib.progress import ProgressEvent

    kinds = {f.name: str(f.type) for f in dataclasses.fields(ProgressEvent)}
    fits = {"str": lambda v: isinstance(v, str), "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "float | None": lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}
    out = {}
    for k, v in (d if isinstance(d, dict) else {}).items():
        if k not in kinds or not fits.get(kinds[k], lambda v: False)(v):  # the API's schema would refuse it
            continue
        if isinstance(v, str):
            v = v[:2000]
        out[k] = v
    try:
        return ProgressEvent(**out)
    except TypeError:
        return ProgressEvent(stage="prepare")


def _sanitize(ws: Workspace, job_id: str) -> None:
    """Before a run (what an earlier attempt left) and after it (a link planted in out/ would be
    uploaded as an artifact): only plain files stay in the job's writable folders."""
    for name in ws.sanitize():
        log.warning("job %s: removed %s from its folders (not a plain file)", job_id, name)


def warm_up() -> None:
    """The calibration zygote starts its imports (torch) now, so the first job does not wait for them."""
    zygote_for(CALIBRATE)


def run_job(job_id: str, settings: Settings, worker_name: str, enqueue=None) -> str:
    """``enqueue(job_id)``: sends a job's message (a job handed back needs one); without it the
    API's sweeper sends it within a few seconds."""
    store = store_for(settings)
    objects = objects_of(settings)
    # the message is a turn: run the fairest queued job, which need not be the one it names
    job = store.claim_next(worker_name, stale_after_s=settings.stale_after_s,
                           max_attempts=settings.max_attempts, hint=job_id)
    if job is None:
        log.info("message for job %s: nothing queued to run", job_id)
        return "skipped"
    job_id = job.id
    attempt = job.attempts
    log.info("job %s: attempt %d on %s", job_id, attempt, worker_name)
    hb = Heartbeat(store, job_id, attempt, settings.heartbeat_s)
    _running.append(hb)
    if _stop_requested:
        hb.hand_back(_stop_requested[0])
    hb.start()
    ws = Workspace(settings.scratch, objects, job_id, settings.object_retry_s)
    artifacts: list = []
    try:
        state, error, report = _calibrate(job, settings, ws, store, hb, attempt)
        if state == State.SUCCEEDED:  # every artifact stored before any is recorded
            artifacts = ws.publish(report)
    except (ObjectStoreError, ArtifactMismatch) as e:  # after object_retry_s of retries: one line
        state, error, report = State.FAILED, str(e), None
        log.error("job %s: %s", job_id, e)
    finally:
        _running.remove(hb)
        hb.stop()
        ws.close()
    if state is None and hb.handing_back and \
            _hand_back(store, job_id, attempt, f"{worker_name} was stopped ({hb.handing_back})", enqueue):
        return "handed back"
    if state is None:  # canceled by the user, deleted, or taken over: someone else owns the row now
        now = store.get(job_id)
        if now is None or now.state == State.CANCELED:  # a canceled job's files count against its tenant
            _delete_files(objects, job_id)
            if now is not None:
                store.mark_files_deleted(job_id)
        log.info("job %s: attempt %d stopped (no longer owns the job)", job_id, attempt)
        return "stopped"
    last = hb.progress or {}
    final = dict(last, stage="done" if state == State.SUCCEEDED else last.get("stage", "prepare"), attempt=attempt)
    ok = store.finish(job_id, attempt, state, error=error,
                      metrics=(report or {}).get("metrics") if state == State.SUCCEEDED else None,
                      artifacts=artifacts if state == State.SUCCEEDED else [], progress=final)
    if ok and state == State.SUCCEEDED:
        try:
            objects.delete(resume_key(job_id))
        except ObjectStoreError as e:  # retention removes it with the job
            log.warning("job %s: resume state not deleted (%s)", job_id, e)
    if store.get(job_id) is None:  # deleted while finishing
        _delete_files(objects, job_id)
    log.info("job %s: %s%s", job_id, state if ok else f"{state} (dropped: row moved on)", f" ({error})" if error else "")
    return state


def _hand_back(store: Store, job_id: str, attempt: int, reason: str, enqueue) -> bool:
    """After the run stopped and its units' resume state was stored: the job queued again. False:
    canceled, deleted or taken over meanwhile (the caller cleans up as for any lost job)."""
    if not store.hand_back(job_id, attempt, reason):
        return False
    log.warning("job %s: handed back to the queue at attempt %d: %s", job_id, attempt, reason)
    if enqueue is not None:
        try:
            enqueue(job_id)
            store.mark_enqueued(job_id)
        except Exception as e:  # the sweeper sends queued jobs that have no message
            log.warning("job %s: message not sent (%s); the API's sweeper sends it", job_id, e)
    return True


def _delete_files(objects: Objects, job_id: str) -> None:
    try:
        objects.delete_job(job_id)
    except ObjectStoreError as e:  # the sweeper removes objects of jobs it does not know
        log.warning("job %s: files not deleted (%s)", job_id, e)


def _calibrate(job, settings: Settings, ws: Workspace, store: Store, hb: Heartbeat, attempt: int):
    """(state, error, report); state None when the job was taken from this attempt."""
    jd = ws.dir
    first = {"seen": False}
    t0 = time.monotonic()

    warnings = {"n": 0}

    def on_progress(ev) -> None:
        if ev.stage == "warning":  # in the job's history now; in its metrics at the end
            warnings["n"] += 1
            if warnings["n"] <= MAX_WARNINGS:  # a child's events are untrusted: bounded
                store.note(job.id, attempt, {"event": "warning", "message": ev.message[:2000]})
            return
        d = ev.to_dict()
        d["attempt"] = attempt
        hb.set_progress(d)
        if not first["seen"] and ev.stage in ("reconstruct", "unit_done"):
            first["seen"] = True
            store.note(job.id, attempt, {"event": "first_progress", "stage": ev.stage, "unit": ev.unit,
                                         "iteration": ev.iteration, "after_s": round(time.monotonic() - t0, 2)})

    out_dir, resume_dir = ws.out, ws.resume
    if hb.handing_back:  # stopped right after the claim: nothing fetched, nothing to undo
        return None, None, None
    inputs = ws.fetch(job.inputs)  # ObjectStoreError after object_retry_s: the job fails naming it
    model = {"model": inputs["model"], "model_name": job.model_file} if job.arch == PROGRAM else \
        {"arch": job.arch, "num_classes": job.num_classes, "weights": inputs["model"]}
    _sanitize(ws, job.id)
    child = Child(CALIBRATE)
    jail = Jail(read=sorted({str(Path(p).parent) for p in inputs.values()}), write=[str(out_dir), str(resume_dir)],
                tmp=str(Path(child.cwd) / "tmp"), memory_bytes=settings.worker_memory_bytes,
                uid=settings.sandbox_uid, gpu=settings.device != "cpu")
    kwargs = {"model": model, "calibration": inputs["calibration"], "evaluation": inputs.get("evaluation"),
              "labels": inputs.get("labels"), "config": {**job.config, "device": settings.device},
              "out_dir": str(out_dir), "resume_dir": str(resume_dir), "limits": settings.data_limits,
              "torch_threads": settings.torch_threads}
    ws.start_sync()  # resume state goes to the store as units finish: another worker resumes from it
    try:
        try:
            result = child.run(jail, kwargs, settings.max_job_runtime_s, lambda d: on_progress(_event(d)),
                               off=settings.sandbox == "off", stop=hb.halt)
        finally:
            _sanitize(ws, job.id)
            ws.stop_sync(final=True)
        log.info("job %s: sandbox %s, peak memory %.2f GiB", job.id, child.how, child.peak_rss_bytes / 2**30)
    except ChildFailed as e:
        if e.kind == "stopped" or hb.handing_back:  # canceled, deleted, re-queued or handed back
            return None, None, None
        cap = f"{settings.worker_memory_bytes / 2**30:.1f} GiB"
        if e.kind == "memory":
            return State.FAILED, (f"the calibration needed more host memory than the worker's cap of {cap} "
                                  "(CLCALIB_WORKER_MEMORY_BYTES): use fewer calibration images (config.calib_size) "
                                  "or a smaller input size, or ask the operator to raise the cap"), None
        log.error("job %s: sandboxed calibration ended: %s: %s", job.id, e.kind, e.message)
        if e.kind == "died":
            return State.FAILED, (f"the calibration process died ({e.message}); with a memory cap of {cap} "
                                  "(CLCALIB_WORKER_MEMORY_BYTES) this is most often memory"), None
        return State.FAILED, f"internal error in the worker: {e.kind}: {e.message[:500]}", None
    if "error" in result:
        return State.FAILED, str(result["error"]).replace(str(jd) + "/", ""), None
    report = result["report"]
    hb.beat()
    if hb.lost.is_set():
        return None, None, None
    return State.SUCCEEDED, None, report
