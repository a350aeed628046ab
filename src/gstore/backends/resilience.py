"""Retries, deadlines and a circuit breaker around any backend.

:class:`ResilientBackend` implements the same protocol as the backend it wraps
(:class:`~gstore.backends.base.StorageBackend`), every method explicitly, and
passes the inner backend's ``capabilities`` through: a call the backend does
not support fails with ``ENOTSUP`` here, before the breaker or the counters
see it.

* **Reads retry.** ``stat``, ``head``, ``read_range``, ``list_dir`` and
  ``walk`` are side-effect free: a *transient* failure (timeout, 5xx,
  throttling, a connection reset, a truncated body) is retried with
  exponential backoff and full jitter, up to ``retries`` times, all within one
  deadline per operation (``--request-timeout``). Each attempt of ``stat``,
  ``head`` and ``read_range`` gets at most half of that deadline, so a backend
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
  instead of piling requests on a dead backend. A background probe (the
  backend's own ``probe()``) runs every ``breaker_cooldown`` seconds while it
  is open; the first success closes the circuit and tells the listeners (the
  write-back queue retries its failed uploads at once).
* :meth:`ResilientBackend.health` is the snapshot ``gstore status`` shows.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from gstore.backends.base import (
    Capabilities,
    Feature,
    Listing,
    ObjectInfo,
    StorageBackend,
    UploadedPart,
)
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
        self._listeners: list[Callable[[str], None]] = []

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
        if self.state != CLOSED:
            log.warning("backend reachable again; circuit closed after %.1fs",
                        self._clock() - (self.opened_at or self._clock()))
            self.state = CLOSED
            self.opened_at = None
            self._notify()

    def failure(self, exc: BaseException) -> None:
        self.consecutive_failures += 1
        self.last_error = _short(exc)
        self.last_error_at = time.time()
        if self.state == CLOSED and self.consecutive_failures >= self.threshold:
            self.state = OPEN
            self.opened_at = self._clock()
            self.times_opened += 1
            log.error("backend unavailable: %d consecutive failures (last: %s); circuit open, "
                      "calls fail fast, probing every %gs", self.consecutive_failures, self.last_error,
                      self.cooldown)
            self._notify()
        elif self.state == HALF_OPEN:
            self.state = OPEN

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
            "consecutive_failures": self.consecutive_failures,
            "threshold": self.threshold,
            "cooldown_s": self.cooldown,
            "open_for_s": round(now - self.opened_at, 1) if self.opened_at is not None else None,
            "times_opened": self.times_opened,
            "fast_failures": self.fast_failures,
            "last_error": self.last_error,
            "last_error_at": (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_error_at))
                              if self.last_error_at else None),
        }


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# Side-effect free operations: retried, and (the first three) bounded per attempt.
_RETRIED = frozenset({"stat", "head", "read_range", "list_dir", "walk"})
_PER_ATTEMPT_LIMIT = frozenset({"stat", "head", "read_range"})


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

    # -- writing: one attempt each, counted by the breaker ---------------------------------

    async def put_bytes(
        self,
        path: str,
        data: bytes,
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

    async def make_dir(self, path: str) -> None:
        await self._once("make_dir", self._inner.make_dir, (path,), {})

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

    async def upload_part(self, path: str, upload_id: str, number: int, data: bytes) -> UploadedPart:
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
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            self._record(exc)
            raise
        self.breaker.success()
        return result

    def _record(self, exc: BaseException) -> bool:
        """Tell the breaker about a failure; returns whether it was transient."""
        transient = classify(exc)[1]
        if transient:
            self.breaker.failure(exc)
        else:
            self.breaker.success()  # a definite answer: the backend is there
        return transient

    async def _retrying(
        self, name: str, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        policy = self.policy
        what = f"{name} {args[0] if args else ''}".strip()
        started = self._clock()
        deadline = started + policy.deadline
        limit_attempt = name in _PER_ATTEMPT_LIMIT
        attempt = 0
        last: BaseException | None = None
        while True:
            try:
                self.breaker.check(what)
            except CircuitOpenError as exc:
                if last is None:
                    raise
                self.failed_operations += 1
                raise BackendError(errno.EIO, f"{what}: gave up after {attempt} attempt(s): {exc}",
                                   transient=True) from last
            remaining = deadline - self._clock()
            per_attempt = remaining
            self.calls += 1
            try:
                if limit_attempt:
                    per_attempt = remaining if policy.retries == 0 else min(remaining, max(policy.deadline / 2, 0.001))
                    with trio.fail_after(max(per_attempt, 0.001)):
                        result = await fn(*args, **kwargs)
                else:
                    result = await fn(*args, **kwargs)
            except trio.TooSlowError:
                last = BackendError(errno.ETIMEDOUT, f"{what}: no answer within {per_attempt:.3g}s", transient=True)
                self.breaker.failure(last)
            except Exception as exc:
                if not self._record(exc):
                    raise  # a definite answer: not found, denied, stale...
                last = exc
            else:
                self.breaker.success()
                return result
            attempt += 1
            delay = min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1)) * self._rng.uniform(0.5, 1.0)
            remaining = deadline - self._clock()
            if attempt > policy.retries or delay >= remaining or self.breaker.state != CLOSED:
                self.failed_operations += 1
                elapsed = self._clock() - started
                raise BackendError(
                    errno.EIO, f"{what}: failed after {attempt} attempt(s) in {elapsed:.1f}s: {_short(last)}",
                    transient=True,
                ) from last
            self.retries += 1
            log.debug("%s failed (attempt %d): %s; retrying in %.2fs", what, attempt, _short(last), delay)
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
        try:
            while self.breaker.state != CLOSED:
                await trio.sleep(self.policy.breaker_cooldown)
                if self.breaker.state == CLOSED:
                    break
                self.breaker.probing()
                try:
                    with trio.fail_after(max(0.001, min(self.policy.deadline, 30.0))):
                        await self._inner.probe()
                except trio.TooSlowError:
                    self.breaker.failure(BackendError(errno.ETIMEDOUT, "probe timed out", transient=True))
                except Exception as exc:  # noqa: BLE001 - any failure keeps the circuit open
                    err, _transient = classify(exc)
                    # A probe that got a definite answer (denied, missing bucket) still
                    # proves the endpoint answers; only transient failures keep it open.
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
