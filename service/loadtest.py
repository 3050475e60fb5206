"""A bounded loopback load test: N concurrent keep-alive connections polling one job's status.

    python -m service.loadtest --url http://127.0.0.1:8000 --key KEY --job JOB_ID \\
        --concurrency 200 --requests 4000

Prints one JSON line: requests, concurrency, errors, polls_per_s, p50_ms, p99_ms, max_ms.
The client is a minimal HTTP/1.1 client on asyncio streams, so that on a small machine the
figure measures the server rather than the load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit


async def _client(host: str, port: int, request: bytes, quota: list[int], lat: list[float], errors: dict):
    reader = writer = None
    while quota[0] > 0:
        quota[0] -= 1
        t = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12].decode()
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if status != "200":
                errors[status] = errors.get(status, 0) + 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            if writer is not None:
                writer.close()
            reader = writer = None
        lat.append(time.perf_counter() - t)
    if writer is not None:
        writer.close()


async def run(url: str, key: str | None, path: str, concurrency: int, requests: int) -> dict:
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}Accept: application/json\r\n\r\n".encode()
    lat: list[float] = []
    errors: dict[str, int] = {}
    quota = [requests]
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(host, port, request, quota, lat, errors) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    lat.sort()

    def q(p: float) -> float:
        return round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 1)

    return {"requests": len(lat), "concurrency": concurrency, "errors": errors,
            "polls_per_s": round(len(lat) / wall, 1), "p50_ms": q(0.50), "p99_ms": q(0.99),
            "max_ms": round(1000 * lat[-1], 1), "wall_s": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--key", default=None)
    ap.add_argument("--job", required=True)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--requests", type=int, default=4000)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(run(a.url, a.key, f"/v1/jobs/{a.job}", a.concurrency, a.requests))))


if __name__ == "__main__":
    main()
