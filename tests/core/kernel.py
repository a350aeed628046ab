"""A tiny stand-in for the kernel's VFS over the core's FileSystem API.

:class:`Kernel` offers os-like calls (``open``, ``pwrite``, ``close``,
``rename``, ...) and turns each into the requests the Linux VFS would send a
FUSE file system, through the same FileSystem methods the FUSE adapter calls:

* paths are resolved one component at a time with ``lookup``; like the kernel
  it counts the references each reply gives (``nlookup``) and sends
  ``forget(ino, nlookup)`` once nothing holds the inode any more: no dentry,
  no open file, no call in progress;
* with ``dcache=True`` it keeps a dentry cache as the kernel does within the
  entry timeout: a cached path is not looked up again, the kernel asks
  ``getattr`` on the inode number it has (that is how most ``stat``/``open``
  calls reach a FUSE daemon). Its own unlink and rename update the cache
  (``d_delete``/``d_move``), :meth:`Kernel.drop_caches` empties it;
* ``open`` is lookup + ``open``, or ``create`` when the name does not exist
  and ``O_CREAT`` was given (``O_EXCL`` on an existing name fails in the VFS
  with ``EEXIST`` without asking the file system); ``O_TRUNC`` is passed to
  ``open`` (libfuse3 enables atomic_o_trunc);
* ``close`` is ``flush``, then ``release``; like the kernel (fuse_file_put), the
  release is sent *without waiting* for its reply when the driver has a
  nursery: the next call of the program may be served while the release is
  still running in the daemon. :meth:`Kernel.released` waits for them;
* writes on an ``O_APPEND`` descriptor go to the size the kernel knows: the
  driver asks ``getattr`` first, like the kernel using the size of its last
  attribute reply;
* a path call that gets ``ESTALE`` from the file system is retried once from
  the start with fresh lookups, as the VFS does (``LOOKUP_REVAL``);
* the checks the VFS makes before a request reaches the file system are made
  here: reading a write-only descriptor or writing a read-only one is
  ``EBADF``, ``ftruncate`` of a read-only descriptor is ``EINVAL``, an unknown
  descriptor is ``EBADF``.

It also checks one thing the kernel relies on: an inode number the kernel
still holds for a file that was unlinked or replaced (open descriptors keep it)
must not come back in a lookup reply for another file; the kernel would take
the two for one inode. That raises :class:`InodeReuse`.

Errors are ``OSError`` with the errno the program would see.
"""

from __future__ import annotations

import errno
import inspect
import itertools
import os
from dataclasses import dataclass
from typing import Any

import trio

from gstore.vfs.inodes import ROOT_INODE

ACCESS_MODE = os.O_RDONLY | os.O_WRONLY | os.O_RDWR


def _err(code: int, what: str) -> OSError:
    return OSError(code, os.strerror(code), what)


class InodeReuse(AssertionError):
    """The file system handed out an inode number the kernel still holds for another file."""


@dataclass(frozen=True)
class Stat:
    size: int
    is_dir: bool
    ino: int


@dataclass
class OpenFile:
    fd: int
    fh: int
    ino: int
    flags: int
    path: str  # the path it was opened by (for messages only: the file may have moved)

    @property
    def readable(self) -> bool:
        return (self.flags & ACCESS_MODE) in (os.O_RDONLY, os.O_RDWR)

    @property
    def writable(self) -> bool:
        return (self.flags & ACCESS_MODE) in (os.O_WRONLY, os.O_RDWR)

    @property
    def append(self) -> bool:
        return bool(self.flags & os.O_APPEND)


@dataclass(frozen=True)
class Entry:
    """What a lookup (or the dentry cache) resolved a name to."""

    ino: int
    is_dir: bool
    size: int


class _Call:
    """Inodes pinned while one call is in progress; unpinned when it ends."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.pins: list[int] = []

    def pin(self, ino: int) -> None:
        self.kernel._pin(ino)  # noqa: SLF001 - same module
        self.pins.append(ino)

    def __enter__(self) -> _Call:
        return self

    def __exit__(self, *exc: object) -> None:
        for ino in self.pins:
            self.kernel._unpin(ino)  # noqa: SLF001
        self.pins.clear()


class Kernel:
    """os-like calls over one core FileSystem (see the module docstring)."""

    def __init__(self, fs: Any, nursery: trio.Nursery | None = None, *, dcache: bool = False) -> None:
        self.fs = fs
        self.files: dict[int, OpenFile] = {}
        self._fds = itertools.count(3)
        self._nursery = nursery  # where asynchronous releases run (None: close waits for them)
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        #: Errors of releases sent in the background: no program sees them, a test should.
        self.release_errors: list[str] = []
        self.dcache_enabled = dcache
        self.dcache: dict[str, Entry] = {}  # path -> entry; each cached dentry pins its inode
        self._nlookup: dict[int, int] = {}  # references the file system gave us, per inode
        self._pins: dict[int, int] = {}  # what holds each inode (dentries, open files, calls)
        self._orphans: set[int] = set()  # inodes whose name is gone but that open files still hold

    # -- inode references ------------------------------------------------------------------

    def _got(self, ino: int, path: str) -> None:
        """A reply (lookup, create, mkdir, readdirplus) gave one reference to ``ino``."""
        if ino == ROOT_INODE:
            return
        if ino in self._orphans:
            raise InodeReuse(f"{path!r} was given inode {ino}, which the kernel still holds for a file "
                             "that was unlinked or replaced (an open descriptor keeps it): the kernel "
                             "would take the two for one file")
        self._nlookup[ino] = self._nlookup.get(ino, 0) + 1

    def _pin(self, ino: int) -> None:
        if ino != ROOT_INODE:
            self._pins[ino] = self._pins.get(ino, 0) + 1

    def _unpin(self, ino: int) -> None:
        if ino == ROOT_INODE:
            return
        left = self._pins[ino] - 1
        if left:
            self._pins[ino] = left
            return
        del self._pins[ino]
        self._orphans.discard(ino)
        count = self._nlookup.pop(ino, 0)
        if count:
            self.fs.forget(ino, count)

    def _drop_dentry(self, path: str, *, orphan: bool) -> None:
        entry = self.dcache.pop(path, None)
        if entry is None:
            return
        if orphan and any(f.ino == entry.ino for f in self.files.values()):
            self._orphans.add(entry.ino)  # only open files reach it now
        self._unpin(entry.ino)

    def drop_caches(self) -> None:
        """``echo 2 > /proc/sys/vm/drop_caches``: every cached dentry goes; unused inodes are forgotten."""
        for path in sorted(self.dcache, key=len, reverse=True):
            self._drop_dentry(path, orphan=False)

    def held_inodes(self) -> dict[int, int]:
        """inode -> references the kernel holds (not yet forgotten)."""
        return dict(self._nlookup)

    # -- path resolution ----------------------------------------------------------------

    @staticmethod
    def _split(path: str) -> list[str]:
        return [p for p in path.strip("/").split("/") if p]

    async def _resolve(self, call: _Call, parent: int, parent_path: str, name: str) -> Entry:
        """One component: from the dentry cache (then ``getattr``) or by ``lookup``."""
        path = f"{parent_path}/{name}" if parent_path else name
        cached = self.dcache.get(path) if self.dcache_enabled else None
        if cached is not None:
            try:
                inode = await self.fs.getattr(cached.ino)
            except OSError as exc:
                if exc.errno != errno.ESTALE:
                    raise
                self._drop_dentry(path, orphan=False)  # d_invalidate, then a real lookup
            else:
                call.pin(cached.ino)
                return Entry(cached.ino, inode.info.is_dir, inode.info.size)
        inode = await self.fs.lookup(parent, name)
        self._got(inode.ino, path)
        entry = Entry(inode.ino, inode.info.is_dir, inode.info.size)
        call.pin(inode.ino)
        if self.dcache_enabled:
            old = self.dcache.get(path)
            if old is not None and old.ino != inode.ino:
                self._drop_dentry(path, orphan=False)
            if path not in self.dcache:
                self._pin(inode.ino)
            self.dcache[path] = entry
        return entry

    def _remember(self, path: str, ino: int, is_dir: bool, size: int) -> None:
        """A reply that created ``path`` (create, mkdir) instantiates its dentry."""
        if self.dcache_enabled:
            self._drop_dentry(path, orphan=True)
            self._pin(ino)
            self.dcache[path] = Entry(ino, is_dir, size)

    async def _walk_dir(self, call: _Call, parts: list[str]) -> tuple[int, str]:
        ino, path = ROOT_INODE, ""
        for part in parts:
            entry = await self._resolve(call, ino, path, part)
            path = f"{path}/{part}" if path else part
            if not entry.is_dir:
                raise _err(errno.ENOTDIR, path)
            ino = entry.ino
        return ino, path

    async def _parent(self, call: _Call, path: str) -> tuple[int, str, str]:
        """(parent inode, parent path, last name)."""
        parts = self._split(path)
        if not parts:
            raise _err(errno.EBUSY, "/")
        parent, parent_path = await self._walk_dir(call, parts[:-1])
        return parent, parent_path, parts[-1]

    async def _entry(self, call: _Call, path: str) -> Entry:
        parts = self._split(path)
        if not parts:
            root = await self.fs.getattr(ROOT_INODE)
            return Entry(ROOT_INODE, True, root.info.size)
        parent, parent_path, name = await self._parent(call, path)
        return await self._resolve(call, parent, parent_path, name)

    async def _entry_or_none(self, call: _Call, parent: int, parent_path: str, name: str) -> Entry | None:
        try:
            return await self._resolve(call, parent, parent_path, name)
        except FileNotFoundError:
            return None

    def _file(self, fd: int) -> OpenFile:
        f = self.files.get(fd)
        if f is None:
            raise _err(errno.EBADF, f"fd {fd}")
        return f

    @staticmethod
    async def _revalidating(call: Any) -> Any:
        try:
            return await call(False)
        except OSError as exc:
            if exc.errno != errno.ESTALE:
                raise
        return await call(True)

    def _forget_path(self, path: str) -> None:
        """LOOKUP_REVAL: the retry does not trust the dentry cache for this path."""
        parts = self._split(path)
        for i in range(len(parts), 0, -1):
            self._drop_dentry("/".join(parts[:i]), orphan=False)

    # -- files ---------------------------------------------------------------------------------

    async def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        async def attempt(reval: bool) -> int:
            if reval:
                self._forget_path(path)
            with _Call(self) as call:
                parent, parent_path, name = await self._parent(call, path)
                entry = await self._entry_or_none(call, parent, parent_path, name)
                if entry is None:
                    if not flags & os.O_CREAT:
                        raise _err(errno.ENOENT, path)
                    fh, inode = await self.fs.create(parent, name, mode, flags)
                    self._got(inode.ino, path)
                    ino = inode.ino
                    self._remember(path, ino, False, inode.info.size)
                else:
                    if flags & os.O_CREAT and flags & os.O_EXCL:
                        raise _err(errno.EEXIST, path)
                    if entry.is_dir and flags & (os.O_WRONLY | os.O_RDWR):
                        raise _err(errno.EISDIR, path)
                    open_flags = flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)
                    fh, _keep_cache, _direct_io = await self.fs.open(entry.ino, open_flags)
                    ino = entry.ino
                self._pin(ino)  # the open file holds its inode until the release
                fd = next(self._fds)
                self.files[fd] = OpenFile(fd, fh, ino, flags, path)
                return fd

        return await self._revalidating(attempt)

    async def close(self, fd: int) -> None:
        """close(2): FUSE flush (its error is close's), then the release, in the background."""
        f = self._file(fd)
        del self.files[fd]
        try:
            await self.fs.flush(f.fh)
        finally:
            if self._nursery is None:
                await self._release(f)
            else:
                self._in_flight += 1
                if self._idle.is_set():
                    self._idle = trio.Event()
                self._nursery.start_soon(self._background_release, f)
                await trio.lowlevel.checkpoint()  # the daemon picks the request up

    async def _release(self, f: OpenFile) -> None:
        try:
            released = self.fs.release(f.fh)
            if inspect.isawaitable(released):  # async in the current API; was a plain call once
                await released
        finally:
            self._unpin(f.ino)

    async def _background_release(self, f: OpenFile) -> None:
        try:
            await self._release(f)
        except trio.Cancelled:
            raise
        except BaseException as exc:  # noqa: BLE001 - recorded for the test, as the daemon would log it
            self.release_errors.append(f"release of fd {f.fd} ({f.path}): {type(exc).__name__}: {exc}")
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def released(self) -> None:
        """Wait until every release sent so far has been answered."""
        await self._idle.wait()

    async def abandon(self, fd: int) -> None:
        """Forget a descriptor without any request (its process died with the daemon)."""
        self.files.pop(fd, None)

    async def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        f = self._file(fd)
        if not f.writable:
            raise _err(errno.EBADF, f"fd {fd} is not open for writing")
        if f.append:
            # Linux: pwrite on an O_APPEND descriptor appends whatever the offset.
            offset = (await self.fs.getattr(f.ino)).info.size
        return await self.fs.write(f.fh, offset, data)

    async def append(self, fd: int, data: bytes) -> int:
        """write(2) on an ``O_APPEND`` descriptor (or any: the kernel's idea of the size is the end)."""
        f = self._file(fd)
        if not f.writable:
            raise _err(errno.EBADF, f"fd {fd} is not open for writing")
        size = (await self.fs.getattr(f.ino)).info.size
        return await self.fs.write(f.fh, size, data)

    async def pread(self, fd: int, size: int, offset: int) -> bytes:
        f = self._file(fd)
        if not f.readable:
            raise _err(errno.EBADF, f"fd {fd} is not open for reading")
        # As the FUSE adapter (fuse_ops.Operations.read) does: the cache-hit path first, so
        # every core test (the model tests above all) also checks the bytes it answers.
        handle = self.fs.handle_at(f.fh)
        data = handle.read_cached(offset, size) if handle is not None else None
        if data is not None:
            return data
        return await self.fs.read(f.fh, offset, size)

    async def read_all(self, fd: int, chunk: int = 64 * 1024) -> bytes:
        """Read from offset 0 until a short read (like ``cat``)."""
        out = bytearray()
        while True:
            data = await self.pread(fd, chunk, len(out))
            out += data
            if len(data) < chunk:
                return bytes(out)

    async def ftruncate(self, fd: int, size: int) -> None:
        f = self._file(fd)
        if not f.writable:
            raise _err(errno.EINVAL, f"fd {fd} is not open for writing")
        await self.fs.setattr(f.ino, size=size, fh=f.fh)

    async def fsync(self, fd: int) -> None:
        await self.fs.fsync(self._file(fd).fh)

    async def fstat(self, fd: int) -> Stat:
        inode = await self.fs.getattr(self._file(fd).ino)
        return Stat(inode.info.size, inode.info.is_dir, inode.ino)

    # -- paths -----------------------------------------------------------------------------------

    async def stat(self, path: str) -> Stat:
        """lookup (its reply carries the attributes) or the cached dentry, and a getattr; they must agree."""
        async def attempt(reval: bool) -> Stat:
            if reval:
                self._forget_path(path)
            with _Call(self) as call:
                entry = await self._entry(call, path)
                again = await self.fs.getattr(entry.ino)
                if (entry.size, entry.is_dir) != (again.info.size, again.info.is_dir) and not entry.is_dir:
                    raise AssertionError(f"stat {path}: lookup says (size, is_dir) = {(entry.size, entry.is_dir)}, "
                                         f"getattr right after says {(again.info.size, again.info.is_dir)}")
                return Stat(again.info.size, again.info.is_dir, entry.ino)

        return await self._revalidating(attempt)

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except FileNotFoundError:
            return False
        return True

    async def read_file(self, path: str) -> bytes:
        fd = await self.open(path, os.O_RDONLY)
        try:
            return await self.read_all(fd)
        finally:
            await self.close(fd)

    async def write_file(self, path: str, data: bytes, *, fsync: bool = False) -> None:
        fd = await self.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            if data:
                await self.pwrite(fd, data, 0)
            if fsync:
                await self.fsync(fd)
        finally:
            await self.close(fd)

    async def truncate(self, path: str, size: int) -> None:
        async def attempt(reval: bool) -> None:
            if reval:
                self._forget_path(path)
            with _Call(self) as call:
                entry = await self._entry(call, path)
                if entry.is_dir:
                    raise _err(errno.EISDIR, path)
                await self.fs.setattr(entry.ino, size=size)

        await self._revalidating(attempt)

    async def unlink(self, path: str) -> None:
        async def attempt(reval: bool) -> None:
            if reval:
                self._forget_path(path)
            with _Call(self) as call:
                parent, parent_path, name = await self._parent(call, path)
                entry = await self._resolve(call, parent, parent_path, name)  # ENOENT from here, as in the VFS
                if entry.is_dir:
                    raise _err(errno.EISDIR, path)
                await self.fs.unlink(parent, name)
                self._orphan_or_forget(path, entry.ino)

        await self._revalidating(attempt)

    def _orphan_or_forget(self, path: str, ino: int) -> None:
        """``path`` is gone (unlinked, or replaced by a rename): its inode lives on only in open files."""
        if any(f.ino == ino for f in self.files.values()):
            self._orphans.add(ino)
        self._drop_dentry(path, orphan=True)

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        async def attempt(reval: bool) -> None:
            if reval:
                self._forget_path(old)
                self._forget_path(new)
            with _Call(self) as call:
                old_parent, old_parent_path, old_name = await self._parent(call, old)
                source = await self._resolve(call, old_parent, old_parent_path, old_name)
                new_parent, new_parent_path, new_name = await self._parent(call, new)
                target = await self._entry_or_none(call, new_parent, new_parent_path, new_name)
                if target is not None and target.ino == source.ino:
                    return  # the VFS: renaming a file onto itself does nothing
                if target is not None:
                    if source.is_dir and not target.is_dir:
                        raise _err(errno.ENOTDIR, new)
                    if not source.is_dir and target.is_dir:
                        raise _err(errno.EISDIR, new)
                await self.fs.rename(old_parent, old_name, new_parent, new_name, flags)
                if target is not None:
                    self._orphan_or_forget(self._join(new_parent_path, new_name), target.ino)
                self._move_dentries(self._join(old_parent_path, old_name), self._join(new_parent_path, new_name))

        await self._revalidating(attempt)

    @staticmethod
    def _join(parent_path: str, name: str) -> str:
        return f"{parent_path}/{name}" if parent_path else name

    def _move_dentries(self, old: str, new: str) -> None:
        """d_move: the cached dentries of ``old`` (and below it) now name ``new``."""
        moving = {p: e for p, e in self.dcache.items() if p == old or p.startswith(old + "/")}
        for p in moving:
            del self.dcache[p]
        for p, e in moving.items():
            self._drop_dentry(new + p[len(old):], orphan=True)
            self.dcache[new + p[len(old):]] = e

    async def mkdir(self, path: str) -> None:
        async def attempt(reval: bool) -> None:
            if reval:
                self._forget_path(path)
            with _Call(self) as call:
                parent, parent_path, name = await self._parent(call, path)
                if await self._entry_or_none(call, parent, parent_path, name) is not None:
                    raise _err(errno.EEXIST, path)
                inode = await self.fs.mkdir(parent, name)
                self._got(inode.ino, path)
                call.pin(inode.ino)
                self._remember(path, inode.ino, True, 0)

        await self._revalidating(attempt)

    async def rmdir(self, path: str) -> None:
        async def attempt(reval: bool) -> None:
            if reval:
                self._forget_path(path)
            with _Call(self) as call:
                parent, parent_path, name = await self._parent(call, path)
                await self._resolve(call, parent, parent_path, name)
                await self.fs.rmdir(parent, name)
                self._drop_dentry(path, orphan=False)

        await self._revalidating(attempt)

    async def listdir_stat(self, path: str = "") -> dict[str, tuple[bool, int]]:
        """``ls -l``: name -> (is_dir, size) from readdir (entries registered, as readdirplus does)."""
        async def attempt(reval: bool) -> dict[str, tuple[bool, int]]:
            if reval:
                self._forget_path(path)
            with _Call(self) as call:
                ino, dir_path = await self._walk_dir(call, self._split(path))
                fh = await self.fs.opendir(ino)
                try:
                    handle = self.fs.dir_handle(fh)
                    out = {}
                    register = getattr(self.fs, "dir_entry_inode", None)
                    for name, info in handle.entries:
                        out[name] = (info.is_dir, 0 if info.is_dir else info.size)
                        if register is not None:
                            child = register(handle, self._join(dir_path, name), info)
                            self._got(child.ino, self._join(dir_path, name))
                            call.pin(child.ino)
                    return out
                finally:
                    self.fs.releasedir(fh)

        return await self._revalidating(attempt)

    async def listdir(self, path: str = "") -> list[str]:
        return sorted(await self.listdir_stat(path))

    async def close_all(self) -> None:
        for fd in list(self.files):
            await self.close(fd)
        await self.released()
