"""What the filesystem needs from a storage backend, as typed protocols.

Paths given to a backend are always *relative to the mount root* ("" is the
root, "a/b.txt" a file below it). Each backend joins them to its root itself,
after :func:`check_relative_path`, so a mount of ``bucket/prefix`` cannot reach
outside the prefix whatever a caller passes in.

The vocabulary is split by what the callers use it for:

* :class:`ReadingBackend`: probe, stat, head, list_dir, walk, read_range,
  read_range_into, cache_key, aclose (plus ``display``, ``cache_namespace``,
  ``capabilities``);
* :class:`WritingBackend`: put_bytes, put_local_file, delete, copy, copy_object,
  make_dir, remove_dir_marker;
* :class:`MultipartBackend`: part_size, min_copy_part, start_multipart,
  upload_part, copy_part, complete_multipart, abort_multipart;
* :class:`VersionsBackend`: list_versions (the ``.versions`` view);
* :class:`ContentTypeBackend`: set_content_type;
* :class:`HealthReporting`: add_listener, health (the circuit breaker).

:class:`StorageBackend` is all of them: what the mount core receives. Every
backend implements every method; what it cannot do is declared in its
:class:`Capabilities` (``backend.capabilities``), and calling it anyway raises
:class:`NotSupportedError` (``ENOTSUP``) before anything reaches the storage.
Callers decide from the capabilities, never by probing attributes.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from gstore.backends.filebody import FileRegion
from gstore.errors import BackendError

if TYPE_CHECKING:
    from gstore.virtual.versions import ObjectVersion


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """Metadata of one object or directory, as a listing or a stat returns it.

    ``identity`` names one version of the object's bytes: the block cache keys
    blocks by it, so a changed object can never be served from stale blocks.
    """

    name: str  # last component, relative to the listed directory ("" for the root)
    is_dir: bool
    size: int = 0
    mtime: float = 0.0  # seconds since the epoch
    etag: str | None = None  # without quotes
    version_id: str | None = None
    content_type: str | None = None
    # POSIX attributes kept in the object's metadata (gstore.backends.objectmeta); None:
    # not stored, or not known (a listing carries none of them): the mount's defaults show.
    mode: int | None = None  # st_mode with the file type bits
    uid: int | None = None
    gid: int | None = None
    ctime: float | None = None
    atime: float | None = None
    rdev: int = 0
    xattrs: tuple[tuple[str, bytes], ...] | None = None
    # The attributes above come from the object itself (a HEAD, or this mount's own
    # writes), not from a listing: a lookup need not ask again.
    detailed: bool = False
    # The staged file whose upload wrote the object (objectmeta.WRITER; from a HEAD only).
    writer: str | None = None

    @property
    def identity(self) -> str:
        # The ETag (with the size) names the bytes whether the info came from a
        # listing (no VersionId) or a HEAD (with one), so both agree. VersionId,
        # when known, only pins the ranged GETs to the version that was opened.
        if self.etag:
            return f"e:{self.etag}:{self.size}"
        if self.version_id and self.version_id != "null":
            return f"v:{self.version_id}"
        return f"s:{self.size}:{self.mtime:.6f}"


@dataclass(slots=True)
class Listing:
    """The children of one directory, by name, plus what could not be shown."""

    entries: dict[str, ObjectInfo] = field(default_factory=dict)
    # (raw key, reason) of backend keys that cannot be POSIX names here.
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class UploadedPart:
    """One part of a multipart upload, as ``upload_part``/``copy_part`` return it.

    Opaque to callers: collect them (in any order) and hand them to
    ``complete_multipart``.
    """

    number: int  # 1-based part number
    etag: str  # as the server returned it (quotes kept)


# -- capabilities ----------------------------------------------------------------------

Feature = Literal[
    "conditional_writes", "server_copy", "multipart", "versions", "content_type", "user_metadata",
    "local_file_upload",
]

_FEATURE_TEXT: dict[str, str] = {
    "conditional_writes": "conditional writes (If-Match / If-None-Match)",
    "server_copy": "server-side copies of object ranges",
    "multipart": "multipart uploads",
    "versions": "object versions",
    "content_type": "changing the Content-Type of an object",
    "user_metadata": "user metadata on objects",
    "local_file_upload": "uploading a local file in one call",
}


class NotSupportedError(BackendError):
    """The backend lacks the feature an operation needs (see :class:`Capabilities`).

    ``errno`` is ``ENOTSUP``; never transient, never retried. Raised before
    anything is sent to the storage.
    """

    def __init__(self, message: str, *, feature: str | None = None) -> None:
        super().__init__(errno.ENOTSUP, message)
        self.feature = feature


def not_supported(feature: Feature, operation: str, display: str = "this backend") -> NotSupportedError:
    """The error for ``operation`` on a backend without ``feature``."""
    return NotSupportedError(
        f"{operation}: {display} does not support {_FEATURE_TEXT[feature]} (capabilities.{feature} is false)",
        feature=feature,
    )


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do beyond the basic reads and writes every backend has.

    Every method of :class:`StorageBackend` exists on every backend; the ones
    tied to a feature the backend lacks raise :class:`NotSupportedError`. The
    basic operations (stat, head, list_dir, walk, read_range, put_bytes without
    preconditions, delete, copy, make_dir, remove_dir_marker) are always there.
    """

    #: ``put_bytes`` and ``complete_multipart`` honour ``if_match`` (the ETag the
    #: object must still have) and ``if_none_match`` (the object must not exist),
    #: atomically on the server. Without it, passing either raises ENOTSUP: a
    #: precondition is never silently dropped.
    conditional_writes: bool = False
    #: ``copy`` runs on the storage (no bytes pass through this process) and,
    #: with ``multipart``, ``copy_part`` copies a byte range of an existing object.
    server_copy: bool = False
    #: ``start_multipart``, ``upload_part``, ``complete_multipart``,
    #: ``abort_multipart`` (and ``copy_part`` with ``server_copy``).
    multipart: bool = False
    #: ``list_versions`` lists the versions of an object (one "null" version
    #: on an S3 bucket without versioning).
    versions: bool = False
    #: Objects carry a Content-Type: ``put_bytes``/``start_multipart`` store the
    #: one given, ``head`` reports it and ``set_content_type`` changes it.
    #: Without it the ``content_type`` arguments are hints, dropped silently.
    content_type: bool = False
    #: Objects carry user metadata: ``put_bytes``/``start_multipart`` store the
    #: ``metadata`` given (gstore keeps mtime and mode there). Without it the
    #: argument is a hint, dropped silently.
    user_metadata: bool = False
    #: ``put_local_file`` uploads a local file without reading it into memory
    #: (how large files reach a backend without multipart).
    local_file_upload: bool = False
    #: The longest key the store accepts, in bytes (S3: 1,024), for ENAMETOOLONG at
    #: create rather than an upload that fails later; None: no limit known.
    max_key_bytes: int | None = None

    def supports(self, feature: Feature) -> bool:
        value = getattr(self, feature)
        assert isinstance(value, bool), feature
        return value

    def require(self, feature: Feature, operation: str, display: str = "this backend") -> None:
        """Raise :class:`NotSupportedError` unless the backend has ``feature``."""
        if not self.supports(feature):
            raise not_supported(feature, operation, display)

    def require_preconditions(
        self, operation: str, display: str, *, if_match: str | None, if_none_match: bool
    ) -> None:
        """Refuse a precondition the backend cannot honour (a dropped one would lose data)."""
        if if_match is not None or if_none_match:
            self.require("conditional_writes", operation, display)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


# -- the protocols ---------------------------------------------------------------------
# All async methods are trio coroutines. Errors are ``OSError`` subclasses
# (``FileNotFoundError`` for a missing object); the cause is kept on ``__cause__``
# so :mod:`gstore.errors` can classify it.


@runtime_checkable
class ReadingBackend(Protocol):
    """Reading a tree of objects: what the read path and the metadata cache use."""

    @property
    def display(self) -> str:
        """Printable description without secrets, e.g. ``s3://bucket/prefix``."""
        ...

    @property
    def cache_namespace(self) -> str:
        """Distinguishes the same path on two different backends in the block cache."""
        ...

    @property
    def capabilities(self) -> Capabilities:
        """What this backend can do beyond the basics."""
        ...

    def cache_key(self, path: str) -> str:
        """A string naming ``path`` on this backend (not its version), for the block cache."""
        ...

    def key_bytes(self, path: str) -> int:
        """How long the backend's key for ``path`` is, in bytes (see ``max_key_bytes``)."""
        ...

    async def head_folder(self, path: str) -> ObjectInfo | None:
        """The folder's marker object with its stored attributes, or None (no marker, or a
        backend whose folders carry none)."""
        ...

    async def probe(self) -> None:
        """Check that the mount root is reachable; raise with a clear message if not."""

    async def stat(self, path: str) -> ObjectInfo:
        """Metadata of one file or directory; ``FileNotFoundError`` if neither exists."""
        ...

    async def head(self, path: str) -> ObjectInfo | None:
        """Full metadata of the *object* at ``path`` (Content-Type, VersionId when known);
        None if there is no object (a directory is not one)."""
        ...

    async def list_dir(self, path: str, *, max_pages: int | None = None) -> Listing | None:
        """All children of a directory (one paginated listing, no per-entry requests);
        None if they do not fit in ``max_pages`` pages (when the backend pages at all)."""
        ...

    async def walk(self, path: str) -> list[ObjectInfo]:
        """Every object and directory below directory ``path``, recursively; names are
        relative to ``path`` (``"a/b.txt"``)."""
        ...

    async def read_range(self, path: str, start: int, end: int, expect: ObjectInfo) -> bytes:
        """Bytes ``[start, end)`` of exactly the version ``expect`` describes.

        Raises :class:`gstore.errors.StaleObjectError` if the object changed
        (where the backend can tell).
        """
        ...

    async def read_range_into(
        self, path: str, start: int, end: int, expect: ObjectInfo, sink: RangeSink
    ) -> None:
        """Bytes ``[start, end)`` of the version ``expect`` describes, handed to ``sink`` as they arrive.

        For reads whose bytes go to disk, not to the caller (readahead): no body is
        ever held whole in memory or joined, so the memory a GET costs is its
        receive buffer, whatever its size. Returns once exactly ``end - start``
        bytes were written to ``sink``; otherwise raises, like :meth:`read_range`
        (a body cut short is a transient ``EIO``). Either way no ``sink.write``
        call happens after this returns or raises (see :class:`SinkGate`): the
        caller owns the sink again, e.g. to discard a partial block.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""


@runtime_checkable
class RangeSink(Protocol):
    """Where :meth:`ReadingBackend.read_range_into` puts the bytes of a range as they arrive.

    Concurrency contract: ``write`` receives consecutive pieces of the range, in
    order, one call at a time, but from whichever thread receives them (S3: the
    asyncio loop thread; fsspec: a worker thread), so it must not touch trio
    state (hand results over with ``TrioToken.run_sync_soon``). It may block
    briefly (a disk write): it holds up that thread's other requests meanwhile.
    A piece may be a memoryview valid only during the call.
    """

    def write(self, piece: bytes | memoryview) -> None:
        """Take the next piece of the range."""


class SinkClosedError(Exception):
    """A piece arrived for a sink whose read was already given up (see :class:`SinkGate`)."""


class SinkGate:
    """Forwards pieces to a sink until :meth:`close`; none gets through after close() returns.

    Why: a request the trio side gives up (timeout, cancellation) is cancelled on
    the asyncio loop *asynchronously* (see ``AsyncioBridge.run``), so the loop may
    still deliver a piece after the trio task moved on to a retry or to discarding
    the partial block. The lock makes close() wait for a write in progress (one
    piece: a disk write of at most a few hundred KiB), so whoever closed the gate
    owns the sink from then on; a later write raises :class:`SinkClosedError`
    into the abandoned request, which stops it.
    """

    __slots__ = ("_sink", "_lock", "_open")

    def __init__(self, sink: RangeSink) -> None:
        self._sink = sink
        self._lock = threading.Lock()
        self._open = True

    def write(self, piece: bytes | memoryview) -> None:
        with self._lock:
            if not self._open:
                raise SinkClosedError("the read this piece belongs to was given up")
            self._sink.write(piece)

    def close(self) -> None:
        with self._lock:
            self._open = False


def feed_sink(sink: RangeSink, data: bytes | memoryview) -> None:
    """Hand bytes read whole to a sink: ``read_range_into`` for backends that cannot stream."""
    if len(data):
        sink.write(memoryview(data))


@runtime_checkable
class WritingBackend(Protocol):
    """Changing objects: single PUTs, deletes, copies, directory markers."""

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
        """Store ``data`` as the object at ``path``; returns the new object's info (its ETag).

        ``data`` is the bytes, or a hashed :class:`FileRegion` of a local file that the
        backend reads as it sends (bounded memory whatever the size); either way the
        bytes stored are those whose MD5 the caller knows, or the call fails.

        ``if_match`` (an ETag without quotes) / ``if_none_match`` make the write
        conditional (``capabilities.conditional_writes``; else ENOTSUP); a failed
        precondition raises an ``ESTALE`` error. ``content_type`` and ``metadata``
        are stored where the backend can (``capabilities.content_type`` /
        ``user_metadata``) and dropped otherwise.
        """
        ...

    async def put_local_file(self, path: str, local_path: str) -> ObjectInfo:
        """Upload the local file ``local_path`` as ``path`` without reading it into memory
        (``capabilities.local_file_upload``; else ENOTSUP)."""
        ...

    async def delete(self, path: str) -> None:
        """Delete the object at ``path``."""

    async def copy(self, source_path: str, target_path: str, source: ObjectInfo) -> None:
        """Copy the version ``source`` of ``source_path`` to ``target_path``."""

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
        """Copy one object without its bytes passing through this process; returns the
        copy's info (its ETag). With ``capabilities.server_copy`` the storage copies it
        and keeps what is described below; other backends use their own copy call
        (fsspec ``copy``), which keeps no ``mtime``.

        The copy keeps the source's Content-Type and user metadata (its POSIX
        attributes); when the source stores no modification time, the copy gets
        ``mtime`` (None: the source's LastModified), so it shows the source's time
        and not the time of the copy. ``source`` pins the version copied (a
        different current version raises ``ESTALE``); None copies the current one.
        ``if_match``/``if_none_match`` make it conditional on the *target*, as for
        ``put_bytes`` (a failed precondition raises ``ESTALE``).
        """
        ...

    async def make_dir(self, path: str, *, metadata: Mapping[str, str] | None = None) -> None:
        """Create directory ``path`` (on object stores: a ``path/`` marker object, carrying
        ``metadata`` where ``capabilities.user_metadata``)."""

    async def remove_dir_marker(self, path: str) -> None:
        """Remove the empty directory ``path`` (its marker); no error if there is none."""


@runtime_checkable
class MultipartBackend(Protocol):
    """Uploads in parts, some of them copied on the server from an existing object."""

    @property
    def min_copy_part(self) -> int:
        """Smallest part ``copy_part`` accepts (except the last one)."""
        ...

    def part_size(self, size: int) -> int:
        """The part size to use for an object of ``size`` bytes."""
        ...

    async def start_multipart(
        self, path: str, *, content_type: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> str:
        """Begin a multipart upload to ``path``; returns its upload id."""
        ...

    async def upload_part(self, path: str, upload_id: str, number: int, data: bytes | FileRegion) -> UploadedPart:
        """Send part ``number`` (1-based); ``data`` as in ``put_bytes``."""
        ...

    async def copy_part(
        self, path: str, upload_id: str, number: int, source_path: str, source: ObjectInfo, start: int, end: int
    ) -> UploadedPart:
        """Make bytes ``[start, end)`` of the version ``source`` of ``source_path`` part
        ``number``, on the server (``capabilities.server_copy`` as well)."""
        ...

    async def complete_multipart(
        self,
        path: str,
        upload_id: str,
        parts: Sequence[UploadedPart],
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> None:
        """Assemble the parts (any order) into the object; preconditions as ``put_bytes``."""

    async def abort_multipart(self, path: str, upload_id: str) -> None:
        """Drop an unfinished upload and its parts."""


@runtime_checkable
class VersionsBackend(Protocol):
    """Object versions: what the ``.versions`` view lists."""

    async def list_versions(self, path: str) -> list[ObjectVersion]:
        """Every version (and delete marker) of the object at ``path``, newest first."""
        ...


@runtime_checkable
class ContentTypeBackend(Protocol):
    """Changing the Content-Type of an existing object in place."""

    async def set_content_type(self, path: str, content_type: str) -> ObjectInfo:
        """Set the Content-Type, keeping the bytes and the other metadata; returns the new info."""
        ...

    async def update_metadata(self, path: str, metadata: Mapping[str, str], *, content_type: str | None,
                              if_match: str | None) -> ObjectInfo:
        """Replace the user metadata (``capabilities.user_metadata``), keeping the bytes;
        ``if_match``: only if the object still has that ETag (else ESTALE)."""
        ...


@runtime_checkable
class HealthReporting(Protocol):
    """Reachability, as the retry layer sees it (``gstore status``, the write-back queue)."""

    def add_listener(self, callback: Callable[[str], None]) -> None:
        """``callback(state)`` whenever the backend's state changes ("open", "closed", ...).
        A backend without a circuit breaker never changes state: it never calls back."""

    def health(self) -> dict[str, Any] | None:
        """Breaker state and retry counters; None for a backend without them."""
        ...


@runtime_checkable
class StorageBackend(
    ReadingBackend,
    WritingBackend,
    MultipartBackend,
    VersionsBackend,
    ContentTypeBackend,
    HealthReporting,
    Protocol,
):
    """Everything the mount core uses; what each backend can really do is in ``capabilities``."""


#: The old name, kept while the callers move to the protocols above.
Backend = StorageBackend


class NoHealth:
    """``add_listener``/``health`` of a backend without a circuit breaker (mixed in)."""

    def add_listener(self, callback: Callable[[str], None]) -> None:
        return None  # no circuit here: the state never changes

    def health(self) -> dict[str, Any] | None:
        return None


# -- paths -----------------------------------------------------------------------------


def check_relative_path(path: str) -> str:
    """Validate a mount-relative path; the single guard of the mount's boundary.

    Every component must be a real name: no empty components, no ``.`` or
    ``..``, no leading ``/``. Returns the path unchanged.
    """
    if path == "":
        return path
    if path.startswith("/") or path.endswith("/"):
        raise PermissionError(f"path {path!r} is not relative to the mount")
    for part in path.split("/"):
        if part in ("", ".", "..") or "\0" in part:
            raise PermissionError(f"path {path!r} leaves the mount")
    return path


def join_key(root: str, path: str) -> str:
    """``root`` + ``path`` with exactly one separator; both already validated."""
    check_relative_path(path)
    if not root:
        return path
    if not path:
        return root
    return f"{root.rstrip('/')}/{path}"


def posix_name_problem(name: str) -> str | None:
    """Why a backend key component cannot be shown as a file name, or None if it can."""
    if name == "":
        return "empty name (a '//' in the key or a key ending in '/')"
    if name in (".", ".."):
        return f"reserved name {name!r}"
    if "\0" in name:
        return "NUL byte in name"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        return "name longer than 255 bytes"
    return None
