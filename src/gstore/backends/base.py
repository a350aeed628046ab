"""What the filesystem needs from a storage backend, and nothing more.

Paths given to a backend are always *relative to the mount root* ("" is the
root, "a/b.txt" a file below it). Each backend joins them to its root itself,
after :func:`check_relative_path`, so a mount of ``bucket/prefix`` cannot reach
outside the prefix whatever a caller passes in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


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


class Backend(Protocol):
    """The storage operations the filesystem is built on.

    All methods are trio coroutines. Errors are ``OSError`` subclasses
    (``FileNotFoundError`` for a missing object); the cause is kept on
    ``__cause__`` so :mod:`gstore.errors` can classify it.
    """

    #: Printable description without secrets, e.g. ``s3://bucket/prefix``.
    display: str
    #: Distinguishes the same path on two different backends in the block cache.
    cache_namespace: str

    async def probe(self) -> None:
        """Check that the mount root is reachable; raise with a clear message if not."""

    async def stat(self, path: str) -> ObjectInfo:
        """Metadata of one file or directory; ``FileNotFoundError`` if neither exists."""

    async def list_dir(self, path: str, *, max_pages: int | None = None) -> Listing | None:
        """All children of a directory (one paginated listing, no per-entry requests);
        None if they do not fit in ``max_pages`` pages (when the backend pages at all)."""

    async def read_range(self, path: str, start: int, end: int, expect: ObjectInfo) -> bytes:
        """Bytes ``[start, end)`` of exactly the version ``expect`` describes.

        Raises :class:`gstore.errors.StaleObjectError` if the object changed.
        """

    async def aclose(self) -> None:
        """Release connections."""


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
