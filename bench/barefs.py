"""The bare pyfuse3 + trio file system: the ceiling a Python FUSE daemon can reach.

It serves one local file, read-only, under one name, with a passthrough
``pread`` per READ and nothing else (no cache, no locks, no backend), so a
gstore figure divided by this one's says how much of the gap to a C daemon is
gstore's own work and how much is pyfuse3 + trio's per-request cost.

    python -m bench.barefs SOURCE_FILE MOUNTPOINT [--name NAME]

Runs in the foreground until unmounted (``fusermount3 -u``) or SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1


class BareFS(pyfuse3.Operations):
    """A root folder holding one file whose reads are preads of a local file."""

    def __init__(self, source: str, name: bytes) -> None:
        super().__init__()
        self.name = name
        self.fd = os.open(source, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        is_root = inode == pyfuse3.ROOT_INODE
        a.st_mode = (stat.S_IFDIR | 0o555) if is_root else (stat.S_IFREG | 0o444)
        a.st_nlink = 2 if is_root else 1
        a.st_size = 0 if is_root else self.size
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        a.attr_timeout = a.entry_timeout = 300  # nothing ever changes here
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != self.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(FILE_INODE)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:  # one entry, cookie 1: stable, not a list index of a changing list
            pyfuse3.readdir_reply(token, self.name, self._attrs(FILE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        # keep_cache: the file never changes, so the kernel may keep its pages across opens
        # (what gstore does while an object's ETag is unchanged): "warm" is then like for like.
        return pyfuse3.FileInfo(fh=FILE_INODE, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.fd, size, off)

    async def release(self, fh: int) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.barefs")
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("--name", default=None, help="the file's name in the mount (default: the source's)")
    args = p.parse_args(argv)
    name = (args.name or os.path.basename(args.source)).encode()
    serve(BareFS(args.source, name), args.mountpoint, "barefs")
    return 0


def serve(fs: pyfuse3.Operations, mountpoint: str, fsname: str) -> None:
    """Mount ``fs`` and serve it in the foreground until unmounted or SIGTERM."""
    options = set(pyfuse3.default_options)
    options.add(f"fsname={fsname}")
    options.discard("default_permissions")
    pyfuse3.init(fs, mountpoint, options)
    # SIGTERM: unmount ourselves so the loop ends (trio would otherwise die with the signal)
    signal.signal(signal.SIGTERM, lambda *_: pyfuse3.terminate())
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    sys.exit(main())
