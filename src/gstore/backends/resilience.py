"""Retries, deadlines and a circuit breaker around any backend.

:class:`ResilientBackend` implements the same protocol as the backend it wraps
(:class:`~gstore.backends.base.StorageBackend`), every method explicitly, and
passes the inner backend's ``capabilities`` through: a call the backend does
not support fails with ``ENOTSUP`` here, before the breaker or the counters
see it.

* **Reads retry.** ``stat``, ``head``, ``read_range``, ``read_range_into``,
  ``list_dir`` and ``walk`` are side-effect free: a *transient* failure
  (timeout, 5xx, throttling, a connection reset, a truncated body) is retried
  with exponential backoff and full jitter, up to ``retries`` times, all within
  one deadline per operation (``--request-timeout``); a retry of
  ``read_range_into`` is the same request, and the bytes its sink already
  received are skipped, not written twice. Each
  attempt of ``stat``, ``head`` and the two range reads gets at most half of
  that deadline, so a backend
  that hangs on one request is tried again instead of eating the whole budget.
  When the budget is spent the operation fails with ``EIO`` (never an endless
  hang); a definite answer (not found, access denied, changed object) is
  returned at once and never retried.
* **Writes do not retry here.** A PUT or a multipart step whose response was
  lost may have been applied; the write-back queue owns that decision (it
  retries forever with its own backoff and checks the remote state first).
  Each write (and ``list_versions``, ``set_content_type``) is one attempt,
  counted by the breaker, with no deadline from this layer: the backend bounds
  it (S3: at least 600 s for PUTs, parts, completes and copies).
* **Circuit breaker.** ``breaker_threshold`` consecutive transient failures
  (of any operation) open the circuit: every call fails at once with ``EIO``
  instead of piling requests on a dead backend. A request that got *no answer
  at all* within its time (a hung backend, a connect timeout) opens it at once,
  unless another request succeeded meanwhile (then the backend is slow for
  that one request, not gone): a hung backend costs one timeout, not ten. The
  operation whose timeout opened the circuit may try once more (a stuck pooled
  connection is common and a new one usually works); everyone else fails fast.
  A background probe (the backend's own ``probe()``) runs at once and then
  every ``breaker_cooldown`` seconds while it is open; the first success
  closes the circuit and tells the listeners (the write-back queue retries its
  failed uploads at once). Open means *offline*: the metadata cache answers
  from what it last knew and the block cache serves what it holds.
* **One request, one budget.** :func:`request_scope` marks everything a task
  does until it leaves the scope as one request: every side-effect free
  operation inside shares one ``deadline`` (``--request-timeout``), so a
  lookup that needs a LIST and a HEAD never waits twice the timeout.
* :meth:`ResilientBackend.health` is the snapshot ``gstore status`` shows.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from gstore.backends.base import (
    Capabilities,
    Feature,
    Listing,
    ObjectInfo,
    RangeSink,
    StorageBackend,
    UploadedPart,
)
from gstore.backends.filebody import FileRegion
from gstore.errors import BackendError, classify

if TYPE_CHECKING:
    from gstore.virtual.versions import ObjectVersion

T = TypeVar("T")

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


@dataclass(frozen=True)
class ResiliencePolicy:
    retries: int = 4  # extra attempts after the first, for side-effect free operations
    deadline: float = 60.0  # total seconds for one operation, retries included
    base_delay: float = 0.1  # first backoff (before jitter)
    max_delay: float = 2.0  # largest backoff between two attempts
    breaker_threshold: int = 10  # consecutive transient failures that open the circuit
    breaker_cooldown: float = 5.0  # seconds between probes while open

    def __post_init__(self) -> None:
        if self.retries < 0 or self.deadline <= 0 or self.breaker_threshold < 1 or self.breaker_cooldown <= 0:
            raise ValueError(f"invalid resilience policy: {self}")


class CircuitOpenError(BackendError):
    """The backend is considered down; the call was not attempted."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message, transient=True)


class CircuitBreaker:
    """Consecutive-failure breaker: closed → open → (probe) → closed.

    *Closed* is "online", *open* and *half-open* are "offline": the listeners
    hear of each change once, and each change is one log line.

    Not thread-safe: used from the trio thread only.
    """

    def __init__(self, threshold: int, cooldown: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self.state = CLOSED
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self.times_opened = 0
        self.fast_failures = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # wall clock
        self.last_success_at: float | None = None  # our clock: when a call last got an answer
        self.changed_at = time.time()  # wall clock of the last change between online and offline
        self.opened_by: str | None = None  # "timeout" or "failures", while open
        self._listeners: list[Callable[[str], None]] = []

    @property
    def online(self) -> bool:
        return self.state == CLOSED

    def add_listener(self, callback: Callable[[str], None]) -> None:
        """``callback(new_state)`` on every change of state (exceptions are logged, not raised)."""
        self._listeners.append(callback)

    def check(self, what: str) -> None:
        """Raise :class:`CircuitOpenError` unless a call may go to the backend now."""
        if self.state == CLOSED:
            return
        self.fast_failures += 1
        waited = self._clock() - (self.opened_at or self._clock())
        raise CircuitOpenError(
            f"{what}: backend unavailable (circuit open for {waited:.1f}s after "
            f"{self.consecutive_failures} consecutive failures; last: {self.last_error})"
        )

    def success(self) -> None:
        self.consecutive_failures = 0
        self.last_success_at = self._clock()
        if self.state != CLOSED:
            log.warning("backend reachable again after %.1fs: online, normal cache lifetimes again",
                        self._clock() - (self.opened_at or self._clock()))
            self.state = CLOSED
            self.opened_at = None
            self.opened_by = None
            self.changed_at = time.time()
            self._notify()

    def failure(self, exc: BaseException) -> None:
        self.consecutive_failures += 1
        self.last_error = _short(exc)
        self.last_error_at = time.time()
        if self.state == CLOSED and self.consecutive_failures >= self.threshold:
            self._open("failures", f"{self.consecutive_failures} consecutive failures")
        elif self.state == HALF_OPEN:
            self.state = OPEN

    def no_answer(self, exc: BaseException, started: float) -> bool:
        """A call started at ``started`` (our clock) got no answer at all in its time.

        Opens the circuit at once unless some call succeeded since ``started``
        (then the backend answers, only slowly or not to this request: an
        ordinary failure). Returns whether this call opened it.
        """
        if self.state != CLOSED or (self.last_success_at is not None and self.last_success_at > started):
            self.failure(exc)
            return False
        self.consecutive_failures += 1
        self.last_error = _short(exc)
        self.last_error_at = time.time()
        self._open("timeout", f"no answer within {self._clock() - started:.1f}s")
        return True

    def _open(self, cause: str, why: str) -> None:
        self.state = OPEN
        self.opened_at = self._clock()
        self.opened_by = cause
        self.times_opened += 1
        self.changed_at = time.time()
        log.error("backend unreachable (%s; last error: %s): offline; answering from the last known "
                  "listings and cached blocks, other calls fail fast (EIO), uploads stay queued; "
                  "probing every %gs", why, self.last_error, self.cooldown)
        self._notify()

    def probing(self) -> None:
        if self.state == OPEN:
            self.state = HALF_OPEN

    def _notify(self) -> None:
        for callback in list(self._listeners):
            try:
                callback(self.state)
            except Exception:  # noqa: BLE001 - a listener never breaks the breaker
                log.exception("circuit listener failed")

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "state": self.state,
            "online": self.online,
            "since": _iso(self.changed_at),
            "opened_by": self.opened_by,
            "consecutive_failures": self.consecutive_failures,
            "threshold": self.threshold,
            "cooldown_s": self.cooldown,
            "open_for_s": round(now - self.opened_at, 1) if self.opened_at is not None else None,
            "times_opened": self.times_opened,
            "fast_failures": self.fast_failures,
            "last_error": self.last_error,
            "last_error_at": _iso(self.last_error_at) if self.last_error_at else None,
        }


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# Side-effect free operations: retried, and (the first three) bounded per attempt.
_RETRIED = frozenset({"stat", "head", "read_range", "read_range_into", "list_dir", "walk"})
_PER_ATTEMPT_LIMIT = frozenset({"stat", "head", "read_range", "read_range_into"})


def _no_answer(exc: BaseException) -> bool:
    """Whether ``exc`` means the backend did not answer at all in time (a hang, a connect
    timeout), as opposed to answering with an error (a 5xx, a refused connection, or S3's
    own ``RequestTimeout``, which is an answer)."""
    found = False
    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            break
        if isinstance(getattr(current, "response", None), dict):
            return False  # an HTTP answer, whatever it says
        if isinstance(current, (trio.TooSlowError, TimeoutError, asyncio.TimeoutError, socket.timeout)):
            found = True
        elif isinstance(current, BackendError) and current.errno == errno.ETIMEDOUT:
            found = True
        else:
            kind = type(current)
            if "Timeout" in kind.__name__ and (kind.__module__ or "").startswith(
                    ("aiohttp", "botocore", "aiobotocore", "urllib3")):
                found = True
        current = current.__cause__
    return found


# The request the current task is serving (see request_scope): (task, trio time it began).
_REQUEST: contextvars.ContextVar[tuple[object, float] | None] = contextvars.ContextVar(
    "gstore_request", default=None)


@contextmanager
def request_scope() -> Iterator[None]:
    """Everything the current task does inside is one request: one ``--request-timeout`` in total.

    Every side-effect free operation of a :class:`ResilientBackend` inside the
    scope (a LIST, then a HEAD, retries included) ends by the time the first
    one began plus the policy's deadline; an operation that would start after
    that fails at once with EIO. Nested scopes keep the outer start. Tasks
    started from inside (prefetches) are not bound by it: the scope belongs to
    the task that entered it. Writes are not bounded by it (see the module
    docstring). Outside trio it does nothing.
    """
    try:
        task = trio.lowlevel.current_task()
    except RuntimeError:
        task = None
    current = _REQUEST.get()
    if task is None or (current is not None and current[0] is task):
        yield
        return
    token = _REQUEST.set((task, trio.current_time()))
    try:
        yield
    finally:
        _REQUEST.reset(token)


def _request_elapsed() -> float | None:
    """Seconds the current task's request (request_scope) has run; None outside one."""
    current = _REQUEST.get()
    if current is None:
        return None
    try:
        if current[0] is not trio.lowlevel.current_task():
            return None
        return max(0.0, trio.current_time() - current[1])
    except RuntimeError:
        return None


class _SinkProgress:
    """The sink of one ``read_range_into`` across its attempts: each byte reaches it once.

    Every attempt asks for the whole range again (the same request, as a retried
    ``read_range``: a retry that asked for the rest would be a different request,
    and a range is pinned to one version, so the bytes are the same); the part an
    earlier attempt already delivered is skipped. ``delivered`` and ``_seen`` are
    written by the thread that feeds the sink and read or reset on the trio thread
    only before or after a backend call, when (by the protocol, see ``SinkGate``)
    no write is running or will run: no lock needed.
    """

    __slots__ = ("_sink", "_seen", "delivered")

    def __init__(self, sink: RangeSink) -> None:
        self._sink = sink
        self._seen = 0  # bytes of the current attempt so far
        self.delivered = 0  # bytes passed on to the sink, all attempts together

    def begin_attempt(self) -> None:
        self._seen = 0

    def write(self, piece: bytes | memoryview) -> None:
        seen = self._seen
        self._seen = seen + len(piece)
        skip = self.delivered - seen
        if skip >= len(piece):
            return  # the sink has these bytes from an earlier attempt
        if skip > 0:
            piece = memoryview(piece)[skip:]
        self._sink.write(piece)
        self.delivered += len(piece)


class ResilientBackend:
    """A backend with bounded retries, per-operation deadlines and a circuit breaker."""

    def __init__(
        self,
        inner: StorageBackend,
        policy: ResiliencePolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._inner = inner
        self.policy = policy or ResiliencePolicy()
        self._clock = clock
        self._rng = rng or random.Random()
        self.breaker = CircuitBreaker(self.policy.breaker_threshold, self.policy.breaker_cooldown, clock=clock)
        self.breaker.add_listener(self._on_state)
        self.display = inner.display
        self.cache_namespace = inner.cache_namespace
        self.calls = 0
        self.retries = 0
        self.failed_operations = 0
        self._prober_running = False

    @property
    def inner(self) -> StorageBackend:
        """The backend below the retry layer."""
        return self._inner

    @property
    def capabilities(self) -> Capabilities:
        # Read through each time: the inner backend may learn more after a probe.
        return self._inner.capabilities

    def add_listener(self, callback: Callable[[str], None]) -> None:
        self.breaker.add_listener(callback)

    def health(self) -> dict[str, Any]:
        """Backend health for ``gstore status``: breaker state and retry counters."""
        return {
            **self.breaker.snapshot(),
            "calls": self.calls,
            "retries": self.retries,
            "failed_operations": self.failed_operations,
            "retry_limit": self.policy.retries,
            "deadline_s": self.policy.deadline,
        }

    # -- reading: side-effect free, retried --------------------------------------------

    def cache_key(self, path: str) -> str:
        return self._inner.cache_key(path)

    def key_bytes(self, path: str) -> int:
        return self._inner.key_bytes(path)

    async def head_folder(self, path: str) -> ObjectInfo | None:
        return await self._retrying("head_folder", self._inner.head_folder, (path,), {})

    async def probe(self) -> None:
        # The startup check: one attempt, a clear message; never trips the breaker.
        await self._inner.probe()

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def stat(self, path: str) -> ObjectInfo:
        return await self._retrying("stat", self._inner.stat, (path,), {})

    async def head(self, path: str) -> ObjectInfo | None:
        return await self._retrying("head", self._inner.head, (path,), {})

    async def list_dir(self, path: str, *, max_pages: int | None = None) -> Listing | None:
        return await self._retrying("list_dir", self._inner.list_dir, (path,), {"max_pages": max_pages})

    async def walk(self, path: str) -> list[ObjectInfo]:
        return await self._retrying("walk", self._inner.walk, (path,), {})

    async def read_range(self, path: str, start: int, end: int, expect: ObjectInfo) -> bytes:
        return await self._retrying("read_range", self._checked_read, (path, start, end, expect), {})

    async def _checked_read(self, path: str, start: int, end: int, expect: ObjectInfo) -> bytes:
        data = await self._inner.read_range(path, start, end, expect)
        if len(data) != max(0, end - start):
            # A body cut short must never become a block: retried like a reset.
            raise BackendError(errno.EIO, f"short read of {path} [{start}, {end}): got {len(data)} bytes",
                               transient=True)
        return data

    async def read_range_into(
        self, path: str, start: int, end: int, expect: ObjectInfo, sink: RangeSink
    ) -> None:
        """``read_range``'s retries and deadline, for a range streamed into ``sink``; a retry
        passes on only the bytes the sink has not had yet (see :class:`_SinkProgress`)."""
        progress = _SinkProgress(sink)
        await self._retrying("read_range_into", self._streamed_read, (path, start, end, expect, progress), {})

    async def _streamed_read(self, path: str, start: int, end: int, expect: ObjectInfo,
                             progress: _SinkProgress) -> None:
        """One attempt of ``read_range_into``."""
        progress.begin_attempt()
        await self._inner.read_range_into(path, start, end, expect, progress)
        if progress.delivered != max(0, end - start):
            # A body cut short must never become a block: retried like a reset.
            raise BackendError(errno.EIO, f"short read of {path} [{start}, {end}): got "
                               f"{progress.delivered} bytes", transient=True)

    # -- writing: one attempt each, counted by the breaker ---------------------------------

    async def put_bytes(
        self,
        path: str,
        data: bytes | FileRegion,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> ObjectInfo:
        self.capabilities.require_preconditions(
            f"put {path}", self.display, if_match=if_match, if_none_match=if_none_match)
        return await self._once("put_bytes", self._inner.put_bytes, (path, data), {
            "content_type": content_type, "metadata": metadata, "if_match": if_match,
            "if_none_match": if_none_match,
        })

    async def put_local_file(self, path: str, local_path: str) -> ObjectInfo:
        self._require("local_file_upload", f"put {path}")
        return await self._once("put_local_file", self._inner.put_local_file, (path, local_path), {})

    async def delete(self, path: str) -> None:
        await self._once("delete", self._inner.delete, (path,), {})

    async def copy(self, source_path: str, target_path: str, source: ObjectInfo) -> None:
        await self._once("copy", self._inner.copy, (source_path, target_path, source), {})

    async def copy_object(self, source_path: str, target_path: str, source: ObjectInfo | None, *,
                          mtime: float | None = None, if_match: str | None = None,
                          if_none_match: bool = False) -> ObjectInfo:
        self.capabilities.require_preconditions(
            f"copy to {target_path}", self.display, if_match=if_match, if_none_match=if_none_match)
        result: ObjectInfo = await self._once(
            "copy_object", self._inner.copy_object, (source_path, target_path, source),
            {"mtime": mtime, "if_match": if_match, "if_none_match": if_none_match})
        return result

    async def make_dir(self, path: str, *, metadata: Mapping[str, str] | None = None) -> None:
        await self._once("make_dir", self._inner.make_dir, (path,), {"metadata": metadata} if metadata else {})

    async def remove_dir_marker(self, path: str) -> None:
        await self._once("remove_dir_marker", self._inner.remove_dir_marker, (path,), {})

    # -- multipart -------------------------------------------------------------------------

    @property
    def min_copy_part(self) -> int:
        return self._inner.min_copy_part

    @property
    def supports_server_copy(self) -> bool:
        """Deprecated: ``capabilities.server_copy``."""
        return self.capabilities.server_copy

    def part_size(self, size: int) -> int:
        return self._inner.part_size(size)

    async def start_multipart(
        self, path: str, *, content_type: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> str:
        self._require("multipart", f"start multipart upload of {path}")
        return await self._once("start_multipart", self._inner.start_multipart, (path,),
                                {"content_type": content_type, "metadata": metadata})

    async def upload_part(self, path: str, upload_id: str, number: int, data: bytes | FileRegion) -> UploadedPart:
        self._require("multipart", f"upload part {number} of {path}")
        return await self._once("upload_part", self._inner.upload_part, (path, upload_id, number, data), {})

    async def copy_part(
        self, path: str, upload_id: str, number: int, source_path: str, source: ObjectInfo, start: int, end: int
    ) -> UploadedPart:
        self._require("multipart", f"copy part {number} of {path}")
        self._require("server_copy", f"copy part {number} of {path}")
        return await self._once("copy_part", self._inner.copy_part,
                                (path, upload_id, number, source_path, source, start, end), {})

    async def complete_multipart(
        self,
        path: str,
        upload_id: str,
        parts: Sequence[UploadedPart],
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> None:
        self._require("multipart", f"complete multipart upload of {path}")
        self.capabilities.require_preconditions(
            f"complete multipart upload of {path}", self.display, if_match=if_match, if_none_match=if_none_match)
        await self._once("complete_multipart", self._inner.complete_multipart, (path, upload_id, parts),
                         {"if_match": if_match, "if_none_match": if_none_match})

    async def abort_multipart(self, path: str, upload_id: str) -> None:
        self._require("multipart", f"abort multipart upload of {path}")
        await self._once("abort_multipart", self._inner.abort_multipart, (path, upload_id), {})

    # -- versions, content type ------------------------------------------------------------

    async def list_versions(self, path: str) -> list[ObjectVersion]:
        # One attempt, as before the protocols were explicit (it was forwarded as a write).
        self._require("versions", f"list versions of {path}")
        return await self._once("list_versions", self._inner.list_versions, (path,), {})

    async def set_content_type(self, path: str, content_type: str) -> ObjectInfo:
        self._require("content_type", f"set the Content-Type of {path}")
        return await self._once("set_content_type", self._inner.set_content_type, (path, content_type), {})

    async def update_metadata(self, path: str, metadata: Mapping[str, str], *, content_type: str | None,
                              if_match: str | None) -> ObjectInfo:
        self._require("user_metadata", f"change the metadata of {path}")
        return await self._once("update_metadata", self._inner.update_metadata, (path, metadata),
                                {"content_type": content_type, "if_match": if_match})

    def _require(self, feature: Feature, operation: str) -> None:
        """ENOTSUP before the breaker sees anything: an unsupported call says nothing about health."""
        self.capabilities.require(feature, operation, self.display)

    # -- the machinery ---------------------------------------------------------------

    async def _once(
        self, name: str, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        """One attempt, counted by the breaker (writes: the caller decides about retries)."""
        what = f"{name} {args[0] if args else ''}".strip()
        self.breaker.check(what)
        self.calls += 1
        started = self._clock()
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            self._record(exc, started)
            raise
        self.breaker.success()
        return result

    def _record(self, exc: BaseException, started: float) -> tuple[bool, bool]:
        """Tell the breaker about a failure of a call begun at ``started``.

        Returns (transient, whether this failure opened the circuit).
        """
        transient = classify(exc)[1]
        if not transient:
            self.breaker.success()  # a definite answer: the backend is there
            return False, False
        if _no_answer(exc):
            return True, self.breaker.no_answer(exc, started)
        self.breaker.failure(exc)
        return True, False

    async def _retrying(
        self, name: str, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        policy = self.policy
        what = f"{name} {args[0] if args else ''}".strip()
        started = self._clock()
        deadline = started + policy.deadline
        elapsed = _request_elapsed()
        if elapsed is not None:  # inside a request that already spent some of its budget
            deadline -= elapsed
        limit_attempt = name in _PER_ATTEMPT_LIMIT
        # A full listing or a walk is many requests, each bounded by the backend's own
        # per-request timeout: its first attempt is not cut here (a folder of a million
        # keys may take longer than one request may); retries are.
        many_requests = name == "walk" or (name == "list_dir" and kwargs.get("max_pages") is None)
        attempt = 0
        trial = False  # this attempt is the one retry allowed after our own timeout opened the circuit
        last: BaseException | None = None
        while True:
            if not trial:
                try:
                    self.breaker.check(what)
                except CircuitOpenError as exc:
                    if last is None:
                        raise
                    self.failed_operations += 1
                    raise BackendError(errno.EIO, f"{what}: gave up after {attempt} attempt(s): {exc}",
                                       transient=True) from last
            remaining = deadline - self._clock()
            if remaining <= 0:
                self.failed_operations += 1
                raise BackendError(
                    errno.EIO, f"{what}: not sent: this request has used its {policy.deadline:g}s "
                    "(--request-timeout)" + (f"; last error: {_short(last)}" if last else ""), transient=True,
                ) from last
            if limit_attempt and policy.retries and not trial:
                per_attempt: float | None = min(remaining, max(policy.deadline / 2, 0.001))
            elif many_requests and attempt == 0:
                per_attempt = None
            else:
                per_attempt = remaining
            self.calls += 1
            attempt_started = self._clock()
            opened = False
            try:
                if per_attempt is None:
                    result = await fn(*args, **kwargs)
                else:
                    with trio.fail_after(max(per_attempt, 0.001)):
                        result = await fn(*args, **kwargs)
            except trio.TooSlowError:
                last = BackendError(errno.ETIMEDOUT, f"{what}: no answer within {per_attempt:.3g}s", transient=True)
                opened = self.breaker.no_answer(last, attempt_started)
            except Exception as exc:
                transient, opened = self._record(exc, attempt_started)
                if not transient:
                    raise  # a definite answer: not found, denied, stale...
                last = exc
            else:
                self.breaker.success()
                return result
            attempt += 1
            trial = opened and not trial  # our own timeout opened it: one more try, on a new connection
            delay = 0.0 if trial else (
                min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1)) * self._rng.uniform(0.5, 1.0))
            remaining = deadline - self._clock()
            if (attempt > policy.retries or delay >= remaining or remaining <= 0.001
                    or (self.breaker.state != CLOSED and not trial)):
                self.failed_operations += 1
                elapsed_here = self._clock() - started
                raise BackendError(
                    errno.EIO, f"{what}: failed after {attempt} attempt(s) in {elapsed_here:.1f}s: {_short(last)}",
                    transient=True,
                ) from last
            self.retries += 1
            log.debug("%s failed (attempt %d): %s; retrying in %.2fs", what, attempt, _short(last), delay)
            if delay:
                await trio.sleep(delay)

    # -- recovery --------------------------------------------------------------------

    def _on_state(self, state: str) -> None:
        if state == OPEN and not self._prober_running:
            try:
                trio.lowlevel.spawn_system_task(self._probe_until_closed, name="gstore-backend-prober")
                self._prober_running = True
            except RuntimeError:  # not inside trio (unit tests that drive the breaker directly)
                pass

    async def _probe_until_closed(self) -> None:
        # Opened by a request that got no answer: probe at once, so one stuck request
        # (while the backend is fine) costs no more than this probe. Opened by a run of
        # failures (throttling, errors): wait a cooldown first, to give the backend a rest.
        wait = 0.0 if self.breaker.opened_by == "timeout" else self.policy.breaker_cooldown
        try:
            while self.breaker.state != CLOSED:
                await trio.sleep(wait)
                wait = self.policy.breaker_cooldown
                if self.breaker.state == CLOSED:
                    break
                self.breaker.probing()
                try:
                    with trio.fail_after(max(0.001, min(self.policy.deadline, 30.0))):
                        await self._inner.probe()
                except trio.TooSlowError:
                    self.breaker.failure(BackendError(errno.ETIMEDOUT, "probe timed out", transient=True))
                except Exception as exc:  # noqa: BLE001 - any failure keeps the circuit open
                    # A probe that got a definite answer (denied, missing bucket) still
                    # proves the endpoint answers; only transient failures keep it open.
                    # (A backend's probe() may wrap the library error in a clearer message
                    # that lost the "transient" mark: the cause still has it.)
                    _transient = classify(exc)[1] or (exc.__cause__ is not None and classify(exc.__cause__)[1])
                    if _transient:
                        self.breaker.failure(exc)
                        log.info("backend probe failed: %s", _short(exc))
                    else:
                        self.breaker.success()
                else:
                    self.breaker.success()
        finally:
            self._prober_running = False


if TYPE_CHECKING:  # the static proof that the class implements the whole protocol

    def _implements(backend: ResilientBackend) -> StorageBackend:
        return backend
