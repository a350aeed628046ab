"""POSIX metadata calls for the core test driver, and a core over the local S3 endpoint.

:class:`PosixKernel` extends :class:`tests.core.kernel.Kernel` (which it does
not change) with the requests the Linux VFS sends for ``chmod``, ``chown``,
``utimensat``, ``symlink``, ``readlink``, ``mknod``/``mkfifo``, ``link``,
``mkdir`` with a mode and the ``*xattr`` calls, and with ``lstat``/``stat``
that return everything ``stat(2)`` shows (mode, owner, times, rdev), through
the same :class:`gstore.vfs.attributes.AttributePolicy` the FUSE adapter uses.

Symlinks are followed the way the VFS does it: :meth:`PosixKernel.realpath`
resolves each component with ``lookup``; when one is a symlink, its target
(``readlink``) is spliced into the rest of the path (at most 40 times, then
``ELOOP``). ``stat``/``open``-like helpers follow, ``lstat``/``readlink`` do not.

The POSIX attributes live in S3 user metadata: a local-directory backend has
nowhere to keep them, so :func:`open_s3_core` builds the core on a fresh bucket
of the local S3 endpoint (``open_core(..., backend="s3")``: moto on
127.0.0.1), with the rest of the harness (restarts, crashes, drains) unchanged.
"""

from __future__ import annotations

import errno
import inspect
import os
import stat as statmod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from gstore.vfs.attributes import AttributePolicy
from gstore.vfs.inodes import ROOT_INODE

from .conftest import CoreHarness, open_core
from .kernel import Kernel, OpenFile, _Call, _err

#: Symlinks followed in one resolution before ELOOP (Linux: 40).
MAX_SYMLINKS = 40


def make_policy(fs: Any, options: Any) -> AttributePolicy:
    """The attribute policy a mount with ``options`` uses (the adapter builds the same)."""
    offered = dict(uid=options.uid, gid=options.gid, umask=options.umask, attr_ttl=options.attr_ttl,
                   entry_ttl=options.attr_ttl, mounted_at=fs.mounted_at, negative_ttl=options.negative_ttl)
    accepted = inspect.signature(AttributePolicy).parameters
    return AttributePolicy(**{k: v for k, v in offered.items() if k in accepted})


class PosixKernel(Kernel):
    """:class:`Kernel` plus the metadata calls (see the module docstring)."""

    def __init__(self, fs: Any, policy: AttributePolicy, nursery: Any = None, *, dcache: bool = False,
                 caller: tuple[int, int] | None = None) -> None:
        super().__init__(fs, nursery, dcache=dcache)
        self.policy = policy
        #: (uid, gid) of the process making the calls: the kernel sends it with every request,
        #: and a new file, folder, symlink or node belongs to it.
        self.caller = caller if caller is not None else (os.getuid(), os.getgid())

    def _owner_kw(self, method: Any) -> dict[str, Any]:
        """``owner=`` for a FileSystem method that takes the caller's ids (the adapter passes them)."""
        return {"owner": self.caller} if "owner" in inspect.signature(method).parameters else {}

    @classmethod
    def of(cls, h: CoreHarness) -> PosixKernel:
        """A driver over the harness's current core (make a new one after each restart or crash)."""
        return cls(h.fs, make_policy(h.fs, h.options))

    # -- inodes of paths ----------------------------------------------------------------

    async def _inode(self, call: _Call, path: str) -> Any:
        entry = await self._entry(call, path)
        return await self.fs.getattr(entry.ino)

    async def lstat(self, path: str) -> Any:
        """stat(2) without following a final symlink: an ``Attributes`` (mode, uid, gid, times, ...)."""
        with _Call(self) as call:
            return self.policy.of(await self._inode(call, path))

    async def stat_follow(self, path: str) -> Any:
        """stat(2): the attributes of what ``path`` names after following every symlink."""
        return await self.lstat(await self.realpath(path))

    async def lstat_or_none(self, path: str) -> Any:
        try:
            return await self.lstat(path)
        except FileNotFoundError:
            return None

    async def fstat_attrs(self, fd: int) -> Any:
        return self.policy.of(await self.fs.getattr(self._file(fd).ino))

    async def listdir_attrs(self, path: str = "") -> dict[str, Any]:
        """``ls -l``: name -> Attributes of the inode readdir registered (what readdirplus replies);
        with a dentry cache, the entries are cached as readdirplus makes the kernel do."""
        with _Call(self) as call:
            ino, dir_path = await self._walk_dir(call, self._split(path))
            fh = await self.fs.opendir(ino)
            try:
                handle = self.fs.dir_handle(fh)
                out = {}
                for name, info in handle.entries:
                    child_path = self._join(dir_path, name)
                    child = self.fs.dir_entry_inode(handle, child_path, info)
                    self._got(child.ino, child_path)
                    call.pin(child.ino)
                    # readdirplus instantiates the dentry, valid for the entry timeout
                    self._remember(child_path, child.ino, child.info.is_dir, child.info.size)
                    out[name] = self.policy.of(child)
                return out
            finally:
                self.fs.releasedir(fh)

    # -- following symlinks --------------------------------------------------------------

    async def realpath(self, path: str, *, follow_last: bool = True) -> str:
        """``path`` with every symlink resolved (relative targets from their folder, absolute
        ones from the mount root); ``ELOOP`` after :data:`MAX_SYMLINKS` links."""
        pending = self._split(path)
        done: list[str] = []
        followed = 0
        while pending:
            name = pending.pop(0)
            if name == ".":
                continue
            if name == "..":
                if done:
                    done.pop()
                continue
            candidate = "/".join([*done, name])
            last = not pending
            attrs = await self.lstat(candidate)
            if statmod.S_ISLNK(attrs.mode) and (follow_last or not last):
                followed += 1
                if followed > MAX_SYMLINKS:
                    raise _err(errno.ELOOP, path)
                target = await self.readlink(candidate)
                if target.startswith("/"):
                    done = []
                pending = self._split(target) + pending
                continue
            done.append(name)
        return "/".join(done)

    # -- attribute changes ---------------------------------------------------------------

    async def _setattr(self, path: str, *, follow: bool = True, **changes: Any) -> Any:
        real = await self.realpath(path) if follow else path
        with _Call(self) as call:
            entry = await self._entry(call, real)
            inode = await self.fs.setattr(entry.ino, **changes)
            return self.policy.of(inode)

    async def chmod(self, path: str, mode: int) -> Any:
        """chmod(2): the kernel sends the permission bits with the file type bits of the inode."""
        current = await self.stat_follow(path)
        return await self._setattr(path, mode=statmod.S_IFMT(current.mode) | (mode & 0o7777))

    async def chown(self, path: str, uid: int | None, gid: int | None, *, follow: bool = True) -> Any:
        """chown(2) (``follow=False``: lchown); None (-1) leaves that id as it is."""
        return await self._setattr(path, follow=follow, uid=uid, gid=gid)

    async def utime(self, path: str, *, atime: float | None = None, mtime: float | None = None) -> Any:
        """utimensat(2) with explicit times (None: UTIME_OMIT for that one)."""
        return await self._setattr(path, atime=atime, mtime=mtime)

    async def fchmod(self, fd: int, mode: int) -> Any:
        f = self._file(fd)
        current = self.policy.of(await self.fs.getattr(f.ino))
        inode = await self.fs.setattr(f.ino, mode=statmod.S_IFMT(current.mode) | (mode & 0o7777), fh=f.fh)
        return self.policy.of(inode)

    # -- names of other kinds ---------------------------------------------------------------

    async def _new_name(self, path: str, make: Any) -> Any:
        """The VFS part of mkdir/symlink/mknod: EEXIST before asking; the reply's inode is referenced."""
        with _Call(self) as call:
            parent, parent_path, name = await self._parent(call, path)
            if await self._entry_or_none(call, parent, parent_path, name) is not None:
                raise _err(errno.EEXIST, path)
            inode = await make(parent, name)
            self._got(inode.ino, path)
            call.pin(inode.ino)
            self._remember(path, inode.ino, inode.info.is_dir, inode.info.size)
            return self.policy.of(inode)

    async def mkdir_mode(self, path: str, mode: int = 0o777) -> Any:
        kw = self._owner_kw(self.fs.mkdir)
        return await self._new_name(path, lambda parent, name: self.fs.mkdir(parent, name, mode, **kw))

    async def symlink(self, target: str, path: str) -> Any:
        kw = self._owner_kw(self.fs.symlink)
        return await self._new_name(path, lambda parent, name: self.fs.symlink(parent, name, target, **kw))

    async def mknod(self, path: str, mode: int, rdev: int = 0) -> Any:
        kw = self._owner_kw(self.fs.mknod)
        return await self._new_name(path, lambda parent, name: self.fs.mknod(parent, name, mode, rdev, **kw))

    async def mkfifo(self, path: str, mode: int = 0o644) -> Any:
        return await self.mknod(path, statmod.S_IFIFO | mode)

    async def readlink(self, path: str) -> str:
        with _Call(self) as call:
            entry = await self._entry(call, path)
            target = await self.fs.readlink(entry.ino)
            return target.decode() if isinstance(target, bytes) else target

    async def link(self, source: str, path: str) -> Any:
        """link(2): the file system is asked (inode, new parent, new name)."""
        with _Call(self) as call:
            entry = await self._entry(call, source)
            parent, _parent_path, name = await self._parent(call, path)
            inode = await self.fs.link(entry.ino, parent, name)
            return self.policy.of(inode)

    async def create_fd(self, path: str, mode: int = 0o644, flags: int = os.O_WRONLY) -> int:
        """open(path, flags | O_CREAT | O_EXCL, mode) of a new name, with the caller's ids."""
        with _Call(self) as call:
            parent, parent_path, name = await self._parent(call, path)
            if await self._entry_or_none(call, parent, parent_path, name) is not None:
                raise _err(errno.EEXIST, path)
            flags |= os.O_CREAT | os.O_EXCL
            fh, inode = await self.fs.create(parent, name, mode, flags, **self._owner_kw(self.fs.create))
            self._got(inode.ino, path)
            self._remember(path, inode.ino, False, inode.info.size)
            self._pin(inode.ino)  # the open file holds its inode until the release
            fd = next(self._fds)
            self.files[fd] = OpenFile(fd, fh, inode.ino, flags, path)
            return fd

    async def create(self, path: str, mode: int = 0o644, data: bytes = b"") -> Any:
        """open(O_CREAT|O_EXCL|O_WRONLY, mode), write ``data``, close; the attributes after close."""
        fd = await self.create_fd(path, mode)
        try:
            if data:
                await self.pwrite(fd, data, 0)
        finally:
            await self.close(fd)
        return await self.lstat(path)

    # -- extended attributes -------------------------------------------------------------------

    async def _xattr_inode(self, call: _Call, path: str) -> Any:
        return await self._inode(call, await self.realpath(path))

    async def getxattr(self, path: str, name: str) -> bytes:
        with _Call(self) as call:
            return await self.fs.xattrs.get(await self._xattr_inode(call, path), name)

    async def setxattr(self, path: str, name: str, value: bytes) -> None:
        with _Call(self) as call:
            await self.fs.xattrs.set(await self._xattr_inode(call, path), name, value)

    async def listxattr(self, path: str) -> list[str]:
        with _Call(self) as call:
            return list(await self.fs.xattrs.names(await self._xattr_inode(call, path)))

    async def removexattr(self, path: str, name: str) -> None:
        with _Call(self) as call:
            await self.fs.xattrs.remove(await self._xattr_inode(call, path), name)

    async def root_attrs(self) -> Any:
        return self.policy.of(await self.fs.getattr(ROOT_INODE))


# --------------------------------------------------------------------------- a core over S3


@asynccontextmanager
async def open_s3_core(tmp_path: Path, **options: Any) -> AsyncIterator[CoreHarness]:
    """:func:`open_core` on a fresh bucket of the local S3 endpoint (``backend="s3"``)."""
    async with open_core(tmp_path, backend="s3", **options) as h:
        yield h


def put_object(h: CoreHarness, key: str, data: bytes, **metadata: str) -> None:
    """An object written by another tool, with this user metadata (x-amz-meta-NAME)."""
    assert h.bucket is not None
    h.bucket.client.put_object(Bucket=h.bucket.name, Key=key, Body=data, Metadata=dict(metadata))


def head_metadata(h: CoreHarness, key: str) -> dict[str, str]:
    """The object's user metadata as S3 stores it (names lower-case, without x-amz-meta-)."""
    assert h.bucket is not None
    return h.bucket.client.head_object(Bucket=h.bucket.name, Key=key)["Metadata"]


def get_object(h: CoreHarness, key: str) -> bytes:
    assert h.bucket is not None
    return h.bucket.client.get_object(Bucket=h.bucket.name, Key=key)["Body"].read()


__all__ = ["MAX_SYMLINKS", "PosixKernel", "get_object", "head_metadata", "make_policy", "open_s3_core",
           "put_object"]
