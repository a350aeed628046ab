"""Staged files: what programs wrote, kept on local disk until the backend has it.

Each staged file is two files in ``<state dir>/staging/``:

* ``<id>.data``: the file's bytes at their offsets (sparse where nothing was
  written or fetched yet);
* ``<id>.json``: its journal record: the mount path, the remote version the
  edits apply to (``base``), what the remote object was expected to be when the
  upload happens (``expect``, for conflict detection), the logical size, the
  ``dirty`` and ``present`` extents, and mtime/mode.

The record is replaced atomically (temp file, fsync, rename, fsync of the
directory) at every close, fsync, truncate and rename, after the data file
itself was fsynced. A small file whose every byte is local (at most
``INLINE_LIMIT``) carries its bytes in the record instead (``inline``): the
record's own fsync then makes them durable, which saves the data file's fsync,
a third of what a close waits for; the next start writes them back into the
data file before anything else (no fsync needed there: the record stays until
the upload is confirmed, so it can restore them again). So after a kill -9 or
a power loss, everything a program had closed or fsynced is found again at the
next start and uploaded; nothing is deleted before the backend confirmed the
upload. A file created and never closed has no record yet (nothing was
promised for it): its data file is an orphan the next start removes. Creating
a staged file is therefore no fsync, and not even an ``open(O_CREAT)`` on the
trio thread: a worker thread makes empty files ahead of need (*spares*, 128 at a
time), because creating an inode is a journaled change that can wait behind any
fsync on the same disk (0.1-0.6 ms measured there, during a stream of closes),
and the trio thread should not wait like that. Taking a spare is a plain
``open``; with none ready, the file is created there as before. A small file's
close takes a spare too, to write its record into before renaming it in place
(a rename, which the trio thread does there, measured 0.05-0.15 ms). Spares left
at a stop are orphans too.
Closes and fsyncs go through :meth:`StagingArea.commit`: those arriving while a
commit runs are written together by one worker-thread call with one directory
fsync (:mod:`gstore.write.group_commit`); an fsync returns once its own record
is durable. The close of a small file is written by the trio thread itself when
no such commit runs (:meth:`StagingArea._commit_here`): a record with no fsync is
a write into a spare and a rename, cheaper than the trip to a worker thread.
Under ``_records_lock`` a record older than the last one written for the same
file is never put back over it, whichever thread wrote which. A *close* of a
small file whose record carries its bytes returns once the record is written
and renamed in place, before its fsync: from then on a kill -9 or a crash of
the daemon loses nothing (the record is in the kernel's page cache), and the
record sync thread fsyncs it and the directory within about
``RECORD_SYNC_INTERVAL`` (:meth:`StagingArea._sync_records`). Only a power
loss or a kernel crash inside that window can lose such a close, which is what
close(2) promises on a local file system (ext4 commits every 5 s); fsync(2) is
what programs use to be sure, and it still waits for the disk (and the backend).
A record torn by such a loss does not parse: :meth:`StagingArea.load` leaves it in
place and says so, and uploads nothing from it (an empty one, whose bytes never
reached the disk, it removes with a warning: nothing in it to inspect). Waiting
for two fsyncs was two thirds of what closing a new small file cost (1,000 x 4
KiB: 2.9 ms per close against 0.9 ms), and all of the time it varied with the
disk's other work.

The commit that puts a small file's bytes in its record also keeps them, with
their MD5, for the file's upload (:meth:`StagingArea.take_body`, at most
``BODY_CACHE_LIMIT`` bytes in all): the upload then reads nothing.

Once the backend confirmed a generation, its record is no longer needed: the
upload removes it in a worker thread (:meth:`StagingArea.forget`, batched like
commits) before the file is retired, so retiring it on the trio thread unlinks
no record, and the data file goes in the background thread that also fsyncs the
directory after removals. A crash before that leaves a data file with no record,
which the next start removes.

The data file's descriptor stays open while the staged file is in use
(``StagedFile.fd``, opened when a writer creates the file or at the first write
or local read, closed by :meth:`StagingArea.close_fd` when the last handle
closes, or at removal): a ``write(2)`` through the mount is one ``pwrite``, with
no open and close around it.
Only the trio thread uses that descriptor. Work done in worker threads (fsync,
reads for uploads, truncate) opens its own, so closing the shared one can never
pull it from under a thread, nor hand a reused descriptor number to a pread of
another file.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import trio

from gstore.backends.base import ObjectInfo
from gstore.backends.objectmeta import PosixMeta
from gstore.write.early_writeback import EarlyWriteback
from gstore.write.extents import Extents
from gstore.write.group_commit import GroupCommit

log = logging.getLogger(__name__)

EXPECT_ABSENT = "absent"
#: Files up to this size whose bytes are all local carry them in their record (see above).
INLINE_LIMIT = 16 * 1024
#: Bytes of small files' bodies kept from their last commit for their upload, in all.
BODY_CACHE_LIMIT = 8 * 1024 * 1024
#: Spare data files made per batch by the spare thread, and how few left start the next batch.
SPARE_BATCH = 128
SPARE_LOW = 64
#: Records written by a close without their fsync are fsynced (with the directory) this
#: often at most (seconds): the window in which a power loss can take back a close.
RECORD_SYNC_INTERVAL = 0.2
#: The removal thread fsyncs the directory at most this often (seconds). Nothing waits for
#: that fsync (it only shortens the time in which a power loss can bring a removed record
#: back); back to back, during a stream of uploads, it kept the file system's journal busy
#: for the fsyncs every close waits for.
REMOVAL_SYNC_INTERVAL = 0.5


def _fsync_path(path: Path, flags: int = 0) -> None:
    """Fsync the file or folder at ``path`` through a descriptor of its own (any thread)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_spare(path: Path) -> int | None:
    """A write descriptor on an empty spare, or None when it was swept meanwhile.

    No ``O_TRUNC`` (see :meth:`StagingArea._open_temp_record`); a spare holding bytes is
    never expected, but is emptied, so that a record written into it keeps no tail."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a regular file may take fewer at once)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _info_to_json(info: ObjectInfo | None) -> dict[str, Any] | None:
    if info is None:
        return None
    return {"size": info.size, "mtime": info.mtime, "etag": info.etag, "version_id": info.version_id,
            "content_type": info.content_type}


def _info_from_json(data: dict[str, Any] | None, name: str) -> ObjectInfo | None:
    if not data:
        return None
    return ObjectInfo(name=name, is_dir=False, size=int(data["size"]), mtime=float(data.get("mtime") or 0),
                      etag=data.get("etag"), version_id=data.get("version_id"),
                      content_type=data.get("content_type"))


@dataclass(eq=False)
class StagedFile:
    """One file with local changes not yet confirmed by the backend."""

    id: str
    path: str
    data_path: Path
    size: int = 0
    # The remote version whose bytes fill ranges that are not ``present``
    # (None when every byte is local: a new or truncated file).
    base: ObjectInfo | None = None
    base_path: str | None = None
    # What the remote object must still be at upload time: "etag:<etag>",
    # EXPECT_ABSENT, or None (no check: the user chose to overwrite).
    expect: str | None = None
    dirty: Extents = field(default_factory=Extents)
    present: Extents = field(default_factory=Extents)
    mtime: float = field(default_factory=time.time)
    mode: int = 0o644  # permission bits (with setuid, setgid, sticky)
    file_type: int = stat.S_IFREG  # S_IFREG, S_IFLNK (the bytes are the target), S_IFIFO, ...
    uid: int | None = None  # None: the mount's default owner
    gid: int | None = None
    ctime: float = field(default_factory=time.time)
    atime: float | None = None
    rdev: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)  # user.* names set by programs
    # Content-Type to upload with: set by the user (user.mimetype) or kept from the
    # base version when it was specific; None: guessed from the name at upload.
    content_type: str | None = None
    generation: int = 0
    created: float = field(default_factory=time.time)
    # Memory-only state (owned by gstore.write.pending).
    writers: int = 0  # open handles that may write
    readers: int = 0  # open read-only handles sharing these bytes
    unlinked: bool = False  # dropped: unlinked (maybe still open) or replaced; never uploaded
    removed: bool = False  # its files are gone from the staging directory
    # A journal record of it is on disk, and whether the last one written carried the bytes
    # (then the data file's may never have been fsynced): both under StagingArea._records_lock.
    recorded: bool = False
    recorded_inline: bool = False
    # The generation of the last record written (under _records_lock too): a thread whose
    # record is of an older one (it read the file before another thread's newer record)
    # never puts it back over the newer (see StagingArea._persist_one).
    recorded_generation: int = -1
    upload_started: bool = False  # an upload was sent at least once: an object may exist
    persisted_generation: int = -1  # the generation whose record is written (maybe not yet fsynced)
    durable_generation: int = -1  # the generation whose data and record are fsynced
    published: ObjectInfo | None = None  # what the path shows once this file is retired
    uploaded_generation: int = -1  # the generation last confirmed by the backend
    attempts: int = 0
    last_error: str | None = None
    md5: str | None = None  # of the bytes last uploaded, when known
    # The data file's descriptor for the trio thread's pwrite/pread (see the module docstring).
    fd: int | None = field(default=None, repr=False)

    @property
    def complete(self) -> bool:
        """Every byte is in the staging file: no fetch from the base needed."""
        return self.base is None or self.present.covers(0, self.size)

    @property
    def carries_bytes(self) -> bool:
        """Its journal record carries its bytes (small, and every byte local): see INLINE_LIMIT."""
        return self.size <= INLINE_LIMIT and self.complete

    def info(self) -> ObjectInfo:
        return ObjectInfo(
            name=self.path.rsplit("/", 1)[-1], is_dir=False, size=self.size, mtime=self.mtime,
            content_type=self.content_type, mode=self.file_type | self.mode, uid=self.uid, gid=self.gid,
            ctime=self.ctime, atime=self.atime, rdev=self.rdev,
            xattrs=tuple(sorted(self.xattrs.items())) or None, detailed=True,
        )

    def posix_meta(self) -> PosixMeta:
        """The attributes the object carries as user metadata (gstore.backends.objectmeta)."""
        return PosixMeta(mode=self.file_type | self.mode, uid=self.uid, gid=self.gid, mtime=self.mtime,
                         ctime=self.ctime, atime=self.atime, rdev=self.rdev,
                         xattrs=tuple(sorted(self.xattrs.items())) or None)

    def take_attributes(self, info: ObjectInfo) -> None:
        """Start from the attributes of the object these changes apply to."""
        if info.mode is not None:
            self.mode = info.mode & 0o7777
            self.file_type = stat.S_IFMT(info.mode) or stat.S_IFREG
        self.uid, self.gid = info.uid, info.gid
        self.ctime = info.ctime or info.mtime or self.ctime
        self.atime = info.atime
        self.rdev = info.rdev
        self.xattrs = dict(info.xattrs or ())

    def record(self) -> dict[str, Any]:
        return {
            "version": 1, "id": self.id, "path": self.path, "size": self.size,
            "base": _info_to_json(self.base), "base_path": self.base_path, "expect": self.expect,
            "dirty": self.dirty.to_list(), "present": self.present.to_list(),
            "mtime": self.mtime, "mode": self.mode, "created": self.created,
            "content_type": self.content_type, "file_type": self.file_type, "uid": self.uid, "gid": self.gid,
            "ctime": self.ctime, "atime": self.atime, "rdev": self.rdev,
            "xattrs": {name: base64.b64encode(value).decode("ascii") for name, value in self.xattrs.items()},
        }


class StagingArea:
    """The staging directory: creates, persists, reloads and removes staged files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._records_lock = threading.Lock()
        # Directory fsyncs after removals (see remove): whether one is owed, whether one runs.
        self._removals_lock = threading.Lock()
        self._removals_unsynced = False
        self._removals_syncing = False
        self._removals_synced_at = float("-inf")  # time.monotonic() of the last; removal thread only
        # Set by close(): background threads finish their work without their pauses.
        self._closing = False
        # Data files of removed staged files, unlinked by the removal thread (under _removals_lock).
        self._unlinks: list[Path] = []
        # Ids of empty spare data files (see create) and whether the spare thread runs: both
        # under _spares_lock (the spare thread appends, the trio thread takes).
        self._spares_lock = threading.Lock()
        self._umask: int | None = None  # the process's, read once (_needs_chmod)
        self._spares: list[str] = []
        self._filling = False
        # Small files' bodies read by their last commit, for their upload (see take_body):
        # id -> (generation, bytes, MD5 hex), under _bodies_lock (commits add, the trio thread
        # takes, removal drops); _bodies_size bytes in all, at most BODY_CACHE_LIMIT.
        self._bodies_lock = threading.Lock()
        self._bodies: dict[str, tuple[int, bytes, str]] = {}
        self._bodies_size = 0
        # Records written without their fsync (see commit), fsynced by the record sync thread:
        # id -> number of the latest such write of it, the last number given, whether the
        # thread runs, when it last synced; under _record_sync_lock.
        self._record_sync_lock = threading.Lock()
        self._records_unsynced: dict[str, int] = {}
        self._record_writes = 0
        self._records_syncing = False
        self._records_synced_at = float("-inf")  # time.monotonic(); record sync thread only
        # Closes and fsyncs: batched journal writes (see commit); trio thread only. An item is
        # the staged file and whether its record must be durable before the call returns.
        self.commits: GroupCommit[tuple[StagedFile, bool]] = GroupCommit(self.persist_batch)
        # Records of uploaded generations, removed in batches too (see forget); trio thread only.
        self.forgets: GroupCommit[tuple[StagedFile, int]] = GroupCommit(self._forget_batch)
        # Large files being appended to: their disk writes start before the close's fsync.
        self.early_writeback = EarlyWriteback()
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)

    # -- lifecycle ---------------------------------------------------------------

    def create(self, path: str, *, base: ObjectInfo | None, expect: str | None, size: int,
               attributes: ObjectInfo | None = None, configure: Callable[[StagedFile], None] | None = None,
               keep_open: bool = False) -> StagedFile:
        """A new staged file; ``attributes``: the object whose mode, owner and xattrs it keeps;
        ``configure`` sets anything else before the first record is written.

        No record is written here: the first :meth:`persist` (close, fsync, truncate,
        rename) writes it. Until then a crash leaves only an orphan data file.
        ``keep_open``: a writer's handle follows, so the descriptor just made becomes the
        shared one (its first write opens nothing; the last handle's close closes it)."""
        staged_id, fd = self._new_data_file()
        data_path = self.root / f"{staged_id}.data"
        try:
            if size:
                os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        if not keep_open:
            os.close(fd)
        staged = StagedFile(id=staged_id, path=path, data_path=data_path, size=size, base=base,
                            base_path=path if base else None, expect=expect,
                            fd=fd if keep_open else None)
        if base is None:
            staged.present.add(0, size)
        if base is not None:
            staged.mtime = base.mtime or staged.mtime
            if base.content_type and base.content_type.split(";")[0].strip().lower() not in (
                    "application/octet-stream", "binary/octet-stream", ""):
                staged.content_type = base.content_type
        if attributes is not None:
            staged.take_attributes(attributes)
        if configure is not None:
            configure(staged)
        return staged

    def _new_data_file(self) -> tuple[str, int]:
        """An empty data file of mode 0600 and a read-write descriptor on it (trio thread):
        a spare when one is ready, else one created here."""
        spare = self._take_spare()
        if spare is not None:
            try:
                return spare, os.open(self.root / f"{spare}.data", os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                pass  # swept meanwhile (another core's orphan sweep, in tests): make one
        staged_id = secrets.token_hex(12)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(self.root / f"{staged_id}.data", flags, 0o600)
        try:
            if self._needs_chmod():
                os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            raise
        return staged_id, fd

    def _take_spare(self) -> str | None:
        """A spare's id, or None; starts the spare thread when few are left (or none yet)."""
        with self._spares_lock:
            spare = self._spares.pop() if self._spares else None
            refill = len(self._spares) < SPARE_LOW and not self._filling
            if refill:
                self._filling = True
        if refill:
            trio.lowlevel.start_thread_soon(self._make_spares, lambda result: None,
                                            name="gstore staging spares")
        return spare

    def _needs_chmod(self) -> bool:
        """Whether a file made with mode 0600 may have less (a umask that strips owner bits).

        Read once per staging area from /proc (no ``os.umask`` set-and-restore, which would
        race other threads creating files). Under the usual umasks the chmod after each
        create is a journaled inode update for nothing: 2,048 of them per 1,000 small
        files, competing with the record fsyncs for the journal.
        """
        if self._umask is None:
            try:
                with open("/proc/self/status", encoding="ascii") as status:
                    line = next(line for line in status if line.startswith("Umask:"))
                self._umask = int(line.split()[1], 8)
            except (OSError, StopIteration, ValueError, IndexError):
                self._umask = 0o777  # unknown: always chmod
        return bool(self._umask & 0o600)

    def _make_spares(self) -> None:
        """Create a batch of empty data files (spare thread). A failure only means the trio
        thread creates its files itself, where a real problem (ENOSPC) then surfaces."""
        made: list[str] = []
        try:
            for _ in range(SPARE_BATCH):
                staged_id = secrets.token_hex(12)
                path = self.root / f"{staged_id}.data"
                # mknod, not open(O_CREAT): made without a descriptor, so a spare never shows
                # as an open staging file (fails with EEXIST like O_EXCL).
                os.mknod(path, 0o600 | stat.S_IFREG)
                if self._needs_chmod():
                    os.chmod(path, 0o600)
                made.append(staged_id)
        except OSError as exc:
            log.debug("could not make spare staging files in %s: %s", self.root, exc)
        finally:
            with self._spares_lock:
                self._spares.extend(made)
                self._filling = False

    def persist(self, staged: StagedFile, *, sync_data: bool = True) -> None:
        """Make the staged file's data and record durable (see the module docstring).

        Runs in worker threads while the trio thread may remove the same staged file:
        ``_records_lock`` orders the two, and a removed file is never recorded again
        (a record without its data would be reported at every start).
        """
        if self._persist_one(staged, sync_data, defer_sync=False):
            self._sync_dir()

    async def commit(self, staged: StagedFile, *, durable: bool = True) -> bool:
        """:meth:`persist` for a close or an fsync (trio thread): closes at about the same
        moment share one worker-thread call and one directory fsync (:mod:`gstore.write.group_commit`).

        ``durable=False`` (a close): a record carrying the file's bytes is written without
        waiting for its fsync, which the record sync thread does soon after (see the module
        docstring). Returns whether the record is durable now (False: written, fsync pending).
        """
        if durable or not self._commit_here(staged):
            await self.commits.commit((staged, durable))
        if durable:
            return True
        with self._record_sync_lock:
            return staged.id not in self._records_unsynced

    def _commit_here(self, staged: StagedFile) -> bool:
        """The close of a small file, on the trio thread itself; False: use the group commit.

        A record carrying the bytes, written without its fsync, is a few system calls
        on the page cache (the bytes come through the shared descriptor): a trip to a
        worker thread and back cost more than the work, and was most of what closing
        a new small file took (1,000 x 4 KiB, medians as the program saw them in three
        alternating runs: a close 0.86-1.50 ms through the worker, 0.41-0.63 ms here).
        Taken only when no group commit is running (its thread may be writing this
        file's record) and ``_records_lock`` is free at once (a worker holds it
        through a record's fsync, which the trio thread must never wait for).
        """
        if self.commits.busy or staged.unlinked or not staged.carries_bytes:
            return False
        outcome = self._persist_one(staged, True, defer_sync=True, on_trio_thread=True)
        if outcome == "busy":
            return False
        if outcome == "deferred":
            self._sync_records_soon([staged.id])
        return True

    def persist_batch(self, batch: Sequence[tuple[StagedFile, bool]]) -> list[BaseException | None]:
        """:meth:`persist` of several files (worker thread), with one directory fsync for all.

        Returns one error or None per file. A file's record counts as durable only
        after the directory fsync, so a failure of that fails every renamed one. Records
        written with their fsync left to the record sync thread (``durable`` False, bytes
        inline) count as written once renamed; that thread syncs the directory for them."""
        errors: list[BaseException | None] = []
        renamed = []
        deferred = []
        for staged, durable in batch:
            try:
                outcome = self._persist_one(staged, True, defer_sync=not durable)
                if outcome == "deferred":
                    deferred.append(staged.id)
                elif outcome:
                    renamed.append(len(errors))
                errors.append(None)
            except OSError as exc:
                errors.append(exc)
        if deferred:
            self._sync_records_soon(deferred)
        if renamed:
            try:
                self._sync_dir()
            except OSError as exc:
                for index in renamed:
                    errors[index] = exc
        return errors

    def _persist_one(self, staged: StagedFile, sync_data: bool, *, defer_sync: bool,
                     on_trio_thread: bool = False) -> bool | str:
        """Fsync the data (or put it in the record), write and fsync the record, rename it in
        place; True when renamed (the directory still needs its fsync), ``"deferred"`` when
        ``defer_sync`` let a record carrying the bytes skip its fsync (the caller queues it
        for the record sync thread), False when there was nothing to record.

        Worker threads and the trio thread (``on_trio_thread``: a close, see
        :meth:`_commit_here`) may record the same file at once. Each reads the
        generation before the bytes and the fields, and under ``_records_lock`` a
        record of an older generation than the one last written is not written: the
        newer one holds everything it would (an older one renamed last would take
        back writes after a crash). A durable caller then fsyncs that newer record.
        ``on_trio_thread``: only a record that carries the bytes, read through the
        shared descriptor, and ``"busy"`` without doing anything when that is not so
        or when another thread holds ``_records_lock`` (through an fsync maybe)."""
        if staged.unlinked or staged.removed:
            return False
        generation = staged.generation  # read before the record and the bytes (see _keep_body)
        fields = staged.record()
        inline = staged.carries_bytes
        if on_trio_thread and not inline:
            return "busy"
        synced = False
        try:
            if inline:
                # Also without sync_data: such a record never points at bytes not durable.
                if on_trio_thread and staged.fd is not None:
                    data = os.pread(staged.fd, fields["size"], 0).ljust(fields["size"], b"\0")
                else:
                    data = self.read_local(staged, 0, fields["size"])
                fields["inline"] = base64.b64encode(data).decode("ascii")
                self._keep_body(staged, generation, data)
            elif sync_data or staged.recorded_inline:
                # After a record that carried the bytes, the data file's were never fsynced.
                self._sync_data(staged)
                synced = True
        except FileNotFoundError:
            if staged.removed:
                return False
            raise
        record = json.dumps(fields, separators=(",", ":")).encode()
        final = self.root / f"{staged.id}.json"
        if not self._records_lock.acquire(blocking=not on_trio_thread):
            return "busy"
        try:
            if staged.unlinked or staged.removed:
                return False
            if generation < staged.recorded_generation:
                # Another thread recorded a newer generation since this one read the file.
                if not staged.recorded:
                    return False  # and it is uploaded already: its record is gone
                if defer_sync:
                    return "deferred" if staged.recorded_inline else True
                self._sync_record(final)
                return True
            if not inline and not synced and staged.recorded_inline:
                # Rare: another thread wrote a record carrying the bytes since the check above.
                self._sync_data(staged)
            deferred = defer_sync and inline
            fd, temp = self._open_temp_record(staged, on_trio_thread)
            try:
                _write_all(fd, record)
                if not deferred:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
            staged.recorded, staged.recorded_inline = True, inline
            staged.recorded_generation = generation
        finally:
            self._records_lock.release()
        return "deferred" if deferred else True

    def _open_temp_record(self, staged: StagedFile, on_trio_thread: bool) -> tuple[int, Path]:
        """A descriptor on an empty file to write a record into, and its name (renamed over
        the record once written).

        On the trio thread a spare (see :meth:`_new_data_file`), written under its own
        name, not an ``open(O_CREAT)``: creating an inode there took 0.1-0.6 ms, more
        than all the rest of a close, as it waits for the journal behind the record sync
        thread's fsyncs; the spare thread creates them ahead of need. A crash before the
        rename leaves a data file with no record: an orphan, which the next start removes,
        as it removes any spare.

        A spare is opened without ``O_TRUNC`` (it is empty: made by ``mknod`` and never
        written). On ext4 a truncation to size 0 marks the file for its "replace via
        truncate" rule (``auto_da_alloc``): the close then allocates and starts writing
        its blocks at once, 0.04 ms on the trio thread and one disk write per record
        that the record sync thread's fsync would otherwise batch. Measured on 1,000 new
        4 KiB files (``scripts/measure_create.py``, 3 alternating runs): the record's
        ``close`` 0.039 -> 0.002 ms, the close phase 1.73-1.86 -> 1.53-1.64 s."""
        if on_trio_thread:
            spare = self._take_spare()
            if spare is not None:
                temp = self.root / f"{spare}.data"
                fd = _open_spare(temp)
                if fd is not None:
                    return fd, temp
        temp = self.root / f".{staged.id}.{secrets.token_hex(4)}.json.tmp"
        return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), temp

    @staticmethod
    def _sync_record(final: Path) -> None:
        """Fsync a record already in place (its directory entry: the caller's directory fsync)."""
        _fsync_path(final)

    def _sync_records_soon(self, ids: Sequence[str]) -> None:
        """Queue records written without their fsync for the record sync thread (any thread)."""
        with self._record_sync_lock:
            for staged_id in ids:
                self._record_writes += 1
                self._records_unsynced[staged_id] = self._record_writes
            if self._records_syncing:
                return  # the running thread loops once more and covers these
            self._records_syncing = True
        threading.Thread(target=self._sync_records, name="gstore record sync", daemon=True).start()

    def _sync_records(self) -> None:
        """Fsync queued records, then the directory, at most every ``RECORD_SYNC_INTERVAL``.

        A record is fsynced by name: one replaced since (a later commit) is the newer, and
        fsyncing it does no harm; one removed since (uploaded, unlinked) needs nothing. An
        id leaves the queue only after the directory fsync that follows its record's, and
        only if no write of it was queued after this pass took the queue (that one's bytes
        may have missed the fsync), so :meth:`wait_records_synced` and :meth:`commit`'s
        answer mean durable."""
        while True:
            pause = self._records_synced_at + RECORD_SYNC_INTERVAL - time.monotonic()
            if not self._closing:
                time.sleep(max(0.0, pause))
            with self._record_sync_lock:
                taken = dict(self._records_unsynced)
                ids = list(taken)
                if not ids:
                    self._records_syncing = False
                    return
            failed = False
            for staged_id in ids:
                try:
                    fd = os.open(self.root / f"{staged_id}.json", os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    failed = True
                    log.warning("could not open staging record %s to fsync it: %s", staged_id, exc)
                    continue
                try:
                    os.fsync(fd)
                except OSError as exc:
                    failed = True
                    log.warning("could not fsync staging record %s: %s", staged_id, exc)
                finally:
                    os.close(fd)
            try:
                self._sync_dir()
            except OSError as exc:
                failed = True
                log.warning("could not fsync the staging directory %s: %s", self.root, exc)
            self._records_synced_at = time.monotonic()
            if failed:
                continue  # all stay queued: tried again after the pause
            with self._record_sync_lock:
                for staged_id, write in taken.items():
                    if self._records_unsynced.get(staged_id) == write:
                        del self._records_unsynced[staged_id]

    def close(self, timeout: float = 10.0) -> bool:
        """Let the background threads (spares, removals, record syncs) finish what they have,
        without their pauses, and the early writeback thread its current call, and wait for them: a stopped mount leaves its staging
        directory still, so a new start over it (or removing it) races with nothing.
        False (logged) if they took longer than ``timeout``; nothing is lost then: a
        record not fsynced is in the page cache, and the next start removes orphans."""
        self._closing = True
        self.early_writeback.close()
        deadline = time.monotonic() + timeout
        while True:
            busy = self.early_writeback.busy()
            with self._spares_lock:
                busy = busy or self._filling
            with self._removals_lock:
                busy = busy or self._removals_syncing
            with self._record_sync_lock:
                busy = busy or self._records_syncing
            if not busy:
                return True
            if time.monotonic() >= deadline:
                log.warning("staging threads still busy after %gs at stop", timeout)
                return False
            time.sleep(0.005)

    def wait_records_synced(self, timeout: float = 30.0) -> bool:
        """Block until every record written without its fsync has been fsynced (a clean stop,
        tests); False if that took longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            with self._record_sync_lock:
                if not self._records_unsynced:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def _keep_body(self, staged: StagedFile, generation: int, data: bytes) -> None:
        """Keep the bytes a commit read for the file's upload (worker thread).

        ``generation`` was read on this thread before the record and the bytes, while
        the trio thread may write: any write after that read moves the generation on,
        so an upload that captured its generation later never takes bytes of an older
        one. Bytes may be newer than their label (written while the commit read them),
        as with any read of a file being written: the upload is then of a generation
        older than the file's, which is not retired and goes up again.
        """
        md5 = hashlib.md5(data).hexdigest()
        with self._bodies_lock:
            self._drop_body(staged.id)
            # Checked after remove() set it and dropped the body: a removed file keeps none.
            if staged.removed or self._bodies_size + len(data) > BODY_CACHE_LIMIT:
                return
            self._bodies[staged.id] = (generation, data, md5)
            self._bodies_size += len(data)

    def _drop_body(self, staged_id: str) -> tuple[int, bytes, str] | None:
        """Forget a kept body (``_bodies_lock`` held)."""
        kept = self._bodies.pop(staged_id, None)
        if kept is not None:
            self._bodies_size -= len(kept[1])
        return kept

    def take_body(self, staged: StagedFile, generation: int) -> tuple[bytes, str] | None:
        """The bytes and MD5 of ``generation`` of a small file, if its commit kept them
        (trio thread; no system call). None: read them (changed since, or not kept)."""
        with self._bodies_lock:
            kept = self._drop_body(staged.id)
        if kept is None or kept[0] != generation:
            return None
        return kept[1], kept[2]

    @staticmethod
    def _sync_data(staged: StagedFile) -> None:
        _fsync_path(staged.data_path)

    async def forget(self, staged: StagedFile, generation: int) -> None:
        """The backend confirmed ``generation`` of ``staged``: its record is not needed any more.

        Called by the upload before it retires the file (trio thread), so that retiring
        unlinks no record there; uploads ending at about the same moment share one
        worker-thread call (:mod:`gstore.write.group_commit`). The record stays when the
        file changed since (a newer generation needs it) or could not be removed
        (:meth:`remove` tries again). A crash at any point here loses nothing: the backend
        has this generation, and a record left over only uploads the same bytes again.
        """
        await self.forgets.commit((staged, generation))

    def _forget_batch(self, batch: Sequence[tuple[StagedFile, int]]) -> list[BaseException | None]:
        for staged, generation in batch:
            self._forget_one(staged, generation)
        return [None] * len(batch)

    def _forget_one(self, staged: StagedFile, generation: int) -> None:
        """Unlink the record if it is still that of ``generation`` (worker thread).

        ``generation`` is read here while the trio thread may change it: safe because
        the trio thread moves it on *before* it asks for the record of the new
        generation, and that record is written under ``_records_lock`` too: either
        this sees the new generation and keeps the record, or the new record is
        written after this unlink.
        """
        with self._records_lock:
            if staged.removed or not staged.recorded or staged.generation != generation:
                return
            try:
                os.unlink(self.root / f"{staged.id}.json")
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove the staging record of %s (uploaded): %s",
                            staged.path, exc)
                return
            staged.recorded = False

    def remove_record(self, staged: StagedFile) -> None:
        """Forget the journal record only: the bytes stay for handles still open."""
        with self._records_lock:
            staged.unlinked = True
            staged.recorded = False
            try:
                os.unlink(self.root / f"{staged.id}.json")
            except FileNotFoundError:
                pass
        self._sync_dir()

    def remove(self, staged: StagedFile) -> None:
        """Forget a staged file (only after the backend confirmed it, or it was deleted).

        Called on the trio thread (an upload retiring the file, an unlink discarding
        it). A record still on disk is unlinked here, at once: a file deleted by a
        program must not come back after a crash. An uploaded file's record is
        normally gone already (:meth:`forget`), so this costs the trio thread no
        system call but the descriptor's close. The data file, which nothing reads
        any more, is unlinked by the removal thread, which then fsyncs the directory
        once for every removal meanwhile (:meth:`_remove_soon`); a crash before
        that leaves a data file with no record, removed at the next start. A power
        loss before the directory fsync may bring a record back, as an unlink on any
        local file system can before its directory is fsynced: the next start then
        uploads those bytes again (an object already holding them is recognised as
        ours, a changed one is a conflict); nothing is lost.
        """
        self.close_fd(staged)
        with self._records_lock:
            staged.removed = True
            if staged.recorded:
                staged.recorded = False
                try:
                    os.unlink(self.root / f"{staged.id}.json")
                except FileNotFoundError:
                    pass
        with self._bodies_lock:
            self._drop_body(staged.id)  # after ``removed`` is set: no commit keeps one again
        self._remove_soon(staged.data_path)

    def _remove_soon(self, data_path: Path | None = None) -> None:
        """Unlink ``data_path`` (if any) and fsync the directory in the removal thread, which
        takes every removal queued meanwhile in one pass."""
        with self._removals_lock:
            if data_path is not None:
                self._unlinks.append(data_path)
            self._removals_unsynced = True
            if self._removals_syncing:
                return  # the running thread loops once more and covers this one
            self._removals_syncing = True
        trio.lowlevel.start_thread_soon(self._sync_removals, lambda result: None, name="gstore staging sync")

    def _sync_removals(self) -> None:
        while True:
            with self._removals_lock:
                if not self._removals_unsynced:
                    self._removals_syncing = False
                    return
                self._removals_unsynced = False
                unlinks, self._unlinks = self._unlinks, []
            for path in unlinks:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:  # left for the orphan sweep of the next start
                    log.warning("could not remove the staging data file %s: %s", path, exc)
            # Removals queued during this pause are unlinked by the next pass, then synced.
            pause = self._removals_synced_at + REMOVAL_SYNC_INTERVAL - time.monotonic()
            if not self._closing:
                time.sleep(max(0.0, pause))
            try:
                self._sync_dir()
            except OSError as exc:  # the next removal tries again
                log.warning("could not fsync the staging directory %s: %s", self.root, exc)
            self._removals_synced_at = time.monotonic()

    def load(self) -> list[StagedFile]:
        """Staged files left by a previous run (crash, kill, or a drain that timed out)."""
        found: list[StagedFile] = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                entry.unlink(missing_ok=True)
                continue
            if entry.suffix != ".json":
                continue
            try:
                text = entry.read_text()
                if not text:
                    # Renamed in place but its bytes never reached the disk: a power loss in the
                    # window before the record sync thread's fsync (see the module docstring).
                    # Nothing in it to restore or inspect; that close is what the loss took.
                    log.warning("staging record %s is empty: a close lost to a power loss before its "
                                "record reached the disk; removed", entry)
                    entry.unlink(missing_ok=True)
                    continue
                data = json.loads(text)
                staged = StagedFile(
                    id=data["id"], path=data["path"], data_path=self.root / f"{data['id']}.data",
                    size=int(data["size"]), base=_info_from_json(data.get("base"), data["path"]),
                    base_path=data.get("base_path"), expect=data.get("expect"),
                    dirty=Extents(tuple(r) for r in data.get("dirty", [])),
                    present=Extents(tuple(r) for r in data.get("present", [])),
                    mtime=float(data.get("mtime", time.time())), mode=int(data.get("mode", 0o644)),
                    created=float(data.get("created", time.time())),
                    content_type=data.get("content_type"),
                    file_type=int(data.get("file_type", stat.S_IFREG)),
                    uid=data.get("uid"), gid=data.get("gid"),
                    ctime=float(data.get("ctime") or data.get("mtime") or time.time()),
                    atime=data.get("atime"), rdev=int(data.get("rdev") or 0),
                    xattrs={name: base64.b64decode(value) for name, value in (data.get("xattrs") or {}).items()},
                )
                inline = None if data.get("inline") is None else base64.b64decode(data["inline"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("staging record %s is unreadable (%s); left in place for inspection", entry, exc)
                continue
            if inline is not None:
                try:
                    self._restore_inline(staged, inline)
                except OSError as exc:
                    log.error("could not restore the bytes staging record %s carries (%s); left "
                              "in place for inspection", entry, exc)
                    continue
            if not staged.data_path.exists():
                log.error("staging record %s has no data file; left in place for inspection", entry)
                continue
            staged.recorded, staged.recorded_inline = True, inline is not None
            found.append(staged)
        return found

    @staticmethod
    def _restore_inline(staged: StagedFile, payload: bytes) -> None:
        """Make the data file hold the bytes its record carries (at start): they are what was
        promised, whatever a power loss left in the data file. Not fsynced: the record keeps
        them until the upload is confirmed, and a record written later without them fsyncs
        the data file first (``recorded_inline``)."""
        wanted = payload[:staged.size].ljust(staged.size, b"\0")
        fd = os.open(staged.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.pread(fd, staged.size + 1, 0) != wanted:
                os.ftruncate(fd, 0)
                os.pwrite(fd, wanted, 0)
        finally:
            os.close(fd)

    def orphans(self, known: set[str]) -> list[Path]:
        """Data files without a record (a crash between creating and recording them)."""
        return [p for p in self.root.glob("*.data") if p.stem not in known]

    def _sync_dir(self) -> None:
        _fsync_path(self.root, os.O_DIRECTORY)

    # -- data --------------------------------------------------------------------------

    @staticmethod
    def _open_fd(staged: StagedFile) -> int:
        """The staged file's shared descriptor (trio thread only), opened on first use."""
        if staged.fd is None:
            staged.fd = os.open(staged.data_path, os.O_RDWR | os.O_CLOEXEC)
        return staged.fd

    @staticmethod
    def close_fd(staged: StagedFile) -> None:
        """Close the shared descriptor: the last handle closed (it reopens if used again)."""
        fd, staged.fd = staged.fd, None
        if fd is not None:
            os.close(fd)

    @staticmethod
    def write(staged: StagedFile, offset: int, data: bytes) -> int:
        """A program's write (trio thread): one pwrite on the shared descriptor."""
        written = os.pwrite(StagingArea._open_fd(staged), data, offset)
        if written != len(data):
            raise OSError(errno.ENOSPC, "short write to the staging file")
        end = offset + written
        staged.dirty.add(offset, end)
        staged.present.add(offset, end)
        if end > staged.size:
            # Bytes between the old end and this write read as zeros: they are local now.
            staged.present.add(staged.size, offset)
            staged.size = end
        staged.generation += 1
        staged.mtime = staged.ctime = time.time()
        return written

    @staticmethod
    def read_local(staged: StagedFile, offset: int, length: int) -> bytes:
        """Bytes of the staging file; safe in worker threads (a descriptor of its own)."""
        fd = os.open(staged.data_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        return data.ljust(length, b"\0")

    @staticmethod
    def truncate(staged: StagedFile, size: int) -> None:
        fd = os.open(staged.data_path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        old = staged.size
        staged.dirty.truncate(size)
        staged.present.truncate(size)
        if size > old:
            staged.present.add(old, size)  # the extension reads as zeros
            staged.dirty.add(old, size)
        staged.size = size
        staged.generation += 1
        staged.mtime = staged.ctime = time.time()

    @staticmethod
    def fill(staged: StagedFile, offset: int, data: bytes) -> None:
        """Store bytes fetched from the base version (not a change; trio thread)."""
        os.pwrite(StagingArea._open_fd(staged), data, offset)
        staged.present.add(offset, offset + len(data))

    def bytes_on_disk(self) -> int:
        total = 0
        for entry in self.root.glob("*.data"):
            try:
                total += entry.stat().st_blocks * 512
            except OSError:
                pass
        return total
