"""Extended attributes: ``user.md5``, ``user.mimetype``, ``user.etag``, ``user.version_id``.

They give shell tools (``getfattr``, ``os.getxattr``) what a storage library
gives Python code, at the lowest price the backend allows:

* ``user.md5`` is free when the ETag is an MD5 (a single-part upload) or this
  mount uploaded the object; otherwise the object is streamed through the
  block cache once and the digest remembered for that version, so the second
  ask costs nothing. A pending file answers the MD5 of its local bytes.
* ``user.mimetype`` is the object's Content-Type when it says something
  (a HEAD, remembered for the attribute TTL), else a guess from the name.
* Setting ``user.mimetype`` rewrites the object's Content-Type in place
  (a server-side copy onto itself); pending files take it at upload.

Only ``user.*`` names ever reach the backend: ``ls -l`` asks every file for
``security.selinux`` and ``system.posix_acl_access``, and those must stay free.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
import hashlib
import logging
import os
import re
from typing import TYPE_CHECKING

import cachetools
import trio

from gstore.backends.base import ObjectInfo
from gstore.virtual import ConcatManifestRef, ConcatRef, DiffRef, VersionRef, guess_mimetype, md5_from_etag
from gstore.virtual import resolve_manifest
from gstore.virtual.names import MANIFEST_MAX_BYTES
from gstore.vfs.control import is_control_path
from gstore.write.staging import StagedFile
from gstore.vfs.inodes import Inode
from gstore.virtual import VirtualRef

if TYPE_CHECKING:
    from gstore.vfs.content import MountContent
    from gstore.vfs.virtual_files import VirtualFiles

log = logging.getLogger(__name__)

MD5 = "user.md5"
MIMETYPE = "user.mimetype"
ETAG = "user.etag"
VERSION_ID = "user.version_id"
KNOWN = (MD5, MIMETYPE, ETAG, VERSION_ID)

_HASH_CHUNK = 8 * 1024 * 1024
_MIMETYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*(\s*;[ -~]*)?")


def _err(code: int, what: str) -> OSError:
    return OSError(code, os.strerror(code), what)


class Xattrs:
    """Attribute requests of one mount, answered from metadata, the cache or a stream."""

    def __init__(self, content: MountContent, virtual: VirtualFiles, *, ttl: float,
                 store: Callable[[Inode, str, bytes | None], Awaitable[None]] | None = None) -> None:
        self._content = content
        self._virtual = virtual
        # Sets (bytes) or removes (None) a stored user.* attribute: the namespace layer
        # does it, under the path's lock, through the pending-files owner.
        self._store = store
        self._details: cachetools.TTLCache[tuple[str, str], ObjectInfo] = cachetools.TTLCache(
            maxsize=10_000, ttl=max(ttl, 0.001))
        self._hashing: dict[tuple[str, str], trio.Event] = {}
        self.md5_computed = 0  # objects hashed by streaming (for status and tests)

    def _virtual_ref(self, inode: Inode) -> VirtualRef | None:
        return self._virtual.parse(inode.path) if inode.virtual else None

    # -- the four requests ---------------------------------------------------------------

    async def names(self, inode: Inode) -> list[str]:
        if is_control_path(inode.path):
            return []
        if inode.info.is_dir:
            return list(await self._stored(inode))
        names = [MD5, MIMETYPE]
        info = await self._current(inode)
        if info is None:  # pending or virtual
            return names + [n for n in await self._stored(inode) if n not in KNOWN]
        if info.etag:
            names.append(ETAG)
        if (info.version_id and info.version_id != "null") or await self._has_version_id(inode, info):
            names.append(VERSION_ID)
        return names + [n for n in await self._stored(inode) if n not in KNOWN]

    async def _stored(self, inode: Inode) -> dict[str, bytes]:
        """The user.* attributes kept with the file (not the computed ones)."""
        if is_control_path(inode.path) or self._virtual_ref(inode) is not None:
            return {}
        if inode.info.is_dir:
            return dict(inode.info.xattrs or ())
        staged = inode.staged if inode.unlinked else self._content.staged(inode.path)
        if isinstance(staged, StagedFile):
            return dict(staged.xattrs)
        info = inode.info
        if not info.detailed:
            try:
                info = await self._head(inode.path, info)
            except FileNotFoundError:
                return {}
        return dict(info.xattrs or ())

    async def get(self, inode: Inode, name: str) -> bytes:
        if name.startswith("user.") and (name not in KNOWN or inode.info.is_dir):
            stored = await self._stored(inode)
            if name not in stored:
                raise _err(errno.ENODATA, name)
            return stored[name]
        if not name.startswith("user.") or name not in KNOWN or inode.info.is_dir or is_control_path(inode.path):
            raise _err(errno.ENODATA, name)
        if name == MD5:
            return (await self.md5(inode)).encode()
        if name == MIMETYPE:
            return (await self.mimetype(inode)).encode()
        info = await self._current(inode)
        if info is None:
            raise _err(errno.ENODATA, name)
        if name == ETAG:
            if not info.etag:
                raise _err(errno.ENODATA, name)
            return info.etag.encode()
        version_id = info.version_id
        if not version_id and self._virtual_ref(inode) is None:
            version_id = (await self._head(inode.path, info)).version_id
        if not version_id or version_id == "null":
            raise _err(errno.ENODATA, name)
        return version_id.encode()

    async def set(self, inode: Inode, name: str, value: bytes) -> None:
        if name != MIMETYPE or inode.info.is_dir:
            await self._set_stored(inode, name, value)
            return
        if inode.info.is_dir or is_control_path(inode.path):
            raise _err(errno.ENOTSUP, inode.path)
        if self._virtual_ref(inode) is not None or self._content.read_only:
            raise _err(errno.EROFS, inode.path)
        try:
            content_type = value.decode("ascii").strip()
        except UnicodeDecodeError:
            raise _err(errno.EINVAL, f"{MIMETYPE} must be ASCII, like text/plain") from None
        if len(content_type) > 255 or not _MIMETYPE_RE.fullmatch(content_type):
            raise _err(errno.EINVAL, f"{MIMETYPE}: {content_type!r} is not a MIME type like text/plain")
        await self._content.set_content_type(inode.path, content_type)
        self.forget(inode.path)

    async def remove(self, inode: Inode, name: str) -> None:
        if name in KNOWN and not inode.info.is_dir:
            raise _err(errno.ENOTSUP, f"{name} is computed by gstore and cannot be removed")
        if not name.startswith("user."):
            raise _err(errno.ENODATA, name)
        await self._set_stored(inode, name, None)

    async def _set_stored(self, inode: Inode, name: str, value: bytes | None) -> None:
        """setxattr/removexattr of a user.* name kept with the object."""
        if not name.startswith("user.") or (name in KNOWN and not inode.info.is_dir):
            # system.*, security.*, trusted.*: nothing an object store could keep (cp -a ignores this).
            raise _err(errno.ENOTSUP, f"{name}: only user.* attributes are kept")
        if is_control_path(inode.path) or self._store is None:
            raise _err(errno.ENOTSUP, f"{inode.path}: no extended attributes here")
        if self._virtual_ref(inode) is not None or self._content.read_only:
            raise _err(errno.EROFS, inode.path)
        if len(name.encode()) > 255:
            raise _err(errno.ERANGE, name)
        await self._store(inode, name, value)
        self.forget(inode.path)

    def forget(self, path: str) -> None:
        for key in [k for k in self._details if k[0] == path]:
            self._details.pop(key, None)

    # -- values ----------------------------------------------------------------------------

    async def md5(self, inode: Inode) -> str:
        ref = self._virtual_ref(inode)
        if ref is not None:
            if isinstance(ref, VersionRef):
                source = await self._virtual.source(ref.path)
                return await self._remote_md5(source.read_path, source.info)
            reader = await self._virtual.open(ref)
            return await self._hash(reader.read, reader.size)
        staged = self._content.staged(inode.path)
        if staged is not None:
            if staged.md5 and staged.uploaded_generation >= staged.generation:
                return staged.md5
            return await self._hash(lambda o, n: self._content.read_staged(staged, o, n), staged.size)
        info = await self._content.metadata.stat(inode.path)
        return await self._remote_md5(inode.path, info)

    async def _remote_md5(self, path: str, info: ObjectInfo) -> str:
        from_etag = md5_from_etag(info.etag)
        if from_etag is not None:
            return from_etag
        key = (path, info.etag or info.identity)
        while True:
            known = self._content.known_md5.get(key)
            if known is not None:
                return known
            running = self._hashing.get(key)
            if running is None:
                break
            await running.wait()  # someone is hashing this version: share the result
        done = self._hashing[key] = trio.Event()
        try:
            stream = self._content.open_stream(path, info)
            digest = await self._hash(lambda o, n: self._content.read_stream(stream, o, n), info.size)
            self._content.known_md5[key] = digest
            self.md5_computed += 1
            log.info("md5 of %s computed by reading %d bytes (ETag %s is not an MD5)", path, info.size, info.etag)
            return digest
        finally:
            del self._hashing[key]
            done.set()

    @staticmethod
    async def _hash(read, size: int) -> str:  # type: ignore[no-untyped-def]
        digest = hashlib.md5()
        offset = 0
        while offset < size:
            chunk = await read(offset, min(_HASH_CHUNK, size - offset))
            if not chunk:
                raise _err(errno.EIO, f"short read at {offset} of {size} bytes while hashing")
            await trio.to_thread.run_sync(digest.update, chunk)
            offset += len(chunk)
        return digest.hexdigest()

    async def mimetype(self, inode: Inode) -> str:
        ref = self._virtual_ref(inode)
        name = inode.path.rsplit("/", 1)[-1]
        if ref is not None:
            if isinstance(ref, DiffRef):
                return "text/x-diff"
            if isinstance(ref, VersionRef):
                return guess_mimetype(ref.target, None)
            if isinstance(ref, ConcatRef):
                return guess_mimetype(ref.parts[0], None)
            if isinstance(ref, ConcatManifestRef):
                manifest = await self._virtual.source(ref.manifest)
                text = await self._virtual.read_whole(manifest, MANIFEST_MAX_BYTES)
                parts = resolve_manifest(ref.base_dir, text, self._virtual.names)
                return guess_mimetype(parts[0], None) if parts else "application/octet-stream"
            return guess_mimetype(name, None)
        staged = self._content.staged(inode.path)
        if staged is not None:
            return guess_mimetype(name, staged.content_type)
        info = await self._content.metadata.stat(inode.path)
        if info.content_type is None:
            info = await self._head(inode.path, info)
        return guess_mimetype(name, info.content_type)

    # -- helpers ------------------------------------------------------------------------------

    async def _current(self, inode: Inode) -> ObjectInfo | None:
        """The remote object's metadata, or None for pending and computed files."""
        ref = self._virtual_ref(inode)
        if ref is not None:
            if isinstance(ref, VersionRef):
                return (await self._virtual.source(ref.path)).info
            return None
        if self._content.staged(inode.path) is not None:
            return None
        return await self._content.metadata.stat(inode.path)

    async def _has_version_id(self, inode: Inode, info: ObjectInfo) -> bool:
        """Whether the object has a version id; listings do not say, a HEAD does
        (asked only of backends that keep versions)."""
        if self._virtual_ref(inode) is not None or not self._content.backend.capabilities.versions:
            return False
        head = await self._head(inode.path, info)
        return bool(head.version_id and head.version_id != "null")

    async def _head(self, path: str, info: ObjectInfo) -> ObjectInfo:
        """The object's full metadata (Content-Type, VersionId), remembered per version."""
        key = (path, info.identity)
        known = self._details.get(key)
        if known is not None:
            return known
        found = await self._content.backend.head(path)
        if found is None:
            raise _err(errno.ENOENT, path)
        self._details[key] = found
        return found
