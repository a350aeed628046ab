"""End to end: the read path's per-request costs (issue #14), checked by what the daemon does.

Speed itself is measured by scripts/measure_read_ceiling.py, never asserted here;
these tests pin the behaviour the speed depends on: no xattr round trip per file
in ``ls -l``, cached reads served with no backend request and a bounded number of
open block files, dense random reads turning into a background fetch of the rest.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import daemon_pid
from tests.fuse.test_read_path import assert_fetched_once

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def direct_reads(path: Path, offsets: list[int], size: int = 4096) -> list[bytes]:
    """O_DIRECT preads (each one a FUSE READ, no page cache) into an aligned buffer."""
    buf = mmap.mmap(-1, size)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        out = []
        for off in offsets:
            n = os.preadv(fd, [buf], off)
            out.append(bytes(buf[:n]))
        return out
    finally:
        os.close(fd)
        buf.close()


def fetched_bytes(s3) -> int:
    return sum(int(b) - int(a) + 1 for a, b in (r.range.removeprefix("bytes=").split("-") for r in s3.get_records()))


def test_ls_l_of_many_files_sends_no_xattr_request_per_file(s3, mount):
    for i in range(300):
        s3.put(f"many/f{i:04d}", b"x" * (i % 7))
    s3.put("many/doc.txt", b"hello\n")
    m = mount("test:", "--debug-requests")
    first = subprocess.run(["ls", "-l", str(m.path / "many")], check=True, capture_output=True, text=True).stdout
    assert len(first.splitlines()) == 302  # "total" + 301 entries
    before = m.log().count("fuse getxattr")
    second = subprocess.run(["ls", "-l", str(m.path / "many")], check=True, capture_output=True, text=True).stdout
    assert second == first
    asked = m.log().count("fuse getxattr") - before
    # coreutils asks every file for security.selinux and system.posix_acl_access;
    # ENOTSUP makes it stop after the first file of the device.
    assert asked <= 4, f"{asked} getxattr requests for one ls -l of 301 files"
    # The attributes gstore answers are still there.
    assert os.getxattr(m.path / "many/doc.txt", "user.md5") == hashlib.md5(b"hello\n").hexdigest().encode()
    assert "user.md5" in os.listxattr(m.path / "many/doc.txt")
    for name in ("security.selinux", "system.posix_acl_access", "trusted.x"):
        with pytest.raises(OSError) as refused:
            os.getxattr(m.path / "many/doc.txt", name)
        assert refused.value.errno in (errno.ENOTSUP, errno.EOPNOTSUPP), (name, refused.value)


def test_cached_random_reads_are_exact_need_no_request_and_keep_few_files_open(s3, mount):
    data = blob(24 * MiB, seed=14)
    s3.put("db.bin", data)
    m = mount("test:", "--block-size", "1M")
    subprocess.run(["cat", str(m.path / "db.bin")], check=True, stdout=subprocess.DEVNULL)
    pid = daemon_pid(m.cache_dir)
    assert pid is not None
    fds_before = len(os.listdir(f"/proc/{pid}/fd"))
    s3.reset_stats()
    rng = random.Random(5)
    offsets = [rng.randrange(0, len(data) - 4096) for _ in range(3000)]
    for off, got in zip(offsets, direct_reads(m.path / "db.bin", offsets), strict=True):
        assert got == data[off : off + 4096], off
    # Reads spanning two blocks, and the last bytes of the object.
    spans = [MiB - 100, 5 * MiB - 4000, len(data) - 4096, len(data) - 10]
    for off, got in zip(spans, direct_reads(m.path / "db.bin", spans), strict=True):
        assert got == data[off : off + 4096], off
    assert s3.stats()["GET"] == 0, "a cached block was fetched again"
    fds_after = len(os.listdir(f"/proc/{pid}/fd"))
    assert fds_after - fds_before <= 24 + 4, "the daemon keeps far more block files open than it read"


def test_dense_random_reads_fetch_the_rest_of_the_file_in_the_background(s3, mount):
    data = blob(32 * MiB, seed=15)
    s3.put("table.db", data)
    m = mount("test:", "--block-size", "1M")
    os.stat(m.path / "table.db")
    s3.reset_stats()
    # Ten distinct blocks, read at random places: dense enough for a 32-block file.
    blocks = [3, 29, 11, 17, 0, 22, 8, 25, 14, 5]
    offsets = [b * MiB + 777 for b in blocks]
    for off, got in zip(offsets, direct_reads(m.path / "table.db", offsets), strict=True):
        assert got == data[off : off + 4096]
    deadline = time.monotonic() + 60
    while fetched_bytes(s3) < len(data) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_fetched_once(s3.get_records(), len(data))
    s3.reset_stats()
    rng = random.Random(6)
    offsets = [rng.randrange(0, len(data) - 4096) for _ in range(500)]
    for off, got in zip(offsets, direct_reads(m.path / "table.db", offsets), strict=True):
        assert got == data[off : off + 4096], off
    assert s3.stats()["GET"] == 0


def test_sparse_random_reads_fetch_only_what_they_touch(s3, mount):
    data = blob(64 * MiB, seed=16)
    s3.put("video.mp4", data)
    m = mount("test:", "--block-size", "1M")
    os.stat(m.path / "video.mp4")
    s3.reset_stats()
    offsets = [b * MiB + 5 for b in (60, 2, 33, 17, 48)]
    for off, got in zip(offsets, direct_reads(m.path / "video.mp4", offsets), strict=True):
        assert got == data[off : off + 4096]
    time.sleep(0.5)  # a background fill, if one were (wrongly) started, would show by now
    gets = s3.get_records()
    assert len(gets) == 5, [r.range for r in gets]
    assert all(re.fullmatch(r"bytes=\d+-\d+", r.range or "") for r in gets)
