"""Streaming multipart parser for job uploads.

Files go straight from the socket to the job's ``inputs/`` folder under server-chosen names;
nothing is held in memory beyond one chunk, and the whole request is capped (413 as soon as
the cap is crossed, before the rest is read). The stored suffix comes from the content
(safetensors / zip / npy / tar sniffing), never from the client's filename.
"""

from __future__ import annotations

import codecs
import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header

from service.bodies import Body
from service.errors import ApiError

FILE_FIELDS = ("model", "calibration", "evaluation", "labels")
TEXT_FIELDS = ("arch", "num_classes", "config")


@dataclass
class Upload:
    texts: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # role -> stored path
    filenames: dict[str, str] = field(default_factory=dict)  # role -> client's name (display only)
    total_bytes: int = 0


SPACE_CHECK_BYTES = 8 << 20  # free disk space is re-checked after every this many bytes received


class _Parser:
    def __init__(self, dest: Path, max_bytes: int, max_field_bytes: int, check_space: Callable[[int], None]):
        self.dest, self.max_bytes, self.max_field_bytes = dest, max_bytes, max_field_bytes
        self.check_space, self._unchecked = check_space, 0
        self.out = Upload()
        self._hname = self._hval = b""
        self._disposition = b""
        self._name: str | None = None
        self._file: BinaryIO | None = None
        self._text: bytearray | None = None
        self._seen: set[str] = set()

    def on_part_begin(self) -> None:
        self._disposition, self._name, self._file, self._text = b"", None, None, None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hval += data[start:end]

    def on_header_end(self) -> None:
        if self._hname.lower() == b"content-disposition":
            self._disposition = self._hval
        self._hname = self._hval = b""

    def on_headers_finished(self) -> None:
        _, opts = parse_options_header(self._disposition)
        raw = opts.get(b"name")
        if raw is None:
            raise ApiError(400, "bad_multipart", "a multipart part has no Content-Disposition name")
        name = raw.decode("utf-8", "replace")
        if name not in FILE_FIELDS and name not in TEXT_FIELDS:
            raise ApiError(422, "unknown_field", f"unknown form field {name[:60]!r}; expected "
                           f"{', '.join(FILE_FIELDS + TEXT_FIELDS)}", field=name[:60])
        if name in self._seen:
            raise ApiError(422, "duplicate_field", f"form field {name!r} given twice", field=name)
        self._seen.add(name)
        self._name = name
        if name in FILE_FIELDS:
            path = self.dest / f"{name}.upload"
            self._file = open(path, "wb")  # noqa: SIM115 - closed in on_part_end / close()
            self.out.files[name] = path
            fn = opts.get(b"filename")
            if fn:
                self.out.filenames[name] = fn.decode("utf-8", "replace")[:200]
        else:
            self._text = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        self.out.total_bytes += n
        if self.out.total_bytes > self.max_bytes:
            raise too_large(self.max_bytes)
        if self._file is not None:
            self._unchecked += n
            if self._unchecked >= SPACE_CHECK_BYTES:  # a stream without Content-Length, or other writers
                self._unchecked = 0
                self.check_space(0)
            try:
                self._file.write(data[start:end])
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    self.check_space(1 << 62)  # raises the 507 with the free space stated
                raise
        elif self._text is not None:
            if len(self._text) + n > self.max_field_bytes:
                raise ApiError(413, "field_too_large",
                               f"form field {self._name!r} is larger than {self.max_field_bytes} bytes",
                               field=self._name)
            self._text += data[start:end]

    def on_part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self._text is not None and self._name is not None:
            try:
                self.out.texts[self._name] = codecs.decode(bytes(self._text), "utf-8")
            except UnicodeDecodeError:
                raise ApiError(422, "bad_text", f"form field {self._name!r} is not UTF-8 text",
                               field=self._name) from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def too_large(cap: int) -> ApiError:
    return ApiError(413, "too_large", f"upload is larger than the limit of {cap} bytes "
                    "(CLCALIB_MAX_UPLOAD_BYTES); send fewer or smaller files")


async def receive(request, dest: Path, *, max_bytes: int, max_field_bytes: int,
                  check_space: Callable[[int], None], idle_s: float = 30.0, min_rate: float = 0.0,
                  rate_window_s: float = 10.0, rate_grace_s: float = 10.0) -> Upload:
    """Parse the request body into ``dest``. Raises ApiError (400/413/415/422, 408 for a body
    that stalls or arrives slower than ``min_rate`` bytes/s, and 507 from
    ``check_space(incoming_bytes)`` when the disk's reserve would be used)."""
    ctype = request.headers.get("content-type", "")
    kind, params = parse_options_header(ctype)
    if kind != b"multipart/form-data":
        raise ApiError(415, "not_multipart", f"expected a multipart/form-data body, got {ctype[:80]!r}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_multipart", "multipart/form-data without a boundary")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes + 64 * 1024:
        raise too_large(max_bytes)
    check_space(int(length) if length is not None and length.isdigit() else 0)
    dest.mkdir(parents=True, exist_ok=True)
    p = _Parser(dest, max_bytes, max_field_bytes, check_space)
    callbacks = {
        "on_part_begin": p.on_part_begin, "on_part_data": p.on_part_data,
        "on_part_end": p.on_part_end, "on_header_field": p.on_header_field,
        "on_header_value": p.on_header_value, "on_header_end": p.on_header_end,
        "on_headers_finished": p.on_headers_finished,
    }
    body = Body(request, idle_s, min_rate, rate_window_s, rate_grace_s)  # the rule every request body arrives by
    try:
        parser = MultipartParser(boundary, callbacks)
        while (chunk := await body.next()) is not None:
            parser.write(chunk)
        parser.finalize()
    except ApiError:
        raise
    except Exception as e:  # python-multipart raises several types for broken bodies
        raise ApiError(400, "bad_multipart", f"malformed multipart body ({str(e)[:200]})") from None
    finally:
        body.close()
        p.close()
    for role, path in list(p.out.files.items()):
        final = path.with_name(role + sniff_suffix(path, role))
        path.rename(final)
        p.out.files[role] = final
    return p.out


def sniff_suffix(path: Path, role: str) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 0 < n and 8 + n <= size and head[8:9] == b"{":
            return ".safetensors"
    if role == "model":
        return ".pt"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return ".zip"
    if head.startswith(b"\x93NUMPY"):
        return ".npy"
    return ".tar"
