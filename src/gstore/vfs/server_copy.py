"""One file copied inside the storage, asked for through ``MNT/.gstore/copy``.

``gstore sync`` between two folders of one mount would otherwise read every
byte through the kernel and upload it again. Through this control file the
sync process names the two paths and the daemon makes the storage copy the
object (S3 CopyObject; UploadPartCopy parts above 5 GiB), so no byte leaves
the bucket, and the mount's own view of the target stays coherent.

The request, written to the file: ``SRC\\0DST`` (paths relative to the
mount), optionally ``\\0absent`` or ``\\0etag:ETAG``: what DST must still be
(what the caller saw when it decided to copy). Without it, what this mount
shows for DST at that moment is the expectation. The verdict, read back:

* ``{"ok": true, "server_side": true, "etag": ..., "size": ...}``: done and
  durable (no upload is pending for it);
* ``{"ok": false, "fallback": true, "reason": ...}``: not a case for a
  server-side copy (SRC or DST has pending local changes, the backend has no
  server-side copy, SRC changed on the backend meanwhile): copy through the
  mount, which goes through the write-back queue;
* ``{"ok": false, "fallback": false, "error": ..., "errno": N}``: failed;
  ``"conflict": true`` when DST is no longer what the caller expected (it is
  left alone: never silently overwritten).

Concurrency (trio tasks interleave at every ``await``): the copy holds the
path locks of SRC and DST (``FileSystem.locks``, the ones create, open for
writing, truncate, rename and unlink take) from its first check to its last
change, so neither path can become pending in between: "no pending changes"
checked at the start still holds when the copy is made. A writer of another
host is caught by the conditional copy instead: If-Match / If-None-Match on
the target, after a HEAD of it (stores that ignore the headers on CopyObject,
moto among them, still get the check, with a window of one request).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gstore.backends.base import ObjectInfo
from gstore.vfs.inodes import parent_path
from gstore.vfs.refresh import normalize_refresh_path

if TYPE_CHECKING:
    from gstore.vfs.filesystem import FileSystem
    from gstore.vfs.refresh import Refresher

log = logging.getLogger(__name__)

ABSENT = "absent"
ETAG_PREFIX = "etag:"


@dataclass(frozen=True, slots=True)
class CopyRequest:
    """What a writer of ``.gstore/copy`` asked for."""

    source: str
    target: str
    #: None: DST as this mount shows it; "": DST must not exist; else the ETag DST must have.
    expect: str | None = None


def parse_copy_request(raw: bytes) -> CopyRequest:
    """``SRC\\0DST[\\0absent|\\0etag:ETAG]``; ValueError with a reason if it is not that."""
    text = raw.decode("utf-8", "surrogateescape").rstrip("\n")
    fields = text.split("\0")
    if len(fields) not in (2, 3):
        raise ValueError("expected SRC\\0DST, optionally followed by \\0absent or \\0etag:ETAG")
    source, target = normalize_refresh_path(fields[0]), normalize_refresh_path(fields[1])
    if not source or not target:
        raise ValueError("the mount root cannot be copied or replaced")
    if source == target:
        raise ValueError("source and destination are the same file")
    expect: str | None = None
    if len(fields) == 3:
        if fields[2] == ABSENT:
            expect = ""
        elif fields[2].startswith(ETAG_PREFIX) and len(fields[2]) > len(ETAG_PREFIX):
            expect = fields[2][len(ETAG_PREFIX):].strip('"')
        else:
            raise ValueError(f"expected 'absent' or 'etag:ETAG' after DST, got {fields[2]!r}")
    return CopyRequest(source, target, expect)


def _fallback(reason: str) -> dict[str, Any]:
    return {"ok": False, "fallback": True, "reason": reason}


def _error(code: int, message: str, *, conflict: bool = False) -> dict[str, Any]:
    return {"ok": False, "fallback": False, "errno": code, "error": message, "conflict": conflict}


class ServerCopier:
    """Callable for :class:`gstore.vfs.control.ControlFiles`: ``await copier(request_bytes)`` → verdict.

    Counts what it did (``copies``, ``fallbacks``, ``conflicts``) for status and tests.
    """

    def __init__(self, fs: FileSystem, refresher: Refresher) -> None:
        self._fs = fs
        self._refresher = refresher  # makes the mount's (and the kernel's) view of DST fresh
        self.copies = 0
        self.fallbacks = 0
        self.conflicts = 0

    async def __call__(self, raw: bytes) -> dict[str, Any]:
        try:
            request = parse_copy_request(raw)
        except ValueError as exc:
            return _error(errno.EINVAL, f"malformed copy request: {exc}")
        try:
            verdict = await self.copy(request)
        except OSError as exc:
            code = exc.errno or errno.EIO
            verdict = _error(code, f"{request.source} -> {request.target}: {exc.strerror or exc}")
        if verdict.get("fallback"):
            self.fallbacks += 1
            log.info("no server-side copy of %s to %s: %s", request.source, request.target, verdict["reason"])
        elif not verdict.get("ok"):
            self.conflicts += bool(verdict.get("conflict"))
            log.warning("server-side copy of %s to %s failed: %s", request.source, request.target, verdict["error"])
        return verdict

    async def copy(self, request: CopyRequest) -> dict[str, Any]:
        fs = self._fs
        src, dst = request.source, request.target
        for path in (src, dst):
            if fs.virtual.parse(path) is not None:
                return _error(errno.EINVAL, f"{path} is a virtual file")
        if fs.read_only:
            return _error(errno.EROFS, "the mount is read-only")
        if not fs.backend.capabilities.server_copy:
            return _fallback(f"{fs.backend.display} has no server-side copy that keeps attributes")
        async with fs.locks.hold(src, dst):
            if fs.content.staged(src) is not None:
                return _fallback(f"{src} has local changes not uploaded yet")
            if fs.content.staged(dst) is not None:
                return _fallback(f"{dst} has local changes not uploaded yet")
            queue = fs.pending.namespace if fs.pending is not None else None
            if queue is not None and len(queue):
                # The backend misses namespace changes made here (an outage): the copy's checks
                # would look at the wrong state; a copy through the queue keeps the order.
                return _fallback(f"{len(queue)} namespace change(s) queued here are not in the backend yet")
            shown = await fs.content.stat_path(src)  # what the caller saw: FileNotFoundError if nothing
            if shown.is_dir:
                return _error(errno.EISDIR, f"{src} is a folder")
            folder = await fs.content.stat_path(parent_path(dst)) if parent_path(dst) else None
            if folder is not None and not folder.is_dir:
                return _error(errno.ENOTDIR, f"{parent_path(dst)} is not a folder")
            expect = request.expect
            if expect is None:  # DST as this mount shows it now
                try:
                    seen = await fs.content.stat_path(dst)
                except FileNotFoundError:
                    expect = ""
                else:
                    if seen.is_dir:
                        return _error(errno.EISDIR, f"{dst} is a folder")
                    expect = seen.etag
            current = await fs.backend.head(dst)
            if expect is not None and (current.etag if current is not None else "") != expect:
                await self._refresh(dst)
                what = "exists now" if current is not None and expect == "" else "changed"
                return _error(errno.ESTALE, f"{dst} {what} on the backend since it was looked at; not replaced",
                              conflict=True)
            if current is None and await self._is_folder(dst):
                return _error(errno.EISDIR, f"{dst} is a folder")
            try:
                copied = await fs.backend.copy_object(
                    src, dst, shown, mtime=shown.mtime or None,
                    if_match=current.etag if current is not None else None, if_none_match=current is None)
            except FileNotFoundError:
                await self._refresh(src)
                raise
            except OSError as exc:
                if exc.errno != errno.ESTALE:
                    raise
                now = await fs.backend.head(dst)
                if (now.etag if now is not None else None) != (current.etag if current is not None else None):
                    await self._refresh(dst)
                    return _error(errno.ESTALE, f"{dst} changed on the backend during the copy; not replaced",
                                  conflict=True)
                await self._refresh(src)
                return _fallback(f"{src} changed on the backend since this mount looked at it")
            await self._published(src, dst, shown, copied, new=current is None)
        self.copies += 1
        log.info("copied %s to %s on the server (%d bytes)", src, dst, copied.size)
        return {"ok": True, "server_side": True, "source": src, "target": dst, "etag": copied.etag,
                "size": copied.size, "mtime": copied.mtime}

    async def _is_folder(self, path: str) -> bool:
        try:
            return (await self._fs.content.stat_path(path)).is_dir
        except FileNotFoundError:
            return False

    async def _refresh(self, path: str) -> None:
        await self._refresher([path])

    async def _published(self, src: str, dst: str, shown: ObjectInfo, copied: ObjectInfo, *, new: bool) -> None:
        """The mount shows the copy from now on: fresh caches (ours and the kernel's), then the
        copy's attributes remembered, so the next look at DST costs no request."""
        fs = self._fs
        await self._refresh(dst)
        info = dataclasses.replace(copied, name=dst.rsplit("/", 1)[-1])
        known = fs.content.known_md5.get((src, shown.etag or shown.identity))
        if known is not None and copied.etag:
            fs.content.known_md5[(dst, copied.etag)] = known  # a multipart ETag is no MD5: keep the digest
        if copied.etag:
            fs.metadata.mtimes.set(dst, copied.etag, info.mtime, info)
        fs.metadata.remember(dst, info)
        inode = fs.inodes.by_path(dst)
        if inode is not None:
            fs.inodes.refresh(inode, info)
        if new:
            fs.content.folder_changed(parent_path(dst))


__all__ = ["ABSENT", "CopyRequest", "ETAG_PREFIX", "ServerCopier", "parse_copy_request"]
