"""Real components for the service tests: a redis-server started here on a free port, a fresh
PostgreSQL database, uvicorn and Celery worker subprocesses, Fashion-MNIST PNG archives and
the reference model. A missing binary or service fails the test with a message; nothing skips."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from svc_fmnist import FMNIST, REFERENCE, write_zip
from svc_helpers import PG_ADMIN, RedisServer, S3Server, Stack


@pytest.fixture
def redis_server(tmp_path):
    servers = []

    def make(appendonly: bool = True) -> RedisServer:
        s = RedisServer(tmp_path / f"redis{len(servers)}", appendonly)
        s.start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def own_postgres_url():
    """A PostgreSQL database of this test alone (the session's is shared by the tests of one
    process, and some count its rows), dropped afterwards with its connections."""
    import psycopg

    admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    name = f"clcalib_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    yield f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture
def s3_server(tmp_path):
    """Start moto's S3 server (``S3Server.start``'s arguments); stopped after the test, whatever
    state the test left it in."""
    servers = []

    def make(**kw) -> S3Server:
        s = S3Server(tmp_path / f"s3-{len(servers)}")
        servers.append(s)
        return s.start(**kw)

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    try:
        import psycopg

        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except Exception as e:
        pytest.fail(f"PostgreSQL not reachable at {PG_ADMIN} ({e}); start it or set CLCALIB_TEST_PG")
    name = f"clcalib_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(scope="session")
def fmnist_zips(tmp_path_factory):
    """calib.zip: 256 train PNGs; eval.zip: 500 test PNGs in class folders."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST IDX files missing under {FMNIST} (apt-get install -y dataset-fashion-mnist)")
    d = tmp_path_factory.mktemp("fmnist")
    return {
        "calib": write_zip(d / "calib.zip", "train", 256, by_class=False),
        "eval": write_zip(d / "eval.zip", "t10k", 500, by_class=True),
        "dir": d,
    }


@pytest.fixture(scope="session")
def reference_model() -> Path:
    if not REFERENCE.is_file():
        pytest.fail(f"reference model missing: {REFERENCE}")
    return REFERENCE


@pytest.fixture
def stack_factory(tmp_path):
    stacks = []

    def make(**env) -> Stack:
        s = Stack(tmp_path / f"stack{len(stacks)}", **env)
        stacks.append(s)
        return s

    yield make
    for s in stacks:
        s.close()


@pytest.fixture(scope="session")
def api_only(tmp_path_factory):
    """An API over HTTP with the embedded file queue and no worker: nothing it accepts runs."""
    s = Stack(tmp_path_factory.mktemp("api_only"), CLCALIB_MAX_UPLOAD_BYTES=64 << 20,
              CLCALIB_MAX_ARCHIVE_ENTRIES=2000, CLCALIB_MAX_ARCHIVE_BYTES=50 << 20, CLCALIB_MAX_IMAGE_PIXELS=4_000_000)
    s.start_api()
    yield s
    s.close()
