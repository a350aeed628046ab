"""The write-back queue: staged files go up in the background, none is ever dropped.

After the last writer closes a file, its upload is due ``delay`` seconds later
(a re-open for writing cancels a running or pending upload: the next close
schedules a fresh one). Uploads run in the mount's nursery, a few at a time.
A failed upload is retried with exponential backoff and jitter, forever; a
conflict (the remote object changed since this mount read it) is resolved by
the configured policy. The staged data is removed only after the backend
confirmed the upload and the result was checked (ETag = MD5 for single PUTs,
size by HEAD after multipart uploads).

Protocol notes (invariants other code relies on):
* ``self.staged`` maps a mount path to its StagedFile; a path has at most one.
* A StagedFile with ``writers > 0`` is never uploaded unless a flush/fsync asks.
* ``generation`` grows on every change; an upload that finishes for an older
  generation leaves the file staged (the newer content goes up next).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mimetypes
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import trio

from gstore.backends.base import ObjectInfo
from gstore.errors import BackendError, StaleObjectError, classify
from gstore.write.staging import EXPECT_ABSENT, StagedFile, StagingArea

log = logging.getLogger(__name__)

SINGLE_PUT_LIMIT = 8 * 1024 * 1024
FILL_CHUNK = 8 * 1024 * 1024
MAX_BACKOFF = 300.0


class ConflictPolicy(str, Enum):
    OVERWRITE = "overwrite"  # ours wins
    KEEP_BOTH = "keep-both"  # ours goes to NAME.conflict-TIMESTAMP, theirs stays
    FAIL = "fail"  # ours stays staged and the upload is reported failed


class ConflictError(BackendError):
    def __init__(self, message: str) -> None:
        super().__init__(errno.EEXIST, message, transient=False)


def conflict_name(path: str, when: float | None = None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when or time.time()))
    return f"{path}.conflict-{stamp}"


def content_type_for(path: str) -> str:
    guessed, _ = mimetypes.guess_type(path.rsplit("/", 1)[-1], strict=False)
    return guessed or "application/octet-stream"


@dataclass
class WriteBackStats:
    uploaded: int = 0
    bytes_uploaded: int = 0
    bytes_copied: int = 0
    failures: int = 0
    conflicts: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # path -> last error


class WriteBack:
    """Owns every staged file of the mount and their uploads."""

    def __init__(
        self,
        backend: Any,
        staging: StagingArea,
        *,
        read_base: Callable[[StagedFile, int, int], Any],
        on_uploaded: Callable[[StagedFile, ObjectInfo], None],
        delay: float,
        conflict_policy: ConflictPolicy = ConflictPolicy.KEEP_BOTH,
        concurrency: int = 4,
        part_concurrency: int = 4,
    ) -> None:
        self.backend = backend
        self.staging = staging
        self._read_base = read_base  # async (staged, start, end) -> bytes of the base version
        self._on_uploaded = on_uploaded
        self.delay = delay
        self.policy = conflict_policy
        self.staged: dict[str, StagedFile] = {}
        # staged id -> when the upload is due, on trio's clock (trio.current_time(), which
        # is offset from time.monotonic(): mixing the two made the scheduler spin).
        self._due: dict[str, float] = {}
        self.scheduler_passes = 0  # how often the scheduler woke up (a busy loop shows here)
        self._running: dict[str, trio.CancelScope] = {}
        self._queued: set[str] = set()  # spawned, waiting for an upload slot
        self._changed = trio.Event()  # set whenever an upload ends or the schedule changes
        self._kick = trio.Event()
        self._limiter = trio.CapacityLimiter(max(1, concurrency))
        self._part_limiter = trio.CapacityLimiter(max(1, part_concurrency))
        self._nursery: trio.Nursery | None = None
        self.stats = WriteBackStats()
        self._theirs: dict[str, ObjectInfo] = {}  # staged id -> the other writer's object (keep-both)
        add_listener = getattr(backend, "add_listener", None)  # ResilientBackend: circuit state changes
        if callable(add_listener):
            add_listener(self._backend_state)

    def _backend_state(self, state: str) -> None:
        """The backend is reachable again: uploads waiting for a retry go now, not after their backoff."""
        if state != "closed":
            return
        for staged in list(self.staged.values()):
            if staged.attempts > 0 and staged.id in self._due:
                self.schedule(staged, 0)

    # -- bookkeeping -----------------------------------------------------------------

    def get(self, path: str) -> StagedFile | None:
        return self.staged.get(path)

    def adopt(self, staged: StagedFile) -> None:
        self.staged[staged.path] = staged

    def pending(self) -> list[StagedFile]:
        return list(self.staged.values())

    def schedule(self, staged: StagedFile, delay: float | None = None) -> None:
        when = trio.current_time() + (self.delay if delay is None else delay)
        self._due[staged.id] = when
        self._wake()

    def _wake(self) -> None:
        self._kick.set()
        self._changed.set()
        self._changed = trio.Event()

    def cancel(self, staged: StagedFile) -> None:
        """Stop a running or pending upload (the file is being changed again)."""
        self._due.pop(staged.id, None)
        scope = self._running.get(staged.id)
        if scope is not None:
            scope.cancel()

    async def wait_idle(self, staged: StagedFile) -> None:
        """Wait until no upload of ``staged`` is running."""
        while staged.id in self._running:
            await self._changed.wait()

    def forget(self, staged: StagedFile) -> None:
        """Drop a staged file whose content must never be uploaded (it was deleted)."""
        self.cancel(staged)
        staged.unlinked = True
        if self.staged.get(staged.path) is staged:
            del self.staged[staged.path]
        self.staging.remove(staged)
        self.stats.failed.pop(staged.path, None)
        self._wake()

    # -- the scheduler ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                self.scheduler_passes += 1
                now = trio.current_time()
                for staged_id, when in sorted(self._due.items(), key=lambda item: item[1]):
                    if when > now:
                        break
                    staged = self._by_id(staged_id)
                    del self._due[staged_id]
                    if staged is None or staged.id in self._running or staged.id in self._queued:
                        continue
                    self._queued.add(staged.id)
                    nursery.start_soon(self._upload_task, staged)
                next_due = min(self._due.values(), default=None)
                self._kick = trio.Event()
                with trio.move_on_at(next_due if next_due is not None else now + 3600):
                    await self._kick.wait()

    def _by_id(self, staged_id: str) -> StagedFile | None:
        return next((s for s in self.staged.values() if s.id == staged_id), None)

    async def _upload_task(self, staged: StagedFile) -> None:
        try:
            await self._limiter.acquire()
        finally:
            self._queued.discard(staged.id)
        try:
            await self._upload_task_locked(staged)
        finally:
            self._limiter.release()

    async def _upload_task_locked(self, staged: StagedFile) -> None:
        if staged.unlinked or self.staged.get(staged.path) is not staged:
            return
        if staged.uploaded_generation >= staged.generation:
            return  # already durable (a flush raced with the scheduler)
        scope = trio.CancelScope()
        self._running[staged.id] = scope
        generation = staged.generation
        try:
            with scope:
                await self._upload(staged, generation)
            if scope.cancelled_caught:
                log.info("upload of %s cancelled (changed again)", staged.path)
        except Exception as exc:  # noqa: BLE001 - an upload failure never ends the daemon
            self._failed(staged, exc)
        finally:
            self._running.pop(staged.id, None)
            self._wake()


    def _failed(self, staged: StagedFile, exc: BaseException) -> None:
        staged.attempts += 1
        staged.last_error = str(exc) or type(exc).__name__
        self.stats.failures += 1
        self.stats.failed[staged.path] = staged.last_error
        if isinstance(exc, ConflictError):
            log.error("upload of %s refused: %s (kept locally; policy %s)", staged.path, exc, self.policy.value)
            return
        backoff = min(MAX_BACKOFF, 2.0 ** min(staged.attempts, 12)) * random.uniform(0.5, 1.0)
        code, transient = classify(exc)
        log.warning("upload of %s failed (attempt %d, %s%s): %s; retrying in %.0fs",
                    staged.path, staged.attempts, errno.errorcode.get(code, code),
                    ", transient" if transient else "", exc, backoff)
        self.schedule(staged, backoff)

    # -- one upload --------------------------------------------------------------------------

    async def _upload(self, staged: StagedFile, generation: int) -> None:
        path = staged.path
        target, if_match, if_none_match = await self._resolve_conflict(staged)
        content_type = staged.content_type or content_type_for(target)
        metadata = {"mtime": f"{staged.mtime:.6f}", "mode": str(0o100000 | (staged.mode & 0o7777))}
        size = staged.size
        copy_parts, local_parts = self._plan(staged, size)
        for start, end in local_parts:
            await self._fill(staged, start, end)
        start_time = time.monotonic()
        if not copy_parts and (size <= SINGLE_PUT_LIMIT or not hasattr(self.backend, "start_multipart")):
            if size <= SINGLE_PUT_LIMIT or not hasattr(self.backend, "put_local_file"):
                data = await trio.to_thread.run_sync(self.staging.read_local, staged, 0, size)
                md5 = hashlib.md5(data).hexdigest()
                info = await self.backend.put_bytes(target, data, content_type=content_type, metadata=metadata,
                                                    if_match=if_match, if_none_match=if_none_match)
                if info.etag and "-" not in info.etag and info.etag != md5:
                    raise BackendError(errno.EIO, f"upload of {target}: ETag {info.etag} is not the MD5 {md5} of what was sent",
                                       transient=True)
            else:
                info = await self.backend.put_local_file(target, str(staged.data_path))
                md5 = None
        else:
            info, md5 = await self._multipart(staged, target, size, copy_parts, content_type, metadata,
                                              if_match, if_none_match)
        staged.md5 = md5
        self.stats.uploaded += 1
        self.stats.bytes_uploaded += size - sum(e - s for s, e in copy_parts)
        self.stats.bytes_copied += sum(e - s for s, e in copy_parts)
        log.info("uploaded %s (%d bytes%s) in %.2fs", target, size,
                 f", {sum(e - s for s, e in copy_parts)} copied server-side" if copy_parts else "",
                 time.monotonic() - start_time)
        if target != path:
            self.stats.conflicts += 1
            log.warning("conflict: %s changed on the backend since it was read here; this mount's version "
                        "was uploaded as %s", path, target)
        staged.attempts = 0
        staged.last_error = None
        staged.uploaded_generation = generation
        self.stats.failed.pop(path, None)
        if staged.generation == generation and not staged.unlinked and staged.path == path and staged.writers == 0:
            if target == path:
                self._on_uploaded(staged, info)
            else:
                # The path now shows the other writer's object (not a blank entry of size 0).
                theirs = self._theirs.pop(staged.id, None)
                self._on_uploaded(staged, theirs or ObjectInfo(name=target.rsplit("/", 1)[-1], is_dir=False))
            del self.staged[path]
            self.staging.remove(staged)
        elif staged.generation == generation and target == path:
            # Uploaded while still open (fsync/flush): later changes compare against this version.
            staged.expect = f"etag:{info.etag}" if info.etag else None
            staged.base = None if staged.complete else staged.base
        elif target == path:
            staged.expect = f"etag:{info.etag}" if info.etag else None

    async def _resolve_conflict(self, staged: StagedFile) -> tuple[str, str | None, bool]:
        """Where to upload, with which precondition (If-Match ETag, If-None-Match *)."""
        expect = staged.expect
        if expect is None:
            return staged.path, None, False
        current = await self.backend.head(staged.path)
        expected_etag = expect[5:] if expect.startswith("etag:") else None
        unchanged = (current is None) if expect == EXPECT_ABSENT else (current is not None and current.etag == expected_etag)
        if unchanged:
            return staged.path, expected_etag, expect == EXPECT_ABSENT
        if current is not None and await self._is_our_own(staged, current):
            # An earlier attempt landed but its answer was lost (reset, timeout, kill -9
            # before the journal was cleared): the object *is* ours, not a conflict.
            log.info("%s: the backend already has exactly these bytes (an earlier upload whose answer "
                     "was lost); not a conflict", staged.path)
            return staged.path, current.etag, False
        if current is not None:
            self._theirs[staged.id] = current
        if self.policy is ConflictPolicy.OVERWRITE:
            log.warning("conflict on %s: the backend copy changed since it was read here; overwriting it "
                        "(policy overwrite)", staged.path)
            return staged.path, None, False
        if self.policy is ConflictPolicy.FAIL:
            raise ConflictError(f"{staged.path} changed on the backend since it was read here")
        return conflict_name(staged.path), None, True

    async def _is_our_own(self, staged: StagedFile, current: ObjectInfo) -> bool:
        """Whether the remote object has exactly the staged bytes (by its single-part ETag = MD5)."""
        etag = current.etag or ""
        if current.size != staged.size or len(etag) != 32 or "-" in etag or staged.size > SINGLE_PUT_LIMIT:
            return False
        if not staged.complete:
            return False  # parts of it were never fetched: it cannot be compared here
        data = await trio.to_thread.run_sync(self.staging.read_local, staged, 0, staged.size)
        return hashlib.md5(data).hexdigest() == etag.lower()

    def _plan(self, staged: StagedFile, size: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Split the file into parts copied server-side from the base, and parts sent from here."""
        base = staged.base
        if (
            base is None
            or staged.complete
            or not getattr(self.backend, "supports_server_copy", False)
            or size < 2 * self.backend.min_copy_part
        ):
            return [], [(0, size)] if size else []
        part = self.backend.part_size(size)
        copy_parts, local_parts = [], []
        for start in range(0, size, part):
            end = min(size, start + part)
            copyable = (
                end <= base.size
                and end - start >= self.backend.min_copy_part
                and not staged.dirty.overlaps(start, end)
            )
            (copy_parts if copyable else local_parts).append((start, end))
        if not copy_parts:
            return [], [(0, size)]
        return copy_parts, local_parts

    async def _fill(self, staged: StagedFile, start: int, end: int) -> None:
        """Make ``[start, end)`` of the staging file valid by fetching what is missing from the base."""
        base = staged.base
        gaps = list(staged.present.gaps(start, end))
        if not gaps:
            return  # every byte is local already: nothing to fetch, nothing new to journal
        for gap_start, gap_end in gaps:
            if base is None or gap_start >= base.size:
                staged.present.add(gap_start, gap_end)  # beyond the base: zeros
                continue
            cursor = gap_start
            while cursor < min(gap_end, base.size):
                chunk_end = min(gap_end, base.size, cursor + FILL_CHUNK)
                try:
                    data = await self._read_base(staged, cursor, chunk_end)
                except StaleObjectError as exc:
                    raise ConflictError(
                        f"{staged.path}: the version this mount's changes apply to is gone from the backend "
                        "(changed by another writer); the changed bytes are kept locally"
                    ) from exc
                # Only the ranges still missing *now*: a program may have written
                # some of them while the fetch was in flight (no await below).
                for hole_start, hole_end in staged.present.gaps(cursor, chunk_end):
                    self.staging.fill(staged, hole_start, data[hole_start - cursor : hole_end - cursor])
                cursor = chunk_end
            if gap_end > base.size:
                staged.present.add(base.size, gap_end)
        await trio.to_thread.run_sync(self.staging.persist, staged)

    async def _multipart(
        self, staged: StagedFile, target: str, size: int, copy_parts: list[tuple[int, int]],
        content_type: str, metadata: dict[str, str], if_match: str | None, if_none_match: bool,
    ) -> tuple[ObjectInfo, str | None]:
        backend = self.backend
        part = backend.part_size(size)
        ranges = [(start, min(size, start + part)) for start in range(0, size, part)]
        copy_set = set(copy_parts)
        upload_id = await backend.start_multipart(target, content_type=content_type, metadata=metadata)
        results: list[dict[str, Any]] = []
        md5 = None if copy_parts else hashlib.md5()
        try:
            async with trio.open_nursery() as nursery:
                for number, (start, end) in enumerate(ranges, start=1):
                    await self._part_limiter.acquire_on_behalf_of(number)
                    if (start, end) in copy_set:
                        nursery.start_soon(self._copy_part, staged, target, upload_id, number, start, end, results)
                        continue
                    data = await trio.to_thread.run_sync(self.staging.read_local, staged, start, end - start)
                    if md5 is not None:
                        md5.update(data)
                    nursery.start_soon(self._send_part, target, upload_id, number, data, results)
            await backend.complete_multipart(target, upload_id, results, if_match=if_match,
                                             if_none_match=if_none_match)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                try:
                    await backend.abort_multipart(target, upload_id)
                except Exception:  # noqa: BLE001 - the original error matters more
                    log.warning("could not abort multipart upload %s of %s", upload_id, target)
            raise
        info = await backend.head(target)
        if info is None or info.size != size:
            raise BackendError(errno.EIO, f"upload of {target}: the backend reports "
                               f"{'no object' if info is None else f'{info.size} bytes'}, expected {size}",
                               transient=True)
        return info, md5.hexdigest() if md5 is not None else None

    async def _send_part(self, target: str, upload_id: str, number: int, data: bytes, results: list) -> None:
        try:
            results.append(await self.backend.upload_part(target, upload_id, number, data))
        finally:
            self._part_limiter.release_on_behalf_of(number)

    async def _copy_part(self, staged: StagedFile, target: str, upload_id: str, number: int,
                         start: int, end: int, results: list) -> None:
        try:
            assert staged.base is not None and staged.base_path is not None
            results.append(await self.backend.copy_part(target, upload_id, number, staged.base_path,
                                                        staged.base, start, end))
        finally:
            self._part_limiter.release_on_behalf_of(number)

    # -- waiting for durability ------------------------------------------------------------

    async def flush(self, targets: list[StagedFile] | None = None, *, timeout: float | None = None) -> list[str]:
        """Upload now and wait until durable; returns what failed (one line each, empty if all is durable).

        An upload that fails after the flush began is reported at once (the
        queue keeps retrying it in the background); a file still open for
        writing is uploaded as it is now.
        """
        chosen = list(self.staged.values()) if targets is None else targets
        goals = {s.id: (s.generation, s.attempts) for s in chosen}
        for staged in chosen:
            busy = staged.id in self._running or staged.id in self._queued
            if not busy and not self.durable(staged, staged.generation):
                self.schedule(staged, 0)
        deadline = None if timeout is None else trio.current_time() + timeout
        while True:
            failed, waiting = [], []
            for staged in chosen:
                generation, attempts = goals[staged.id]
                if self.durable(staged, generation):
                    continue
                if staged.attempts > attempts and staged.id not in self._running and staged.id not in self._queued:
                    failed.append(f"{staged.path}: {staged.last_error}")
                else:
                    waiting.append(staged)
            if not waiting:
                return failed
            if deadline is not None and trio.current_time() >= deadline:
                return failed + [f"{s.path}: not uploaded within {timeout:g}s" for s in waiting]
            with trio.move_on_at(deadline if deadline is not None else trio.current_time() + 3600):
                await self._changed.wait()

    def durable(self, staged: StagedFile, generation: int) -> bool:
        """Whether the content of ``generation`` (or something newer) is confirmed by the backend."""
        if staged.unlinked or self.staged.get(staged.path) is not staged:
            return True
        return staged.uploaded_generation >= generation
