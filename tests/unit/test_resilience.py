"""Retries, deadlines and the circuit breaker of :mod:`gstore.backends.resilience` (no network)."""

from __future__ import annotations

import errno
import random
import time

import pytest
import trio

from gstore.backends import make_backend, resilience_policy
from gstore.backends.base import Capabilities, NotSupportedError, ObjectInfo
from gstore.backends.resilience import CLOSED, OPEN, CircuitBreaker, ResiliencePolicy, ResilientBackend
from gstore.errors import BackendError, StaleObjectError

INFO = ObjectInfo(name="f", is_dir=False, size=10, etag="abc")


def transient(msg: str = "503 SlowDown") -> BackendError:
    return BackendError(errno.EAGAIN, msg, transient=True)


class Flaky:
    """A backend whose calls follow a script: an exception to raise, "hang", or a value."""

    display = "fake://"
    cache_namespace = "fake"
    capabilities = Capabilities()  # plain reads and writes, nothing optional

    def __init__(self) -> None:
        self.script: list[object] = []
        self.default: object = b"0123456789"
        self.calls: list[str] = []
        self.probe_ok = True
        self.probes = 0

    def cache_key(self, path: str) -> str:
        return "fake|" + path

    async def _step(self, name: str) -> object:
        self.calls.append(name)
        step = self.script.pop(0) if self.script else self.default
        if step == "hang":
            await trio.sleep_forever()
        if isinstance(step, BaseException):
            raise step
        return step

    async def probe(self) -> None:
        self.probes += 1
        if not self.probe_ok:
            raise transient("probe: connection refused")

    async def stat(self, path: str) -> object:
        result = await self._step("stat")
        return INFO if isinstance(result, bytes) else result

    async def head(self, path: str) -> object:
        return await self._step("head")

    async def list_dir(self, path: str, max_pages: int | None = None) -> object:
        return await self._step("list_dir")

    async def walk(self, path: str) -> object:
        return await self._step("walk")

    async def read_range(self, path: str, start: int, end: int, expect: ObjectInfo) -> bytes:
        data = await self._step("read_range")
        assert isinstance(data, bytes)
        return data[start:end]

    async def put_bytes(self, path: str, data: bytes, **kwargs: object) -> object:
        return await self._step("put_bytes")

    async def aclose(self) -> None:
        return None


def wrap(inner: Flaky, **kw: object) -> ResilientBackend:
    policy = ResiliencePolicy(**{"retries": 4, "deadline": 5.0, "base_delay": 0.01, "max_delay": 0.05,
                                 "breaker_threshold": 50, "breaker_cooldown": 0.2, **kw})  # type: ignore[arg-type]
    return ResilientBackend(inner, policy, rng=random.Random(7))  # type: ignore[arg-type]  # a partial fake


def test_transient_failures_are_retried_then_succeed() -> None:
    async def main() -> None:
        inner = Flaky()
        inner.script = [transient(), ConnectionResetError(errno.ECONNRESET, "reset"), b"0123456789"]
        backend = wrap(inner)
        assert await backend.read_range("f", 0, 10, INFO) == b"0123456789"
        assert inner.calls == ["read_range"] * 3
        assert backend.retries == 2 and backend.health()["state"] == CLOSED

    trio.run(main)


def test_definite_answers_are_not_retried() -> None:
    async def main() -> None:
        inner = Flaky()
        backend = wrap(inner)
        for exc in (FileNotFoundError(errno.ENOENT, "nope"), StaleObjectError("changed"),
                    PermissionError(errno.EACCES, "denied")):
            inner.calls.clear()
            inner.script = [exc]
            with pytest.raises(type(exc)):
                await backend.stat("f")
            assert inner.calls == ["stat"]
        assert backend.breaker.consecutive_failures == 0

    trio.run(main)


def test_gives_up_with_eio_after_the_retry_limit() -> None:
    async def main() -> None:
        inner = Flaky()
        inner.default = transient()
        backend = wrap(inner, retries=3)
        with pytest.raises(BackendError) as info:
            await backend.read_range("f", 0, 10, INFO)
        assert info.value.errno == errno.EIO
        assert "4 attempt" in str(info.value)
        assert len(inner.calls) == 4
        assert backend.health()["failed_operations"] == 1

    trio.run(main)


def test_a_hanging_backend_fails_within_the_deadline() -> None:
    async def main() -> None:
        inner = Flaky()
        inner.default = "hang"
        backend = wrap(inner, deadline=0.6)
        started = time.monotonic()
        with pytest.raises(BackendError) as info:
            await backend.read_range("f", 0, 10, INFO)
        elapsed = time.monotonic() - started
        assert info.value.errno == errno.EIO
        assert elapsed < 1.0, elapsed
        assert len(inner.calls) == 2  # each attempt gets at most half the deadline

    trio.run(main)


def test_a_hang_then_an_answer_is_retried() -> None:
    async def main() -> None:
        inner = Flaky()
        inner.script = ["hang", b"0123456789"]
        backend = wrap(inner, deadline=1.0)
        assert await backend.read_range("f", 2, 5, INFO) == b"234"

    trio.run(main)


def test_short_bodies_are_retried_never_returned() -> None:
    async def main() -> None:
        inner = Flaky()
        inner.script = [b"01234", b"0123456789"]
        backend = wrap(inner)
        assert await backend.read_range("f", 0, 10, INFO) == b"0123456789"
        inner.default = b"012"
        with pytest.raises(BackendError) as info:
            await backend.read_range("f", 0, 10, INFO)
        assert info.value.errno == errno.EIO

    trio.run(main)


def test_breaker_opens_fails_fast_and_recovers_by_itself() -> None:
    async def main() -> None:
        inner = Flaky()
        inner.default = transient("connection refused")
        inner.probe_ok = False
        backend = wrap(inner, retries=1, breaker_threshold=4, breaker_cooldown=0.1)
        states: list[str] = []
        backend.add_listener(states.append)
        for _ in range(2):
            with pytest.raises(BackendError):
                await backend.stat("f")
        assert backend.health()["state"] == OPEN
        assert states == [OPEN]
        calls = len(inner.calls)
        started = time.monotonic()
        for _ in range(100):  # fail fast: no request reaches the dead backend
            with pytest.raises(BackendError) as info:
                await backend.read_range("f", 0, 10, INFO)
            assert info.value.errno == errno.EIO
        with pytest.raises(BackendError):
            await backend.put_bytes("f", b"x")  # writes too
        assert len(inner.calls) == calls
        assert time.monotonic() - started < 0.5
        assert backend.health()["fast_failures"] >= 101
        await trio.sleep(0.35)
        assert inner.probes >= 2 and backend.health()["state"] != CLOSED  # probes fail: stays open
        inner.probe_ok = True
        inner.default = b"0123456789"
        with trio.fail_after(2):
            while backend.health()["state"] != CLOSED:
                await trio.sleep(0.02)
        assert states == [OPEN, CLOSED]
        assert await backend.read_range("f", 0, 10, INFO) == b"0123456789"
        assert backend.health()["times_opened"] == 1

    trio.run(main)


def test_writes_are_not_retried_but_counted() -> None:
    async def main() -> None:
        inner = Flaky()
        inner.script = [transient()]
        backend = wrap(inner, breaker_threshold=1)
        with pytest.raises(BackendError):
            await backend.put_bytes("f", b"data")
        assert inner.calls == ["put_bytes"]
        assert backend.breaker.state == OPEN

    trio.run(main)


def test_capabilities_pass_through_and_unsupported_calls_never_reach_the_backend() -> None:
    async def main() -> None:
        inner = Flaky()
        backend = wrap(inner, breaker_threshold=1)
        assert backend.capabilities is inner.capabilities
        assert backend.supports_server_copy is False  # deprecated spelling, kept for the callers
        assert backend.cache_key("a") == "fake|a"
        assert backend.display == "fake://"
        for call in (
            lambda: backend.start_multipart("f"),
            lambda: backend.upload_part("f", "u", 1, b"x"),
            lambda: backend.copy_part("f", "u", 1, "g", INFO, 0, 10),
            lambda: backend.complete_multipart("f", "u", []),
            lambda: backend.abort_multipart("f", "u"),
            lambda: backend.list_versions("f"),
            lambda: backend.set_content_type("f", "text/plain"),
            lambda: backend.put_local_file("f", "/nonexistent"),
            lambda: backend.put_bytes("f", b"x", if_match="abc"),
            lambda: backend.put_bytes("f", b"x", if_none_match=True),
        ):
            with pytest.raises(NotSupportedError) as info:
                await call()
            assert info.value.errno == errno.ENOTSUP and "fake://" in str(info.value)
        # Not sent, not counted: an unsupported call says nothing about the backend's health.
        assert inner.calls == [] and backend.calls == 0 and backend.breaker.state == CLOSED
        inner.capabilities = Capabilities(multipart=True)  # learnt later (a probe): seen at once
        assert backend.capabilities.multipart

    trio.run(main)


def test_breaker_counts_consecutive_failures_only() -> None:
    clock = [0.0]
    breaker = CircuitBreaker(3, 1.0, clock=lambda: clock[0])
    for _ in range(2):
        breaker.failure(transient())
    breaker.success()
    breaker.failure(transient())
    breaker.failure(transient())
    assert breaker.state == CLOSED
    breaker.failure(transient())
    assert breaker.state == OPEN
    with pytest.raises(BackendError) as info:
        breaker.check("stat x")
    assert info.value.errno == errno.EIO and "circuit open" in str(info.value)


def test_policy_defaults_follow_the_request_timeout() -> None:
    assert resilience_policy(60).breaker_cooldown == 5.0
    assert resilience_policy(4).breaker_cooldown == 2.0
    assert resilience_policy(0.5).breaker_cooldown == 1.0
    assert resilience_policy(4, retries=0, breaker_cooldown=0.5).retries == 0
    with pytest.raises(ValueError):
        ResiliencePolicy(retries=-1)


def test_make_backend_wraps_and_works(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a.txt").write_bytes(b"hello world")

    async def main() -> None:
        backend = make_backend("file", str(tmp_path), {}, request_timeout=5)
        assert isinstance(backend, ResilientBackend)
        await backend.probe()
        info = await backend.stat("a.txt")
        assert await backend.read_range("a.txt", 6, 11, info) == b"world"
        with pytest.raises(FileNotFoundError):
            await backend.stat("missing")
        with pytest.raises(PermissionError):
            await backend.stat("../etc/passwd")
        assert backend.health()["state"] == CLOSED

    trio.run(main)
