"""POSIX attributes as S3 user metadata: the names gstore writes and the names it reads.

gstore writes the names s3fs-fuse uses, so a bucket written by one shows the
same modes, owners, times, symlinks and xattrs through the other:

=========  ==========================================================  =================
name       value                                                       also written by
=========  ==========================================================  =================
``mode``   st_mode in decimal, file type bits included (S_IFLNK ...)   s3fs-fuse
``uid``    decimal                                                      s3fs-fuse
``gid``    decimal                                                      s3fs-fuse
``mtime``  seconds since the epoch, with a decimal fraction             s3fs-fuse, rclone
``ctime``  same                                                          s3fs-fuse
``atime``  same                                                          s3fs-fuse
``rdev``   st_rdev in decimal (device nodes only)                       s3fs-fuse
``xattr``  URL-encoded JSON: name → base64 of the value                 s3fs-fuse
=========  ==========================================================  =================

One more name is gstore's own: ``gstore-staged``, the id of the staged file
(journal record) whose upload wrote the object. It is how a mount recognises
its own upload whose answer it never saw (a daemon killed, or a connection
reset, after the object landed, while the file had changed since): without it
the next upload would find an object it did not expect and take its own
earlier generation for another writer's (a conflict copy of our newest bytes).

Reading is lenient: a value that does not parse is ignored (the default shows),
never an error, because other tools write these names too. S3 limits the user
metadata of one object to 2 KiB (names and values together): :func:`encode`
raises ``E2BIG`` beyond it rather than letting an upload fail later.
"""

from __future__ import annotations

import base64
import errno
import json
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote

#: The metadata names gstore reads and writes (others' names are kept as they are).
MANAGED = frozenset({"mode", "uid", "gid", "mtime", "ctime", "atime", "rdev", "xattr", "gstore-staged"})

#: The name of the staged-file id an upload writes (see the module docstring).
WRITER = "gstore-staged"

#: S3's limit on the user metadata of one object (keys and values, UTF-8).
USER_METADATA_LIMIT = 2048

Xattrs = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class PosixMeta:
    """What an object's metadata says about its POSIX attributes (None: not stored)."""

    mode: int | None = None  # st_mode with the file type bits
    uid: int | None = None
    gid: int | None = None
    mtime: float | None = None
    ctime: float | None = None
    atime: float | None = None
    rdev: int = 0
    xattrs: Xattrs | None = None


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip(), 10)
    except ValueError:
        return None


def _time(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if number == number and abs(number) < 1e13 else None  # not NaN, not absurd


def _mode(value: str | None) -> int | None:
    mode = _int(value)
    if mode is None or mode < 0 or mode > 0o177777:
        return None
    if stat.S_IFMT(mode) == 0:
        mode |= stat.S_IFREG  # permission bits only (some tools write that): a regular file
    return mode


def _xattrs(value: str | None) -> Xattrs | None:
    if not value:
        return None
    try:
        table = json.loads(unquote(value))
        if not isinstance(table, dict):
            return None
        return tuple(sorted((str(name), base64.b64decode(str(data))) for name, data in table.items()))
    except (ValueError, TypeError):
        return None


def decode(metadata: Mapping[str, str] | None) -> PosixMeta:
    """The POSIX attributes in an object's user metadata (keys without ``x-amz-meta-``)."""
    if not metadata:
        return PosixMeta()
    md = {key.lower(): value for key, value in metadata.items()}
    return PosixMeta(
        mode=_mode(md.get("mode")), uid=_int(md.get("uid")), gid=_int(md.get("gid")),
        mtime=_time(md.get("mtime")), ctime=_time(md.get("ctime")), atime=_time(md.get("atime")),
        rdev=_int(md.get("rdev")) or 0, xattrs=_xattrs(md.get("xattr")),
    )


def writer(metadata: Mapping[str, str] | None) -> str | None:
    """The id of the staged file whose upload wrote the object (``WRITER``), if any."""
    for key, value in (metadata or {}).items():
        if key.lower() == WRITER:
            return value.strip() or None
    return None


def _format_time(value: float) -> str:
    return f"{value:.9f}".rstrip("0").rstrip(".")


def encode(meta: PosixMeta, *, writer: str | None = None) -> dict[str, str]:
    """User metadata for an object with these attributes (and the staged file ``writer``
    whose upload writes it); E2BIG over S3's 2 KiB limit."""
    out: dict[str, str] = {}
    if writer:
        out[WRITER] = writer
    if meta.mode is not None:
        out["mode"] = str(meta.mode)
    if meta.uid is not None:
        out["uid"] = str(meta.uid)
    if meta.gid is not None:
        out["gid"] = str(meta.gid)
    for name in ("mtime", "ctime", "atime"):
        value = getattr(meta, name)
        if value is not None:
            out[name] = _format_time(value)
    if meta.rdev:
        out["rdev"] = str(meta.rdev)
    if meta.xattrs:
        table = {name: base64.b64encode(value).decode("ascii") for name, value in meta.xattrs}
        out["xattr"] = quote(json.dumps(table, separators=(",", ":"), sort_keys=True), safe="")
    size = sum(len(k.encode()) + len(v.encode()) for k, v in out.items())
    if size > USER_METADATA_LIMIT:
        raise OSError(errno.E2BIG, f"the object's attributes and extended attributes take {size} bytes; "
                      f"S3 keeps at most {USER_METADATA_LIMIT}")
    return out


__all__ = ["MANAGED", "PosixMeta", "USER_METADATA_LIMIT", "WRITER", "Xattrs", "decode", "encode", "writer"]
