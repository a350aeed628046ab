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
    """path → (ETag, mtime) of objects whose time this mount set."""

    def __init__(self, path: Path | None) -> None:
        target = ":memory:" if path is None else str(path)
        self._db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        if path is not None:
            path.chmod(0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def set(self, path: str, etag: str | None, mtime: float) -> None:
        if not etag:
            return
        self._db.execute("INSERT OR REPLACE INTO mtimes (path, folder, etag, mtime) VALUES (?, ?, ?, ?)",
                         (path, parent_path(path), etag, mtime))

    def drop(self, path: str) -> None:
        self._db.execute("DELETE FROM mtimes WHERE path = ?", (path,))

    def apply(self, path: str, info: ObjectInfo) -> ObjectInfo:
        """``info`` with the time this mount set, if it is still that version."""
        if info.is_dir or not info.etag:
            return info
        row = self._db.execute("SELECT etag, mtime FROM mtimes WHERE path = ?", (path,)).fetchone()
        if row is None or row[0] != info.etag or row[1] == info.mtime:
            return info
        return replace(info, mtime=row[1])

    def apply_folder(self, folder: str, entries: dict[str, ObjectInfo]) -> None:
        """Lay the remembered times over one folder's listing, in place."""
        prefix = f"{folder}/" if folder else ""
        for path, etag, mtime in self._db.execute(
                "SELECT path, etag, mtime FROM mtimes WHERE folder = ?", (folder,)):
            name = path[len(prefix):]
            info = entries.get(name)
            if info is not None and not info.is_dir and info.etag == etag and info.mtime != mtime:
                entries[name] = replace(info, mtime=mtime)

    def close(self) -> None:
        self._db.close()
