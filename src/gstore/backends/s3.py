"""S3 backend: s3fs for sessions and credentials, raw S3 calls for precision.

s3fs provides the credential chain, the aiobotocore session, its retry policy
and endpoint handling. The calls themselves go through ``_call_s3`` so that
listings keep the raw keys (needed to decide deliberately about keys that are
not POSIX names), a lookup is a single HEAD, and a ranged GET is pinned to the
version the handle opened (``VersionId`` or ``If-Match``), which rules out
mixing blocks of two versions of an object.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import logging
import stat
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import trio
from botocore.utils import parse_timestamp as botocore_parse_timestamp  # type: ignore[import-untyped]

from gstore.backends import objectmeta
from gstore.backends.base import (
    Capabilities,
    Listing,
    NoHealth,
    ObjectInfo,
    RangeSink,
    SinkClosedError,
    SinkGate,
    UploadedPart,
    check_relative_path,
    join_key,
    not_supported,
    posix_name_problem,
)
from gstore.backends.bridge import AsyncioBridge
from gstore.backends.filebody import FileRegion
from gstore.errors import BackendError, StaleObjectError, as_backend_error, classify
from gstore.virtual.versions import ObjectVersion

if TYPE_CHECKING:
    from gstore.backends.base import StorageBackend

log = logging.getLogger(__name__)


def _strip_etag(value: str | None) -> str | None:
    return value.strip('"') if value else None


def _timestamp(value: Any) -> float:
    return value.timestamp() if hasattr(value, "timestamp") else 0.0


def parse_timestamp(value: Any) -> datetime.datetime:
    """botocore's timestamp parser for S3 answers, ISO 8601 first.

    Every object of a LIST page carries a LastModified like
    ``2026-12-03T15:01:43.000Z``; botocore's default parser (dateutil) takes about
    90 µs for one, ``datetime.fromisoformat`` 0.3 µs. Profiled on a cold ``ls -l``
    of 2,000 objects, the default parser was 30% of the daemon's CPU. Anything
    else (the RFC 1123 dates of HTTP headers, epoch numbers) goes to botocore's
    parser, so results are the same datetimes as before, only sooner.
    """
    if isinstance(value, str) and len(value) >= 20 and value[4] == "-" and value[10] == "T":
        try:
            parsed = datetime.datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is not None:
                return parsed
    return botocore_parse_timestamp(value)


def use_fast_timestamps(session: Any) -> None:
    """Make clients created by this botocore session parse timestamps with :func:`parse_timestamp`
    (the documented ``response_parser_factory`` component; the AWS CLI sets it the same way)."""
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)


def _head_mtime(head: dict[str, Any]) -> float:
    """mtime from the object's metadata ("mtime", as rclone and s3fs-fuse write it), else LastModified."""
    stored = objectmeta.decode(head.get("Metadata")).mtime
    return stored if stored is not None else _timestamp(head.get("LastModified"))


def _info_from_head(name: str, head: dict[str, Any], *, is_dir: bool = False) -> ObjectInfo:
    """An object's (or a folder marker's) attributes from a HEAD: with its POSIX metadata."""
    meta = objectmeta.decode(head.get("Metadata"))
    mode = meta.mode
    if mode is not None and is_dir != stat.S_ISDIR(mode):
        mode = None  # a type that contradicts the key (a marker saying "file"): ignored
    return ObjectInfo(
        name=name, is_dir=is_dir, size=0 if is_dir else int(head.get("ContentLength", 0)),
        mtime=_head_mtime(head), etag=None if is_dir else _strip_etag(head.get("ETag")),
        version_id=None if is_dir else head.get("VersionId"), content_type=head.get("ContentType"),
        mode=mode, uid=meta.uid, gid=meta.gid, ctime=meta.ctime, atime=meta.atime, rdev=meta.rdev,
        xattrs=meta.xattrs, detailed=True, writer=objectmeta.writer(head.get("Metadata")),
    )


def redact_url(url: str) -> str:
    """An endpoint URL without user:password@, safe to log."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    return url


# -- streamed ranged GETs (read_range_into) --------------------------------------------

#: aiohttp's read buffer for a streamed GET: reading pauses (TCP pushes back on the
#: server) once twice this much is received and not yet written to the sink. The
#: memory one readahead GET costs, whatever the size of its range; large enough that
#: the pause/resume pair of syscalls is rare while the sink keeps up.
STREAM_BUFFER = 1024 * 1024
#: Piece size when the body is not an aiohttp stream (another HTTP client in aiobotocore).
STREAM_PIECE = 256 * 1024


def _read_error(exc: BaseException, path: str, kwargs: dict[str, Any]) -> OSError:
    """A failed GET as the OSError callers expect: ESTALE (the version is gone) or classified."""
    if isinstance(exc, SinkClosedError):
        # Only the abandoned request itself sees this, never a caller: nothing to classify.
        given_up = BackendError(errno.ECANCELED, f"get_object {kwargs['Key']}: given up")
        given_up.__cause__ = exc
        return given_up
    if classify(exc)[0] == errno.ESTALE:
        stale = StaleObjectError(f"{path} changed on the backend while open")
        stale.__cause__ = exc
        return stale
    return as_backend_error(exc, f"get_object {kwargs['Key']} {kwargs['Range']}")


def _check_length(path: str, start: int, end: int, got: int) -> None:
    """A body shorter than the range asked for is a transient EIO: retried, never cached."""
    if got != end - start:
        raise BackendError(
            errno.EIO,
            f"short read of {path} [{start}, {end}): got {got} bytes",
            transient=True,
        )


async def _stream_body(fs: Any, bucket: str, kwargs: dict[str, Any], sink: RangeSink, length: int) -> int:
    """On the asyncio loop: GET ``kwargs`` and write each piece of the body to ``sink``.

    Returns the number of bytes written. Pieces are aiohttp's own ``bytes`` objects
    (one per socket read, up to 256 KiB), passed on uncopied: ``readchunk`` hands
    out a buffered chunk whole, where ``read()`` would join them all into one body.
    A body longer than asked for fails before its surplus reaches the sink.
    """
    response = await fs._call_s3("get_object", Bucket=bucket, **kwargs)
    body = response["Body"]
    try:
        next_piece = _piece_reader(body)
        got = 0
        while piece := await next_piece():
            got += len(piece)
            if got > length:
                raise BackendError(errno.EIO, f"get_object {kwargs['Key']}: body longer than the "
                                   f"{length} bytes asked for", transient=True)
            sink.write(piece)
        return got
    finally:
        body.close()


def _piece_reader(body: Any) -> Callable[[], Awaitable[bytes]]:
    """A coroutine function returning the body's next piece as received, b"" at its end."""
    content = getattr(getattr(body, "raw_stream", None), "content", None)
    if not isinstance(content, aiohttp.StreamReader):
        return lambda: body.read(STREAM_PIECE)  # type: ignore[no-any-return]
    content.set_read_chunk_size(STREAM_BUFFER)  # the flow-control window (see STREAM_BUFFER)

    async def next_piece() -> bytes:
        while True:
            piece, end_of_http_chunk = await content.readchunk()
            if piece or not end_of_http_chunk:
                return piece  # b"" with end_of_http_chunk False: the end of the body
            # b"" at a chunked-encoding boundary: not the end, read on

    return next_piece


# -- writes ------------------------------------------------------------------------
# Kept apart from the read methods above: everything that changes the bucket.

MIN_PART = 5 * 1024 * 1024
MAX_PARTS = 10_000


#: Least time a write request (PUT, part upload, multipart complete, copy) may take.
WRITE_TIMEOUT = 600.0

#: Everything, except ``put_local_file`` (large files go up in parts instead).
#: ``conditional_writes`` is declared, not probed: AWS honours If-Match and
#: If-None-Match on PutObject and CompleteMultipartUpload; an S3-compatible
#: store that does not may be detected at mount time later (replace the
#: instance's ``capabilities`` with ``dataclasses.replace``).
S3_CAPABILITIES = Capabilities(
    conditional_writes=True,
    server_copy=True,
    multipart=True,
    versions=True,
    content_type=True,
    user_metadata=True,
    local_file_upload=False,
    max_key_bytes=1024,
)


def part_size_for(size: int, preferred: int = 8 * 1024 * 1024) -> int:
    """A part size S3 accepts for an object of ``size`` bytes (at most 10,000 parts)."""
    needed = -(-size // MAX_PARTS)
    return max(MIN_PART, preferred, needed)


def _md5_b64(data: bytes) -> str:
    import base64
    import hashlib

    return base64.b64encode(hashlib.md5(data).digest()).decode()


#: Above this, a body's Content-MD5 is computed in a worker thread: 8 MiB take ~15 ms,
#: which on the trio thread would stall every FUSE request of the mount meanwhile.
_THREAD_MD5_ABOVE = 256 * 1024


async def _content_md5(data: bytes) -> str:
    if len(data) <= _THREAD_MD5_ABOVE:
        return _md5_b64(data)
    return await trio.to_thread.run_sync(_md5_b64, data)


class S3Writes:
    """Write operations of :class:`S3Backend` (mixed in below)."""

    if TYPE_CHECKING:  # provided by S3Backend
        bucket: str
        display: str
        write_timeout: float
        capabilities: Capabilities
        _fs: Any
        _bridge: AsyncioBridge

        def key_of(self, path: str) -> str: ...

        async def _call(self, method: str, *, timeout: float | None = None, **kwargs: Any) -> Any: ...

    min_copy_part = MIN_PART

    @property
    def supports_server_copy(self) -> bool:
        """Deprecated: ``capabilities.server_copy``."""
        return self.capabilities.server_copy

    def part_size(self, size: int) -> int:
        return part_size_for(size)

    async def _send(self, method: str, data: bytes | FileRegion, **kwargs: Any) -> Any:
        """A request with a body and its Content-MD5 (PutObject, UploadPart).

        A :class:`FileRegion` is streamed from its file (see ``filebody``): its
        reader is opened, read and closed on the asyncio thread, inside the one
        coroutine the bridge cancels, so no read outlives the request. No
        ContentLength is passed: botocore takes it from the reader's position, so
        an attempt that s3fs repeated after a partial send (only without
        ``resilient``: gstore makes one attempt per call) sends fewer bytes than
        the Content-MD5 names and is refused (BadDigest), never stored.
        """
        key = kwargs["Key"]
        if not isinstance(data, FileRegion):
            kwargs["Body"], kwargs["ContentMD5"] = data, await _content_md5(data)
            return await self._call(method, timeout=self.write_timeout, **kwargs)
        kwargs["ContentMD5"] = data.md5_b64
        call_s3 = self._fs._call_s3

        async def streamed() -> Any:
            reader = data.open()
            try:
                return await call_s3(method, Bucket=self.bucket, Body=reader, **kwargs)
            finally:
                reader.close()

        try:
            return await self._bridge.run(streamed(), timeout=self.write_timeout)
        except Exception as exc:  # noqa: BLE001 - backends raise OSError only
            raise as_backend_error(exc, f"{method} {key}")

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
        """One PutObject; the server verifies Content-MD5, the caller gets the new ETag."""
        self.capabilities.require_preconditions(
            f"put {path}", self.display, if_match=if_match, if_none_match=if_none_match)
        kwargs: dict[str, Any] = {"Key": self.key_of(path)}
        if content_type:
            kwargs["ContentType"] = content_type
        if metadata:
            kwargs["Metadata"] = dict(metadata)
        if if_match:
            kwargs["IfMatch"] = f'"{if_match}"'
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        response = await self._send("put_object", data, **kwargs)
        return ObjectInfo(
            name=path.rsplit("/", 1)[-1],
            is_dir=False,
            size=len(data),
            mtime=time.time(),
            etag=_strip_etag(response.get("ETag")),
            version_id=response.get("VersionId"),
            content_type=content_type,
        )

    async def put_local_file(self, path: str, local_path: str) -> ObjectInfo:
        # Large files go up in parts (capabilities.multipart) instead.
        raise not_supported("local_file_upload", f"put {path}", self.display)

    async def start_multipart(
        self, path: str, *, content_type: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> str:
        kwargs: dict[str, Any] = {"Key": self.key_of(path)}
        if content_type:
            kwargs["ContentType"] = content_type
        if metadata:
            kwargs["Metadata"] = dict(metadata)
        response = await self._call("create_multipart_upload", **kwargs)
        return str(response["UploadId"])

    async def upload_part(self, path: str, upload_id: str, number: int, data: bytes | FileRegion) -> UploadedPart:
        response = await self._send("upload_part", data, Key=self.key_of(path), UploadId=upload_id, PartNumber=number)
        etag = str(response["ETag"])
        plain = (_strip_etag(etag) or "").lower()
        if isinstance(data, FileRegion) and len(plain) == 32 and "-" not in plain and plain != data.md5_hex:
            # A store that ignores Content-MD5 (moto does) took bytes other than those hashed
            # (the staging file changed during the send): never let them into the object.
            raise BackendError(errno.EIO, f"upload part {number} of {path}: ETag {plain} is not the MD5 "
                               f"{data.md5_hex} of the part", transient=True)
        return UploadedPart(number, etag)

    async def copy_part(
        self, path: str, upload_id: str, number: int, source_path: str, source: ObjectInfo, start: int, end: int
    ) -> UploadedPart:
        copy_source: dict[str, str] = {"Bucket": self.bucket, "Key": self.key_of(source_path)}
        kwargs: dict[str, Any] = {}
        if source.version_id and source.version_id != "null":
            copy_source["VersionId"] = source.version_id
        elif source.etag:
            kwargs["CopySourceIfMatch"] = f'"{source.etag}"'
        response = await self._call(
            "upload_part_copy", timeout=self.write_timeout, Key=self.key_of(path), UploadId=upload_id, PartNumber=number,
            CopySource=copy_source, CopySourceRange=f"bytes={start}-{end - 1}", **kwargs,
        )
        return UploadedPart(number, str(response["CopyPartResult"]["ETag"]))

    async def complete_multipart(
        self,
        path: str,
        upload_id: str,
        parts: Sequence[UploadedPart],
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> None:
        self.capabilities.require_preconditions(
            f"complete multipart upload of {path}", self.display, if_match=if_match, if_none_match=if_none_match)
        kwargs: dict[str, Any] = {}
        if if_match:
            kwargs["IfMatch"] = f'"{if_match}"'
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        await self._call(
            "complete_multipart_upload", timeout=self.write_timeout, Key=self.key_of(path), UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": p.etag}
                                       for p in sorted(parts, key=lambda p: p.number)]},
            **kwargs,
        )

    async def abort_multipart(self, path: str, upload_id: str) -> None:
        await self._call("abort_multipart_upload", Key=self.key_of(path), UploadId=upload_id)

    async def head(self, path: str) -> ObjectInfo | None:
        """The object at ``path`` (not a directory), or None."""
        try:
            head = await self._call("head_object", Key=self.key_of(path))
        except FileNotFoundError:
            return None
        return _info_from_head(path.rsplit("/", 1)[-1], head)

    async def copy(self, source_path: str, target_path: str, source: ObjectInfo) -> None:
        """Server-side copy of one object, keeping its metadata; no bytes pass through us."""
        if source.size > 5 * 1024**3:
            upload_id = await self.start_multipart(target_path, content_type=source.content_type, metadata=None)
            try:
                size = self.part_size(source.size)
                parts: list[UploadedPart] = []
                for number, start in enumerate(range(0, source.size, size), start=1):
                    end = min(source.size, start + size)
                    parts.append(await self.copy_part(target_path, upload_id, number, source_path, source, start, end))
                await self.complete_multipart(target_path, upload_id, parts, if_match=None, if_none_match=False)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.abort_multipart(target_path, upload_id)
                raise
            return
        copy_source: dict[str, str] = {"Bucket": self.bucket, "Key": self.key_of(source_path)}
        if source.version_id and source.version_id != "null":
            copy_source["VersionId"] = source.version_id
        await self._call("copy_object", timeout=self.write_timeout, Key=self.key_of(target_path), CopySource=copy_source)

    async def delete(self, path: str) -> None:
        await self._call("delete_object", Key=self.key_of(path))

    async def make_dir(self, path: str, *, metadata: Mapping[str, str] | None = None) -> None:
        """Put the folder's marker object ("path/"), with its attributes as metadata."""
        kwargs: dict[str, Any] = {}
        if metadata:
            kwargs["Metadata"] = dict(metadata)
        await self._call("put_object", Key=self.key_of(path) + "/", Body=b"", **kwargs)

    async def head_folder(self, path: str) -> ObjectInfo | None:
        if not path:
            return None
        try:
            head = await self._call("head_object", Key=self.key_of(path) + "/")
        except FileNotFoundError:
            return None
        return _info_from_head(path.rsplit("/", 1)[-1], head, is_dir=True)

    def key_bytes(self, path: str) -> int:
        return len(self.key_of(path).encode("utf-8", "surrogateescape"))

    async def update_metadata(self, path: str, metadata: Mapping[str, str], *, content_type: str | None,
                              if_match: str | None) -> ObjectInfo:
        """Replace an object's user metadata in place (a copy onto itself), keeping its bytes,
        its other headers and, with ``if_match``, only if it is still that version."""
        key = self.key_of(path)
        head = await self._call("head_object", Key=key)
        if if_match is not None and _strip_etag(head.get("ETag")) != if_match:
            raise StaleObjectError(f"{path} changed on the backend")
        if int(head.get("ContentLength", 0)) > 5 * 1024**3:
            raise BackendError(errno.EFBIG, f"{path}: objects over 5 GiB cannot be rewritten in place")
        kwargs: dict[str, Any] = {
            "Key": key, "CopySource": {"Bucket": self.bucket, "Key": key},
            # What other tools keep there stays; the names gstore manages are replaced.
            "MetadataDirective": "REPLACE", "Metadata": {
                **{k: v for k, v in (head.get("Metadata") or {}).items() if k.lower() not in objectmeta.MANAGED},
                **metadata},
            "ContentType": content_type or head.get("ContentType") or "application/octet-stream",
        }
        if head.get("ETag"):
            kwargs["CopySourceIfMatch"] = head["ETag"]
        for name in ("CacheControl", "ContentDisposition", "ContentEncoding", "ContentLanguage"):
            if head.get(name):
                kwargs[name] = head[name]
        await self._call("copy_object", timeout=self.write_timeout, **kwargs)
        info = await self.head(path)
        if info is None:
            raise BackendError(errno.ENOENT, f"{path} vanished while its metadata was changed")
        return info

    async def remove_dir_marker(self, path: str) -> None:
        await self._call("delete_object", Key=self.key_of(path) + "/")

    async def walk(self, path: str) -> list[ObjectInfo]:
        """Every object below directory ``path`` (names relative to it), markers included."""
        base = self.key_of(path)
        key_prefix = f"{base}/" if base else ""
        found: list[ObjectInfo] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": key_prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._call("list_objects_v2", **kwargs)
            for item in page.get("Contents", ()):
                found.append(ObjectInfo(
                    name=item["Key"][len(key_prefix):], is_dir=item["Key"].endswith("/"),
                    size=int(item.get("Size", 0)), etag=_strip_etag(item.get("ETag")),
                ))
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token:
                return found

    async def list_versions(self, path: str) -> list[ObjectVersion]:
        """Every version (and delete marker) of the object at ``path``, as the store lists them.

        A bucket without versioning lists one version, "null"."""
        key = self.key_of(path)
        found: list[ObjectVersion] = []
        kwargs: dict[str, Any] = {"Prefix": key}
        while True:
            page = await self._call("list_object_versions", **kwargs)
            for item, marker in [(v, False) for v in page.get("Versions", ())] + [
                    (d, True) for d in page.get("DeleteMarkers", ())]:
                if item.get("Key") != key:
                    continue  # "key.bak" shares the prefix
                found.append(ObjectVersion(
                    version_id=item.get("VersionId"), last_modified=item["LastModified"],
                    size=int(item.get("Size", 0)), etag=_strip_etag(item.get("ETag")),
                    is_latest=bool(item.get("IsLatest")), is_delete_marker=marker))
            next_key = page.get("NextKeyMarker")
            if not page.get("IsTruncated") or not next_key or next_key > key:
                return found
            kwargs["KeyMarker"] = next_key
            kwargs["VersionIdMarker"] = page.get("NextVersionIdMarker", "")

    async def set_content_type(self, path: str, content_type: str) -> ObjectInfo:
        """Change the Content-Type of an object in place: a server-side copy onto itself
        that keeps every other header and the user metadata, and only if it is still
        the version just looked at."""
        key = self.key_of(path)
        head = await self._call("head_object", Key=key)
        if int(head.get("ContentLength", 0)) > 5 * 1024**3:
            raise BackendError(errno.EFBIG, f"{path}: objects over 5 GiB cannot be rewritten in place")
        kwargs: dict[str, Any] = {
            "Key": key, "CopySource": {"Bucket": self.bucket, "Key": key},
            "MetadataDirective": "REPLACE", "ContentType": content_type,
            "Metadata": head.get("Metadata") or {},
        }
        if head.get("ETag"):
            kwargs["CopySourceIfMatch"] = head["ETag"]
        for name in ("CacheControl", "ContentDisposition", "ContentEncoding", "ContentLanguage"):
            if head.get(name):
                kwargs[name] = head[name]
        await self._call("copy_object", timeout=self.write_timeout, **kwargs)
        info = await self.head(path)
        if info is None:
            raise BackendError(errno.ENOENT, f"{path} vanished while its Content-Type was changed")
        return info

    # -- one object copied on the server (``.gstore/copy``, gstore sync) -----------------

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
        """CopyObject (UploadPartCopy parts above 5 GiB), conditional on the target.

        One HEAD of the source comes first: it pins the version copied (VersionId,
        else CopySourceIfMatch), says whether the source stores a modification time
        and gives the headers that a metadata REPLACE must carry over. Without a
        stored time, the copy gets ``mtime`` (REPLACE); otherwise the metadata
        travels unchanged (COPY). AWS honours If-Match/If-None-Match on CopyObject;
        callers that need the guarantee on stores that ignore them check first.
        """
        self.capabilities.require_preconditions(
            f"copy to {target_path}", self.display, if_match=if_match, if_none_match=if_none_match)
        source_key, target_key = self.key_of(source_path), self.key_of(target_path)
        head = await self._call("head_object", Key=source_key)
        etag = _strip_etag(head.get("ETag"))
        if source is not None and source.etag and etag != source.etag:
            raise StaleObjectError(f"{source_path} changed on the backend")
        version = head.get("VersionId")
        size = int(head.get("ContentLength", 0))
        stored: dict[str, str] = dict(head.get("Metadata") or {})
        replace = objectmeta.decode(stored).mtime is None
        metadata = stored
        if replace:
            when = mtime if mtime is not None else _timestamp(head.get("LastModified"))
            metadata = {**stored, **objectmeta.encode(objectmeta.PosixMeta(mtime=when))}
        content_type = head.get("ContentType")
        name = target_path.rsplit("/", 1)[-1]
        if size > 5 * 1024**3:
            pinned = ObjectInfo(name=name, is_dir=False, size=size, etag=etag, version_id=version)
            upload_id = await self.start_multipart(target_path, content_type=content_type, metadata=metadata)
            try:
                part = self.part_size(size)
                parts = [await self.copy_part(target_path, upload_id, number, source_path, pinned, start,
                                              min(size, start + part))
                         for number, start in enumerate(range(0, size, part), start=1)]
                await self.complete_multipart(target_path, upload_id, parts, if_match=if_match,
                                              if_none_match=if_none_match)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.abort_multipart(target_path, upload_id)
                raise
            copied = await self.head(target_path)
            if copied is None:
                raise BackendError(errno.ENOENT, f"{target_path} vanished right after it was copied")
            return copied
        copy_source: dict[str, str] = {"Bucket": self.bucket, "Key": source_key}
        kwargs: dict[str, Any] = {"Key": target_key, "CopySource": copy_source}
        if version and version != "null":
            copy_source["VersionId"] = version
        elif etag:
            kwargs["CopySourceIfMatch"] = f'"{etag}"'
        if if_match:
            kwargs["IfMatch"] = f'"{if_match}"'
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if replace:
            kwargs.update(MetadataDirective="REPLACE", Metadata=metadata,
                          ContentType=content_type or "application/octet-stream")
            for header in ("CacheControl", "ContentDisposition", "ContentEncoding", "ContentLanguage"):
                if head.get(header):
                    kwargs[header] = head[header]
        response = await self._call("copy_object", timeout=self.write_timeout, **kwargs)
        result = response.get("CopyObjectResult") or {}
        return _info_from_head(name, {
            "ContentLength": size, "ETag": result.get("ETag"), "VersionId": response.get("VersionId"),
            "ContentType": content_type, "Metadata": metadata, "LastModified": result.get("LastModified"),
        })


class S3Backend(S3Writes, NoHealth):
    """A bucket, or a prefix inside one, seen through s3fs.

    Implements all of :class:`~gstore.backends.base.StorageBackend`; see
    ``S3_CAPABILITIES`` for what it declares.
    """

    def __init__(self, fs: Any, root: str, *, request_timeout: float | None = None) -> None:
        root = root.strip("/")
        if not root:
            raise ValueError("an S3 mount needs a bucket: s3://BUCKET[/PREFIX]")
        self._fs = fs
        self.bucket, _, self.prefix = root.partition("/")
        self.prefix = self.prefix.strip("/")
        self._bridge = AsyncioBridge(fs.loop, timeout=request_timeout)
        # Writes that the server may take minutes to finish (completing or copying
        # gigabytes) get longer than a read: nobody waits on them but flush/fsync,
        # and giving up early only means sending the same bytes again.
        self.write_timeout = max(request_timeout or 60.0, WRITE_TIMEOUT)
        endpoint = getattr(fs, "client_kwargs", {}).get("endpoint_url") or getattr(
            fs, "endpoint_url", None
        )
        self._endpoint = redact_url(endpoint) if endpoint else None
        self.display = f"s3://{root}" + (f" at {self._endpoint}" if self._endpoint else "")
        self.cache_namespace = f"s3|{self._endpoint or 'aws'}|{self.bucket}"
        self.capabilities = S3_CAPABILITIES
        self._versioned: bool | None = None

    # -- helpers -----------------------------------------------------------------

    def key_of(self, path: str) -> str:
        return join_key(self.prefix, check_relative_path(path))

    def cache_key(self, path: str) -> str:
        return f"{self.cache_namespace}|{self.key_of(path)}"

    async def _call(self, method: str, *, timeout: float | None = None, **kwargs: Any) -> Any:
        try:
            return await self._bridge.run(self._fs._call_s3(method, Bucket=self.bucket, **kwargs), timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - backends raise OSError only
            raise as_backend_error(exc, f"{method} {kwargs.get('Key') or kwargs.get('Prefix') or self.bucket}")

    # -- reading (ReadingBackend; head and walk are above) ---------------------------

    async def probe(self) -> None:
        try:
            await self._call("head_bucket")
        except Exception as exc:  # noqa: BLE001 - turned into one clear message
            err, _ = classify(exc)
            reason = {
                errno.ENOENT: "the bucket does not exist",
                errno.EACCES: "access denied (check the credentials)",
            }.get(err, f"{type(exc).__name__}: {exc}")
            raise BackendError(err, f"cannot open {self.display}: {reason}") from exc

    async def stat(self, path: str) -> ObjectInfo:
        key = self.key_of(path)
        name = path.rsplit("/", 1)[-1]
        if not key or path == "":
            return ObjectInfo(name="", is_dir=True)
        head, listing = await self._head_and_probe_folder(key)
        if head is not None:
            return _info_from_head(name, head)
        contents = listing.get("Contents") or ()
        if contents and contents[0].get("Key") == key + "/":
            # A marker object: it carries the folder's mode, owner and times.
            try:
                return _info_from_head(name, await self._call("head_object", Key=key + "/"), is_dir=True)
            except FileNotFoundError:
                pass
        if listing.get("KeyCount", 0) or contents or listing.get("CommonPrefixes"):
            # No marker object: a folder that exists only as a prefix, with nothing stored.
            return ObjectInfo(name=name, is_dir=True, detailed=True)
        raise FileNotFoundError(errno.ENOENT, f"no such object or prefix: {path}")

    async def _head_and_probe_folder(self, key: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """The HEAD of ``key`` (None: no object) and, when there is none, a one-key LIST of
        ``key/`` (whether a folder is there).

        Both are sent at once, as mountpoint-s3 does: a lookup of a folder, or of a name
        that does not exist yet (each new file's), costs one round trip instead of two,
        which is most of its time on a remote store (20 ms each with ``scripts/bench
        --latency 20``). The price is one LIST for a lookup that finds a file; the
        metadata cache (gstore.vfs.metadata) keeps such lookups few. A failed HEAD
        cancels the LIST; a failed LIST matters only when the HEAD found nothing.
        """
        head: dict[str, Any] | None = None
        listing: dict[str, Any] = {}
        errors: dict[str, OSError] = {}

        async def send_head(cancel_scope: trio.CancelScope) -> None:
            nonlocal head
            try:
                head = await self._call("head_object", Key=key)
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors["head"] = exc
                cancel_scope.cancel()

        async def send_list() -> None:
            nonlocal listing
            try:
                listing = await self._call("list_objects_v2", Prefix=key + "/", Delimiter="/", MaxKeys=1)
            except OSError as exc:
                errors["list"] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_head, nursery.cancel_scope)
            nursery.start_soon(send_list)
        if "head" in errors:
            raise errors["head"]
        if head is None and "list" in errors:
            raise errors["list"]
        return head, listing

    async def list_dir(self, path: str, *, max_pages: int | None = None) -> Listing | None:
        """The folder's children; None when ``max_pages`` pages (of 1,000 keys) do not hold them all."""
        base = self.key_of(path)
        key_prefix = f"{base}/" if base else ""
        listing = Listing()
        files: dict[str, ObjectInfo] = {}
        dirs: set[str] = set()
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": key_prefix, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._call("list_objects_v2", **kwargs)
            for common in page.get("CommonPrefixes", ()):
                raw = common["Prefix"]
                dirs.add(raw[len(key_prefix) : -1])
            for item in page.get("Contents", ()):
                raw = item["Key"]
                name = raw[len(key_prefix) :]
                if name == "":
                    continue  # the "dir/" marker object of this directory itself
                files[name] = ObjectInfo(
                    name=name,
                    is_dir=False,
                    size=int(item.get("Size", 0)),
                    mtime=_timestamp(item.get("LastModified")),
                    etag=_strip_etag(item.get("ETag")),
                )
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
            if not token:
                break
            if max_pages is not None:
                max_pages -= 1
                if max_pages <= 0:
                    return None
        for name in dirs:
            problem = posix_name_problem(name)
            if problem:
                listing.skipped.append((key_prefix + name + "/", problem))
                continue
            if name in files:
                listing.skipped.append(
                    (key_prefix + name, "key is both an object and a prefix; the directory wins")
                )
                del files[name]
            listing.entries[name] = ObjectInfo(name=name, is_dir=True)
        for name, info in files.items():
            problem = posix_name_problem(name)
            if problem:
                listing.skipped.append((key_prefix + name, problem))
                continue
            listing.entries[name] = info
        return listing

    async def read_range(self, path: str, start: int, end: int, expect: ObjectInfo) -> bytes:
        if end <= start:
            return b""
        kwargs = self._get_kwargs(path, start, end, expect)
        try:
            data = await self._bridge.run(self._get_body(kwargs))
        except Exception as exc:  # noqa: BLE001 - backends raise OSError only
            raise _read_error(exc, path, kwargs)  # noqa: B904 - the cause is kept on the error
        _check_length(path, start, end, len(data))
        return data

    async def read_range_into(
        self, path: str, start: int, end: int, expect: ObjectInfo, sink: RangeSink
    ) -> None:
        """The ranged GET of ``read_range``, its body handed to ``sink`` piece by piece as
        aiohttp receives it (see :func:`_stream_body`): no join, no second buffer."""
        if end <= start:
            return
        kwargs = self._get_kwargs(path, start, end, expect)
        gate = SinkGate(sink)
        try:
            got = await self._bridge.run(_stream_body(self._fs, self.bucket, kwargs, gate, end - start))
        except Exception as exc:  # noqa: BLE001 - backends raise OSError only
            raise _read_error(exc, path, kwargs)  # noqa: B904 - the cause is kept on the error
        finally:
            gate.close()  # a request given up may still be running on the loop: it writes no more
        _check_length(path, start, end, got)

    def _get_kwargs(self, path: str, start: int, end: int, expect: ObjectInfo) -> dict[str, Any]:
        """GetObject arguments for ``[start, end)``, pinned to the version the handle opened."""
        kwargs: dict[str, Any] = {"Key": self.key_of(path), "Range": f"bytes={start}-{end - 1}"}
        if expect.version_id and expect.version_id != "null":
            kwargs["VersionId"] = expect.version_id
        elif expect.etag:
            kwargs["IfMatch"] = f'"{expect.etag}"'
        return kwargs

    async def _get_body(self, kwargs: dict[str, Any]) -> bytes:
        response = await self._fs._call_s3("get_object", Bucket=self.bucket, **kwargs)
        body = response["Body"]
        try:
            data: bytes = await body.read()
            return data
        finally:
            body.close()

    async def aclose(self) -> None:
        session = getattr(self._fs, "_s3", None)
        if session is not None:
            try:
                await self._bridge.run(self._close_session(), timeout=5)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                log.debug("closing the S3 session failed", exc_info=True)

    async def _close_session(self) -> None:
        s3 = getattr(self._fs, "_s3", None)
        if s3 is not None:
            await s3.__aexit__(None, None, None)
            self._fs._s3 = None
        await asyncio.sleep(0)


if TYPE_CHECKING:  # the static proof that the class implements the whole protocol

    def _implements(backend: S3Backend) -> StorageBackend:
        return backend
