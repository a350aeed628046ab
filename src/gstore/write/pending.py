"""Pending files: the one owner of every file with changes the backend does not have yet.

Only this module creates, opens, writes, truncates, moves, discards and retires
staged files and their journal records (:mod:`gstore.write.staging` is the
storage under it, :mod:`gstore.write.uploader` sends one file,
:mod:`gstore.write.scheduler` decides when). Everyone else asks.

States of a path, and how it moves between them::

    clean ──open(w)/create/truncate──▶ staged ──last writer closes──▶ due
      ▲                                 ▲  │                            │
      │                       write/open(w) │ unlink (holders > 0)      ▼
      │                                 │  ▼                         uploading
      │                                 │ unlinked-but-open             │
      │                                 │  (detached: no path, no        │ confirmed
      │                                 │   journal, bytes kept until    ▼
      │                                 │   the last handle closes)   uploaded ── handles still
      │                                 │                                │        open: stays
      └───────────── retired: the last handle closed ◀───────────────────┘        staged

* **staged**: in ``_by_path``; reads, sizes and listings of the path come from
  it. Any number of handles (readers and writers, threads, processes) share the
  one StagedFile of a path.
* **due / uploading**: the scheduler runs :meth:`_upload_one` when no writer
  holds it (or a flush/fsync asks); a write during an upload makes the result
  stale (``generation`` moved on), so the file stays staged and goes up again.
* **uploaded-but-open**: ``uploaded_generation == generation`` with handles
  open: still answered locally (the same bytes the backend now has).
* **retired**: no handle, upload confirmed: the StagedFile leaves ``_by_path``
  and, in the same synchronous step, the ``published`` listeners put the
  uploaded object's attributes in the metadata cache. The kernel therefore never
  sees the size, the listing or the bytes step back to an older version.
* **unlinked-but-open**: unlink with handles open detaches the file: it leaves
  the namespace and the journal at once (never uploaded, not recovered after a
  crash) and its bytes stay for the open handles until the last one closes.
* **renamed-while-open**: the same StagedFile gets the new path; handles follow.

Concurrency rules (everything runs on the trio thread; tasks interleave at
every ``await``):
* every method that changes which StagedFile a path has (``open_for_write``,
  ``create``, ``truncate_path``, ``move``, ``drop``) must be called with the
  path's lock held (``locks.hold(path)``, taken by the namespace layer,
  :mod:`gstore.vfs.filesystem`); they re-check the table after each await only
  where noted, because nobody else may change that path meanwhile;
* ``write`` and the bookkeeping of ``release`` and ``_finish`` contain no
  await between reading and changing state, so they need no lock;
* ``ensure_local`` (filling bytes of the base version) runs without the lock,
  from an upload or an open: after its fetch it fills only ranges still missing
  *and* inside the current size, so a write or truncate meanwhile always wins.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from collections.abc import AsyncIterator

import trio

from gstore.backends import objectmeta
from gstore.backends.base import ObjectInfo, StorageBackend
from gstore.cache.reader import BlockReader
from gstore.errors import BackendError, StaleObjectError, classify
from gstore.write.namespace_queue import NamespaceQueue
from gstore.write.scheduler import UploadScheduler
from gstore.write.staging import EXPECT_ABSENT, StagedFile, StagingArea
from gstore.write.uploader import ConflictError, ConflictPolicy, Uploader, UploadResult

log = logging.getLogger(__name__)

EAGER_FILL_LIMIT = 16 * 1024 * 1024
#: How long an upload waits for earlier queued namespace changes being replayed.
NAMESPACE_WAIT = 30.0
#: A flush looks at every file it waits for again when it saw none settle for this long
#: (seconds); otherwise at one file per upload that changes state (PendingFiles._wait_for_progress).
FLUSH_RESCAN = 0.5
FILL_CHUNK = 8 * 1024 * 1024
#: Seconds between two INFO summaries of finished uploads (see PendingFiles._log_summaries).
UPLOAD_SUMMARY_INTERVAL = 10.0

# Failures retrying will not fix: the upload is parked until a flush --retry or a remount.
_PERMANENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOENT, errno.EINVAL, errno.ENAMETOOLONG,
                               errno.EFBIG, errno.ENOTSUP, errno.EEXIST})

Published = Callable[[str, "ObjectInfo | None", "str | None"], None]


class PathLocks:
    """One trio lock per path, made on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, trio.Lock] = {}
        self._users: dict[str, int] = {}

    def held(self, path: str) -> bool:
        lock = self._locks.get(path)
        return lock is not None and lock.locked()

    @asynccontextmanager
    async def hold(self, *paths: str) -> AsyncIterator[None]:
        """Hold the locks of ``paths``, taken in sorted order (two renames never deadlock)."""
        entered: list[str] = []
        locked: list[str] = []
        try:
            for path in sorted(set(paths)):
                lock = self._locks.setdefault(path, trio.Lock())
                self._users[path] = self._users.get(path, 0) + 1
                entered.append(path)
                try:
                    # Free: taken with no checkpoint (a pass through trio's scheduler, an epoll
                    # call, per create and rename otherwise); held: wait in line (trio's lock is fair).
                    lock.acquire_nowait()
                except trio.WouldBlock:
                    await lock.acquire()
                locked.append(path)
            yield
        finally:
            for path in reversed(locked):
                self._locks[path].release()
            for path in entered:
                self._users[path] -= 1
                if not self._users[path]:
                    del self._users[path]
                    del self._locks[path]


@dataclass
class WriteStats:
    uploaded: int = 0
    bytes_uploaded: int = 0
    bytes_copied: int = 0
    failures: int = 0
    conflicts: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # path -> last error

    def counters(self) -> tuple[int, int, int, int, int]:
        return self.uploaded, self.bytes_uploaded, self.bytes_copied, self.failures, self.conflicts


def upload_summary(before: tuple[int, int, int, int, int], after: tuple[int, int, int, int, int],
                   seconds: float, pending: int) -> str | None:
    """The INFO line for what uploads did between two snapshots of WriteStats, or None (nothing)."""
    files, sent, copied, failures, conflicts = (b - a for a, b in zip(before, after))
    if not (files or failures):
        return None
    text = f"uploaded {files} file(s), {sent / 1048576:.1f} MiB"
    if copied:
        text += f" (+{copied / 1048576:.1f} MiB copied server-side)"
    text += f" in the last {seconds:.0f}s"
    if failures:
        text += f"; {failures} failed attempt(s)"
    if conflicts:
        text += f"; {conflicts} conflict(s)"
    return text + f"; {pending} file(s) pending"


class PendingFiles:
    """Every staged file of one mount (see the module docstring for states and rules)."""

    def __init__(
        self,
        backend: StorageBackend,
        staging: StagingArea,
        reader: BlockReader,
        *,
        delay: float,
        policy: ConflictPolicy = ConflictPolicy.KEEP_BOTH,
        concurrency: int = 8,
        part_concurrency: int = 8,
        reserve_space: Callable[[int], None] | None = None,
        fsync_patience: float = 60.0,
        namespace: NamespaceQueue | None = None,
    ) -> None:
        self.backend = backend
        # Namespace changes queued while the backend was unreachable: uploads wait for them
        # (see gstore.write.namespace_queue: "rm a; create a" must reach the backend in order).
        self.namespace = namespace
        self.staging = staging
        self._reader = reader
        self.locks = PathLocks()
        self._by_path: dict[str, StagedFile] = {}
        #: ``get`` as one builtin call (the dict's own bound ``get``), for the cache-hit read
        #: path, which asks it on every read (vfs.handles.ObjectHandle.read_cached). Safe
        #: because ``_by_path`` is never rebound, only changed in place.
        self.staged_at: Callable[[str], StagedFile | None] = self._by_path.get
        self._by_id: dict[str, StagedFile] = {}  # also the detached (unlinked-but-open) ones
        self.scheduler = UploadScheduler(self._upload_one, delay=delay, concurrency=concurrency)
        self.uploader = Uploader(backend, staging, ensure_local=self.ensure_local, policy=policy,
                                 part_concurrency=part_concurrency)
        self.stats = WriteStats()
        # How long fsync keeps retrying transient upload failures before it reports EIO.
        self.fsync_patience = fsync_patience
        self._published: list[Published] = []
        self._reserve_space = reserve_space or (lambda nbytes: None)
        self._staged_bytes = 0
        backend.add_listener(self._backend_state)  # circuit state changes (a plain backend never calls)

    # -- what others may ask ---------------------------------------------------------

    @property
    def policy(self) -> ConflictPolicy:
        return self.uploader.policy

    @property
    def delay(self) -> float:
        return self.scheduler.delay

    def on_published(self, listener: Published) -> None:
        """``listener(path, info, md5)`` runs, synchronously, when a file is retired."""
        self._published.append(listener)

    def get(self, path: str) -> StagedFile | None:
        return self._by_path.get(path)

    def pending(self) -> list[StagedFile]:
        return list(self._by_path.values())

    def under(self, folder: str) -> Iterator[StagedFile]:
        prefix = folder + "/"
        return (s for p, s in list(self._by_path.items()) if p.startswith(prefix))

    def overlay(self, folder: str, entries: dict[str, ObjectInfo]) -> dict[str, ObjectInfo]:
        """A folder's listing with pending files laid over it."""
        if not self._by_path:
            return entries
        entries = dict(entries)
        prefix = f"{folder}/" if folder else ""
        for path, staged in self._by_path.items():
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" not in rest:
                entries[rest] = staged.info()
            else:  # a pending file deeper down makes its top folder exist here
                top = rest.split("/", 1)[0]
                entries.setdefault(top, ObjectInfo(name=top, is_dir=True))
        return entries

    @staticmethod
    def remote_may_exist(staged: StagedFile) -> bool:
        """Whether an object may be at the staged file's path on the backend."""
        return staged.expect != EXPECT_ABSENT or staged.uploaded_generation >= 0 or staged.upload_started

    # -- opening -------------------------------------------------------------------------

    async def open_for_write(self, path: str, current: Callable[[], Awaitable[ObjectInfo]], *,
                             truncate: bool) -> StagedFile:
        """A writer opens ``path`` (lock held). ``current()`` gives the remote object."""
        staged = self._by_path.get(path)
        if staged is None:
            staged = await self._stage(path, await current(), truncate=truncate)
            staged.writers += 1
        else:
            await self._claim_staged(staged, truncate=truncate)
        self.scheduler.cancel(staged.id, running=False)
        return staged

    async def _claim_staged(self, staged: StagedFile, *, truncate: bool) -> None:
        """A writer takes an existing staged file (lock held); with ``truncate``, empties it.
        Claimed before any await: an upload finishing meanwhile must not retire it."""
        staged.writers += 1
        if truncate:
            try:
                await self._truncate(staged, 0)
            except BaseException:
                staged.writers -= 1
                raise

    async def create(self, path: str, mode: int, current: Callable[[], Awaitable[ObjectInfo | None]], *,
                     exclusive: bool, truncate: bool, owner: tuple[int, int] | None = None) -> StagedFile:
        """open(O_CREAT) of ``path`` (lock held): a new file, or the existing one opened."""
        staged = self._by_path.get(path)
        if staged is not None:
            if exclusive:
                raise OSError(errno.EEXIST, "File exists", path)
            await self._claim_staged(staged, truncate=truncate)
        else:
            existing = await current()
            if existing is not None:
                if exclusive:
                    raise OSError(errno.EEXIST, "File exists", path)
                staged = await self._stage(path, existing, truncate=truncate)
            else:
                staged = await self._new_file(path, stat.S_IFREG, mode, owner, keep_open=True)
            staged.writers += 1
        self.scheduler.cancel(staged.id, running=False)
        return staged

    async def _new_file(self, path: str, file_type: int, mode: int, owner: tuple[int, int] | None, *,
                        rdev: int = 0, content: bytes = b"", keep_open: bool = False) -> StagedFile:
        """``keep_open``: a writer's handle follows (its release closes the descriptor)."""
        def configure(staged: StagedFile) -> None:
            staged.file_type, staged.mode, staged.rdev = file_type, mode & 0o7777, rdev
            if owner is not None:
                staged.uid, staged.gid = owner

        # On the trio thread: an open of a spare data file and no fsync (no record until the
        # first close; see gstore.write.staging).
        staged = self.staging.create(path, base=None, expect=EXPECT_ABSENT, size=0, configure=configure,
                                     keep_open=keep_open)
        if content:
            StagingArea.write(staged, 0, content)
        self._adopt(staged)
        return staged

    async def make_node(self, path: str, file_type: int, mode: int, *, owner: tuple[int, int] | None,
                        rdev: int = 0, content: bytes = b"") -> StagedFile:
        """mknod, mkfifo, symlink (lock held, the name free): a closed file with nothing to write later."""
        if path in self._by_path:
            raise OSError(errno.EEXIST, "File exists", path)
        staged = await self._new_file(path, file_type, mode, owner, rdev=rdev, content=content)
        await self.persist(staged)
        self.scheduler.schedule(staged.id)
        return staged

    async def stage_attributes(self, path: str, current: Callable[[], Awaitable[ObjectInfo]]) -> StagedFile:
        """A change of attributes only (chmod, chown, utimens, setxattr) of ``path`` (lock held).

        A clean file gets a staged file with no local bytes: its upload rewrites the
        object's metadata in place (one copy onto itself), and several changes in a
        row before it runs coalesce into that one request.
        """
        staged = self._by_path.get(path)
        if staged is None:
            staged = await self._stage(path, await current(), truncate=False, fill=False)
        return staged

    def hold(self, staged: StagedFile) -> None:
        """Keep ``staged`` from being retired during a namespace change that awaits (a rename):
        it counts as a reader until :meth:`let_go`. No await: the caller looked it up just now."""
        staged.readers += 1

    async def let_go(self, staged: StagedFile) -> None:
        await self.release(staged, writer=False)

    def open_for_read(self, path: str) -> StagedFile | None:
        """A reader opens ``path``: it shares the staged file, if there is one (no await: atomic)."""
        staged = self._by_path.get(path)
        if staged is not None:
            staged.readers += 1
        return staged

    async def _stage(self, path: str, info: ObjectInfo, *, truncate: bool, fill: bool = True) -> StagedFile:
        """Start local changes to a remote object: only small files are copied now."""
        if info.is_dir:
            raise OSError(errno.EISDIR, "Is a directory", path)
        expect = f"etag:{info.etag}" if info.etag else None
        # On the trio thread: an open(O_CREAT) and a sparse ftruncate, no fsync (no record yet).
        if truncate:
            staged = self.staging.create(path, base=None, expect=expect, size=0, attributes=info)
        else:
            staged = self.staging.create(path, base=info, expect=expect, size=info.size, attributes=info)
        if fill and not truncate and staged.size <= EAGER_FILL_LIMIT and not staged.complete:
            # Small files are copied locally now, while the base version surely exists: a
            # conflicting remote change later can then never cost the bytes not touched here.
            try:
                await self.ensure_local(staged, 0, staged.size)
            except BaseException:
                self.staging.remove(staged)  # trio thread: it closes the shared descriptor
                raise
        self._adopt(staged)
        return staged

    def _adopt(self, staged: StagedFile) -> None:
        self._by_path[staged.path] = staged
        self._by_id[staged.id] = staged
        self._account(staged.size)

    # -- data ---------------------------------------------------------------------------

    def write(self, staged: StagedFile, offset: int, data: bytes) -> int:
        before = staged.size
        written = StagingArea.write(staged, offset, data)
        if staged.size != before:
            self._account(staged.size - before)
            self.staging.early_writeback.appended(staged.data_path, before, offset, offset + written)
        return written

    async def read(self, staged: StagedFile, offset: int, size: int) -> bytes:
        end = min(staged.size, offset + size)
        if offset >= end:
            return b""
        pieces = []
        for start, stop, local in staged.present.pieces(offset, end):
            if local:
                pieces.append(StagingArea.read_local(staged, start, stop - start))
            else:
                pieces.append(await self.read_base(staged, start, stop))
        return b"".join(pieces)

    async def read_base(self, staged: StagedFile, start: int, end: int) -> bytes:
        """Bytes of the version a staged file's changes apply to (zeros beyond its end)."""
        base = staged.base
        if base is None or start >= base.size:
            return bytes(end - start)
        stop = min(end, base.size)
        stream = self._reader.open_stream(staged.base_path or staged.path, base)
        data = await self._reader.read(stream, start, stop - start)
        return data + bytes(end - stop)

    async def ensure_local(self, staged: StagedFile, start: int, end: int) -> None:
        """Make ``[start, end)`` of the staging file valid by fetching what is missing from the base."""
        base = staged.base
        gaps = list(staged.present.gaps(start, end))
        if not gaps:
            return
        for gap_start, gap_end in gaps:
            if base is None or gap_start >= base.size:
                staged.present.add(gap_start, gap_end)  # beyond the base: zeros
                continue
            cursor = gap_start
            while cursor < min(gap_end, base.size):
                chunk_end = min(gap_end, base.size, cursor + FILL_CHUNK)
                try:
                    data = await self.read_base(staged, cursor, chunk_end)
                except StaleObjectError as exc:
                    raise ConflictError(
                        f"{staged.path}: the version this mount's changes apply to is gone from the backend "
                        "(changed by another writer); the changed bytes are kept locally") from exc
                # Only ranges still missing *now* and inside the file: a write or a truncate
                # during the fetch wins (no await from here to the next fetch).
                for hole_start, hole_end in staged.present.gaps(cursor, min(chunk_end, staged.size)):
                    StagingArea.fill(staged, hole_start, data[hole_start - cursor: hole_end - cursor])
                cursor = chunk_end
            if gap_end > base.size:
                staged.present.add(base.size, gap_end)
        if not staged.unlinked:
            await trio.to_thread.run_sync(self.staging.persist, staged)

    async def _truncate(self, staged: StagedFile, size: int) -> None:
        before = staged.size
        # On the trio thread, like write(): the file and its size/generation change in one
        # step with no await in between, so an upload can neither start on, nor be
        # confirmed for (and retire the file with), a generation whose bytes are not there.
        StagingArea.truncate(staged, size)
        await trio.lowlevel.checkpoint()
        self._account(size - before)

    async def truncate_path(self, path: str, size: int, current: Callable[[], Awaitable[ObjectInfo]]) -> StagedFile:
        """truncate(2) of ``path`` (lock held)."""
        staged = self._by_path.get(path)
        if staged is None:
            staged = await self._stage(path, await current(), truncate=size == 0)
        await self.truncate(staged, size)
        return staged

    async def truncate(self, staged: StagedFile, size: int) -> None:
        """ftruncate(2) of a staged file (also an unlinked one)."""
        if staged.size != size:
            await self._truncate(staged, size)
        if staged.writers == 0 and not staged.unlinked:
            await trio.to_thread.run_sync(self.staging.persist, staged)
            self.scheduler.schedule(staged.id)

    async def set_attributes(self, staged: StagedFile, *, mode: int | None = None, uid: int | None = None,
                             gid: int | None = None, atime: float | None = None, mtime: float | None = None,
                             content_type: str | None = None, xattr: tuple[str, bytes | None] | None = None,
                             ) -> None:
        """chmod, chown, utimens, user.mimetype, setxattr/removexattr (``(name, None)``) of a staged file.

        Raises E2BIG (and changes nothing) when the attributes would not fit the
        object's metadata. ctime moves, as on every change.
        """
        if xattr is not None:
            name, value = xattr
            updated = dict(staged.xattrs)
            if value is None:
                if name not in updated:
                    raise OSError(errno.ENODATA, "No data available", name)
                del updated[name]
            else:
                updated[name] = value
            # The same check as the upload's (with its writer id), so a value set now never makes
            # the upload fail later.
            objectmeta.encode(dataclasses.replace(staged.posix_meta(), xattrs=tuple(sorted(updated.items()))),
                              writer=staged.id)
            staged.xattrs = updated
        if mode is not None:
            staged.mode = mode & 0o7777
        if uid is not None:
            staged.uid = uid
        if gid is not None:
            staged.gid = gid
        if atime is not None:
            staged.atime = atime
        if mtime is not None:
            staged.mtime = mtime
        if content_type is not None:
            staged.content_type = content_type
        staged.ctime = time.time()
        staged.generation += 1  # the object's metadata changes with them
        if not staged.unlinked:
            await trio.to_thread.run_sync(lambda: self.staging.persist(staged, sync_data=False))
            if staged.writers == 0:
                self.scheduler.schedule(staged.id)

    # -- closing --------------------------------------------------------------------------

    async def persist(self, staged: StagedFile, *, durable: bool = False) -> None:
        """close(2) (``durable`` False) or fsync(2) (True): what was written is in the journal.

        After a close it survives a crash of the daemon at once, and one of this host
        once the record sync thread fsynced it (a small file's record, within
        ``RECORD_SYNC_INTERVAL``; a larger file's before this returns); after an
        fsync it survives a crash of this host when this returns. Closes at about
        the same moment share one journal commit (a group commit: :meth:`StagingArea.commit`).
        """
        if staged.unlinked:
            return
        if (staged.durable_generation if durable else staged.persisted_generation) == staged.generation:
            return
        generation = staged.generation
        now_durable = await self.staging.commit(staged, durable=durable)
        staged.persisted_generation = max(staged.persisted_generation, generation)
        if now_durable:
            staged.durable_generation = max(staged.durable_generation, generation)

    async def fsync(self, staged: StagedFile) -> list[str]:
        """fsync(2): durable in the backend; returns the failures (empty when durable).

        A program takes an fsync error as fatal (SQLite reports "disk I/O error"), so
        transient failures are retried here, at once, for up to ``fsync_patience``
        seconds; a failure retrying cannot fix is reported at once.
        """
        await self.persist(staged, durable=True)
        if staged.unlinked:
            return []
        deadline = trio.current_time() + self.fsync_patience
        while True:
            failures = await self.flush([staged], timeout=max(0.0, deadline - trio.current_time()))
            record = self.scheduler.attempts.get(staged.id)
            if not failures or (record is not None and record.permanent) or trio.current_time() >= deadline:
                return failures
            log.info("fsync of %s: upload failed (%s); trying again", staged.path, "; ".join(failures))
            await trio.sleep(min(1.0, max(0.0, deadline - trio.current_time())))

    async def release(self, staged: StagedFile, *, writer: bool) -> None:
        """A handle on ``staged`` closed for good."""
        if writer:
            staged.writers = max(0, staged.writers - 1)
        else:
            staged.readers = max(0, staged.readers - 1)
        if staged.unlinked:
            if staged.writers + staged.readers == 0:
                self._discard(staged)
            return
        if writer and staged.writers == 0:
            await self.persist(staged)
        # Re-check after the await: an upload may have finished, a writer opened, a rename moved it.
        if staged.unlinked or self._by_id.get(staged.id) is not staged or staged.writers:
            return
        if staged.readers == 0:
            StagingArea.close_fd(staged)  # no handle left: the shared descriptor goes (reopened on use)
        if staged.uploaded_generation >= staged.generation:
            if staged.readers == 0:
                self._retire(staged)
        elif writer and not self.scheduler.scheduled(staged.id):
            self.scheduler.schedule(staged.id)

    # -- namespace changes (lock of every path involved held) --------------------------------

    async def drop(self, staged: StagedFile, *, finish_sending: bool = False) -> None:
        """The file was unlinked or replaced: its content must never be uploaded.

        ``finish_sending``: an upload already under way is let finish instead of being
        cancelled, so that what the backend has at the path afterwards is known (a
        cancelled PUT may still land, and its ETag would then be nobody's).
        """
        self.scheduler.cancel(staged.id, running=not finish_sending)
        await self.scheduler.wait_idle(staged.id)
        if self._by_id.get(staged.id) is not staged:
            return  # its upload finished meanwhile and retired it (no handle open): nothing left
        if self._by_path.get(staged.path) is staged:
            del self._by_path[staged.path]
        self.stats.failed.pop(staged.path, None)
        staged.unlinked = True
        if staged.writers + staged.readers == 0:
            self._discard(staged)
        else:
            # Unlinked but open: the bytes stay for the handles, the journal forgets them.
            await trio.to_thread.run_sync(self.staging.remove_record, staged)

    async def copy_for_readers(self, path: str, info: ObjectInfo) -> StagedFile:
        """A remote file about to be deleted or replaced is still open for reading: a local
        copy of it (lock held) that those handles move to before it is dropped."""
        staged = await self._stage(path, info, truncate=False, fill=False)
        await self.ensure_local(staged, 0, staged.size)
        return staged

    async def move(self, staged: StagedFile, new_path: str, target: ObjectInfo | None) -> tuple[bool, str | None]:
        """rename(2) of a staged file; returns whether an object may remain at the old key, and
        its ETag as far as this mount knows (after any upload under way has ended)."""
        self.scheduler.cancel(staged.id)
        await self.scheduler.wait_idle(staged.id)
        if not staged.complete:
            await self.ensure_local(staged, 0, staged.size)
        replaced = self._by_path.get(new_path)
        if replaced is not None and replaced is not staged:
            # What the backend has at the target, as far as this mount knows: read after its
            # upload in flight (if any) has finished, which may have changed it (the path's
            # lock is held: nobody else changes which file the target has meanwhile).
            await self.drop(replaced, finish_sending=True)
            expect = replaced.expect
        elif target is not None and not target.is_dir:
            expect = f"etag:{target.etag}" if target.etag else None
        else:
            expect = EXPECT_ABSENT
        remote_old = self.remote_may_exist(staged)
        old_etag = staged.expect[5:] if staged.expect and staged.expect.startswith("etag:") else None
        old = staged.path
        if self._by_path.get(old) is staged:
            del self._by_path[old]
        staged.path = new_path
        staged.base = None
        staged.base_path = None
        staged.expect = expect
        staged.upload_started = False
        staged.uploaded_generation = -1
        staged.generation += 1
        self._by_path[new_path] = staged
        await trio.to_thread.run_sync(lambda: self.staging.persist(staged, sync_data=False))
        if staged.writers == 0:
            self.scheduler.schedule(staged.id)
        self.stats.failed.pop(old, None)
        return remote_old, old_etag

    # -- uploads ------------------------------------------------------------------------------

    def durable(self, staged: StagedFile, generation: int) -> bool:
        if staged.unlinked or self._by_id.get(staged.id) is not staged:
            return True
        return staged.uploaded_generation >= generation

    async def flush(self, targets: list[StagedFile] | None = None, *, timeout: float | None = None,
                    retry_parked: bool = False) -> list[str]:
        """Upload now and wait until durable; returns one line per file that is not.

        A failure after the flush began is reported at once (the queue keeps
        retrying in the background); a parked upload (a failure retrying cannot
        fix) is reported without a new attempt unless ``retry_parked``.
        """
        chosen = self.pending() if targets is None else list(targets)
        goals = {s.id: s.generation for s in chosen}
        start_failures = {}
        for staged in chosen:
            record = self.scheduler.attempts.get(staged.id)
            if record is not None and record.permanent and retry_parked:
                record.permanent = False
            start_failures[staged.id] = record.failures if record is not None else 0
        deadline = None if timeout is None else trio.current_time() + timeout
        if targets is None and self.namespace is not None and len(self.namespace):
            self.namespace.retry_now()
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                await self.namespace.wait_empty_or_failing()
        unsettled = chosen  # not durable when last looked at (a durable file stays durable)
        while True:
            states = [(s, self._flush_state(s, goals[s.id], start_failures[s.id])) for s in unsettled]
            unsettled = [s for s, state in states if state != "durable"]
            failed = [self._failure(s) for s, state in states if state == "failed"]
            waiting = [s for s, state in states if state == "waiting"]
            if not waiting:
                return failed + self._unapplied_namespace_changes(targets)
            if deadline is not None and trio.current_time() >= deadline:
                return (failed + [f"{s.path}: not uploaded within {timeout:g}s" for s in waiting]
                        + self._unapplied_namespace_changes(targets))
            await self._wait_for_progress(waiting, goals, start_failures, deadline)

    def _flush_state(self, staged: StagedFile, goal: int, failures_before: int) -> str:
        """Where one file of a flush stands: "durable", "failed" (since the flush began, or
        parked) or "waiting". A waiting file that is not due now is made due: its write-back
        delay, or the backoff of a failure before the flush, does not hold the flush up."""
        if self.durable(staged, goal):
            return "durable"
        record = self.scheduler.attempts.get(staged.id)
        busy = self.scheduler.busy(staged.id)
        if record is not None and not busy and (record.permanent or record.failures > failures_before):
            return "failed"
        if not busy and not self.scheduler.due_now(staged.id):
            self.scheduler.schedule(staged.id, 0)
        return "waiting"

    def _failure(self, staged: StagedFile) -> str:
        record = self.scheduler.attempts.get(staged.id)
        return f"{staged.path}: {record.last_error if record is not None else 'failed'}"

    async def _wait_for_progress(self, waiting: list[StagedFile], goals: dict[str, int],
                                 failures_before: dict[str, int], deadline: float | None) -> None:
        """Until every file of ``waiting`` has looked settled (durable or failed) once, or
        none did for ``FLUSH_RESCAN`` seconds, or the deadline.

        Wakes at every change of any upload but looks at one file each time (a cursor
        that only moves forward), so waiting for n uploads costs O(n) in all, not O(n)
        per upload (7-12% of the trio thread's time while 1,000 small files went up).
        The caller's full pass then decides: it also sees a file the cursor passed that
        changed again, and makes due a file ahead of a stalled cursor that a writer's
        close delayed (one the cursor reaches, it makes due itself).
        """
        cursor = 0
        stalled_at = trio.current_time() + FLUSH_RESCAN
        while cursor < len(waiting):
            staged = waiting[cursor]
            if self._flush_state(staged, goals[staged.id], failures_before[staged.id]) != "waiting":
                cursor += 1
                stalled_at = trio.current_time() + FLUSH_RESCAN
                continue
            until = stalled_at if deadline is None else min(stalled_at, deadline)
            if trio.current_time() >= until:
                return
            changed = self.scheduler.changed()  # taken with no await since the check: no wake-up lost
            with trio.move_on_at(until):
                await changed.wait()

    def _unapplied_namespace_changes(self, targets: list[StagedFile] | None) -> list[str]:
        """One line per queued namespace change not in the backend yet (a whole flush only)."""
        if targets is not None or self.namespace is None:
            return []
        why = self.namespace.last_error or "waiting to be replayed"
        return [f"{c.path}: queued {c.describe()} not applied yet ({why})" for c in self.namespace.queued()]

    async def _upload_one(self, upload_id: str) -> None:
        """The scheduler's ``upload(id)``: one attempt, its outcome recorded."""
        staged = self._by_id.get(upload_id)
        if staged is None or staged.unlinked or self._by_path.get(staged.path) is not staged:
            return
        if self.namespace is not None and len(self.namespace):
            # Earlier namespace changes go first; while their replay fails (the backend is
            # unreachable) this attempt fails too, like any upload would, and is retried.
            with trio.move_on_after(NAMESPACE_WAIT):
                await self.namespace.wait_empty_or_failing()
            if len(self.namespace):
                self._failed(staged, BackendError(
                    errno.EAGAIN, f"{len(self.namespace)} earlier namespace change(s) not in the backend yet "
                    f"({self.namespace.last_error or 'being replayed'})", transient=True))
                return
            # Re-check after the await: it may have been dropped or moved meanwhile.
            if staged.unlinked or self._by_path.get(staged.path) is not staged:
                return
        if staged.uploaded_generation >= staged.generation:
            if staged.writers + staged.readers == 0:
                self._retire(staged)
            return
        generation, path = staged.generation, staged.path
        def sending() -> None:
            staged.upload_started = True  # from here on an object may exist at the path

        try:
            result = await self.uploader.upload(staged, generation, sending)
        except Exception as exc:  # noqa: BLE001 - an upload failure never ends the daemon
            self._failed(staged, exc)
            return
        if self._retirable(staged, generation, path):
            # Its record is not needed once the backend has this generation: removed now in a
            # worker thread, so that retiring it (in _finish, one synchronous step) unlinks no
            # record on the trio thread. Shielded and with no checkpoint before _finish: a
            # cancel (rename, unlink, stop) meanwhile sees the upload as finished, as if it
            # had come a moment later. Whatever changed during the await, _finish re-checks.
            with trio.CancelScope(shield=True):
                await self.staging.forget(staged, generation)
        self._finish(staged, generation, path, result)
        if self._by_id.get(staged.id) is staged and not staged.unlinked:
            # Still staged (open, or changed meanwhile): the journal must know what the
            # backend now has, or a restart would take our own upload for a conflict.
            # (It may be removed meanwhile: persist then does nothing.)
            await trio.to_thread.run_sync(self.staging.persist, staged)

    def _retirable(self, staged: StagedFile, generation: int, path: str) -> bool:
        """Whether confirming ``generation`` would retire ``staged`` now (what _finish checks)."""
        return (self._by_id.get(staged.id) is staged and not staged.unlinked and staged.path == path
                and staged.generation == generation and staged.writers + staged.readers == 0)

    def _failed(self, staged: StagedFile, exc: BaseException) -> None:
        code, transient = classify(exc)
        permanent = isinstance(exc, ConflictError) or (not transient and code in _PERMANENT_ERRNOS)
        message = str(exc) or type(exc).__name__
        staged.attempts += 1
        staged.last_error = message
        self.stats.failures += 1
        self.stats.failed[staged.path] = message
        delay = self.scheduler.failed(staged.id, message, permanent=permanent)
        if delay is None:
            log.error("upload of %s failed and will not be retried until `gstore flush --retry` or a remount "
                      "(%s): %s; the file is kept locally", staged.path, errno.errorcode.get(code, code), message)
        else:
            log.warning("upload of %s failed (attempt %d, %s%s): %s; retrying in %.0fs", staged.path,
                        staged.attempts, errno.errorcode.get(code, code), ", transient" if transient else "",
                        message, delay)

    def _finish(self, staged: StagedFile, generation: int, path: str, result: UploadResult) -> None:
        """An upload was confirmed (no await here: the handover is one step)."""
        self.scheduler.succeeded(staged.id)
        self.stats.uploaded += 1
        self.stats.bytes_uploaded += result.sent
        self.stats.bytes_copied += result.copied
        self.stats.failed.pop(path, None)
        staged.attempts = 0
        staged.last_error = None
        if staged.unlinked or staged.path != path:
            return  # dropped or moved meanwhile (both wait for uploads; defensive)
        staged.uploaded_generation = max(staged.uploaded_generation, generation)
        if result.target == path:
            # What this mount wrote is what the path shows (also where the backend keeps no
            # metadata: the attribute store remembers it per object version).
            mine = staged.info()
            info = dataclasses.replace(result.info, mtime=mine.mtime, mode=mine.mode, uid=mine.uid, gid=mine.gid,
                                       ctime=mine.ctime, atime=mine.atime, rdev=mine.rdev, xattrs=mine.xattrs,
                                       content_type=result.info.content_type or mine.content_type, detailed=True)
            staged.expect = f"etag:{result.info.etag}" if result.info.etag else None
            staged.md5 = result.md5
            if not staged.complete:
                # Bytes not local are those of the object just uploaded (unchanged ranges).
                staged.base, staged.base_path = result.info, path
            staged.published = info
        else:
            # Keep-both: ours went to the conflict name, the path keeps theirs; a later
            # upload of this file is checked against the same old version (a conflict again).
            self.stats.conflicts += 1
            staged.published = result.theirs  # None: not seen here, the next access asks
        if staged.generation == generation and staged.writers + staged.readers == 0:
            self._retire(staged)

    def _retire(self, staged: StagedFile) -> None:
        """Uploaded and closed: the path is answered by the backend again, in this same step."""
        if self._by_path.get(staged.path) is staged:
            del self._by_path[staged.path]
        self._by_id.pop(staged.id, None)
        self.scheduler.forget(staged.id)
        self.staging.remove(staged)
        self._account(-staged.size)
        if staged.uploaded_generation >= 0:
            for listener in self._published:
                listener(staged.path, staged.published, staged.md5)

    def _discard(self, staged: StagedFile) -> None:
        self._by_id.pop(staged.id, None)
        self.scheduler.forget(staged.id)
        self.staging.remove(staged)
        self._account(-staged.size)

    def _backend_state(self, state: str) -> None:
        """The backend is reachable again: uploads waiting for a retry go now."""
        if state == "closed":
            self.scheduler.retry_now()

    def _account(self, delta: int) -> None:
        self._staged_bytes = max(0, self._staged_bytes + delta)
        self._reserve_space(self._staged_bytes)

    # -- start ---------------------------------------------------------------------------------

    def recover(self) -> list[StagedFile]:
        """Take over the files staged before the last stop and queue their uploads."""
        if self.namespace is not None:
            self.namespace.recover()
        recovered = self.staging.load()
        for staged in recovered:
            if staged.path in self._by_path:
                log.error("two journal records for %s; keeping the newer, the other stays in %s for inspection",
                          staged.path, self.staging.root)
                older = self._by_path[staged.path]
                if older.created > staged.created:
                    continue
            # Whether an upload of it was sent before the stop is not in the journal (it is
            # recorded only once confirmed, and a kill -9 can come between): assume one may
            # have landed, so a rename or unlink also removes the key (a no-op if none did).
            staged.upload_started = True
            self._adopt(staged)
            self.scheduler.schedule(staged.id, 0)
        if recovered:
            log.warning("%d file(s) written before the last stop were not uploaded yet; uploading them now: %s",
                        len(recovered), ", ".join(s.path for s in recovered[:10]) + (" ..." if len(recovered) > 10 else ""))
        orphans = self.staging.orphans({s.id for s in recovered})
        for orphan in orphans:
            # A file unlinked while open, a crash between creating and recording it, a spare,
            # or an uploaded file's data whose removal the stop cut short: nothing was
            # promised for these bytes.
            log.debug("removing staging data %s that has no journal record", orphan.name)
            orphan.unlink(missing_ok=True)
        if orphans:
            log.info("removed %d staging data file(s) with no journal record (never closed, spare, or "
                     "already uploaded)", len(orphans))
        return recovered

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.namespace is not None:
                await nursery.start(self.namespace.run)
            await nursery.start(self.scheduler.run)
            nursery.start_soon(self._log_summaries)
            task_status.started()

    async def _log_summaries(self) -> None:
        """One INFO line per ``UPLOAD_SUMMARY_INTERVAL`` in which uploads finished or failed
        (per-file lines are DEBUG below ``LOGGED_UPLOAD_SIZE``; failures keep their WARNING lines)."""
        interval = UPLOAD_SUMMARY_INTERVAL
        before, since = self.stats.counters(), trio.current_time()
        while True:
            await trio.sleep(interval)
            after, now = self.stats.counters(), trio.current_time()
            line = upload_summary(before, after, now - since, len(self._by_path))
            if line is not None:
                log.info("%s", line)
            before, since = after, now


__all__ = ["EAGER_FILL_LIMIT", "PathLocks", "PendingFiles", "UPLOAD_SUMMARY_INTERVAL", "WriteStats", "upload_summary"]
