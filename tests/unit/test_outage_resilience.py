"""Bounded waits (no network): a hung backend opens the circuit after one timeout, later
calls fail fast, one request shares one --request-timeout, connect timeouts are short.

Times asserted here are upper bounds with wide margins (behaviour, not speed): "three
calls against a hung backend end within 2x one timeout" where each used to take one.
"""

from __future__ import annotations

import errno
import random
import time

import pytest
import trio

from gstore.backends import make_backend
from gstore.backends.base import Capabilities, ObjectInfo
from gstore.backends.resilience import CLOSED, OPEN, ResiliencePolicy, ResilientBackend, request_scope
from gstore.errors import BackendError

INFO = ObjectInfo(name="f", is_dir=False, size=10, etag="abc")


class Scripted:
    """A backend whose calls do what ``behave(name, path)`` says: a value, an exception, or
    a number of seconds to sleep first ("hang" = forever)."""

    display = "fake://"
    cache_namespace = "fake"
    capabilities = Capabilities()

    def __init__(self) -> None:
        self.behave = lambda name, path: INFO
        self.calls: list[tuple[str, str]] = []
        self.probe_behaviour: object = None  # None: fine; "hang"; or an exception

    def cache_key(self, path: str) -> str:
        return "fake|" + path

    async def _do(self, name: str, path: str) -> object:
        self.calls.append((name, path))
        step = self.behave(name, path)
        if step == "hang":
            await trio.sleep_forever()
        if isinstance(step, tuple) and step[0] == "sleep":
            await trio.sleep(step[1])
            step = step[2]
        if isinstance(step, BaseException):
            raise step
        return step

    async def probe(self) -> None:
        if self.probe_behaviour == "hang":
            await trio.sleep_forever()
        if isinstance(self.probe_behaviour, BaseException):
            raise self.probe_behaviour

    async def stat(self, path: str) -> object:
        return await self._do("stat", path)

    async def head(self, path: str) -> object:
        return await self._do("head", path)

    async def list_dir(self, path: str, max_pages: int | None = None) -> object:
        return await self._do("list_dir", path)

    async def walk(self, path: str) -> object:
        return await self._do("walk", path)

    async def read_range(self, path: str, start: int, end: int, expect: ObjectInfo) -> bytes:
        return await self._do("read_range", path)  # type: ignore[return-value]

    async def put_bytes(self, path: str, data: bytes, **kwargs: object) -> object:
        return await self._do("put_bytes", path)

    async def aclose(self) -> None:
        return None


def wrap(inner: Scripted, **kw: object) -> ResilientBackend:
    policy = ResiliencePolicy(**{"retries": 4, "deadline": 1.0, "base_delay": 0.01, "max_delay": 0.05,
                                 "breaker_threshold": 10, "breaker_cooldown": 0.2, **kw})  # type: ignore[arg-type]
    return ResilientBackend(inner, policy, rng=random.Random(3))  # type: ignore[arg-type]


def test_three_calls_against_a_hung_backend_take_about_one_timeout() -> None:
    async def main() -> None:
        inner = Scripted()
        inner.behave = lambda name, path: "hang"
        inner.probe_behaviour = "hang"
        backend = wrap(inner)  # deadline 1 s; before: every call waited it all (3 s for three)
        started = time.monotonic()
        for name in ("a", "b", "c"):
            with pytest.raises(BackendError) as info:
                await backend.stat(name)
            assert info.value.errno == errno.EIO
        elapsed = time.monotonic() - started
        assert elapsed < 2 * 1.0, elapsed
        health = backend.health()
        assert health["state"] != CLOSED and not health["online"] and health["opened_by"] == "timeout"
        assert health["times_opened"] == 1 and health["fast_failures"] >= 2
        # The first call tried twice (a second, fresh connection), the others not at all.
        assert inner.calls == [("stat", "a"), ("stat", "a")]

    trio.run(main)


def test_a_slow_request_while_others_succeed_does_not_open_the_circuit() -> None:
    async def main() -> None:
        inner = Scripted()
        inner.behave = lambda name, path: "hang" if path == "slow" else INFO
        backend = wrap(inner, deadline=0.6, retries=0)
        answered = 0

        async def others() -> None:
            nonlocal answered
            for _ in range(20):
                await backend.stat("fast")
                answered += 1
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(others)
            with pytest.raises(BackendError):
                await backend.stat("slow")
        assert answered == 20
        assert backend.health()["state"] == CLOSED and backend.health()["times_opened"] == 0

    trio.run(main)


def test_a_stuck_request_on_a_healthy_backend_costs_one_probe() -> None:
    """One hung request opens the circuit, the immediate probe finds the backend answering
    and closes it: the others are not failed for a whole cooldown."""

    async def main() -> None:
        inner = Scripted()
        inner.behave = lambda name, path: "hang" if path == "stuck" else INFO
        backend = wrap(inner, deadline=0.6, breaker_cooldown=30)
        states: list[str] = []
        backend.add_listener(states.append)
        with pytest.raises(BackendError):
            await backend.read_range("stuck", 0, 10, INFO)
        with trio.fail_after(2):
            while backend.breaker.state != CLOSED:
                await trio.sleep(0.01)
        assert states == [OPEN, CLOSED]
        assert await backend.stat("other") == INFO

    trio.run(main)


def test_connect_timeouts_open_at_once_answers_do_not() -> None:
    from botocore.exceptions import ConnectTimeoutError

    class RequestTimeout(Exception):  # S3's own 400 RequestTimeout: an answer
        response = {"Error": {"Code": "RequestTimeout"}, "ResponseMetadata": {"HTTPStatusCode": 400}}

    async def main() -> None:
        inner = Scripted()
        answer = RequestTimeout("Your socket connection to the server was not read from")
        inner.behave = lambda name, path: answer
        backend = wrap(inner, retries=1)
        with pytest.raises(BackendError):
            await backend.stat("x")
        assert backend.health()["state"] == CLOSED  # answered twice: 2 of 10 failures
        refused = BackendError(errno.EIO, "connect timeout", transient=True)
        refused.__cause__ = ConnectTimeoutError(endpoint_url="http://127.0.0.1:9")
        inner.behave = lambda name, path: refused
        inner.probe_behaviour = refused
        with pytest.raises(BackendError):
            await backend.stat("x")
        assert backend.health()["state"] != CLOSED and backend.health()["opened_by"] == "timeout"

    trio.run(main)


def test_one_request_shares_one_deadline_but_its_children_do_not() -> None:
    async def main() -> None:
        inner = Scripted()
        inner.behave = lambda name, path: {"first": ("sleep", 0.7, INFO), "second": "hang",
                                           "child": ("sleep", 0.5, INFO)}[path]
        # retries=0: no per-attempt halving, so the budget alone decides.
        backend = wrap(inner, deadline=1.0, retries=0, breaker_threshold=100)
        child_result: list[object] = []

        async def child() -> None:
            child_result.append(await backend.head("child"))

        async with trio.open_nursery() as nursery:
            with request_scope():
                assert await backend.head("first") == INFO  # 0.7 s of the 1 s
                nursery.start_soon(child)  # started inside, but not part of this request
                started = time.monotonic()
                with pytest.raises(BackendError):
                    await backend.stat("second")
                assert time.monotonic() - started < 0.6  # the 0.3 s left, not a fresh 1 s
                while backend.breaker.state != CLOSED:  # (the hang opened it; its probe closes it)
                    await trio.sleep(0.01)
                with pytest.raises(BackendError) as info:  # spent: not even sent
                    await backend.stat("second")
                assert "not sent" in str(info.value)
        assert child_result == [INFO]  # 0.5 s although the request had ~0 s left

    trio.run(main)


def test_retries_of_a_listing_stay_within_the_deadline() -> None:
    async def main() -> None:
        inner = Scripted()
        steps = iter([BackendError(errno.EAGAIN, "503", transient=True), "hang"])
        inner.behave = lambda name, path: next(steps)
        backend = wrap(inner, deadline=0.5, breaker_threshold=100)
        started = time.monotonic()
        with pytest.raises(BackendError) as info:
            await backend.list_dir("d", max_pages=3)
        assert info.value.errno == errno.EIO
        assert time.monotonic() - started < 0.5 + 0.4

    trio.run(main)


def test_the_first_attempt_of_a_full_listing_is_not_cut() -> None:
    """A folder of a million keys may take longer than one request may: each page is bounded
    by the backend, the whole listing is not cut here."""

    async def main() -> None:
        inner = Scripted()
        inner.behave = lambda name, path: ("sleep", 0.8, "listing")
        backend = wrap(inner, deadline=0.5)
        assert await backend.list_dir("huge") == "listing"

    trio.run(main)


def test_a_probe_whose_message_hides_a_transient_cause_keeps_the_circuit_open() -> None:
    async def main() -> None:
        inner = Scripted()
        inner.behave = lambda name, path: BackendError(errno.ECONNREFUSED, "refused", transient=True)
        wrapped = BackendError(errno.EIO, "cannot open s3://b: EndpointConnectionError")  # not marked transient
        wrapped.__cause__ = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
        inner.probe_behaviour = wrapped
        backend = wrap(inner, retries=0, breaker_threshold=1, breaker_cooldown=0.05)
        with pytest.raises(BackendError):
            await backend.stat("x")
        await trio.sleep(0.3)  # several probes
        assert backend.health()["state"] != CLOSED

    trio.run(main)


def test_make_backend_sets_a_short_connect_timeout() -> None:
    opts = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}
    backend = make_backend("s3", "bucket", dict(opts), request_timeout=60)
    assert backend.inner._fs.config_kwargs["connect_timeout"] == 5.0  # type: ignore[attr-defined]
    assert backend.inner._fs.config_kwargs["read_timeout"] == 600  # type: ignore[attr-defined]
    backend = make_backend("s3", "bucket", dict(opts), request_timeout=2)
    assert backend.inner._fs.config_kwargs["connect_timeout"] == 2  # type: ignore[attr-defined]
    backend = make_backend("s3", "bucket", dict(opts), request_timeout=30, connect_timeout=1.5)
    assert backend.inner._fs.config_kwargs["connect_timeout"] == 1.5  # type: ignore[attr-defined]
