"""Modification times this host set, kept where a listing can find them.

S3 listings carry only LastModified (the upload time); the time a program set
(``cp -p``, ``rsync -a``, ``touch -d``) travels as object metadata that only a
HEAD returns. Asking a HEAD per file would undo the one-LIST ``ls -l``, and
showing the upload time would make ``rsync -a`` copy every file again on each
run. So the times this mount wrote are remembered here, per object version
(path and ETag), in a small SQLite file in the mount's state directory, and
laid over listings: one indexed query per listed folder. A changed object (new
ETag) falls back to what the backend says.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
from dataclasses import replace
from pathlib import Path

from gstore.backends.base import ObjectInfo
from gstore.vfs.inodes import parent_path

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mtimes (
    path TEXT PRIMARY KEY, folder TEXT NOT NULL, etag TEXT NOT NULL, mtime REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS mtimes_folder ON mtimes (folder);
"""


class MtimeStore:
    """path → (ETag, mtime, POSIX attributes) of objects whose attributes this mount set.

    Listings carry no user metadata; without this, a folder's ``ls -l`` would show
    the mount's default mode and owner for files this mount chmod'ed, until each
    is looked up by name (a HEAD). One indexed query per listed folder instead.
    """

    def __init__(self, path: Path | None) -> None:
        target = ":memory:" if path is None else str(path)
        self._db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        if path is not None:
            path.chmod(0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(mtimes)")}
        if "attrs" not in columns:  # a state directory from before attributes were kept
            self._db.execute("ALTER TABLE mtimes ADD COLUMN attrs TEXT")

    def set(self, path: str, etag: str | None, mtime: float, info: ObjectInfo | None = None) -> None:
        if not etag:
            return
        attrs = _attrs_json(info) if info is not None else None
        self._db.execute("INSERT OR REPLACE INTO mtimes (path, folder, etag, mtime, attrs) VALUES (?, ?, ?, ?, ?)",
                         (path, parent_path(path), etag, mtime, attrs))

    def drop(self, path: str) -> None:
        self._db.execute("DELETE FROM mtimes WHERE path = ?", (path,))

    def apply(self, path: str, info: ObjectInfo) -> ObjectInfo:
        """``info`` with the time (and attributes) this mount set, if it is still that version."""
        if info.is_dir or not info.etag:
            return info
        row = self._db.execute("SELECT etag, mtime, attrs FROM mtimes WHERE path = ?", (path,)).fetchone()
        if row is None or row[0] != info.etag:
            return info
        return _overlay(info, row[1], row[2])

    def apply_folder(self, folder: str, entries: dict[str, ObjectInfo]) -> None:
        """Lay the remembered times and attributes over one folder's listing, in place."""
        prefix = f"{folder}/" if folder else ""
        for path, etag, mtime, attrs in self._db.execute(
                "SELECT path, etag, mtime, attrs FROM mtimes WHERE folder = ?", (folder,)):
            name = path[len(prefix):]
            info = entries.get(name)
            if info is not None and not info.is_dir and info.etag == etag:
                entries[name] = _overlay(info, mtime, attrs)

    def close(self) -> None:
        self._db.close()


def _attrs_json(info: ObjectInfo) -> str | None:
    if not info.detailed:
        return None
    # Also for an object with no POSIX metadata ("{}" then): it was looked at, no HEAD again.
    return json.dumps({
        "mode": info.mode, "uid": info.uid, "gid": info.gid, "ctime": info.ctime, "atime": info.atime,
        "rdev": info.rdev, "xattrs": {n: base64.b64encode(v).decode("ascii") for n, v in info.xattrs or ()},
    }, separators=(",", ":"))


def _overlay(info: ObjectInfo, mtime: float, attrs: str | None) -> ObjectInfo:
    if info.detailed:
        return info  # from the object itself: newer than anything remembered
    if not attrs:
        return info if info.mtime == mtime else replace(info, mtime=mtime)
    try:
        data = json.loads(attrs)
        xattrs = tuple(sorted((n, base64.b64decode(v)) for n, v in (data.get("xattrs") or {}).items())) or None
        return replace(info, mtime=mtime, mode=data.get("mode"), uid=data.get("uid"), gid=data.get("gid"),
                       ctime=data.get("ctime"), atime=data.get("atime"), rdev=int(data.get("rdev") or 0),
                       xattrs=xattrs, detailed=True)
    except (ValueError, TypeError):
        return replace(info, mtime=mtime)
