"""A real S3 HTTP endpoint on the loopback interface, for tests, demos and benchmarks.

The S3 implementation is moto's server mode (its WSGI application, the same one
``moto.server.ThreadedMotoServer`` serves).  We wrap it in a small WSGI
middleware of our own and serve the result with werkzeug's threaded server in a
background thread.  The middleware exists because plain moto would make any
measurement a measurement of moto:

* **Range fast path.**  moto answers a ranged GET by reading the *whole*
  object and slicing it (~160 ms for 4 KiB out of 256 MiB).  For the common
  case - ``GET /bucket/key`` with one ``Range: bytes=...`` header, path-style
  addressing, at most a ``versionId`` query parameter - we look the object up
  in moto's in-memory backend and read only the requested bytes.  Anything
  unusual (virtual-host addressing, SSE-C, ``partNumber``, response header
  overrides, conditional headers other than ``If-Match``, bucket policies,
  archived objects, unknown keys, ...) falls through to moto unchanged.
* **TCP_NODELAY** on every accepted connection: werkzeug writes headers and
  body separately, and without it small responses stall ~40 ms on delayed
  ACKs.
* **Request accounting** by operation type (:class:`RequestStats`), readable
  in-process or over HTTP (``GET /_gstore/stats``).
* **Optional emulated network**: a fixed latency before each response's first
  byte and a per-request bandwidth cap on response bodies.

Control endpoints (never counted, never delayed)::

    GET  /_gstore/stats         counters as JSON (plus "fast_path": ranged GETs served by us)
    GET  /_gstore/requests      the request log as a JSON list of records
    POST /_gstore/stats/reset   zero the counters and the log
    POST /_gstore/reset         wipe all moto state and the counters

Caveats
-------
* moto keeps its state in process-global backends.  Two servers in one
  process share buckets and objects, and :meth:`S3TestServer.reset` wipes
  everything moto holds in this process (it is moto's own ``/moto-api/reset``).
  Likewise a ``moto.mock_aws`` active in the same process intercepts boto3
  clients before they reach this server.
* Environment: the server sets nothing in ``os.environ`` unless
  ``min_part_size`` is given, in which case it sets ``S3_UPLOAD_PART_MIN_SIZE``
  - the only way moto reads that setting.  moto reads it once, when
  ``moto.settings`` is first imported, so it must be set before moto's first
  import; if moto is already imported we also patch the module-level constant
  moto's multipart code consults.  moto keeps objects up to
  ``MOTO_S3_DEFAULT_KEY_BUFFER_SIZE`` (default: min part size - 1 KiB) in
  memory and larger ones in temporary files; with a ``min_part_size`` below
  1 KiB every object goes to a temporary file unless that variable is set.
* werkzeug's development server closes the connection after every response
  (no keep-alive), so every request pays a loopback TCP handshake. With
  ``keep_alive=True`` (the benchmark's endpoint) cheroot serves the same
  application and keeps connections open, as S3 does.
* Fake credentials are needed only by clients; :meth:`S3TestServer.client`
  passes them explicitly.

moto, werkzeug and boto3 are imported lazily: importing this module works
without them, and using it without them raises an ImportError saying what to
install.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["RequestRecord", "RequestStats", "S3TestServer", "main"]

DEFAULT_ACCOUNT_ID = "123456789012"  # moto's default account (moto.core.DEFAULT_ACCOUNT_ID)
OPS = ("GET", "HEAD", "LIST", "PUT", "COPY", "POST", "DELETE", "OTHER")
MAX_RECORDS = 10_000
CONTROL_PREFIX = "/_gstore"

_log = logging.getLogger(__name__)
_INSTALL_HINT = "gstore.testing.s3server needs moto's server mode: pip install 'moto[server]' boto3"


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} (importing {module} failed: {exc})") from exc


# --------------------------------------------------------------------------- accounting


@dataclasses.dataclass
class RequestRecord:
    """One S3 request as seen by the server (control endpoints are not recorded)."""

    method: str
    op: str
    bucket: str | None
    key: str | None
    range: str | None
    status: int
    bytes_sent: int
    fast_path: bool = False  # served by our range fast path rather than by moto
    prefix: str | None = None  # the Prefix parameter of a listing


class RequestStats:
    """Thread-safe request counters plus a bounded log of :class:`RequestRecord`.

    An operation is counted when its request arrives and body bytes are counted
    before they are handed to the socket, so a client that has received a full
    response always sees it in the counters.
    """

    def __init__(self, max_records: int = MAX_RECORDS) -> None:
        self._lock = threading.Lock()
        self._max_records = max_records
        self._generation = 0
        self._zero()

    def _zero(self) -> None:
        self._counts = dict.fromkeys(OPS, 0)
        self._bytes_sent = 0
        self._bytes_received = 0
        self._fast_path = 0
        self._records: collections.deque[RequestRecord] = collections.deque(
            maxlen=self._max_records
        )

    # -- public API
    def snapshot(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._counts)
            out["bytes_sent"] = self._bytes_sent
            out["bytes_received"] = self._bytes_received
            out["total"] = sum(self._counts.values())
            return out

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return [dataclasses.replace(r) for r in self._records]

    def reset(self) -> None:
        with self._lock:
            self._generation += 1
            self._zero()

    @property
    def fast_path_hits(self) -> int:
        """How many ranged GETs were served by the fast path (not by moto)."""
        with self._lock:
            return self._fast_path

    def as_json(self) -> dict[str, int]:
        out = self.snapshot()
        out["fast_path"] = self.fast_path_hits
        return out

    # -- used by the middleware; a record belongs to the generation it started in, so
    #    requests still in flight during reset() do not leak into the fresh counters.
    def _begin(self, record: RequestRecord) -> int:
        with self._lock:
            self._counts[record.op] += 1
            self._records.append(record)
            return self._generation

    def _status(self, gen: int, record: RequestRecord, status: int) -> None:
        with self._lock:
            record.status = status

    def _sent(self, gen: int, record: RequestRecord, n: int) -> None:
        with self._lock:
            record.bytes_sent += n
            if gen == self._generation:
                self._bytes_sent += n

    def _received(self, gen: int, n: int) -> None:
        with self._lock:
            if gen == self._generation:
                self._bytes_received += n

    def _fast(self, gen: int, record: RequestRecord) -> None:
        with self._lock:
            record.fast_path = True
            if gen == self._generation:
                self._fast_path += 1


# --------------------------------------------------------------------------- request parsing

_BUCKET_SUBRESOURCES = frozenset(
    """accelerate acl analytics cors encryption intelligent-tiering inventory lifecycle location
    logging metrics notification object-lock ownershipControls policy policyStatus publicAccessBlock
    replication requestPayment tagging versioning website session metadataTable torrent""".split()
)
_KEY_SUBRESOURCES = frozenset("acl tagging attributes legal-hold retention torrent restore".split())
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _split_host(environ: dict[str, Any]) -> str:
    host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "")
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _raw_path(environ: dict[str, Any]) -> str:
    """The request path as sent, percent-decoded once (as moto decodes it)."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    if raw:
        if "://" in raw.split("?", 1)[0]:
            raw = urlsplit(raw).path
        else:
            raw = raw.split("?", 1)[0]
        return unquote(raw) or "/"
    # No raw URI: PATH_INFO is already decoded (as latin-1 per WSGI).
    return environ.get("PATH_INFO", "/").encode("latin-1").decode("utf-8", "replace") or "/"


def _target(environ: dict[str, Any]) -> tuple[str | None, str | None, bool]:
    """(bucket, key, path_style) of an S3 request."""
    host = _split_host(environ)
    path = _raw_path(environ)
    path_style = (
        _is_ip_literal(host)
        or "." not in host
        or host.startswith("localhost")
        or host.startswith(("s3.", "s3-"))
    )
    if path_style:
        bucket, _, key = path[1:].partition("/")
        return (bucket or None), (key or None), True
    return host.split(".", 1)[0], (path[1:] or None), False


def _classify(method: str, bucket: str | None, key: str | None, query: dict[str, list[str]],
              environ: dict[str, Any]) -> str:
    if method == "HEAD":
        return "HEAD"
    if method == "GET":
        if bucket is None:
            return "LIST"  # ListBuckets
        if key is None:
            if any(q in _BUCKET_SUBRESOURCES for q in query):
                return "OTHER"
            return "LIST"  # ListObjects(V2), ListObjectVersions, ListMultipartUploads
        if "uploadId" in query:
            return "LIST"  # ListParts
        if any(q in _KEY_SUBRESOURCES for q in query):
            return "OTHER"
        return "GET"
    if method == "PUT":
        if key is not None and environ.get("HTTP_X_AMZ_COPY_SOURCE"):
            return "COPY"  # CopyObject, UploadPartCopy
        return "PUT"
    if method == "POST":
        return "POST"
    if method == "DELETE":
        return "DELETE"
    return "OTHER"


def _parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """(first, last) inclusive; "unsatisfiable"; or None where S3 would ignore the header.

    Mirrors moto's (and S3's) single-range semantics: a start past the end, or a
    zero-length suffix, is unsatisfiable; an end before the start, a multi-range
    or a malformed header means "serve the whole object" - left to moto.
    """
    m = _RANGE_RE.match(value.strip())
    if m is None:
        return None
    first_s, last_s = m.groups()
    last_byte = size - 1
    if first_s:
        first = int(first_s)
        if first > last_byte:
            return "unsatisfiable"
        last = last_byte if not last_s else min(int(last_s), last_byte)
        if first > last:
            return None
        return first, last
    if last_s:
        n = int(last_s)
        if n == 0:
            return "unsatisfiable"
        return size - min(n, size), last_byte
    return None


def _request_id() -> str:
    return uuid.uuid4().hex[:16].upper()


def _xml_escape(text: str) -> str:
    for raw, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&quot;")):
        text = text.replace(raw, escaped)
    return text


_Response = tuple[int, list[tuple[str, str]], bytes]


def _s3_error(status: int, code: str, message: str, **fields: str) -> _Response:
    request_id = _request_id()
    extra = "".join(f"<{k}>{_xml_escape(v)}</{k}>" for k, v in fields.items())
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{_xml_escape(message)}</Message>{extra}"
        f"<RequestId>{request_id}</RequestId><HostId>gstore-s3server</HostId></Error>"
    ).encode()
    headers = [
        ("Content-Type", "application/xml"),
        ("Content-Length", str(len(body))),
        ("x-amz-request-id", request_id),
    ]
    return status, headers, body


_STATUS_TEXT = {200: "OK", 206: "Partial Content", 400: "Bad Request", 404: "Not Found",
                405: "Method Not Allowed", 412: "Precondition Failed",
                416: "Requested Range Not Satisfiable"}


def _status_line(status: int) -> str:
    return f"{status} {_STATUS_TEXT.get(status, 'Unknown')}"


# --------------------------------------------------------------------------- WSGI plumbing


class _CountingInput:
    """wsgi.input wrapper that reports how many request-body bytes were read."""

    def __init__(self, stream: Any, report: Callable[[int], None]) -> None:
        self._stream = stream
        self._report = report

    def read(self, *args: Any) -> bytes:
        data = self._stream.read(*args)
        self._report(len(data))
        return data

    def readline(self, *args: Any) -> bytes:
        data = self._stream.readline(*args)
        self._report(len(data))
        return data

    def readlines(self, *args: Any) -> list[bytes]:
        lines = self._stream.readlines(*args)
        self._report(sum(len(line) for line in lines))
        return lines

    def readinto(self, buf: Any) -> int:
        n = self._stream.readinto(buf) or 0
        self._report(n)
        return n

    def __iter__(self) -> Iterator[bytes]:
        for line in self._stream:
            self._report(len(line))
            yield line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _Body:
    """Response body iterable: latency before the first byte, bandwidth cap, byte counting."""

    def __init__(self, inner: Iterable[bytes], report: Callable[[int], None],
                 latency: float, bandwidth: float | None, max_piece: int | None = None) -> None:
        self._inner = inner
        self._report = report
        self._latency = latency
        self._bandwidth = bandwidth
        # cheroot (keep_alive) sends a large chunk at a fraction of the speed of several
        # small ones (a whole 128 MiB body: 42 MiB/s against 250 with werkzeug).
        self._max_piece = max_piece

    def __iter__(self) -> Iterator[bytes]:
        if self._latency > 0:
            time.sleep(self._latency)
        bw = self._bandwidth
        if not bw:
            limit = self._max_piece
            for chunk in self._inner:
                if not chunk:
                    continue
                if limit is None or len(chunk) <= limit:
                    self._report(len(chunk))
                    yield chunk
                    continue
                view = memoryview(chunk)
                for offset in range(0, len(view), limit):
                    piece = bytes(view[offset : offset + limit])
                    self._report(len(piece))
                    yield piece
            return
        piece_size = max(1024, min(64 * 1024, int(bw / 100)))
        start = time.monotonic()
        sent = 0
        for chunk in self._inner:
            view = memoryview(chunk)
            for offset in range(0, len(view), piece_size):
                piece = bytes(view[offset : offset + piece_size])
                sent += len(piece)
                delay = start + sent / bw - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self._report(len(piece))
                yield piece

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


class _Middleware:
    """Our WSGI layer in front of moto's application."""

    def __init__(self, app: Callable[..., Any], server: S3TestServer) -> None:
        self.app = app
        self.server = server
        self._max_piece = 1024 * 1024 if server.keep_alive else None

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/"):
            return self._control(environ, start_response, path)
        if path.startswith("/moto-api"):
            return self.app(environ, start_response)

        stats = self.server.stats
        method = environ.get("REQUEST_METHOD", "GET").upper()
        bucket, key, path_style = _target(environ)
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        op = _classify(method, bucket, key, query, environ)
        record = RequestRecord(method, op, bucket, key, environ.get("HTTP_RANGE"), 0, 0)
        record.prefix = query.get("prefix", [None])[0]
        gen = stats._begin(record)
        if "wsgi.input" in environ:
            environ["wsgi.input"] = _CountingInput(
                environ["wsgi.input"], lambda n: stats._received(gen, n)
            )

        def report(n: int) -> None:
            stats._sent(gen, record, n)

        fast = None
        if self.server.fast_path and method == "GET" and path_style and environ.get("HTTP_RANGE"):
            try:
                fast = _fast_range_get(environ, bucket, key, query)
            except Exception:  # never let the shortcut break a request moto could serve
                _log.exception("s3server: range fast path failed; falling through to moto")
                fast = None
        if fast is not None:
            status, headers, body = fast
            stats._fast(gen, record)
            stats._status(gen, record, status)
            start_response(_status_line(status), headers)
            return _Body([body], report, self.server.latency, self.server.bandwidth, self._max_piece)

        def counting_start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            try:
                stats._status(gen, record, int(status.split(None, 1)[0]))
            except ValueError:
                pass
            if exc_info:
                write = start_response(status, headers, exc_info)
            else:
                write = start_response(status, headers)

            def counting_write(data: bytes) -> Any:
                report(len(data))
                return write(data)

            return counting_write

        inner = self.app(environ, counting_start_response)
        return _Body(inner, report, self.server.latency, self.server.bandwidth, self._max_piece)

    # -- control endpoints
    def _control(
        self, environ: dict[str, Any], start_response: Callable[..., Any], path: str
    ) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        path = path.rstrip("/")
        routes: dict[str, tuple[str, Callable[[], Any]]] = {
            CONTROL_PREFIX + "/stats": ("GET", self.server.stats.as_json),
            CONTROL_PREFIX + "/requests": ("GET", self._request_log),
            CONTROL_PREFIX + "/stats/reset": ("POST", self._reset_stats),
            CONTROL_PREFIX + "/reset": ("POST", self._reset_all),
        }
        route = routes.get(path)
        if route is None:
            status = 404
            payload = {"error": f"unknown control endpoint {path}", "endpoints": sorted(routes)}
        elif method != route[0]:
            status, payload = 405, {"error": f"{path} needs {route[0]}"}
        else:
            status, payload = 200, route[1]()
        body = json.dumps(payload).encode()
        start_response(_status_line(status), [("Content-Type", "application/json"),
                                              ("Content-Length", str(len(body)))])
        return [body]

    def _request_log(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(r) for r in self.server.stats.records()]

    def _reset_stats(self) -> dict[str, str]:
        self.server.stats.reset()
        return {"status": "ok"}

    def _reset_all(self) -> dict[str, str]:
        self.server.reset()
        return {"status": "ok"}


# --------------------------------------------------------------------------- range fast path

# Request headers whose semantics we do not implement: their presence sends the request to moto.
_FALLTHROUGH_HEADERS = (
    "HTTP_IF_NONE_MATCH",
    "HTTP_IF_MODIFIED_SINCE",
    "HTTP_IF_UNMODIFIED_SINCE",
    "HTTP_ORIGIN",
    "HTTP_X_MOTO_ACCOUNT_ID",
    "HTTP_X_AMZ_EXPECTED_BUCKET_OWNER",
    "HTTP_X_AMZ_SERVER_SIDE_ENCRYPTION_CUSTOMER_ALGORITHM",
    "HTTP_X_AMZ_SERVER_SIDE_ENCRYPTION_CUSTOMER_KEY",
    "HTTP_X_AMZ_SERVER_SIDE_ENCRYPTION_CUSTOMER_KEY_MD5",
)


def _fast_range_get(environ: dict[str, Any], bucket_name: str | None, key_name: str | None,
                    query: dict[str, list[str]]) -> _Response | None:
    """Serve a single-range GET straight from moto's backend, or return None to let moto do it."""
    if not bucket_name or not key_name:
        return None
    if not _is_ip_literal(_split_host(environ)) and _split_host(environ) != "localhost":
        return None  # moto's addressing-style detection is subtle; only handle the obvious case
    if set(query) - {"versionId"}:
        return None
    version_id = None
    if "versionId" in query:
        values = query["versionId"]
        if len(values) != 1 or not values[0]:
            return None
        version_id = values[0]
    if not environ.get("HTTP_AUTHORIZATION"):
        return None  # anonymous requests go through moto's ACL checks
    if any(h in environ for h in _FALLTHROUGH_HEADERS):
        return None
    range_header = environ["HTTP_RANGE"]
    if_match = environ.get("HTTP_IF_MATCH")
    if if_match is not None and ("," in if_match or if_match.strip() == "*"):
        return None

    from moto import settings as moto_settings
    from moto.s3.models import FakeKey, s3_backends

    if moto_settings.INITIAL_NO_AUTH_ACTION_COUNT != float("inf"):
        return None  # IAM authorization is active
    if not moto_settings.s3_allow_crossdomain_access():
        return None
    location = s3_backends.bucket_accounts.get(bucket_name)
    if location is None:
        return None
    partition, account_id = location
    if account_id not in s3_backends:
        return None
    bucket = s3_backends[account_id][partition].buckets.get(bucket_name)
    if bucket is None or bucket.policy is not None or bucket.logging:
        return None

    if version_id is None:
        key = bucket.keys.get(key_name)
    else:
        versions = bucket.keys.getlist(key_name, [])
        key = next((k for k in versions if str(k.version_id) == version_id), None)
    if not isinstance(key, FakeKey) or key.disposed:
        return None  # missing key/version or a delete marker: moto knows the right error
    if key.storage_class in ("GLACIER", "DEEP_ARCHIVE"):
        return None

    size = key.size
    if size == 0:
        return None
    try:
        with key.lock:  # moto's etag property reads the buffer if the ETag isn't cached yet
            etag = key.etag  # quoted, e.g. '"9dd4..."' or '"...-2"' for multipart
    except (ValueError, OSError):
        return None
    if if_match is not None and etag not in (if_match.strip(), f'"{if_match.strip()}"'):
        # S3 (and moto) check If-Match before looking at the range.
        return _s3_error(412, "PreconditionFailed",
                         "At least one of the pre-conditions you specified did not hold",
                         Condition="If-Match")
    span = _parse_range(range_header, size)
    if span is None:
        return None
    if span == "unsatisfiable":
        return _s3_error(416, "InvalidRange", "The requested range is not satisfiable",
                         RangeRequested=range_header, ActualObjectSize=str(size))
    first, last = span
    checksum_headers: dict[str, str] = {}
    if (first, last) == (0, size - 1) and key.checksum_algorithm and \
            environ.get("HTTP_X_AMZ_CHECKSUM_MODE", "").upper() == "ENABLED":
        # A range covering the whole object carries the stored checksum (partial ranges
        # don't), and botocore - which asks for checksums by default - validates it.
        if not key.checksum_value:
            return None
        qualified = key.checksum_value
        if key.checksum_type == "COMPOSITE":
            qualified = f"{qualified}-{key.checksum_parts}"
        checksum_headers[f"x-amz-checksum-{key.checksum_algorithm.lower()}"] = qualified
        if key.checksum_type:
            checksum_headers["x-amz-checksum-type"] = key.checksum_type

    length = last - first + 1
    try:
        with key.lock:  # the buffer's file position is shared by all readers
            buf = key._value_buffer  # SpooledTemporaryFile: BytesIO in memory, else a temp file
            buf.seek(first)
            data = buf.read(length)
    except (ValueError, OSError):
        return None  # buffer closed under us (object deleted/overwritten, state reset)
    if len(data) != length:
        return None

    merged: dict[str, tuple[str, str]] = {}

    def put(name: str, value: Any) -> None:
        merged[name.lower()] = (name, str(value))

    for name, value in key.response_dict.items():
        put(name, value)
    for name, value in key.metadata.items():
        put(name, value)
    # moto records the request's payload hash among the object's metadata and echoes it
    # back; real S3 does not, and it describes the upload, not this response.
    merged.pop("x-amz-content-sha256", None)
    if key.version_id != "null":
        put("x-amz-version-id", key.version_id)
    put("ETag", etag)
    put("Last-Modified", key.last_modified_RFC1123)
    put("Accept-Ranges", "bytes")
    put("Content-Range", f"bytes {first}-{last}/{size}")
    put("Content-Length", length)
    merged.setdefault("content-type", ("Content-Type", "binary/octet-stream"))
    for name in [n for n in merged if n.startswith("x-amz-checksum-")]:
        del merged[name]
    for name, value in checksum_headers.items():
        put(name, value)
    put("x-amz-request-id", _request_id())
    headers = list(merged.values())
    try:
        for name, value in headers:
            value.encode("latin-1")
    except UnicodeEncodeError:
        return None
    return 206, headers, data


# --------------------------------------------------------------------------- the server


def _loopback_bind_host(host: str) -> tuple[str, str]:
    """(address to bind, host part of the endpoint URL); ValueError unless loopback."""
    if host == "localhost":
        return "127.0.0.1", "127.0.0.1"
    refusal = f"S3TestServer only listens on loopback; {host!r} is not a loopback address"
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(refusal) from None
    if not addr.is_loopback:
        raise ValueError(refusal)
    text = str(addr)
    return text, (f"[{text}]" if addr.version == 6 else text)


def _configure_min_part_size(min_part_size: int) -> None:
    """Make moto's multipart minimum part size ``min_part_size``.

    moto reads ``S3_UPLOAD_PART_MIN_SIZE`` from the environment once, when
    ``moto.settings`` is first imported; so this must run before moto's first
    import to take effect the ordinary way.  If moto is already loaded we also
    set the constant that moto's multipart completion consults.
    """
    os.environ["S3_UPLOAD_PART_MIN_SIZE"] = str(int(min_part_size))
    if "moto.settings" in sys.modules:
        sys.modules["moto.settings"].S3_UPLOAD_PART_MIN_SIZE = int(min_part_size)
    if "moto.s3.models" in sys.modules:
        sys.modules["moto.s3.models"].S3_UPLOAD_PART_MIN_SIZE = int(min_part_size)


def _make_handler(verbose: bool) -> type:
    werkzeug_app = _require("moto.moto_server.werkzeug_app")

    class _Handler(werkzeug_app.MotoRequestHandler):  # type: ignore[name-defined,misc]
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            try:
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

        def log_request(self, code: Any = "-", size: Any = "-") -> None:
            if verbose:
                super().log_request(code, size)

    return _Handler


class S3TestServer:
    """moto's S3 behind our middleware, on 127.0.0.1 (or another loopback address).

    Usage::

        with S3TestServer() as server:
            s3 = server.client()
            s3.create_bucket(Bucket="bucket")
            ...
            server.stats.snapshot()
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency: float = 0.0,
        bandwidth: float | None = None,
        region: str = "us-east-1",
        min_part_size: int | None = None,
        fast_path: bool = True,
        verbose: bool = False,
        keep_alive: bool = False,
    ) -> None:
        """``keep_alive``: serve with cheroot (installed separately), which keeps
        connections open between requests as S3 does, instead of werkzeug's server,
        which closes each one after its response (the tests keep that: a fresh
        connection per request is what their fault injection expects). The benchmark
        uses it: a TCP handshake per request cost both the clients and the endpoint
        CPU that no real endpoint charges."""
        self._bind_host, self._url_host = _loopback_bind_host(host)
        if latency < 0:
            raise ValueError("latency must be >= 0")
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError("bandwidth must be > 0 bytes/s (or None for no cap)")
        self.host = host
        self.port = int(port)
        self.latency = float(latency)
        self.bandwidth = float(bandwidth) if bandwidth else None
        self.region = region
        self.min_part_size = min_part_size
        self.fast_path = fast_path
        self.verbose = verbose
        self.keep_alive = keep_alive
        self.stats = RequestStats()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._moto_app: Any = None

    # -- lifecycle
    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("S3TestServer already started")
        if self.min_part_size is not None:
            _configure_min_part_size(self.min_part_size)
        werkzeug_app = _require("moto.moto_server.werkzeug_app")
        serving = _require("werkzeug.serving")
        self._moto_app = werkzeug_app.DomainDispatcherApplication(werkzeug_app.create_backend_app)
        app = _Middleware(self._moto_app, self)
        if self.keep_alive:
            self._start_cheroot(app)
            return
        try:
            server = serving.make_server(self._bind_host, self.port, app, threaded=True,
                                         request_handler=_make_handler(self.verbose))
        except SystemExit:  # werkzeug reports bind errors on stderr and exits
            where = f"{self._bind_host}:{self.port}"
            raise OSError(f"S3TestServer could not listen on {where}") from None
        self._server = server
        self.port = server.server_address[1]
        # The socket is bound and listening already; connections queue until the loop runs.
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"s3server:{self.port}", daemon=True)
        self._thread.start()

    def _start_cheroot(self, app: Any) -> None:
        try:
            wsgi = importlib.import_module("cheroot.wsgi")
        except ImportError as exc:
            raise ImportError(f"S3TestServer(keep_alive=True) serves with cheroot: pip install cheroot ({exc})") from exc
        # Threads: connections served at once (each keeps its thread while open); the
        # benchmark's clients open up to ~20 (gstore's pool, rclone's and s3fs's).
        server = wsgi.Server((self._bind_host, self.port), app, numthreads=32, max=64,
                             server_name="gstore-s3-test", timeout=60)
        server.prepare()  # binds and listens: the port is known from here
        self._server = server
        self.port = server.bind_addr[1]
        self._thread = threading.Thread(target=server.serve, name=f"s3server:{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        if self.keep_alive:
            server.stop()
            if thread is not None:
                thread.join(timeout=10)
            self._server = None
            self._thread = None
            return
        server.shutdown()
        if thread is not None:
            thread.join(timeout=10)
        server.server_close()
        self._server = None
        self._thread = None

    def __enter__(self) -> S3TestServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- information
    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("S3TestServer is not running; call start() first")
        return f"http://{self._url_host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    # -- state
    def seed(self, bucket: str, objects: dict[str, bytes]) -> None:
        """Store many objects straight into moto's backend, without HTTP.

        For fixtures that need thousands of keys (a 10,000-object listing):
        the objects are real moto objects, listed and served like any other.
        The bucket must exist. Not counted in the stats.
        """
        from moto.s3.models import s3_backends

        location = s3_backends.bucket_accounts.get(bucket)
        if location is None:
            raise KeyError(f"no bucket {bucket!r}")
        partition, account_id = location
        backend = s3_backends[account_id][partition]
        for key, value in objects.items():
            backend.put_object(bucket, key, value)

    def reset(self) -> None:
        """Wipe all buckets and objects (all of moto's in-process state) and the stats."""
        app = self._moto_app
        if app is None:
            werkzeug_app = _require("moto.moto_server.werkzeug_app")
            app = werkzeug_app.DomainDispatcherApplication(werkzeug_app.create_backend_app)
        from werkzeug.test import Client

        response = Client(app).post("/moto-api/reset")
        if response.status_code != 200:
            detail = response.get_data(as_text=True)
            raise RuntimeError(f"moto reset failed: {response.status_code} {detail}")
        self.stats.reset()

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint (fake credentials, path-style, no retries)."""
        boto3 = _require("boto3")
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": 1},
                connect_timeout=10,
                read_timeout=60,
            ),
        )

    def __repr__(self) -> str:
        where = self.endpoint_url if self.running else "stopped"
        return f"<S3TestServer {where} latency={self.latency} bandwidth={self.bandwidth}>"


# --------------------------------------------------------------------------- CLI


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gstore.testing.s3server",
        description="Serve a local S3 endpoint (moto + gstore's range fast path)"
        " until SIGTERM/SIGINT.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0 = any free port)")
    parser.add_argument("--latency", type=float, default=0.0,
                        help="seconds before each response's first byte")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="response-body cap in bytes/s, per request")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--min-part-size", type=int, default=None,
                        help="moto's multipart minimum part size (S3_UPLOAD_PART_MIN_SIZE)")
    parser.add_argument("--no-fast-path", action="store_true",
                        help="let moto serve ranged GETs itself")
    parser.add_argument("--port-file", default=None,
                        help="write the endpoint URL to this file once listening")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)

    try:
        server = S3TestServer(
            args.host, args.port, latency=args.latency, bandwidth=args.bandwidth,
            region=args.region, min_part_size=args.min_part_size,
            fast_path=not args.no_fast_path, verbose=args.verbose,
        )
    except ValueError as exc:
        parser.error(str(exc))

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        try:
            print(server.endpoint_url, flush=True)
            if args.port_file:
                _write_atomically(args.port_file, server.endpoint_url + "\n")
            while not stop.wait(1.0):
                pass
        finally:
            server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
