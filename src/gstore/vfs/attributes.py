"""What ``stat`` shows for an inode: modes, owners, times, link counts and cache lifetimes.

The FUSE adapter converts an :class:`Attributes` into the kernel's structure
and decides nothing itself; the rules live here, next to the inode they read.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from gstore.vfs.inodes import Inode

#: The block size st_blksize advertises (what cp and friends size their buffers by).
PREFERRED_IO_SIZE = 128 * 1024


@dataclass(frozen=True, slots=True)
class Attributes:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int
    entry_timeout: float
    attr_timeout: float


class AttributePolicy:
    """The attributes of one mount's inodes (owner and permission defaults from the options)."""

    def __init__(self, *, uid: int, gid: int, umask: int, attr_ttl: float, entry_ttl: float,
                 mounted_at: float) -> None:
        self.uid, self.gid = uid, gid
        self._file_mode = stat.S_IFREG | (0o666 & ~umask)
        self._dir_mode = stat.S_IFDIR | (0o777 & ~umask)
        self._attr_ttl, self._entry_ttl = attr_ttl, entry_ttl
        self._mounted_at = mounted_at

    def of(self, inode: Inode) -> Attributes:
        info = inode.info
        if info.mode is not None and not inode.virtual:
            mode = info.mode  # stored with the object (or set here): its type bits included
        else:
            mode = self._dir_mode if info.is_dir else self._file_mode
        if inode.virtual:  # computed, read-only: no write bits
            mode &= ~0o222
        # 1 is "unknown" for folders (find(1) does not trust a subdirectory count);
        # 0 for a file unlinked while open (fstat on its descriptor).
        nlink = 0 if inode.unlinked else 1
        mtime = info.mtime or self._mounted_at
        return Attributes(
            ino=inode.ino, mode=mode, nlink=nlink,
            uid=self.uid if info.uid is None else info.uid, gid=self.gid if info.gid is None else info.gid,
            size=info.size, blocks=(info.size + 511) // 512, blksize=PREFERRED_IO_SIZE,
            atime_ns=_ns(info.atime if info.atime is not None else mtime), mtime_ns=_ns(mtime),
            ctime_ns=_ns(info.ctime if info.ctime is not None else mtime), rdev=info.rdev,
            entry_timeout=self._entry_ttl, attr_timeout=self._attr_ttl,
        )


def _ns(seconds: float) -> int:
    # Times travel as float seconds (S3 metadata, listings): exact to the microsecond, so
    # "touch -d 04:05:06.789" reads back as .789000000, not .788999936.
    return round(seconds * 1e6) * 1000


__all__ = ["AttributePolicy", "Attributes", "PREFERRED_IO_SIZE"]
