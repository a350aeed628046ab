"""The S3 client's settings, observed from the other end of the socket.

* Its connection pool is as large as the mount's limiters let requests through.
  botocore keeps at most 10 connections by default, fewer than a mount's readahead
  (16 fetches), uploads (16 files) and parts (8) together: with that pool the
  limiters' figures were never reached, and a listing waited behind readahead for a
  connection. A listener that accepts connections and never answers counts how many
  the client opens at once.
* Its requests name gstore in their User-Agent (botocore's own, rebuilt per request,
  cost 5% of the asyncio thread), unless the user's client config gives one.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from gstore.backends import make_backend
from gstore.config import METADATA_CONNECTIONS, MountOptions


class SilentListener:
    """Accepts TCP connections on 127.0.0.1 and never answers a byte."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self._accepted: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent listener", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    @property
    def accepted(self) -> int:
        with self._lock:
            return len(self._accepted)

    def first_request_head(self) -> bytes:
        """The start of what the first connection sent (its request line and headers)."""
        with self._lock:
            conn = self._accepted[0]
        conn.settimeout(5)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                break
            head += chunk
        return head

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._accepted.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        with self._lock:
            for conn in self._accepted:
                conn.close()


@pytest.fixture
def listener() -> Iterator[SilentListener]:
    silent = SilentListener()
    try:
        yield silent
    finally:
        silent.close()


def connections_opened(listener: SilentListener, requests: int, expect: int, **backend_args: Any) -> int:
    """Send ``requests`` lookups at once; once the client has opened ``expect`` connections
    (or after 20 s), give it half a second more to open others, and count them."""
    options = {"endpoint_url": listener.url, "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}
    options.update(backend_args.pop("options", {}))
    backend = make_backend("s3", "bucket", options, request_timeout=30, resilient=False, **backend_args)

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            for i in range(requests):
                nursery.start_soon(backend.head, f"key-{i}")
            with trio.move_on_after(20):
                while listener.accepted < expect:
                    await trio.sleep(0.02)
            await trio.sleep(0.5)
            # Counted before the cancellation: a cancelled request frees its connection's slot,
            # and a request still queued for one may open a new connection before it, too, is
            # cancelled.
            opened = listener.accepted
            nursery.cancel_scope.cancel()
        await backend.aclose()
        return opened

    return trio.run(main)


def test_the_pool_holds_a_connection_for_every_request_the_limiters_allow(listener: SilentListener) -> None:
    # 20 lookups at once, twice botocore's default pool (10 connections: 10 here before).
    assert connections_opened(listener, 20, 20, max_connections=40) == 20


def test_a_pool_size_in_the_users_own_client_config_wins(listener: SilentListener) -> None:
    opened = connections_opened(listener, 20, 12, max_connections=40,
                                options={"config_kwargs": {"max_pool_connections": 12}})
    assert opened == 12


def test_the_mount_sizes_the_pool_from_its_limiters() -> None:
    options = MountOptions(fetch_concurrency=5, upload_concurrency=6, part_concurrency=7)
    assert options.backend_connections == 5 + 6 + 7 + METADATA_CONNECTIONS
    defaults = MountOptions()
    assert defaults.backend_connections > 10  # botocore's default pool, too small


def user_agent_sent(listener: SilentListener, **options: Any) -> str:
    connections_opened(listener, 1, 1, options=options)
    for line in listener.first_request_head().split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"user-agent":
            return value.strip().decode()
    raise AssertionError("no User-Agent header")


def test_requests_name_gstore_in_their_user_agent(listener: SilentListener) -> None:
    from gstore import __version__

    # The session appends "botocore/<version>" to whatever User-Agent it is given.
    assert user_agent_sent(listener).split()[0] == f"gstore/{__version__}"


def test_a_user_agent_in_the_users_own_client_config_wins(listener: SilentListener) -> None:
    assert user_agent_sent(listener, config_kwargs={"user_agent": "my-tool/2"}).split()[0] == "my-tool/2"
