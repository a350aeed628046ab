"""When uploads run: due times, a bounded number at once, backoff, and waking waiters.

The scheduler knows upload ids and one ``upload(id)`` callable, nothing about
files, paths or backends. :class:`gstore.write.pending.PendingFiles` owns the
files and decides *what* is due; this module decides *when* it runs.

Concurrency rules (every method runs on the trio thread):
* an id is in at most one of ``_due`` (waiting for its time), ``_queued``
  (spawned, waiting for a slot) and ``_running`` (its upload is in progress);
* ``cancel(id)`` removes it from ``_due`` and cancels a running upload; an id
  already queued sees the cancellation when it gets its slot (``_cancelled``);
* ``changed()`` returns an event set at the next change of any upload's state:
  waiters re-check their condition after it fires (``flush`` in pending.py);
* ``_heap`` orders due times for the loop: every ``_due`` entry has a heap entry
  with the same time; heap entries whose time no longer matches ``_due`` are
  stale and skipped when popped (a close of each of 1,000 files then costs the
  loop O(log n), not a sort of everything due).
"""

from __future__ import annotations

import heapq
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0


@dataclass
class Attempts:
    """What happened to one id's uploads since it last succeeded."""

    failures: int = 0
    last_error: str | None = None
    permanent: bool = False  # a failure retrying cannot fix: waits for an explicit retry


class UploadScheduler:
    """Runs ``upload(id)`` for due ids, at most ``concurrency`` at once."""

    def __init__(self, upload: Callable[[str], Awaitable[None]], *, delay: float, concurrency: int = 8) -> None:
        self._upload = upload
        self.delay = delay
        self._due: dict[str, float] = {}  # id -> when, on trio's clock (trio.current_time())
        self._heap: list[tuple[float, str]] = []  # (when, id), maybe stale (see the module docstring)
        self._queued: set[str] = set()
        self._running: dict[str, trio.CancelScope] = {}
        self._cancelled: set[str] = set()
        self._limiter = trio.CapacityLimiter(max(1, concurrency))
        self._kick = trio.Event()
        self._changed = trio.Event()
        self.attempts: dict[str, Attempts] = {}
        self.passes = 0  # how often the loop woke up (a busy loop shows here)

    # -- state ---------------------------------------------------------------------

    def busy(self, upload_id: str) -> bool:
        return upload_id in self._running or upload_id in self._queued

    def scheduled(self, upload_id: str) -> bool:
        return upload_id in self._due or self.busy(upload_id)

    def changed(self) -> trio.Event:
        return self._changed

    def _wake(self) -> None:
        self._kick.set()
        self._changed.set()
        self._changed = trio.Event()

    # -- requests --------------------------------------------------------------------

    def schedule(self, upload_id: str, delay: float | None = None) -> None:
        """Run the upload after ``delay`` (default: the write-back delay); earlier wins."""
        when = trio.current_time() + (self.delay if delay is None else delay)
        current = self._due.get(upload_id)
        when = when if current is None or delay is None else min(current, when)
        if when != current:
            self._due[upload_id] = when
            heapq.heappush(self._heap, (when, upload_id))
            if len(self._heap) > 2 * len(self._due) + 64:  # mostly stale: rebuild
                self._heap = [(due, uid) for uid, due in self._due.items()]
                heapq.heapify(self._heap)
        self._cancelled.discard(upload_id)
        self._wake()

    def due_now(self, upload_id: str) -> bool:
        when = self._due.get(upload_id)
        return when is not None and when <= trio.current_time()

    def cancel(self, upload_id: str, *, running: bool = True) -> None:
        """The file changes again (or is gone): no upload of what it was.

        With ``running=False`` only a due upload is dropped: one already sending
        finishes (its result is stale if the file changed; it goes up again), which
        avoids a half-landed, cancelled PUT later mistaken for another writer's.
        """
        self._due.pop(upload_id, None)
        if running:
            scope = self._running.get(upload_id)
            if scope is not None:
                scope.cancel()
            if upload_id in self._queued:
                self._cancelled.add(upload_id)
        self._wake()

    def forget(self, upload_id: str) -> None:
        self.cancel(upload_id)
        self.attempts.pop(upload_id, None)

    async def wait_idle(self, upload_id: str) -> None:
        """Until no upload of ``upload_id`` runs or waits for a slot."""
        while self.busy(upload_id):
            await self._changed.wait()

    def succeeded(self, upload_id: str) -> None:
        self.attempts.pop(upload_id, None)

    def failed(self, upload_id: str, error: str, *, permanent: bool) -> float | None:
        """Record a failure; returns the retry delay, or None when it is parked."""
        record = self.attempts.setdefault(upload_id, Attempts())
        record.failures += 1
        record.last_error = error
        record.permanent = permanent
        if permanent:
            self._wake()
            return None
        backoff = min(MAX_BACKOFF, 2.0 ** min(record.failures, 8)) * random.uniform(0.5, 1.0)
        self.schedule(upload_id, backoff)
        return backoff

    def retry_now(self, *, include_parked: bool = False) -> None:
        """The backend is back (or a user asked): failed uploads go now, not after their backoff."""
        for upload_id, record in list(self.attempts.items()):
            if record.permanent and not include_parked:
                continue
            if record.failures and not self.busy(upload_id):
                record.permanent = False
                self.schedule(upload_id, 0)

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                self.passes += 1
                now = trio.current_time()
                deferred: list[tuple[float, str]] = []
                while self._heap and self._heap[0][0] <= now:
                    when, upload_id = heapq.heappop(self._heap)
                    if self._due.get(upload_id) != when:
                        continue  # stale: rescheduled or cancelled since
                    if self.busy(upload_id):
                        # Running an older state: stays due, run again once it ends (_one wakes us).
                        deferred.append((when, upload_id))
                        continue
                    del self._due[upload_id]
                    self._queued.add(upload_id)
                    nursery.start_soon(self._one, upload_id)
                while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # stale tops would only shorten the sleep
                upcoming = self._heap[0][0] if self._heap else now + 3600
                for item in deferred:
                    heapq.heappush(self._heap, item)
                self._kick = trio.Event()
                with trio.move_on_at(upcoming):
                    await self._kick.wait()

    async def _one(self, upload_id: str) -> None:
        try:
            async with self._limiter:
                self._queued.discard(upload_id)
                if upload_id in self._cancelled:
                    self._cancelled.discard(upload_id)
                    return
                scope = trio.CancelScope()
                self._running[upload_id] = scope
                try:
                    with scope:
                        await self._upload(upload_id)
                except Exception:  # noqa: BLE001 - one upload's bug must never stop every upload
                    log.exception("upload %s failed unexpectedly; it will be tried again", upload_id)
                    self.failed(upload_id, "internal error (see the log)", permanent=False)
                finally:
                    del self._running[upload_id]
        finally:
            self._queued.discard(upload_id)
            self._wake()


__all__ = ["Attempts", "MAX_BACKOFF", "UploadScheduler"]
