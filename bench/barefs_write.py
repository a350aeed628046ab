"""The bare pyfuse3 + trio file system for creating files: the floor for "1,000 small files".

What creating a file through any Python FUSE daemon costs before it does
anything of its own: ``mkdir``, then per file the kernel's LOOKUP (negative),
CREATE, WRITE, FLUSH and RELEASE, each a request that crosses into this process
and back. Each created file's bytes go into a file of its own in a local
directory through a descriptor kept open (what gstore's staging area does),
with no journal, no metadata, no backend. ``--fsync-close`` adds one fsync of
the data file per close, in a worker thread (what a close that must be durable
on local disk cannot do without), so the two figures bracket what a durable
close can cost in Python.

    python -m bench.barefs_write STORE_DIR MOUNTPOINT [--fsync-close]

Runs in the foreground until unmounted (``fusermount3 -u``) or SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import os
import stat
import sys
import time
from dataclasses import dataclass

import pyfuse3
import trio

from bench.barefs import serve


@dataclass
class Node:
    inode: int
    is_dir: bool
    mode: int
    size: int = 0
    fd: int | None = None  # the data file's descriptor while open for writing
    store_path: str = ""


class BareWriteFS(pyfuse3.Operations):
    """Folders and regular files in memory; file bytes in STORE_DIR, one file each."""

    def __init__(self, store: str, fsync_close: bool) -> None:
        super().__init__()
        self.store = store
        self.fsync_close = fsync_close
        self.inodes = itertools.count(pyfuse3.ROOT_INODE + 1)
        self.nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: Node(pyfuse3.ROOT_INODE, True, 0o755)}
        self.children: dict[int, dict[bytes, int]] = {pyfuse3.ROOT_INODE: {}}

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.st_mode = (stat.S_IFDIR if node.is_dir else stat.S_IFREG) | node.mode
        a.st_nlink = 2 if node.is_dir else 1
        a.st_size = node.size
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        now = time.time_ns()
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = now
        a.st_blksize = 4096
        a.st_blocks = (node.size + 511) // 512
        a.attr_timeout = a.entry_timeout = 60
        return a

    def _node(self, inode: int) -> Node:
        try:
            return self.nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        inode = self.children.get(parent_inode, {}).get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self.nodes[inode])

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name in self.children.setdefault(parent_inode, {}):
            raise pyfuse3.FUSEError(errno.EEXIST)
        node = Node(next(self.inodes), True, mode & 0o7777)
        self.nodes[node.inode] = node
        self.children[node.inode] = {}
        self.children[parent_inode][name] = node.inode
        return self._attrs(node)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = sorted(self.children.get(fh, {}).items())
        for index, (name, inode) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attrs(self.nodes[inode]), index):
                return

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        siblings = self.children.setdefault(parent_inode, {})
        if name in siblings:
            raise pyfuse3.FUSEError(errno.EEXIST)
        node = Node(next(self.inodes), False, mode & 0o7777)
        node.store_path = os.path.join(self.store, f"{node.inode}.data")
        node.fd = os.open(node.store_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.nodes[node.inode] = node
        siblings[name] = node.inode
        return pyfuse3.FileInfo(fh=node.inode), self._attrs(node)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self.nodes[fh]
        written = os.pwrite(node.fd, buf, off)
        node.size = max(node.size, off + written)
        return written

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.nodes[fh].fd, size, off)

    async def flush(self, fh: int) -> None:
        node = self.nodes[fh]
        if self.fsync_close and node.fd is not None:
            await trio.to_thread.run_sync(os.fsync, node.fd)

    async def release(self, fh: int) -> None:
        node = self.nodes.get(fh)
        if node is not None and node.fd is not None:
            os.close(node.fd)
            node.fd = None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.barefs_write")
    p.add_argument("store")
    p.add_argument("mountpoint")
    p.add_argument("--fsync-close", action="store_true", help="fsync each file's data at close")
    args = p.parse_args(argv)
    serve(BareWriteFS(args.store, args.fsync_close), args.mountpoint, "barefs_write")
    return 0


if __name__ == "__main__":
    sys.exit(main())
