"""Where a job's bytes live: one small interface, two implementations.

    LocalObjects   the data folder (the embedded default: ``clcalib serve`` needs nothing else)
    S3Objects      an S3-compatible object store (MinIO, AWS S3, ...) through boto3, when
                   ``CLCALIB_S3_BUCKET`` is set; workers then need no disk shared with the API

Keys are made here and nowhere else, from a job id (uuid hex) and server-chosen names::

    jobs/<job id>/inputs/<role>.<kind>         uploads (the API writes them after its checks)
    jobs/<job id>/out/<artifact>               artifacts (the worker, once the run succeeded)
    jobs/<job id>/resume/units.safetensors     per-unit resume state (the worker, after each unit)

A name that is not a plain file name (a slash, ``..``, a leading dot, odd characters) raises
``ValueError``: no key leaves its job's prefix. ``put_file`` is atomic: an object is complete or
absent (S3 makes an object visible only when its PUT or multipart upload completes; the folder
writes a temporary file and renames it), and it returns the SHA-256 it read, which the caller
records only after the upload succeeded.

Errors (boto3's translated, so callers never import botocore)::

    ObjectStoreError            anything the store did not do
      StoreUnavailable          not reachable (connection refused, timeouts): retry
      StoreMisconfigured        wrong credentials, missing bucket, no permission: the operator's
      ObjectMissing             the key does not exist
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

CHUNK = 1 << 20  # read, hash and stream in pieces of this size: memory stays bounded
RESUME_NAME = "units.safetensors"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_T = TypeVar("_T")


class ObjectStoreError(Exception):
    """The object store did not do what was asked; the message names the problem for a person."""


class StoreUnavailable(ObjectStoreError):
    pass


class StoreMisconfigured(ObjectStoreError):
    pass


class ObjectMissing(ObjectStoreError):
    pass


@dataclass(frozen=True)
class Digest:
    sha256: str
    size: int


# ---- keys ------------------------------------------------------------------------------------

def _job(job_id: str) -> str:
    if not (job_id.isascii() and job_id.isalnum() and 0 < len(job_id) <= 64):
        raise ValueError(f"bad job id {job_id[:80]!r}")
    return job_id


def _name(name: str) -> str:
    if not _NAME.match(name) or ".." in name:
        raise ValueError(f"bad object name {name[:80]!r}")
    return name


def job_prefix(job_id: str) -> str:
    return f"jobs/{_job(job_id)}/"


def input_key(job_id: str, rel: str) -> str:
    """The key of an upload; ``rel`` as the job row stores it (``inputs/model.safetensors``)."""
    folder, _, name = rel.partition("/")
    if folder != "inputs":
        raise ValueError(f"bad input path {rel[:80]!r}")
    return f"{job_prefix(job_id)}inputs/{_name(name)}"


def artifact_key(job_id: str, name: str) -> str:
    return f"{job_prefix(job_id)}out/{_name(name)}"


def resume_key(job_id: str) -> str:
    return f"{job_prefix(job_id)}resume/{RESUME_NAME}"


def sha256_file(path: Path) -> Digest:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return Digest(h.hexdigest(), n)


def retrying(fn: Callable[[], _T], window_s: float, what: str, log=None) -> _T:
    """``fn()``, tried again with backoff (0.5 s doubling to 8 s) while it raises ObjectStoreError
    other than ObjectMissing, for up to ``window_s`` seconds; then the last error, its message
    saying for how long it was tried."""
    end, delay = time.monotonic() + window_s, 0.5
    while True:
        try:
            return fn()
        except ObjectMissing:
            raise
        except ObjectStoreError as e:
            if time.monotonic() + delay > end:
                raise type(e)(f"{what}: {e} (tried for {window_s:.0f}s)") from None
            if log is not None:
                log.warning("%s: %s; retrying in %.1fs", what, e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


# ---- the interface -----------------------------------------------------------------------------

class Objects:
    """What the API, the worker and the sweeper do with a job's bytes."""

    kind = "?"

    def put_file(self, path: Path, key: str) -> Digest:
        """Store the file under ``key`` atomically; its SHA-256 and size as read."""
        raise NotImplementedError

    def get_file(self, key: str, path: Path) -> None:
        """Write the object to ``path`` (atomically); ObjectMissing when there is none."""
        raise NotImplementedError

    def open(self, key: str) -> tuple[int, Iterator[bytes]]:
        """(size, chunks of at most CHUNK bytes); ObjectMissing when there is none."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def size(self, key: str) -> int | None:
        """The object's size in bytes; None when there is none."""
        raise NotImplementedError

    def delete_job(self, job_id: str) -> None:
        """Every object of the job (a missing one is not an error)."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def job_ids(self) -> dict[str, float]:
        """Job ids that have objects, each with the time its newest object was written."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise ObjectStoreError unless the store can be written and read now."""
        raise NotImplementedError

    def where(self) -> str:
        raise NotImplementedError


class LocalObjects(Objects):
    """Keys are paths under the data folder (the layout of ``jobs.storage``). Only plain files are
    read: a link or a file with a second name (a calibration's sandbox writes its folders) is
    treated as absent."""

    kind = "local"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"

    def path(self, key: str) -> Path:
        p = self.root / key
        if not key.startswith("jobs/") or ".." in key.split("/"):
            raise ValueError(f"bad key {key[:80]!r}")
        return p

    def put_file(self, path: Path, key: str) -> Digest:
        dest = self.path(key)
        if dest.exists() and os.path.samefile(path, dest):  # the API's upload is already in place
            return sha256_file(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        h, n = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix="." + dest.name, suffix=".tmp")
        try:
            with open(path, "rb") as src, os.fdopen(fd, "wb") as out:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    n += len(chunk)
                    out.write(chunk)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Digest(h.hexdigest(), n)

    def _open_plain(self, key: str):
        try:
            fd = os.open(self.path(key), os.O_RDONLY | os.O_NOFOLLOW)
        except (FileNotFoundError, OSError) as e:
            raise ObjectMissing(f"no object {key}") from e
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise ObjectMissing(f"no object {key} (not a plain file)")
        return os.fdopen(fd, "rb"), st.st_size

    def get_file(self, key: str, path: Path) -> None:
        f, _ = self._open_plain(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
        try:
            with f, os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(f, out, CHUNK)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def open(self, key: str) -> tuple[int, Iterator[bytes]]:
        f, size = self._open_plain(key)

        def chunks() -> Iterator[bytes]:
            with f:
                while chunk := f.read(CHUNK):
                    yield chunk

        return size, chunks()

    def size(self, key: str) -> int | None:
        try:
            f, size = self._open_plain(key)
        except ObjectMissing:
            return None
        f.close()
        return size

    def delete_job(self, job_id: str) -> None:
        from jobs.storage import remove_folder

        remove_folder(self.root / job_prefix(job_id), self.tmp, job_id)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def job_ids(self) -> dict[str, float]:
        d = self.root / "jobs"
        return {p.name: p.stat().st_mtime for p in d.iterdir() if p.is_dir() and p.name.isalnum()} if d.is_dir() else {}

    def check(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        probe = self.tmp / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()

    def where(self) -> str:
        return f"folder {self.root.resolve()}"


class S3Objects(Objects):
    """An S3-compatible bucket through boto3 (credentials from boto3's chain: AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY, a credentials file named by AWS_SHARED_CREDENTIALS_FILE, an instance
    role; never from a job)."""

    kind = "s3"

    def __init__(self, bucket: str, endpoint_url: str | None = None, region: str = "us-east-1",
                 timeout_s: float = 10.0):
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError:
            raise StoreMisconfigured("CLCALIB_S3_BUCKET is set but boto3 is not installed: "
                                     "pip install 'clcalib[s3]'") from None
        self.bucket, self.endpoint = bucket, endpoint_url
        cfg = Config(connect_timeout=timeout_s, read_timeout=max(timeout_s, 30.0), signature_version="s3v4",
                     retries={"max_attempts": 3, "mode": "standard"}, s3={"addressing_style": "path"})
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region,
                                                     config=cfg)
        self.transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=16 << 20,
                                       max_concurrency=4, io_chunksize=CHUNK)

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        try:
            return fn()
        except ClientError as e:
            raise self._client_error(what, e) from None
        except S3UploadFailedError as e:  # the upload manager wraps the ClientError's text
            text = str(e)
            code = next((c for c in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "NoSuchBucket")
                         if c in text), None)
            if code is not None:
                raise self._misconfigured(what, code) from None
            raise StoreUnavailable(f"object store {self.where()}: {what} failed ({text[:200]})") from None
        except (NoCredentialsError, PartialCredentialsError):
            raise StoreMisconfigured(f"object store {self.where()}: no credentials (set AWS_ACCESS_KEY_ID and "
                                     "AWS_SECRET_ACCESS_KEY, or AWS_SHARED_CREDENTIALS_FILE)") from None
        except (ConnectionError, HTTPClientError, BotoCoreError) as e:
            raise StoreUnavailable(f"object store {self.where()} cannot be reached ({type(e).__name__}: "
                                   f"{str(e)[:160]})") from None

    def _misconfigured(self, what: str, code: str) -> ObjectStoreError:
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AccessDenied", "Forbidden"):
            return StoreMisconfigured(f"object store {self.where()} refused the service's credentials ({code}) "
                                      f"on {what}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the key's "
                                      "permissions on the bucket")
        if code == "NoSuchBucket":
            return StoreMisconfigured(f"object store {self.where()}: bucket {self.bucket!r} does not exist; create "
                                      "it (docker-compose.yml's minio-init does) or fix CLCALIB_S3_BUCKET")
        return StoreUnavailable(f"object store {self.where()}: {what} failed ({code})")

    def _client_error(self, what: str, e) -> ObjectStoreError:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404", "NotFound") and what != "check":
            return ObjectMissing(f"no object ({what})")
        if status is not None and status >= 500:
            return StoreUnavailable(f"object store {self.where()}: {what} failed ({code or status})")
        return self._misconfigured(what, code)

    def put_file(self, path: Path, key: str) -> Digest:
        d = sha256_file(path)
        self._call(f"upload of {key}", lambda: self.client.upload_file(
            str(path), self.bucket, key, ExtraArgs={"Metadata": {"sha256": d.sha256}}, Config=self.transfer))
        return d

    def get_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
        os.close(fd)
        try:
            self._call(f"download of {key}", lambda: self.client.download_file(
                self.bucket, key, tmp, Config=self.transfer))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def open(self, key: str) -> tuple[int, Iterator[bytes]]:
        r = self._call(f"download of {key}", lambda: self.client.get_object(Bucket=self.bucket, Key=key))
        body = r["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        return int(r["ContentLength"]), chunks()

    def size(self, key: str) -> int | None:
        try:
            r = self._call(f"lookup of {key}", lambda: self.client.head_object(Bucket=self.bucket, Key=key))
        except ObjectMissing:
            return None
        return int(r["ContentLength"])

    def _keys(self, prefix: str) -> Iterator[dict]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        it = iter(pages)
        while True:
            page = self._call(f"listing of {prefix}", lambda: next(it, None))
            if page is None:
                return
            yield from page.get("Contents", [])

    def delete_job(self, job_id: str) -> None:
        keys = [o["Key"] for o in self._keys(job_prefix(job_id))]
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
            self._call(f"delete of {job_prefix(job_id)}",
                       lambda b=batch: self.client.delete_objects(Bucket=self.bucket, Delete=b))

    def delete(self, key: str) -> None:
        self._call(f"delete of {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=key))

    def job_ids(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for o in self._keys("jobs/"):
            parts = o["Key"].split("/")
            if len(parts) > 2 and parts[1].isascii() and parts[1].isalnum():  # not a key this service made
                out[parts[1]] = max(out.get(parts[1], 0.0), o["LastModified"].timestamp())
        return out

    def check(self) -> None:
        # a listing, not HEAD: its error body names the cause (HEAD's has no body)
        self._call("check", lambda: self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1))

    def where(self) -> str:
        return f"{self.endpoint or 'AWS S3'} bucket {self.bucket!r}"


def objects_for(settings) -> Objects:
    """The store ``settings`` name: the S3 bucket when ``s3_bucket`` is set, else the data folder."""
    if settings.s3_bucket:
        return S3Objects(settings.s3_bucket, settings.s3_endpoint_url, settings.s3_region,
                         settings.s3_timeout_s)
    return LocalObjects(settings.data_dir)
