"""The pyfuse3 adapter: converts types, calls the core, replies. Nothing else.

pyfuse3 handlers may raise only ``FUSEError``: anything else leaves the
request unanswered and ends the main loop. Every handler therefore runs inside
:func:`_errors`, which maps exceptions through the single table in
:mod:`gstore.errors` and logs each failure once with its path.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pyfuse3
import trio

from gstore.backends.base import ObjectInfo
from gstore.backends.resilience import request_scope
from gstore.errors import classify
from gstore.log import redactor
from gstore.vfs.filesystem import FileSystem
from gstore.vfs.attributes import AttributePolicy
from gstore.vfs.inodes import Inode

log = logging.getLogger(__name__)

_QUIET_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST,
                           errno.ENODATA, errno.EROFS, errno.ENAMETOOLONG, errno.EINVAL, errno.ENOTSUP})


# The answer to a getxattr outside user.* (security.*, system.posix_acl_*,
# trusted.*), names gstore never stores. `ls -l` (coreutils) asks every file for
# security.selinux and system.posix_acl_access; ENOTSUP ("this file system has no
# such attributes") makes it stop asking for the rest of the device, where ENODATA
# cost a round trip per file and name. Only ENOSYS would stop the kernel itself,
# and it would take user.md5 and friends with it.
_FOREIGN_XATTR_ERRNO = errno.ENOTSUP

# The last errors reported to programs, for `gstore status` (bounded).
RECENT_ERRORS: deque[dict[str, object]] = deque(maxlen=50)


def _remember_error(what: str, target: object, code: int, exc: BaseException) -> None:
    RECENT_ERRORS.append({
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "op": what, "target": str(target), "errno": errno.errorcode.get(code, str(code)),
        "error": redactor.redact(str(exc))[:500],
    })


@contextmanager
def _errors(what: str, target: object = "") -> Iterator[None]:
    """One FUSE request: its errors become one errno, and its backend reads share one
    ``--request-timeout`` whatever retries happen inside (request_scope)."""
    try:
        with request_scope():
            yield
    except pyfuse3.FUSEError:
        raise
    except (trio.Cancelled, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - the one place errors become errnos
        code, transient = classify(exc)
        if code in _QUIET_ERRNOS and not transient:
            log.debug("%s %s: %s", what, target, exc)
        elif isinstance(exc, OSError):
            log.warning("%s %s: %s (%s)", what, target, exc, errno.errorcode.get(code, code))
            _remember_error(what, target, code, exc)
        else:
            log.exception("%s %s failed unexpectedly", what, target)
            code = errno.EIO
            _remember_error(what, target, code, exc)
        raise pyfuse3.FUSEError(code) from None


class Operations(pyfuse3.Operations):
    """Kernel requests → :class:`FileSystem` calls."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    # No FUSE_POSIX_ACL: the kernel would cache "no ACL" per inode, but every
    # readdirplus reply (each `ls -l`) drops that cache again, so it would still
    # cost a getxattr per file and listing; see _FOREIGN_XATTR_ERRNO instead.
    enable_acl = False

    def __init__(
        self,
        fs: FileSystem,
        *,
        uid: int,
        gid: int,
        umask: int,
        attr_ttl: float,
        entry_ttl: float,
        negative_ttl: float,
        block_size: int,
        xattrs: bool = True,
    ) -> None:
        super().__init__()
        self.fs = fs
        self._policy = AttributePolicy(uid=uid, gid=gid, umask=umask, attr_ttl=attr_ttl, entry_ttl=entry_ttl,
                                       mounted_at=fs.mounted_at)
        self._negative_ttl = negative_ttl
        self._block_size = block_size
        # ENOSYS makes the kernel stop asking for the life of the mount (ls -l asks
        # every file for two security/ACL attributes): the price of turning them off.
        self._xattr_errno = None if xattrs else errno.ENOSYS

    # -- conversions --------------------------------------------------------------

    def _attributes(self, inode: Inode) -> pyfuse3.EntryAttributes:
        found = self._policy.of(inode)
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = found.ino
        attrs.generation = 0
        attrs.entry_timeout = found.entry_timeout
        attrs.attr_timeout = found.attr_timeout
        attrs.st_mode = found.mode
        attrs.st_nlink = found.nlink
        attrs.st_uid, attrs.st_gid = found.uid, found.gid
        attrs.st_size = found.size
        attrs.st_blksize = found.blksize
        attrs.st_blocks = found.blocks
        attrs.st_atime_ns, attrs.st_mtime_ns, attrs.st_ctime_ns = found.atime_ns, found.mtime_ns, found.ctime_ns
        attrs.st_rdev = found.rdev
        return attrs

    @staticmethod
    def _name(raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    # -- lookups and attributes ------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        text = self._name(name)
        try:
            with _errors("lookup", text):
                inode = await self.fs.lookup(parent_inode, text)
        except pyfuse3.FUSEError as exc:
            if exc.errno == errno.ENOENT and self._negative_ttl > 0:
                negative = pyfuse3.EntryAttributes()
                negative.st_ino = 0
                negative.entry_timeout = self._negative_ttl
                return negative
            raise
        return self._attributes(inode)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            try:
                self.fs.forget(ino, count)
            except Exception:  # noqa: BLE001 - forget must never raise
                log.exception("forget of inode %d failed", ino)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        with _errors("getattr", inode):
            return self._attributes(await self.fs.getattr(inode))

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True

    # -- directories ------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        with _errors("opendir", inode):
            return await self.fs.opendir(inode)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        with _errors("readdir", fh):
            for name, inode, next_id in self.fs.readdir(fh, start_id):
                if not pyfuse3.readdir_reply(token, name.encode("utf-8"), self._attributes(inode), next_id):
                    self.fs.readdir_not_taken(inode)
                    return

    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    # -- files ----------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        with _errors("open", inode):
            fh, keep_cache, direct_io = await self.fs.open(inode, flags)
        self._invalidate_stale()
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache, direct_io=direct_io)

    def _invalidate_stale(self) -> None:
        """The kernel forgets cached attributes of inodes the core found changed (attributes
        only: no page lock, so this is safe inside a request; pages go with keep_cache=False)."""
        for ino in self.fs.take_kernel_invalidations():
            try:
                pyfuse3.invalidate_inode(ino, attr_only=True)
            except OSError as exc:  # ENOENT: the kernel no longer knows it
                log.debug("invalidate inode %d: %s", ino, exc)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        # The cache-hit path first: a lookup and a pread, no await (no task switch),
        # no context manager. Anything else, errors included, takes the full path: an
        # unknown fh (None) or a folder's has no read_cached, and read() answers EBADF.
        try:
            data = self.fs.handle_at(fh).read_cached(off, size)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - read() below meets the same error and reports it
            data = None
        if data is not None:
            return data
        with _errors("read", fh):
            return await self.fs.read(fh, off, size)

    async def flush(self, fh: int) -> None:
        with _errors("flush", fh):
            await self.fs.flush(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        with _errors("fsync", fh):
            await self.fs.fsync(fh)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        with _errors("write", fh):
            return await self.fs.write(fh, off, buf)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        text = self._name(name)
        with _errors("create", text):
            fh, inode = await self.fs.create(parent_inode, text, mode, flags, owner=(ctx.uid, ctx.gid))
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=False), self._attributes(inode)

    async def release(self, fh: int) -> None:
        with _errors("release", fh):
            await self.fs.release(fh)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = self._block_size
        data.f_frsize = 4096
        # Object stores have no fixed capacity: report 1 PiB so tools that check
        # free space before writing do not refuse.
        data.f_blocks = data.f_bfree = data.f_bavail = (1 << 50) // data.f_frsize
        data.f_files = data.f_ffree = data.f_favail = 1 << 32
        data.f_namemax = 255
        return data

    # -- namespace changes ---------------------------------------------------------------

    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        with _errors("setattr", inode):
            result = await self.fs.setattr(
                inode,
                size=attr.st_size if fields.update_size else None,
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                atime=attr.st_atime_ns / 1e9 if fields.update_atime else None,
                mtime=attr.st_mtime_ns / 1e9 if fields.update_mtime else None,
                fh=fh,
            )
        return self._attributes(result)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        text = self._name(name)
        with _errors("mkdir", text):
            return self._attributes(await self.fs.mkdir(parent_inode, text, mode, owner=(ctx.uid, ctx.gid)))

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        text = self._name(name)
        with _errors("unlink", text):
            await self.fs.unlink(parent_inode, text)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        text = self._name(name)
        with _errors("rmdir", text):
            await self.fs.rmdir(parent_inode, text)

    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old, new = self._name(name_old), self._name(name_new)
        with _errors("rename", f"{old} -> {new}"):
            await self.fs.rename(parent_inode_old, old, parent_inode_new, new, flags)

    # -- extended attributes (user.md5, user.mimetype, user.etag, user.version_id) ----------

    @staticmethod
    def _xattr_name(raw: bytes) -> str:
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.ENODATA) from None

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if self._xattr_errno:
            raise pyfuse3.FUSEError(self._xattr_errno)
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(_FOREIGN_XATTR_ERRNO)
        text = self._xattr_name(name)
        with _errors("getxattr", text):
            return await self.fs.xattrs.get(self.fs.inode(inode), text)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if self._xattr_errno:
            raise pyfuse3.FUSEError(self._xattr_errno)
        with _errors("listxattr", inode):
            return [name.encode() for name in await self.fs.xattrs.names(self.fs.inode(inode))]

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self._xattr_errno:
            raise pyfuse3.FUSEError(self._xattr_errno)
        text = self._xattr_name(name)
        with _errors("setxattr", text):
            await self.fs.xattrs.set(self.fs.inode(inode), text, value)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self._xattr_errno:
            raise pyfuse3.FUSEError(self._xattr_errno)
        text = self._xattr_name(name)
        with _errors("removexattr", text):
            await self.fs.xattrs.remove(self.fs.inode(inode), text)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        text = self._name(name)
        with _errors("symlink", text):
            inode = await self.fs.symlink(parent_inode, text, target.decode("utf-8", "surrogateescape"),
                                          owner=(ctx.uid, ctx.gid))
        return self._attributes(inode)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        with _errors("readlink", inode):
            return (await self.fs.readlink(inode)).encode("utf-8", "surrogateescape")

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        text = self._name(name)
        with _errors("mknod", text):
            inode = await self.fs.mknod(parent_inode, text, mode, rdev, owner=(ctx.uid, ctx.gid))
        return self._attributes(inode)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        text = self._name(new_name)
        with _errors("link", text):
            return self._attributes(await self.fs.link(inode, new_parent_inode, text))


def mount_options(*, fsname: str, read_only: bool, allow_other: bool, default_permissions: bool) -> set[str]:
    options = {f"fsname={fsname}", "subtype=gstore", "noatime"}
    if read_only:
        options.add("ro")
    if allow_other:
        options.add("allow_other")
    if default_permissions:
        # The kernel checks modes and owners (stored with the objects) like on a local disk.
        options.add("default_permissions")
    return options


__all__ = ["Operations", "mount_options"]
