"""A fault-injecting HTTP proxy in front of a test S3 endpoint (127.0.0.1 only).

Tests point a mount at :attr:`FaultProxy.endpoint_url` instead of the S3 test
server and switch faults on and off while the mount runs::

    proxy = FaultProxy(s3.endpoint).start()
    proxy.inject("status", status=503, code="SlowDown", times=3, methods={"GET"})
    proxy.inject("reset", probability=0.3, methods={"GET"})
    proxy.outage(5)            # every connection is reset for 5 seconds
    proxy.clear()              # all faults off
    proxy.counts()             # {"requests": ..., "reset": ..., ...}

Faults (``kind``):

``latency``   wait ``delay`` seconds before answering (the request is forwarded).
``status``    answer ``status`` (500, 503 ...) with an S3 XML error ``code``
              without forwarding: the backend never saw the request.
``hang``      accept the request and never answer (until the fault is cleared,
              the client gives up, or the proxy stops). Not forwarded.
``reset``     forward the request, send the response headers and half of the
              body, then reset the connection (TCP RST). For a write this is a
              response lost *after* the backend applied the request.
``truncate``  like ``reset`` but the connection is closed cleanly (FIN) after
              half of the body, with the original Content-Length announced.
``outage``    see :meth:`outage`: every new connection is reset at once.

Each fault can be limited to ``times`` injections, a ``probability`` (seeded
RNG, so runs are reproducible), a set of HTTP ``methods``, requests that carry
a ``Range`` header (``ranged_only``), a substring of the path (``path``), and
``per_request`` injections per distinct request (method, URL, Range): with
``per_request=1`` the first try of every block fetch fails and the retry gets
through, which makes retry tests deterministic.

One request per client connection: every response carries ``Connection:
close`` (the upstream test server closes after each response anyway). The
proxy is deliberately simple blocking sockets and one thread per connection.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import socket
import struct
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Fault", "FaultProxy"]

log = logging.getLogger(__name__)

KINDS = ("latency", "status", "hang", "reset", "truncate")
_MAX_HEADER = 64 * 1024
_IO_TIMEOUT = 30.0


@dataclasses.dataclass
class Fault:
    kind: str
    times: int | None = None  # None: unlimited
    probability: float = 1.0
    methods: frozenset[str] | None = None
    ranged_only: bool = False
    path: str | None = None
    delay: float = 0.0  # latency
    status: int = 503  # status
    code: str = "SlowDown"
    per_request: int | None = None  # at most this many times per distinct request (method, URL, Range)
    injected: int = 0
    seen: Counter[tuple[str, str, str]] = dataclasses.field(default_factory=Counter)

    def matches(self, method: str, target: str, headers: dict[str, str]) -> bool:
        if self.times is not None and self.injected >= self.times:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.ranged_only and "range" not in headers:
            return False
        if self.path is not None and self.path not in target:
            return False
        return self.per_request is None or self.seen[_request_key(method, target, headers)] < self.per_request


def _request_key(method: str, target: str, headers: dict[str, str]) -> tuple[str, str, str]:
    return method, target, headers.get("range", "")


class _Request:
    def __init__(self, head: bytes, body: bytes) -> None:
        self.head = head
        self.body = body
        lines = head.split(b"\r\n")
        self.method, self.target, _ = lines[0].decode("latin-1").split(" ", 2)
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            if b":" in line:
                name, _, value = line.decode("latin-1").partition(":")
                self.headers[name.strip().lower()] = value.strip()


def _recv_until(sock: socket.socket, buffer: bytearray, marker: bytes, limit: int) -> int:
    while True:
        at = buffer.find(marker)
        if at >= 0:
            return at
        if len(buffer) > limit:
            raise ValueError("header too large")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("peer closed")
        buffer += chunk


def _recv_exact(sock: socket.socket, buffer: bytearray, n: int) -> bytes:
    while len(buffer) < n:
        chunk = sock.recv(max(65536, n - len(buffer)))
        if not chunk:
            raise ConnectionError("peer closed in the middle of a body")
        buffer += chunk
    data = bytes(buffer[:n])
    del buffer[:n]
    return data


def _read_request(sock: socket.socket) -> _Request:
    buffer = bytearray()
    end = _recv_until(sock, buffer, b"\r\n\r\n", _MAX_HEADER)
    head = bytes(buffer[:end])
    del buffer[: end + 4]
    request = _Request(head, b"")
    if request.headers.get("expect", "").lower() == "100-continue":
        # Answer for the upstream (which then sees a plain request): the client sends its body now.
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.head = b"\r\n".join(line for line in head.split(b"\r\n") if not line.lower().startswith(b"expect:"))
    if request.headers.get("transfer-encoding", "").lower() == "chunked":
        # Keep the chunked framing as is: upstream decodes it.
        raw = bytearray()
        while True:
            at = _recv_until(sock, buffer, b"\r\n", _MAX_HEADER)
            size_line = bytes(buffer[: at + 2])
            del buffer[: at + 2]
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            raw += size_line
            raw += _recv_exact(sock, buffer, size + 2)
            if size == 0:
                break
        request.body = bytes(raw)
    else:
        length = int(request.headers.get("content-length", "0") or 0)
        request.body = _recv_exact(sock, buffer, length)
    return request


def _with_connection_close(head: bytes) -> bytes:
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith((b"connection:", b"keep-alive:"))]
    lines.append(b"Connection: close")
    return b"\r\n".join(lines)


def _hard_reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """Forward HTTP requests to ``upstream`` and break some of them on purpose."""

    def __init__(self, upstream: str, *, host: str = "127.0.0.1", port: int = 0, seed: int = 1234) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the fault proxy only listens on the loopback interface")
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the fault proxy only forwards to a loopback endpoint")
        self._upstream = (parts.hostname, parts.port or 80)
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._outage_until = 0.0
        self._rng = random.Random(seed)
        self._counts: Counter[str] = Counter()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._clients: set[socket.socket] = set()
        self._generation = 0  # bumped by clear(): hanging requests give up

    # -- control -------------------------------------------------------------------

    def inject(self, kind: str, *, times: int | None = None, probability: float = 1.0,
               methods: set[str] | frozenset[str] | None = None, ranged_only: bool = False,
               path: str | None = None, delay: float = 0.0, status: int = 503,
               code: str | None = None, per_request: int | None = None) -> Fault:
        """Switch a fault on (several may be active; the first that matches a request wins)."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {', '.join(KINDS)} (or outage())")
        fault = Fault(kind=kind, times=times, probability=probability,
                      methods=frozenset(m.upper() for m in methods) if methods else None,
                      ranged_only=ranged_only, path=path, delay=delay, status=status,
                      per_request=per_request, code=code or ("SlowDown" if status == 503 else "InternalError"))
        with self._lock:
            self._faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            if fault in self._faults:
                self._faults.remove(fault)
            self._generation += 1

    def clear(self) -> None:
        """All faults off, the outage ended, hanging requests released (their connections reset)."""
        with self._lock:
            self._faults.clear()
            self._outage_until = 0.0
            self._generation += 1

    def outage(self, seconds: float) -> None:
        """For ``seconds`` from now every new connection is reset before a byte is read."""
        with self._lock:
            self._outage_until = time.monotonic() + seconds

    def end_outage(self) -> None:
        with self._lock:
            self._outage_until = 0.0

    @property
    def in_outage(self) -> bool:
        return time.monotonic() < self._outage_until

    def counts(self) -> dict[str, int]:
        """``requests`` (seen), ``forwarded``, and one counter per fault kind injected."""
        with self._lock:
            return dict(self._counts)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self._host}:{self._port}"

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._host, self._port))
        listener.listen(256)
        listener.settimeout(0.2)
        self._port = listener.getsockname()[1]
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            try:
                client.close()
            except OSError:
                pass

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving ---------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            if self.in_outage:
                with self._lock:
                    self._counts["outage"] += 1
                _hard_reset(client)
                continue
            threading.Thread(target=self._serve, args=(client,), name="fault-proxy-conn", daemon=True).start()

    def _pick(self, request: _Request) -> tuple[float, Fault | None]:
        """(added latency, the one breaking fault) for a request; counts what it picks."""
        delay, chosen = 0.0, None
        with self._lock:
            self._counts["requests"] += 1
            for fault in self._faults:
                if not fault.matches(request.method, request.target, request.headers):
                    continue
                if fault.probability < 1.0 and self._rng.random() >= fault.probability:
                    continue
                if fault.kind == "latency":
                    delay += fault.delay
                elif chosen is None:
                    chosen = fault
                else:
                    continue
                fault.injected += 1
                self._counts[fault.kind] += 1
                if fault.per_request is not None:
                    fault.seen[_request_key(request.method, request.target, request.headers)] += 1
        return delay, chosen

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self._clients.add(client)
        try:
            client.settimeout(_IO_TIMEOUT)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                request = _read_request(client)
            except (OSError, ValueError):
                client.close()
                return
            delay, fault = self._pick(request)
            if delay:
                self._sleep(delay)
            if fault is not None and fault.kind == "hang":
                self._hang(client)
                return
            if fault is not None and fault.kind == "status":
                self._send_error(client, fault)
                return
            try:
                head, body = self._forward(request)
            except OSError as exc:
                log.debug("fault proxy: upstream failed: %s", exc)
                self._send_plain(client, 502, b"upstream unreachable")
                return
            with self._lock:
                self._counts["forwarded"] += 1
            if fault is not None and fault.kind in ("reset", "truncate"):
                client.sendall(_with_connection_close(head) + b"\r\n\r\n" + body[: len(body) // 2])
                if fault.kind == "reset":
                    _hard_reset(client)
                else:
                    client.shutdown(socket.SHUT_RDWR)
                    client.close()
                return
            client.sendall(_with_connection_close(head) + b"\r\n\r\n" + body)
            client.shutdown(socket.SHUT_WR)
            client.close()
        except OSError:
            try:
                client.close()
            except OSError:
                pass
        finally:
            with self._lock:
                self._clients.discard(client)

    def _sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    def _hang(self, client: socket.socket) -> None:
        """Say nothing until the client gives up, the fault is cleared or the proxy stops."""
        generation = self._generation
        client.settimeout(0.1)
        while not self._stopping.is_set() and self._generation == generation:
            try:
                if client.recv(1, socket.MSG_PEEK) == b"":
                    break  # the client closed its end
            except TimeoutError:
                continue
            except OSError:
                break
            time.sleep(0.1)  # (pipelined bytes would spin: just wait)
        _hard_reset(client)

    def _forward(self, request: _Request) -> tuple[bytes, bytes]:
        upstream = socket.create_connection(self._upstream, timeout=_IO_TIMEOUT)
        try:
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.sendall(_with_connection_close(request.head) + b"\r\n\r\n" + request.body)
            chunks = []
            while True:
                chunk = upstream.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            upstream.close()
        raw = b"".join(chunks)
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            raise ConnectionError("upstream sent no complete response header")
        return raw[:end], raw[end + 4 :]

    def _send_error(self, client: socket.socket, fault: Fault) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>'
            f"{fault.code}</Code><Message>injected by the fault proxy</Message>"
            "<RequestId>fault-proxy</RequestId></Error>"
        ).encode()
        self._send_plain(client, fault.status, body, content_type="application/xml")

    @staticmethod
    def _send_plain(client: socket.socket, status: int, body: bytes, content_type: str = "text/plain") -> None:
        reason = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Slow Down"}.get(status, "Error")
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            client.sendall(head + body)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        client.close()

    def __repr__(self) -> str:
        return f"FaultProxy({self.endpoint_url} -> {self._upstream[0]}:{self._upstream[1]})"


def describe(counts: dict[str, Any]) -> str:
    """One line for test reports."""
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
