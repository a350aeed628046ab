#!/usr/bin/env python3
"""CPU cost of one cached read in gstore's handler stack, next to a bare handler, in-process.

The FUSE-level figures (scripts/measure_read_ceiling.py) swing with other load
on a shared machine; this one does not need the kernel: it builds the mount's
real core (``build_core`` over a ``file://`` backend, as tests/core do), wraps it
in the real pyfuse3 adapter (``fuse_ops.Operations``), warms the block cache,
and times ``await ops.read(fh, off, size)`` with the thread's CPU clock against
``await bare(off, size)``, an ``async def`` around one ``os.pread`` (what the
bare pyfuse3 file system does). Rounds alternate; the best round counts.
Usage: .venv/bin/python scripts/measure_read_cpu.py [--size 4096] [--reads 20000]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import trio

from gstore.backends import make_backend
from gstore.config import MountOptions
from gstore.core import build_core
from gstore.fuse_ops import Operations

MiB = 1024 * 1024


async def run(size: int, reads: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "backend"
        root.mkdir()
        payload = os.urandom(64 * MiB)
        (root / "data.bin").write_bytes(payload)
        local = os.open(root / "data.bin", os.O_RDONLY)
        backend = make_backend("file", str(root), {}, request_timeout=60, retries=0, breaker_threshold=10,
                               breaker_cooldown=5, connect_timeout=5)
        core = build_core(backend, Path(tmp) / "state", MountOptions())
        ops = Operations(core.fs, uid=0, gid=0, umask=0o022, attr_ttl=60, entry_ttl=60, negative_ttl=5,
                         block_size=MountOptions().block_size)
        async with trio.open_nursery() as nursery:
            await nursery.start(core.run)
            inode = await core.fs.lookup(1, "data.bin")
            fh, _keep, _direct = await core.fs.open(inode.ino, os.O_RDONLY)
            for off in range(0, len(payload), MiB):
                assert await ops.read(fh, off, MiB) == payload[off:off + MiB]
            rng = random.Random(1)
            offsets = [rng.randrange(0, len(payload) // size) * size for _ in range(reads)]
            for off in offsets[:200]:
                assert await ops.read(fh, off, size) == payload[off:off + size]

            async def bare(off: int, n: int) -> bytes:
                return os.pread(local, n, off)

            best = {"gstore": float("inf"), "bare": float("inf")}
            for _ in range(rounds):
                for name, call in (("gstore", lambda o: ops.read(fh, o, size)), ("bare", lambda o: bare(o, size))):
                    start = time.thread_time()
                    for off in offsets:
                        await call(off)
                    best[name] = min(best[name], (time.thread_time() - start) / reads * 1e6)
            nursery.cancel_scope.cancel()
        os.close(local)
    print(f"{size} B cached reads, CPU per read (best of {rounds} rounds of {reads}): "
          f"gstore handler {best['gstore']:.1f} µs, bare pread handler {best['bare']:.1f} µs, "
          f"gstore overhead {best['gstore'] - best['bare']:.1f} µs")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--reads", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trio.run(run, args.size, args.reads, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
