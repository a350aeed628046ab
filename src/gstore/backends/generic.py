"""Any fsspec filesystem (local files, memory, GCS, Azure, SFTP, ...).

Async implementations are driven through the asyncio bridge like S3; blocking
ones run in trio worker threads. Identity comes from an ETag-like field when
the filesystem reports one, else from size and mtime (documented as weaker:
such backends cannot pin a read to one version).
"""

from __future__ import annotations

import datetime as _dt
import errno
import posixpath
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio

from gstore.backends.base import (
    Capabilities,
    Listing,
    NoHealth,
    ObjectInfo,
    RangeSink,
    UploadedPart,
    check_relative_path,
    feed_sink,
    join_key,
    not_supported,
    posix_name_problem,
)
from gstore.backends.bridge import AsyncioBridge
from gstore.backends.filebody import FileRegion
from gstore.errors import BackendError, as_backend_error

if TYPE_CHECKING:
    from gstore.backends.base import StorageBackend
    from gstore.virtual.versions import ObjectVersion

_ETAG_FIELDS = ("ETag", "etag", "md5Hash", "md5", "content_md5")
_MTIME_FIELDS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")


def _as_timestamp(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, _dt.datetime):
        moment: _dt.datetime = value if value.tzinfo is not None else value.replace(tzinfo=_dt.timezone.utc)
        return moment.timestamp()
    if isinstance(value, str):
        try:
            return _as_timestamp(_dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return 0.0
    return 0.0


def info_to_object(entry: Mapping[str, Any], name: str) -> ObjectInfo:
    """Normalise one fsspec info dict."""
    is_dir = entry.get("type") == "directory"
    etag = next((str(entry[f]).strip('"') for f in _ETAG_FIELDS if entry.get(f)), None)
    mtime = next((_as_timestamp(entry[f]) for f in _MTIME_FIELDS if entry.get(f) is not None), 0.0)
    return ObjectInfo(
        name=name,
        is_dir=is_dir,
        size=0 if is_dir else int(entry.get("size") or 0),
        mtime=mtime,
        etag=None if is_dir else etag,
        content_type=entry.get("ContentType") or entry.get("content_type"),
    )


#: What any fsspec filesystem offers through this backend: plain whole-object
#: writes (no preconditions, no parts, no server-side range copies), no versions,
#: no Content-Type or user metadata. Files too large to hold in memory go up
#: with ``put_local_file`` (fsspec's ``put_file`` streams them).
FSSPEC_CAPABILITIES = Capabilities(local_file_upload=True)


class FsspecBackend(NoHealth):
    """A directory of any fsspec filesystem.

    Implements all of :class:`~gstore.backends.base.StorageBackend`; the
    features in which fsspec gives no guarantee (see ``FSSPEC_CAPABILITIES``)
    raise ``ENOTSUP``.
    """

    capabilities: Capabilities = FSSPEC_CAPABILITIES

    def __init__(
        self, fs: Any, protocol: str, root: str, *, request_timeout: float | None = None
    ) -> None:
        self._fs = fs
        self._protocol = protocol
        self._root = root.rstrip("/") if root not in ("", "/") else root
        self._async = bool(getattr(fs, "async_impl", False)) and getattr(fs, "loop", None) is not None
        self._bridge = AsyncioBridge(fs.loop, timeout=request_timeout) if self._async else None
        self._timeout = request_timeout
        self._limiter = trio.CapacityLimiter(32)
        self.display = f"{protocol}://{root}"
        self.cache_namespace = f"{protocol}|{getattr(fs, 'fsid', protocol) if protocol != 'memory' else id(fs)}"

    def _full(self, path: str) -> str:
        check_relative_path(path)
        if self._root == "/":
            return "/" + path
        return join_key(self._root, path)

    def cache_key(self, path: str) -> str:
        return f"{self.cache_namespace}|{self._full(path)}"

    async def head_folder(self, path: str) -> ObjectInfo | None:
        return None  # folders here are real directories: nothing stored with them

    def key_bytes(self, path: str) -> int:
        return len(self._full(path).encode("utf-8", "surrogateescape"))

    async def _do(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``fs.NAME`` (or the async ``fs._NAME``) without blocking trio; errors as OSError."""
        try:
            return await self._call(name, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - backends raise OSError only
            raise as_backend_error(exc, f"{name} {args[0] if args else ''}")

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._bridge is not None:
            return await self._bridge.run(getattr(self._fs, "_" + name)(*args, **kwargs))
        method: Callable[..., Any] = getattr(self._fs, name)
        if self._timeout is None:
            return await trio.to_thread.run_sync(lambda: method(*args, **kwargs), limiter=self._limiter)
        with trio.move_on_after(self._timeout) as scope:
            return await trio.to_thread.run_sync(
                lambda: method(*args, **kwargs), limiter=self._limiter, abandon_on_cancel=True
            )
        assert scope.cancelled_caught
        raise BackendError(errno.ETIMEDOUT, f"{name} timed out after {self._timeout:g}s", transient=True)

    async def probe(self) -> None:
        try:
            info = await self._do("info", self._full(""))
        except FileNotFoundError as exc:
            raise BackendError(errno.ENOENT, f"cannot open {self.display}: it does not exist") from exc
        if info.get("type") != "directory":
            raise BackendError(errno.ENOTDIR, f"cannot open {self.display}: not a directory")

    async def stat(self, path: str) -> ObjectInfo:
        entry = await self._do("info", self._full(path))
        return info_to_object(entry, path.rsplit("/", 1)[-1] if path else "")

    async def list_dir(self, path: str, *, max_pages: int | None = None) -> Listing:
        # fsspec lists a folder in one call: max_pages has nothing to bound here.
        full = self._full(path)
        entries = await self._do("ls", full, detail=True)
        listing = Listing()
        own = full.rstrip("/")
        for entry in entries:
            raw = str(entry.get("name", "")).rstrip("/")
            name = posixpath.basename(raw)
            if raw.lstrip("/") == own.lstrip("/"):
                continue  # some filesystems list the directory itself
            problem = posix_name_problem(name)
            if problem:
                listing.skipped.append((raw, problem))
                continue
            info = info_to_object(entry, name)
            previous = listing.entries.get(name)
            if previous is not None and previous.is_dir and not info.is_dir:
                listing.skipped.append((raw, "name is both a file and a directory; the directory wins"))
                continue
            listing.entries[name] = info
        return listing

    async def read_range(self, path: str, start: int, end: int, expect: ObjectInfo) -> bytes:
        if end <= start:
            return b""
        data = await self._do("cat_file", self._full(path), start=start, end=end)
        if len(data) != end - start:
            raise BackendError(
                errno.EIO, f"short read of {path} [{start}, {end}): got {len(data)} bytes", transient=True
            )
        return bytes(data)

    async def read_range_into(
        self, path: str, start: int, end: int, expect: ObjectInfo, sink: RangeSink
    ) -> None:
        """``read_range``, then the bytes handed to ``sink`` in a worker thread (a sink writes
        to disk). fsspec has no common streaming call: this saves no memory, only keeps
        the protocol whole. The thread is waited for even when cancelled, so no write
        follows the return."""
        data = await self.read_range(path, start, end, expect)
        await trio.to_thread.run_sync(feed_sink, sink, data)

    async def aclose(self) -> None:
        return None

    # -- writes ------------------------------------------------------------------------

    min_copy_part = 0

    @property
    def supports_server_copy(self) -> bool:
        """Deprecated: ``capabilities.server_copy``."""
        return self.capabilities.server_copy

    def part_size(self, size: int) -> int:
        return max(size, 1)  # no multipart: the whole object is one part

    async def put_bytes(
        self,
        path: str,
        data: bytes | FileRegion,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> ObjectInfo:
        # content_type and metadata are hints fsspec has nowhere to keep; a
        # precondition is refused rather than dropped (it could lose a change).
        self.capabilities.require_preconditions(
            f"put {path}", self.display, if_match=if_match, if_none_match=if_none_match)
        if isinstance(data, FileRegion):
            # fsspec takes bytes and checks no digest: read them here, checked against the MD5.
            data = await trio.to_thread.run_sync(data.read_verified)
        await self._do("pipe_file", self._full(path), data)
        return await self.stat(path)

    async def put_local_file(self, path: str, local_path: str) -> ObjectInfo:
        self.capabilities.require("local_file_upload", f"put {path}", self.display)
        await self._do("put_file", local_path, self._full(path))
        return await self.stat(path)

    async def head(self, path: str) -> ObjectInfo | None:
        try:
            info = await self.stat(path)
        except FileNotFoundError:
            return None
        return None if info.is_dir else info

    async def copy(self, source_path: str, target_path: str, source: ObjectInfo) -> None:
        await self._do("copy", self._full(source_path), self._full(target_path))

    async def copy_object(
        self,
        source_path: str,
        target_path: str,
        source: ObjectInfo | None,
        *,
        mtime: float | None = None,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> ObjectInfo:
        """fsspec's ``copy`` (done by the filesystem, or by this process for local ones).

        No preconditions (refused, never dropped) and nowhere to keep ``mtime``: the
        copy shows the time it was made. That is why ``server_copy`` stays false
        here and ``.gstore/copy`` copies through the mount instead."""
        self.capabilities.require_preconditions(
            f"copy to {target_path}", self.display, if_match=if_match, if_none_match=if_none_match)
        if source is not None and source.etag:
            current = await self.stat(source_path)
            if current.etag != source.etag:
                raise BackendError(errno.ESTALE, f"{source_path} changed on the backend")
        await self._do("copy", self._full(source_path), self._full(target_path))
        return await self.stat(target_path)

    async def delete(self, path: str) -> None:
        await self._do("rm_file", self._full(path))

    async def make_dir(self, path: str, *, metadata: Mapping[str, str] | None = None) -> None:
        await self._do("makedirs", self._full(path), exist_ok=True)  # metadata: nowhere to keep it

    async def remove_dir_marker(self, path: str) -> None:
        try:
            await self._do("rmdir", self._full(path))
        except FileNotFoundError:
            pass

    async def walk(self, path: str) -> list[ObjectInfo]:
        full = self._full(path).rstrip("/")
        found = await self._do("find", full, withdirs=True, detail=True)
        out = []
        for name, entry in found.items():
            rel = str(name).rstrip("/")
            strip = full.lstrip("/")
            rel = rel.lstrip("/")
            if rel == strip or not rel.startswith(strip + "/" if strip else ""):
                continue
            rel = rel[len(strip) + 1 :] if strip else rel
            out.append(info_to_object(entry, rel))
        return out

    # -- features fsspec does not offer (FSSPEC_CAPABILITIES says so) ----------------------

    async def start_multipart(
        self, path: str, *, content_type: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> str:
        raise not_supported("multipart", f"start multipart upload of {path}", self.display)

    async def upload_part(self, path: str, upload_id: str, number: int, data: bytes | FileRegion) -> UploadedPart:
        raise not_supported("multipart", f"upload part {number} of {path}", self.display)

    async def copy_part(
        self, path: str, upload_id: str, number: int, source_path: str, source: ObjectInfo, start: int, end: int
    ) -> UploadedPart:
        raise not_supported("multipart", f"copy part {number} of {path}", self.display)

    async def complete_multipart(
        self,
        path: str,
        upload_id: str,
        parts: Sequence[UploadedPart],
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> None:
        raise not_supported("multipart", f"complete multipart upload of {path}", self.display)

    async def abort_multipart(self, path: str, upload_id: str) -> None:
        raise not_supported("multipart", f"abort multipart upload of {path}", self.display)

    async def list_versions(self, path: str) -> list[ObjectVersion]:
        raise not_supported("versions", f"list versions of {path}", self.display)

    async def set_content_type(self, path: str, content_type: str) -> ObjectInfo:
        raise not_supported("content_type", f"set the Content-Type of {path}", self.display)

    async def update_metadata(self, path: str, metadata: Mapping[str, str], *, content_type: str | None,
                              if_match: str | None) -> ObjectInfo:
        raise not_supported("user_metadata", f"change the metadata of {path}", self.display)


if TYPE_CHECKING:  # the static proof that the class implements the whole protocol

    def _implements(backend: FsspecBackend) -> StorageBackend:
        return backend
