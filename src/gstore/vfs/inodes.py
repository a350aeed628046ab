"""Inode numbers for mount-relative paths, with kernel lookup counts.

An inode number is derived from the path (a 63-bit hash), so the same path
gets the same number for the life of the mount and across restarts, which
keeps ``find -inum``, ``tar`` and ``rsync -H`` consistent, without keeping an
entry for every path ever seen: entries live only while the kernel holds a
reference (lookup count > 0) or a handle is open, and ``forget`` drops them.
A hash collision with a live inode of another path is resolved by probing.
"""

from __future__ import annotations

import hashlib
import stat
import time
from dataclasses import dataclass, field

from gstore.backends.base import ObjectInfo

ROOT_INODE = 1
_MASK = (1 << 63) - 1


@dataclass(slots=True)
class Inode:
    ino: int
    path: str  # relative to the mount root; "" for the root
    info: ObjectInfo
    info_time: float  # monotonic time ``info`` was fetched
    lookups: int = 0
    open_handles: int = 0
    # Identity of the bytes the kernel page cache may hold for this inode; an
    # open keeps the page cache only while the object is still that version.
    page_cache_identity: str | None = None
    # How many read handles are open per object identity: two versions open at
    # once must not share the kernel page cache.
    open_identities: dict[str, int] = field(default_factory=dict)
    # A hidden virtual file or directory (.concat, .diff, .versions): read-only, computed.
    virtual: bool = False
    # Monotonic time the backend last confirmed this object (a HEAD): an open soon after
    # trusts it (close-to-open consistency without a second request).
    verified_at: float = 0.0
    # No longer reachable by its path (unlinked or replaced): st_nlink 0 for open handles.
    unlinked: bool = False
    # The pending file (gstore.write.staging.StagedFile) this inode's open handles share,
    # kept so that an unlinked-but-open file still answers fstat. Set by the namespace layer.
    staged: object = None


def file_kind(info: ObjectInfo) -> int:
    """The file type the kernel was told (S_IFREG, S_IFDIR, S_IFLNK, ...): it must never change
    for one inode number, or the kernel marks the inode bad."""
    if info.mode is not None and stat.S_IFMT(info.mode):
        return stat.S_IFMT(info.mode)
    return stat.S_IFDIR if info.is_dir else stat.S_IFREG


def path_inode_number(path: str, attempt: int = 0) -> int:
    digest = hashlib.blake2b(f"{attempt}\0{path}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    number = int.from_bytes(digest, "little") & _MASK
    return number if number > ROOT_INODE else number + 2


def parent_path(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


class InodeTable:
    """The inodes the kernel currently knows about."""

    def __init__(self, root_info: ObjectInfo) -> None:
        self._by_ino: dict[int, Inode] = {}
        self._by_path: dict[str, Inode] = {}
        root = Inode(ROOT_INODE, "", root_info, time.monotonic(), lookups=1)
        self._by_ino[ROOT_INODE] = root
        self._by_path[""] = root

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Inode | None:
        return self._by_ino.get(ino)

    def by_path(self, path: str) -> Inode | None:
        return self._by_path.get(path)

    def number_for(self, path: str, kind: int = stat.S_IFREG) -> int:
        """The inode number ``path`` has, or would get, without registering it.

        Symlinks, FIFOs, sockets and devices hash with their type: a listing cannot
        tell them from files (a lookup can), and the same number must never come
        back with another type, even after the kernel forgot it.
        """
        known = self._by_path.get(path)
        if known is not None:
            return known.ino
        if path == "":
            return ROOT_INODE
        seed = path if kind in (stat.S_IFREG, stat.S_IFDIR) else f"{path}\0{kind:o}"
        attempt = 0
        while True:
            number = path_inode_number(seed, attempt)
            if number not in self._by_ino:
                return number
            attempt += 1

    def remember(self, path: str, info: ObjectInfo, *, lookups: int = 1) -> Inode:
        """Register (or refresh) ``path`` and add ``lookups`` kernel references."""
        now = time.monotonic()
        inode = self._by_path.get(path)
        if inode is None:
            inode = Inode(self.number_for(path, file_kind(info)), path, info, now)
            self._by_ino[inode.ino] = inode
            self._by_path[path] = inode
        elif info is not inode.info:
            if file_kind(info) != file_kind(inode.info):
                # Same name, other kind: the kernel must not see the old inode
                # change type, so the path moves to a fresh number.
                self._detach(inode)
                return self.remember(path, info, lookups=lookups)
            inode.info = info
            inode.info_time = now
        inode.lookups += lookups
        return inode

    def under(self, path: str) -> list[Inode]:
        """The live inodes of ``path`` and everything below it (every inode for ``""``)."""
        if path == "":
            return list(self._by_path.values())
        prefix = path + "/"
        return [inode for p, inode in self._by_path.items() if p == path or p.startswith(prefix)]

    def refresh(self, inode: Inode, info: ObjectInfo) -> None:
        inode.info = info
        inode.info_time = time.monotonic()

    def forget(self, ino: int, count: int) -> None:
        inode = self._by_ino.get(ino)
        if inode is None or ino == ROOT_INODE:
            return
        inode.lookups = max(0, inode.lookups - count)
        self._maybe_drop(inode)

    def opened(self, inode: Inode) -> None:
        inode.open_handles += 1

    def closed(self, inode: Inode) -> None:
        inode.open_handles = max(0, inode.open_handles - 1)
        self._maybe_drop(inode)

    def _maybe_drop(self, inode: Inode) -> None:
        if inode.lookups == 0 and inode.open_handles == 0:
            self._by_ino.pop(inode.ino, None)
            if self._by_path.get(inode.path) is inode:
                del self._by_path[inode.path]

    def _detach(self, inode: Inode) -> None:
        """Unlink ``inode`` from its path; it stays reachable by number until forgotten."""
        if self._by_path.get(inode.path) is inode:
            del self._by_path[inode.path]
        inode.unlinked = True

    def rename_path(self, old: str, new: str) -> None:
        """Move ``old`` (and everything below it) to ``new``; a live inode at ``new`` is detached.

        Inode numbers do not change: the kernel keeps its references across a rename.
        """
        target = self._by_path.get(new)
        if target is not None:
            self._detach(target)
        prefix = old + "/"
        moving = [inode for path, inode in self._by_path.items() if path == old or path.startswith(prefix)]
        for inode in moving:
            del self._by_path[inode.path]
        for inode in moving:
            inode.path = new + inode.path[len(old):]
            stale = self._by_path.get(inode.path)
            if stale is not None and stale is not inode:
                self._detach(stale)
            self._by_path[inode.path] = inode

    def detach_path(self, path: str) -> None:
        """``path`` no longer exists; kernel references to its inode stay valid until forgotten."""
        inode = self._by_path.get(path)
        if inode is not None:
            self._detach(inode)
