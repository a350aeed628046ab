"""Forget what the mount knows about some paths, so the next access asks the backend.

``gstore refresh PATH...`` and writes to ``MNT/.gstore/refresh`` end here. A
mount trusts its caches for their TTLs (attributes, listings, "does not
exist" answers, and the kernel's own copies of them); a program that changed
objects behind the mount's back (another host, a batch job writing to S3
directly) can tell the mount to look again now instead of after the TTLs:

* the metadata cache drops the path and everything below it, and its parent's
  listing (which holds its entry); negative entries included;
* version lists of ``.versions`` go; MD5s, CRC-32s, diffs and cached blocks
  are per object version and stay valid;
* every live inode at or below the path is marked stale (the next getattr asks
  again), and the kernel is told to forget the directory entry and the cached
  attributes (through :class:`KernelCache`, which the daemon implements with
  pyfuse3's invalidation calls; tests without a kernel pass none);
* pending writes are never touched: a path with a pending file keeps showing
  it until its upload is done.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Protocol

from gstore.vfs.control import is_control_path
from gstore.vfs.inodes import ROOT_INODE, parent_path

if TYPE_CHECKING:
    from gstore.vfs.filesystem import FileSystem

log = logging.getLogger(__name__)


class KernelCache(Protocol):
    """The kernel's copies: directory entries (parent inode, name) and inode attributes/data."""

    async def invalidate(self, entries: list[tuple[int, str]], inodes: list[tuple[int, bool]]) -> None:
        """Forget ``entries``, then the ``inodes`` (``(ino, attributes_only)``); unknown ones are ignored."""
        ...


def normalize_refresh_path(raw: str) -> str:
    """A mount-relative path to refresh (``""`` is the whole mount); ValueError if it is not one."""
    if "\0" in raw:
        raise ValueError("contains a NUL character")
    parts = [p for p in raw.strip().strip("/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError("'..' is not allowed (paths are relative to the mount root)")
    path = "/".join(parts)
    if is_control_path(path):
        raise ValueError("gstore's control files have nothing to refresh")
    return path


class Refresher:
    """Callable for :class:`gstore.vfs.control.ControlFiles`: ``await refresher(paths)`` → verdict."""

    def __init__(self, fs: FileSystem, kernel: KernelCache | None = None) -> None:
        self._fs = fs
        self._kernel = kernel
        self.refreshes = 0  # paths refreshed (for status and tests)

    async def __call__(self, paths: list[str]) -> dict[str, Any]:
        refreshed: list[str] = []
        errors: list[str] = []
        entries: dict[tuple[int, str], None] = {}
        inodes: dict[int, bool] = {}
        for raw in paths:
            try:
                path = normalize_refresh_path(raw)
                self._check_virtual(path)
            except (ValueError, OSError) as exc:
                errors.append(f"{raw}: {exc.strerror if isinstance(exc, OSError) else exc}")
                continue
            self.forget(path, entries, inodes)
            refreshed.append(path or ".")
        if self._kernel is not None and (entries or inodes):
            await self._kernel.invalidate(list(entries), list(inodes.items()))
        self.refreshes += len(refreshed)
        if refreshed:
            log.info("refreshed %d path(s): %s", len(refreshed), ", ".join(refreshed[:10]))
        return {"ok": not errors, "refreshed": refreshed, "errors": errors}

    def _check_virtual(self, path: str) -> None:
        if path and self._fs.virtual.parse(path) is not None:
            raise ValueError("a virtual file is computed from other files: refresh those")

    def forget(self, path: str, entries: dict[tuple[int, str], None], inodes: dict[int, bool]) -> None:
        """Drop every cached answer about ``path`` and below; collect what the kernel must forget."""
        fs = self._fs
        if path == "":
            fs.metadata.clear()
        else:
            fs.metadata.forget_tree(path)
            fs.metadata.forget_path(parent_path(path))  # its listing holds path's entry
        fs.virtual.forget(path)
        fs.xattrs.forget(path)
        for inode in fs.inodes.under(path):
            # -inf: stale whatever the monotonic clock reads (it starts at boot).
            inode.info_time = -math.inf
            pending = fs.content.staged(inode.path) is not None
            inodes[inode.ino] = pending  # attributes only: a pending file's bytes are local
            if inode.ino == ROOT_INODE or (path and inode.path != path):
                continue  # below a folder: forgetting the folder's entry prunes theirs
            parent = fs.inodes.by_path(parent_path(inode.path))
            if parent is not None:
                entries[(parent.ino, inode.path.rsplit("/", 1)[-1])] = None
        if path:
            # The kernel may hold an entry for the name, positive or negative, even
            # when no inode of it is live: forget it by name in a known parent.
            parent = fs.inodes.by_path(parent_path(path))
            if parent is not None:
                entries[(parent.ino, path.rsplit("/", 1)[-1])] = None
                parent.info_time = -math.inf
                inodes.setdefault(parent.ino, True)


__all__ = ["KernelCache", "Refresher", "normalize_refresh_path"]
