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
itself was fsynced. So after a kill -9 or a power loss, everything a program
had closed or fsynced is found again at the next start and uploaded; nothing is
deleted before the backend confirmed the upload. A file created and never
closed has no record yet (nothing was promised for it): its data file is an
orphan the next start removes. Creating a staged file is therefore one
``open(O_CREAT)`` and no fsync, cheap enough for the trio thread. Closes and
fsyncs go through :meth:`StagingArea.commit`: those arriving while a commit runs
are written together by one worker-thread call with one directory fsync
(:mod:`gstore.write.group_commit`); each returns once its own record is durable.

The data file's descriptor stays open while the staged file is in use
(``StagedFile.fd``, opened at the first write or local read, closed by
:meth:`StagingArea.close_fd` when the last handle closes, or at removal): a
``write(2)`` through the mount is one ``pwrite``, with no open and close around it.
Only the trio thread uses that descriptor. Work done in worker threads (fsync,
reads for uploads, truncate) opens its own, so closing the shared one can never
pull it from under a thread, nor hand a reused descriptor number to a pread of
another file.
"""

from __future__ import annotations

import base64
import errno
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
from gstore.write.extents import Extents
from gstore.write.group_commit import GroupCommit

log = logging.getLogger(__name__)

EXPECT_ABSENT = "absent"


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
    upload_started: bool = False  # an upload was sent at least once: an object may exist
    persisted_generation: int = -1  # the generation whose data and record are on disk
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
        # Closes and fsyncs: batched journal writes (see commit); trio thread only.
        self.commits: GroupCommit[StagedFile] = GroupCommit(self.persist_batch)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)

    # -- lifecycle ---------------------------------------------------------------

    def create(self, path: str, *, base: ObjectInfo | None, expect: str | None, size: int,
               attributes: ObjectInfo | None = None, configure: Callable[[StagedFile], None] | None = None,
               ) -> StagedFile:
        """A new staged file; ``attributes``: the object whose mode, owner and xattrs it keeps;
        ``configure`` sets anything else before the first record is written.

        No record is written here: the first :meth:`persist` (close, fsync, truncate,
        rename) writes it. Until then a crash leaves only an orphan data file."""
        staged_id = secrets.token_hex(12)
        data_path = self.root / f"{staged_id}.data"
        fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            if size:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)
        staged = StagedFile(id=staged_id, path=path, data_path=data_path, size=size, base=base,
                            base_path=path if base else None, expect=expect)
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

    def persist(self, staged: StagedFile, *, sync_data: bool = True) -> None:
        """Make the staged file's data and record durable (see the module docstring).

        Runs in worker threads while the trio thread may remove the same staged file:
        ``_records_lock`` orders the two, and a removed file is never recorded again
        (a record without its data would be reported at every start).
        """
        if self._persist_one(staged, sync_data):
            self._sync_dir()

    async def commit(self, staged: StagedFile) -> None:
        """:meth:`persist` for a close or an fsync (trio thread): closes at about the same
        moment share one worker-thread call and one directory fsync (:mod:`gstore.write.group_commit`)."""
        await self.commits.commit(staged)

    def persist_batch(self, batch: Sequence[StagedFile]) -> list[BaseException | None]:
        """:meth:`persist` of several files (worker thread), with one directory fsync for all.

        Returns one error or None per file. A file's record counts as durable only
        after the directory fsync, so a failure of that fails every renamed one."""
        errors: list[BaseException | None] = []
        renamed = []
        for staged in batch:
            try:
                if self._persist_one(staged, True):
                    renamed.append(len(errors))
                errors.append(None)
            except OSError as exc:
                errors.append(exc)
        if renamed:
            try:
                self._sync_dir()
            except OSError as exc:
                for index in renamed:
                    errors[index] = exc
        return errors

    def _persist_one(self, staged: StagedFile, sync_data: bool) -> bool:
        """Fsync the data, write and fsync the record, rename it in place; True when renamed
        (the directory still needs its fsync)."""
        if staged.unlinked or staged.removed:
            return False
        if sync_data:
            try:
                fd = os.open(staged.data_path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if staged.removed:
                    return False
                raise
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        record = json.dumps(staged.record(), separators=(",", ":")).encode()
        final = self.root / f"{staged.id}.json"
        temp = self.root / f".{staged.id}.{secrets.token_hex(4)}.json.tmp"
        with self._records_lock:
            if staged.unlinked or staged.removed:
                return False
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, record)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
        return True

    def remove_record(self, staged: StagedFile) -> None:
        """Forget the journal record only: the bytes stay for handles still open."""
        with self._records_lock:
            staged.unlinked = True
            try:
                os.unlink(self.root / f"{staged.id}.json")
            except FileNotFoundError:
                pass
        self._sync_dir()

    def remove(self, staged: StagedFile) -> None:
        """Forget a staged file (only after the backend confirmed it, or it was deleted).

        Called on the trio thread as the last step of an upload: the unlinks happen
        here, the directory fsync that makes them durable runs in a worker thread,
        shared by every removal meanwhile (:meth:`_sync_removals_soon`). A power loss
        before it may bring a record back, as an unlink on any local file system can
        before its directory is fsynced: the next start then uploads those bytes again
        (an object already holding them is recognised as ours, a changed one is a
        conflict); nothing is lost.
        """
        self.close_fd(staged)
        with self._records_lock:
            staged.removed = True
            for path in (self.root / f"{staged.id}.json", staged.data_path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        self._sync_removals_soon()

    def _sync_removals_soon(self) -> None:
        """Fsync the directory in a worker thread, once for every removal made meanwhile."""
        with self._removals_lock:
            self._removals_unsynced = True
            if self._removals_syncing:
                return  # the running sync loops once more and covers this one
            self._removals_syncing = True
        trio.lowlevel.start_thread_soon(self._sync_removals, lambda result: None, name="gstore staging sync")

    def _sync_removals(self) -> None:
        while True:
            with self._removals_lock:
                if not self._removals_unsynced:
                    self._removals_syncing = False
                    return
                self._removals_unsynced = False
            try:
                self._sync_dir()
            except OSError as exc:  # the next removal tries again
                log.warning("could not fsync the staging directory %s: %s", self.root, exc)

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
                data = json.loads(entry.read_text())
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
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("staging record %s is unreadable (%s); left in place for inspection", entry, exc)
                continue
            if not staged.data_path.exists():
                log.error("staging record %s has no data file; left in place for inspection", entry)
                continue
            found.append(staged)
        return found

    def orphans(self, known: set[str]) -> list[Path]:
        """Data files without a record (a crash between creating and recording them)."""
        return [p for p in self.root.glob("*.data") if p.stem not in known]

    def _sync_dir(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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
