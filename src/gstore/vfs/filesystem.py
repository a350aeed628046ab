"""The filesystem core: inodes, directories and open files, with no FUSE types.

:mod:`gstore.fuse_ops` converts kernel requests into calls on this class and
its results back into pyfuse3 structures; everything here can be driven from
a plain trio test. Errors are raised as ``OSError`` (with an errno) and turned
into FUSE errors only by the adapter.

Pending writes are an overlay: a path with a staged file is answered from the
staging area (size, mtime, bytes) whatever the backend or the metadata cache
say, so this host sees its writes at once.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import cachetools
import trio

from gstore.backends.base import Backend, ObjectInfo
from gstore.cache.reader import BlockReader, ReadStream
from gstore.errors import StaleObjectError
from gstore.vfs.control import (
    CONTROL_DIR,
    CONTROL_FILES,
    FLUSH_FILE,
    ControlFiles,
    ControlHandle,
    control_path,
    is_control_path,
)
from gstore.vfs.inodes import ROOT_INODE, Inode, InodeTable, parent_path
from gstore.vfs.metadata import ROOT_INFO, MetadataCache
from gstore.vfs.virtual_files import VirtualFiles, VirtualReader
from gstore.vfs.xattrs import Xattrs
from gstore.virtual import VirtualNames, VirtualRef
from gstore.write.staging import EXPECT_ABSENT, StagedFile, StagingArea
from gstore.write.writeback import WriteBack

log = logging.getLogger(__name__)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR
EAGER_FILL_LIMIT = 16 * 1024 * 1024


def _err(code: int, what: str) -> OSError:
    return OSError(code, os.strerror(code), what)


@dataclass(slots=True)
class DirHandle:
    inode: Inode
    # A snapshot taken at opendir: positions in it are stable readdir cookies.
    entries: list[tuple[str, ObjectInfo]] = field(default_factory=list)


@dataclass(slots=True)
class ControlFileHandle:
    inode: Inode
    control: ControlHandle


@dataclass(slots=True)
class VirtualFileHandle:
    inode: Inode
    reader: VirtualReader


@dataclass(slots=True)
class FileHandle:
    inode: Inode
    stream: ReadStream | None
    staged: StagedFile | None = None  # set for handles opened for writing
    writable: bool = False
    identity: str | None = None  # the object version a read handle pinned


class FileSystem:
    """Path-level operations of one mount."""

    def __init__(
        self,
        backend: Backend,
        metadata: MetadataCache,
        reader: BlockReader,
        *,
        attr_ttl: float,
        writeback: WriteBack | None = None,
        staging: StagingArea | None = None,
        reserve_space: Any = None,
        virtual_names: VirtualNames | None = None,
    ) -> None:
        self.backend = backend
        self.metadata = metadata
        self.reader = reader
        self.writeback = writeback
        self.staging = staging
        self.inodes = InodeTable(ROOT_INFO)
        self._attr_ttl = attr_ttl
        self._handles: dict[int, FileHandle | DirHandle | ControlFileHandle | VirtualFileHandle] = {}
        self._next_handle = itertools.count(1)
        self._reserve_space = reserve_space or (lambda nbytes: None)
        self._staged_bytes = 0
        self.control: ControlFiles | None = None
        # MD5s of what this mount uploaded, per (path, ETag): multipart ETags are not
        # MD5s, and the user.md5 xattr should not cost a download to answer.
        self.known_md5: cachetools.LRUCache[tuple[str, str], str] = cachetools.LRUCache(maxsize=100_000)
        self.mounted_at = time.time()
        self.virtual = VirtualFiles(self, virtual_names or VirtualNames(), ttl=attr_ttl)
        self.xattrs = Xattrs(self, ttl=attr_ttl)

    @property
    def read_only(self) -> bool:
        return self.writeback is None

    # -- names and inodes ------------------------------------------------------------

    def inode(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is None:
            raise _err(errno.ESTALE, f"inode {ino}")
        return inode

    @staticmethod
    def child_path(parent: Inode, name: str) -> str:
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise _err(errno.EINVAL, name)
        if is_control_path(parent.path) or (parent.path == "" and name == CONTROL_DIR):
            raise _err(errno.EPERM, f"{CONTROL_DIR} is gstore's control directory")
        if len(name.encode("utf-8", "surrogateescape")) > 255:
            raise _err(errno.ENAMETOOLONG, name)
        return f"{parent.path}/{name}" if parent.path else name

    def is_control(self, inode: Inode) -> bool:
        return self.control is not None and is_control_path(inode.path)

    def virtual_ref(self, inode: Inode) -> VirtualRef | None:
        """What a virtual inode is (None for ordinary files and directories)."""
        return self.virtual.parse(inode.path) if inode.virtual else None

    def _modifiable_path(self, parent: Inode, name: str) -> str:
        """``name`` in ``parent`` for a change: never inside or onto a virtual name."""
        path = self.child_path(parent, name)
        if parent.virtual or self.virtual.is_virtual_name(name):
            raise _err(errno.EROFS, f"{path}: virtual files are read-only")
        return path

    def _remember_virtual(self, path: str, info: ObjectInfo) -> Inode:
        inode = self.inodes.remember(path, info)
        inode.virtual = True
        return inode

    def dir_entry_inode(self, handle: DirHandle, path: str, info: ObjectInfo) -> Inode:
        """Register a readdir entry (with one kernel reference) as the kind of inode it is."""
        if handle.inode.virtual:
            return self._remember_virtual(path, info)
        return self.inodes.remember(path, info)

    def _staged(self, path: str) -> StagedFile | None:
        return self.writeback.get(path) if self.writeback is not None else None

    async def stat_path(self, path: str) -> ObjectInfo:
        staged = self._staged(path)
        if staged is not None:
            return staged.info()
        return await self.metadata.stat(path)

    async def lookup(self, parent_ino: int, name: str) -> Inode:
        """Resolve ``name`` in a directory; adds one kernel reference to the result."""
        parent = self.inode(parent_ino)
        if not parent.info.is_dir:
            raise _err(errno.ENOTDIR, parent.path)
        if name == ".":
            return self.inodes.remember(parent.path, parent.info)
        if name == "..":
            path = parent_path(parent.path)
            known = self.inodes.by_path(path)
            info = known.info if known else await self.metadata.stat(path)
            return self.inodes.remember(path, info)
        if parent.path == "" and name == CONTROL_DIR and self.control is not None:
            return self.inodes.remember(control_path(), ObjectInfo(CONTROL_DIR, True, mtime=self.mounted_at))
        if parent.path == CONTROL_DIR:
            if name not in CONTROL_FILES:
                raise _err(errno.ENOENT, name)
            return self.inodes.remember(control_path(name), ObjectInfo(name, False, mtime=self.mounted_at))
        path = self.child_path(parent, name)
        if parent.virtual or self.virtual.is_virtual_name(name):
            ref = self.virtual.parse(path)
            if ref is not None:
                return self._remember_virtual(path, await self.virtual.stat(ref))
        return self.inodes.remember(path, await self.stat_path(path))

    def forget(self, ino: int, count: int) -> None:
        self.inodes.forget(ino, count)

    async def getattr(self, ino: int) -> Inode:
        inode = self.inode(ino)
        staged = self._staged(inode.path)
        if is_control_path(inode.path):
            pass
        elif inode.virtual:
            if time.monotonic() - inode.info_time >= self._attr_ttl:
                ref = self.virtual.parse(inode.path)
                if ref is not None:
                    self.inodes.refresh(inode, await self.virtual.stat(ref))
        elif staged is not None:
            self.inodes.refresh(inode, staged.info())
        elif ino != ROOT_INODE and time.monotonic() - inode.info_time >= self._attr_ttl:
            await self._refresh(inode)
        return inode

    async def _refresh(self, inode: Inode) -> None:
        try:
            info = await self.metadata.stat(inode.path)
        except FileNotFoundError:
            if inode.open_handles:
                return  # an open file keeps the version it opened
            raise
        if info.is_dir != inode.info.is_dir:
            # The kernel must never see an inode change kind: this number is gone,
            # the path gets a new one at its next lookup.
            self.inodes.detach_path(inode.path)
            raise _err(errno.ENOENT, inode.path)
        self.inodes.refresh(inode, info)

    # -- directories -------------------------------------------------------------------

    async def opendir(self, ino: int) -> int:
        inode = self.inode(ino)
        if not inode.info.is_dir:
            raise _err(errno.ENOTDIR, inode.path)
        ref = self.virtual_ref(inode)
        if inode.path == CONTROL_DIR:
            entries = {name: ObjectInfo(name, False, mtime=self.mounted_at) for name in CONTROL_FILES}
        elif ref is not None:
            entries = await self.virtual.list_dir(ref)
        else:
            entries = dict(await self.list_dir(inode.path))
            self.virtual.hide_shadowed(inode.path, entries)
            if inode.path == "" and self.control is not None:
                entries.pop(CONTROL_DIR, None)
        handle = DirHandle(inode, sorted(entries.items()))
        fh = next(self._next_handle)
        self._handles[fh] = handle
        return fh

    async def list_dir(self, path: str) -> dict[str, ObjectInfo]:
        """The directory's children: the backend listing with pending writes laid over it."""
        listing = await self.metadata.list_dir(path)
        if self.writeback is None or not self.writeback.staged:
            return listing.entries
        entries = dict(listing.entries)
        prefix = f"{path}/" if path else ""
        for staged_path, staged in self.writeback.staged.items():
            if staged_path.startswith(prefix) and "/" not in staged_path[len(prefix):]:
                entries[staged_path[len(prefix):]] = staged.info()
            elif staged_path.startswith(prefix):
                # A pending file deeper down makes its top directory exist here.
                top = staged_path[len(prefix):].split("/", 1)[0]
                entries.setdefault(top, ObjectInfo(name=top, is_dir=True))
        return entries

    def dir_handle(self, fh: int) -> DirHandle:
        handle = self._handles.get(fh)
        if not isinstance(handle, DirHandle):
            raise _err(errno.EBADF, f"directory handle {fh}")
        return handle

    def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # -- opening files -----------------------------------------------------------------------

    def _require_writable(self, what: str) -> WriteBack:
        if self.writeback is None:
            raise _err(errno.EROFS, what)
        return self.writeback

    async def open(self, ino: int, flags: int) -> tuple[int, bool, bool]:
        """Open a file; returns the handle, whether the kernel page cache may be kept, direct_io."""
        inode = self.inode(ino)
        if inode.info.is_dir:
            raise _err(errno.EISDIR, inode.path)
        if is_control_path(inode.path):
            name = inode.path.rsplit("/", 1)[-1]
            if flags & _WRITE_FLAGS and name != FLUSH_FILE:
                raise _err(errno.EACCES, inode.path)
            self.inodes.opened(inode)
            fh = next(self._next_handle)
            self._handles[fh] = ControlFileHandle(inode, ControlHandle(name))
            return fh, False, True
        writing = bool(flags & _WRITE_FLAGS) or bool(flags & os.O_TRUNC)
        if inode.virtual:
            if writing:
                raise _err(errno.EROFS, f"{inode.path}: virtual files are read-only")
            ref = self.virtual.parse(inode.path)
            if ref is None:
                raise _err(errno.ENOENT, inode.path)
            reader = await self.virtual.open(ref)
            if reader.size != inode.info.size:
                info = inode.info
                self.inodes.refresh(inode, ObjectInfo(info.name, False, reader.size, info.mtime, info.etag,
                                                      info.version_id, info.content_type))
            self.inodes.opened(inode)
            fh = next(self._next_handle)
            self._handles[fh] = VirtualFileHandle(inode, reader)
            # No page cache kept across opens: each open resolves the parts again.
            return fh, False, False
        staged = self._staged(inode.path)
        if writing:
            writeback = self._require_writable(inode.path)
            if staged is None:
                truncate = bool(flags & os.O_TRUNC)
                info = await self.metadata.stat(inode.path)
                if not truncate:
                    # The freshest ETag (and VersionId) is what later edits apply to.
                    info = await self.backend.head(inode.path) or info  # type: ignore[attr-defined]
                staged = await self._stage_existing(inode.path, info, truncate=truncate)
                if not truncate and staged.size <= EAGER_FILL_LIMIT:
                    # Small files are copied locally now, while the base version surely
                    # exists: a conflicting remote change later can then never cost the
                    # bytes this mount did not touch.
                    await writeback._fill(staged, 0, staged.size)  # noqa: SLF001 - same layer
            elif flags & os.O_TRUNC:
                await self._truncate_staged(staged, 0)
            staged.writers += 1
            writeback.cancel(staged)
            self.inodes.refresh(inode, staged.info())
            return self._new_file_handle(inode, None, staged, writable=True), False, False
        if staged is not None:
            self.inodes.refresh(inode, staged.info())
            return self._new_file_handle(inode, None, None), False, False
        if time.monotonic() - inode.info_time >= self._attr_ttl:
            await self._refresh(inode)
        info = inode.info
        identity = info.identity
        other_versions_open = any(n and i != identity for i, n in inode.open_identities.items())
        if other_versions_open:
            # Another handle still reads the previous version through the page
            # cache: this one bypasses it, and nobody keeps it afterwards.
            keep_cache, direct_io = False, True
            inode.page_cache_identity = None
        else:
            keep_cache, direct_io = inode.page_cache_identity == identity, False
            inode.page_cache_identity = identity
        inode.open_identities[identity] = inode.open_identities.get(identity, 0) + 1
        fh = self._new_file_handle(inode, self.reader.open_stream(inode.path, info), None)
        self.file_handle(fh).identity = identity
        return fh, keep_cache, direct_io

    def _new_file_handle(self, inode: Inode, stream: ReadStream | None, staged: StagedFile | None,
                         *, writable: bool = False) -> int:
        if staged is not None:
            inode.page_cache_identity = None
        self.inodes.opened(inode)
        fh = next(self._next_handle)
        self._handles[fh] = FileHandle(inode, stream, staged, writable)
        return fh

    async def create(self, parent_ino: int, name: str, mode: int, flags: int) -> tuple[int, Inode]:
        """Create (or, without O_EXCL, truncate) a file and open it for writing."""
        parent = self.inode(parent_ino)
        writeback = self._require_writable(name)
        path = self._modifiable_path(parent, name)
        staged = self._staged(path)
        if staged is not None:
            if flags & os.O_EXCL:
                raise _err(errno.EEXIST, path)
            await self._truncate_staged(staged, 0)
        else:
            try:
                existing = await self.metadata.stat(path)
            except FileNotFoundError:
                existing = None
            if existing is not None:
                if flags & os.O_EXCL:
                    raise _err(errno.EEXIST, path)
                if existing.is_dir:
                    raise _err(errno.EISDIR, path)
                staged = await self._stage_existing(path, existing, truncate=True)
            else:
                staged = await trio.to_thread.run_sync(
                    lambda: self._staging().create(path, base=None, expect=EXPECT_ABSENT, size=0)
                )
                writeback.adopt(staged)
        staged.mode = mode & 0o7777
        staged.writers += 1
        writeback.cancel(staged)
        self.metadata.forget_path(path)
        inode = self.inodes.remember(path, staged.info())
        return self._new_file_handle(inode, None, staged, writable=True), inode

    def _staging(self) -> StagingArea:
        assert self.staging is not None
        return self.staging

    async def _stage_existing(self, path: str, info: ObjectInfo, *, truncate: bool) -> StagedFile:
        staged = await self._create_stage(path, info, truncate=truncate)
        self._account(staged.size)
        return staged

    async def _create_stage(self, path: str, info: ObjectInfo, *, truncate: bool) -> StagedFile:
        """Start local changes to a remote object: nothing is downloaded now."""
        if info.is_dir:
            raise _err(errno.EISDIR, path)
        expect = f"etag:{info.etag}" if info.etag else None
        staging = self._staging()
        if truncate:
            staged = await trio.to_thread.run_sync(lambda: staging.create(path, base=None, expect=expect, size=0))
        else:
            staged = await trio.to_thread.run_sync(
                lambda: staging.create(path, base=info, expect=expect, size=info.size)
            )
        assert self.writeback is not None
        self.writeback.adopt(staged)
        return staged

    def file_handle(self, fh: int) -> FileHandle:
        handle = self._handles.get(fh)
        if not isinstance(handle, FileHandle):
            raise _err(errno.EBADF, f"file handle {fh}")
        return handle

    # -- reading and writing ------------------------------------------------------------------

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        control = self._handles.get(fh)
        if isinstance(control, ControlFileHandle):
            assert self.control is not None
            return await self.control.read(control.control, offset, size)
        if isinstance(control, VirtualFileHandle):
            return await control.reader.read(offset, size)
        handle = self.file_handle(fh)
        staged = handle.staged or self._staged(handle.inode.path)
        if staged is not None:
            return await self.read_staged(staged, offset, size)
        assert handle.stream is not None
        try:
            return await self.reader.read(handle.stream, offset, size)
        except StaleObjectError:
            # The object changed under this handle: the next open must see the new version.
            self.metadata.forget_path(handle.inode.path)
            handle.inode.info_time = 0.0
            raise

    async def read_staged(self, staged: StagedFile, offset: int, size: int) -> bytes:
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
        """Bytes of the version a staged file's edits apply to (zeros beyond its end)."""
        base = staged.base
        if base is None or start >= base.size:
            return bytes(end - start)
        stop = min(end, base.size)
        stream = self.reader.open_stream(staged.base_path or staged.path, base)
        data = await self.reader.read(stream, start, stop - start)
        return data + bytes(end - stop)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        control = self._handles.get(fh)
        if isinstance(control, ControlFileHandle):
            return ControlFiles.write(control.control, data)
        handle = self.file_handle(fh)
        if not handle.writable or handle.staged is None:
            raise _err(errno.EBADF, handle.inode.path)
        staged = handle.staged
        before = staged.size
        written = StagingArea.write(staged, offset, data)
        if staged.size != before:
            self._account(staged.size - before)
        return written

    def _account(self, delta: int) -> None:
        self._staged_bytes = max(0, self._staged_bytes + delta)
        self._reserve_space(self._staged_bytes)

    async def _truncate_staged(self, staged: StagedFile, size: int) -> None:
        before = staged.size
        await trio.to_thread.run_sync(StagingArea.truncate, staged, size)
        self._account(size - before)

    async def flush(self, fh: int) -> None:
        """close(2) of a descriptor: make what was written durable on local disk."""
        handle = self._handles.get(fh)
        if isinstance(handle, FileHandle) and handle.writable and handle.staged is not None:
            await trio.to_thread.run_sync(self._staging().persist, handle.staged)

    async def fsync(self, fh: int) -> None:
        """fsync(2): return only once the backend has the file."""
        if isinstance(self._handles.get(fh), (ControlFileHandle, VirtualFileHandle)):
            return
        handle = self.file_handle(fh)
        staged = handle.staged or self._staged(handle.inode.path)
        if staged is None or self.writeback is None:
            return
        await trio.to_thread.run_sync(self._staging().persist, staged)
        failures = await self.writeback.flush([staged])
        if failures:
            raise _err(errno.EIO, "; ".join(failures))

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, (ControlFileHandle, VirtualFileHandle)):
            self.inodes.closed(handle.inode)
            return
        if not isinstance(handle, FileHandle):
            return
        if handle.identity is not None:
            counts = handle.inode.open_identities
            counts[handle.identity] = counts.get(handle.identity, 1) - 1
            if counts[handle.identity] <= 0:
                del counts[handle.identity]
        self.inodes.closed(handle.inode)
        staged = handle.staged
        if staged is None or not handle.writable or self.writeback is None:
            return
        staged.writers = max(0, staged.writers - 1)
        if staged.writers == 0 and not staged.unlinked:
            if staged.uploaded_generation >= staged.generation:
                self._retire(staged)
            else:
                self.writeback.schedule(staged)

    def _retire(self, staged: StagedFile) -> None:
        assert self.writeback is not None
        if self.writeback.staged.get(staged.path) is staged:
            del self.writeback.staged[staged.path]
        self._staging().remove(staged)
        self._account(-staged.size)

    def uploaded(self, staged: StagedFile, info: ObjectInfo) -> None:
        """Called by the write-back queue once the backend confirmed a staged file."""
        self._account(-staged.size)
        if staged.md5 and info.etag:
            self.known_md5[(staged.path, info.etag)] = staged.md5
        # The object carries the file's time as metadata; the listing will not.
        info = dataclasses.replace(info, mtime=staged.mtime)
        self.metadata.mtimes.set(staged.path, info.etag, staged.mtime)
        self.metadata.forget_path(staged.path)
        self.metadata.remember(staged.path, info)
        inode = self.inodes.by_path(staged.path)
        if inode is not None and info.etag:
            self.inodes.refresh(inode, info)

    # -- attributes -----------------------------------------------------------------------------

    async def setattr(
        self, ino: int, *, size: int | None = None, mode: int | None = None, mtime: float | None = None,
        fh: int | None = None,
    ) -> Inode:
        inode = self.inode(ino)
        if inode.virtual:
            raise _err(errno.EROFS, f"{inode.path}: virtual files are read-only")
        staged = self._staged(inode.path)
        if size is not None:
            writeback = self._require_writable(inode.path)
            if inode.info.is_dir:
                raise _err(errno.EISDIR, inode.path)
            if staged is None:
                info = await self.metadata.stat(inode.path)
                staged = await self._stage_existing(inode.path, info, truncate=size == 0)
            if staged.size != size:
                await self._truncate_staged(staged, size)
            if staged.writers == 0:
                await trio.to_thread.run_sync(self._staging().persist, staged)
                writeback.schedule(staged)
        if staged is not None:
            if mode is not None:
                staged.mode = mode & 0o7777
            if mtime is not None:
                staged.mtime = mtime
            self.inodes.refresh(inode, staged.info())
        elif mtime is not None and not inode.info.is_dir:
            # A remote object nobody is writing: keep the time for this mount's view only
            # (rewriting an object's metadata is a full server-side copy). See docs/semantics.md.
            info = dataclasses.replace(inode.info, mtime=mtime)
            self.metadata.mtimes.set(inode.path, info.etag, mtime)
            self.metadata.remember(inode.path, info)
            self.inodes.refresh(inode, info)
        return inode

    # -- namespace changes ------------------------------------------------------------------------

    async def mkdir(self, parent_ino: int, name: str) -> Inode:
        parent = self.inode(parent_ino)
        self._require_writable(name)
        path = self._modifiable_path(parent, name)
        if await self._exists(path):
            raise _err(errno.EEXIST, path)
        await self.backend.make_dir(path)  # type: ignore[attr-defined]
        self.metadata.forget_path(path)
        info = ObjectInfo(name=name, is_dir=True, mtime=time.time())
        self.metadata.remember(path, info)
        self.metadata.remember_empty_dir(path)  # _exists just saw nothing under it
        return self.inodes.remember(path, info)

    async def _exists(self, path: str) -> bool:
        try:
            await self.stat_path(path)
            return True
        except FileNotFoundError:
            return False

    async def unlink(self, parent_ino: int, name: str) -> None:
        parent = self.inode(parent_ino)
        self._require_writable(name)
        path = self._modifiable_path(parent, name)
        staged = self._staged(path)
        if staged is None:
            info = await self.metadata.stat(path)
            if info.is_dir:
                raise _err(errno.EISDIR, path)
        remote_may_exist = staged is None or staged.expect != EXPECT_ABSENT or staged.uploaded_generation >= 0
        if staged is not None:
            assert self.writeback is not None
            self.writeback.forget(staged)
            await self.writeback.wait_idle(staged)
            self._account(-staged.size)
        if remote_may_exist:
            await self.backend.delete(path)  # type: ignore[attr-defined]
            self.metadata.mtimes.drop(path)
        self.metadata.forget_path(path)
        self.metadata.remember_missing(path)
        self.inodes.detach_path(path)
        await self._keep_directory(parent_path(path))

    async def _keep_directory(self, path: str) -> None:
        """A directory that exists only as a key prefix vanishes with its last key:
        POSIX says it stays until rmdir, so it gets a marker object then."""
        if path == "":
            return
        listing = await self.list_dir(path)
        if listing:
            return
        try:
            await self.backend.stat(path)
        except FileNotFoundError:
            await self.backend.make_dir(path)  # type: ignore[attr-defined]

    async def rmdir(self, parent_ino: int, name: str) -> None:
        parent = self.inode(parent_ino)
        self._require_writable(name)
        path = self._modifiable_path(parent, name)
        info = await self.stat_path(path)
        if not info.is_dir:
            raise _err(errno.ENOTDIR, path)
        self.metadata.forget_path(path)
        if await self.list_dir(path):
            raise _err(errno.ENOTEMPTY, path)
        await self.backend.remove_dir_marker(path)  # type: ignore[attr-defined]
        self.metadata.forget_path(path)
        self.metadata.remember_missing(path)
        self.inodes.detach_path(path)

    async def rename(self, old_parent: int, old_name: str, new_parent: int, new_name: str, flags: int) -> None:
        self._require_writable(old_name)
        old = self._modifiable_path(self.inode(old_parent), old_name)
        new = self._modifiable_path(self.inode(new_parent), new_name)
        if flags & 2:  # RENAME_EXCHANGE: an object store cannot swap two keys atomically
            raise _err(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        source = await self.stat_path(old)
        try:
            target: ObjectInfo | None = await self.stat_path(new)
        except FileNotFoundError:
            target = None
        if old == new:
            return
        if target is not None:
            if flags & 1:  # RENAME_NOREPLACE
                raise _err(errno.EEXIST, new)
            if source.is_dir and not target.is_dir:
                raise _err(errno.ENOTDIR, new)
            if not source.is_dir and target.is_dir:
                raise _err(errno.EISDIR, new)
            if target.is_dir and await self.list_dir(new):
                raise _err(errno.ENOTEMPTY, new)
        if source.is_dir:
            if new.startswith(old + "/"):
                raise _err(errno.EINVAL, f"cannot move {old} into itself")
            await self._rename_dir(old, new)
        else:
            await self._rename_file(old, new, source, target)
        self.metadata.forget_path(old)
        self.metadata.forget_path(new)
        self.metadata.remember_missing(old)
        name = new.rsplit("/", 1)[-1]
        self.metadata.remember(new, ObjectInfo(name, source.is_dir, source.size, source.mtime, source.etag,
                                               None, source.content_type))
        self.inodes.rename_path(old, new)
        if parent_path(old) != parent_path(new):
            await self._keep_directory(parent_path(old))

    async def _rename_file(self, old: str, new: str, source: ObjectInfo, target: ObjectInfo | None) -> None:
        assert self.writeback is not None
        replaced = self._staged(new)
        if replaced is not None:
            self.writeback.forget(replaced)
            await self.writeback.wait_idle(replaced)
            self._account(-replaced.size)
        staged = self._staged(old)
        if staged is None:
            # Server-side copy, then delete: no byte passes through this host.
            await self.backend.copy(old, new, source)  # type: ignore[attr-defined]
            copied = await self.backend.head(new)  # type: ignore[attr-defined]
            if copied is not None and source.mtime:
                self.metadata.mtimes.set(new, copied.etag, source.mtime)
            await self.backend.delete(old)  # type: ignore[attr-defined]
            self.metadata.mtimes.drop(old)
            return
        await self._move_staged(staged, new, target)

    async def _move_staged(self, staged: StagedFile, new: str, target: ObjectInfo | None) -> None:
        """Move a pending file: its bytes become complete locally, then the old key goes."""
        assert self.writeback is not None
        old = staged.path
        self.writeback.cancel(staged)
        await self.writeback.wait_idle(staged)
        if not staged.complete:
            await self.writeback._fill(staged, 0, staged.size)  # noqa: SLF001 - same layer
            staged.base = None
        remote_old = staged.expect != EXPECT_ABSENT or staged.uploaded_generation >= 0
        del self.writeback.staged[old]
        staged.path = new
        staged.base_path = None
        staged.expect = f"etag:{target.etag}" if target is not None and target.etag else (
            EXPECT_ABSENT if target is None else None)
        staged.generation += 1
        self.writeback.adopt(staged)
        await trio.to_thread.run_sync(self._staging().persist, staged)
        if remote_old:
            await self.backend.delete(old)  # type: ignore[attr-defined]
        if staged.writers == 0:
            self.writeback.schedule(staged)

    async def _rename_dir(self, old: str, new: str) -> None:
        """Every key under ``old/`` is copied to ``new/`` and deleted: not atomic (docs/semantics.md)."""
        assert self.writeback is not None
        prefix = old + "/"
        for path, staged in list(self.writeback.staged.items()):
            if path.startswith(prefix):
                await self._move_staged(staged, new + "/" + path[len(prefix):], None)
        objects = await self.backend.walk(old)  # type: ignore[attr-defined]
        if not objects:
            await self.backend.make_dir(new)  # type: ignore[attr-defined]
        for info in objects:
            if info.is_dir:  # a "sub/" marker
                await self.backend.make_dir(f"{new}/{info.name.rstrip('/')}" if info.name.rstrip("/") else new)  # type: ignore[attr-defined]
                continue
            await self.backend.copy(f"{old}/{info.name}", f"{new}/{info.name}", info)  # type: ignore[attr-defined]
        for info in objects:
            key = f"{old}/{info.name.rstrip('/')}" if info.name.rstrip("/") else old
            if info.is_dir:
                await self.backend.remove_dir_marker(key)  # type: ignore[attr-defined]
            else:
                await self.backend.delete(key)  # type: ignore[attr-defined]
        for path in [old, new]:
            self.metadata.forget_tree(path)

    async def flush_paths(self, paths: list[str] | None) -> list[str]:
        """Upload what is pending (everything, or these paths and what is below them) and wait."""
        if self.writeback is None:
            return []
        if paths is None:
            return await self.writeback.flush()
        chosen = [
            staged for staged in self.writeback.pending()
            if any(p == "" or staged.path == p or staged.path.startswith(p + "/") for p in paths)
        ]
        return await self.writeback.flush(chosen)

    async def set_content_type(self, inode: Inode, content_type: str) -> None:
        """user.mimetype: pending files take it at upload, remote objects get it in place."""
        staged = self._staged(inode.path)
        if staged is not None:
            staged.content_type = content_type
            await trio.to_thread.run_sync(self._staging().persist, staged)
            if staged.uploaded_generation < staged.generation:
                return  # the upload still to come carries it
        setter = getattr(self.backend, "set_content_type", None)
        if setter is None:
            raise _err(errno.ENOTSUP, f"{inode.path}: this backend cannot change an object's Content-Type")
        info = await setter(inode.path, content_type)
        self.metadata.remember(inode.path, info)
        self.inodes.refresh(inode, info)

    def open_handle_count(self) -> int:
        return sum(isinstance(h, FileHandle) for h in self._handles.values())
