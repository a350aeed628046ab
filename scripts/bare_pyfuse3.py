#!/usr/bin/env python3
"""The Python-FUSE ceiling: a bare pyfuse3 + trio file system serving one local file.

It does the least a pyfuse3 file system can do per read (a ``pread`` on an fd
kept open), so ``scripts/measure_read_ceiling.py`` can compare gstore's cached
read path against it in the same run, on the same machine.
Usage: bare_pyfuse3.py LOCAL_FILE MOUNTPOINT   (foreground; fusermount3 -u ends it)
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

FILE_INO = pyfuse3.ROOT_INODE + 1
NAME = b"data"


class Bare(pyfuse3.Operations):
    def __init__(self, path: str) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = ino
        attrs.entry_timeout = attrs.attr_timeout = 300
        if ino == pyfuse3.ROOT_INODE:
            attrs.st_mode = stat.S_IFDIR | 0o755
            attrs.st_nlink = 2
        else:
            attrs.st_mode = stat.S_IFREG | 0o644
            attrs.st_nlink = 1
            attrs.st_size = self._size
        attrs.st_uid, attrs.st_gid = os.getuid(), os.getgid()
        return attrs

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(FILE_INO)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self._fd, size, off)


def main() -> None:
    source, mountpoint = sys.argv[1], sys.argv[2]
    pyfuse3.init(Bare(source), mountpoint, {"fsname=bare", "noatime"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
