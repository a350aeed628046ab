"""End to end: ``gstore sync`` to, from and within a mount of the local S3 endpoint."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuse


def gstore(*args) -> subprocess.CompletedProcess:
    code = "import sys; from gstore.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120)


def make_tree(root: Path, count: int, seed: int = 0) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {}
    for i in range(count):
        rel = f"d{i % 4}/f{i:03d}.bin"
        data = rng.randbytes(rng.randrange(4096, 20_000))
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))
        files[rel] = data
    return files


def keys(s3, prefix: str = "") -> dict[str, bytes]:
    found = {}
    for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if not item["Key"].endswith("/"):
                found[item["Key"]] = s3.get(item["Key"])
    return found


def ops(s3) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in s3.server.stats.records():
        counts[record.op] = counts.get(record.op, 0) + 1
    return counts


def test_sync_local_to_mount_md5_reads_nothing_back(s3, mount, tmp_path):
    local = tmp_path / "local"
    files = make_tree(local, 40)
    m = mount("test:")
    dst = m.path / "backup"
    first = gstore("sync", local, dst)
    assert first.returncode == 0, first.stderr
    assert "40 copied" in first.stdout and "destination durable" in first.stdout
    # Durable when the command returned: every object is in the bucket, and nothing else.
    assert keys(s3, "backup/") == {f"backup/{rel}": data for rel, data in files.items()}
    assert (dst / "d1/f001.bin").stat().st_mtime == 1_700_000_001
    assert (dst / "d1/f001.bin").stat().st_mode & 0o777 == (local / "d1/f001.bin").stat().st_mode & 0o777

    # Change three files: same size other bytes, other size, and a new one.
    same_size = bytearray(files["d0/f000.bin"])
    same_size[10] ^= 0xFF
    (local / "d0/f000.bin").write_bytes(bytes(same_size))
    os.utime(local / "d0/f000.bin", (1_700_000_000, 1_700_000_000))  # the quick check cannot see this one
    (local / "d2/f002.bin").write_bytes(b"shorter")
    (local / "d3/new.bin").write_bytes(b"new file")
    quick = gstore("sync", local, dst, "--dry-run", "-q")
    assert quick.returncode == 0
    assert "d0/f000.bin" not in quick.stdout and "d2/f002.bin" in quick.stdout

    s3.reset_stats()
    out = gstore("sync", local, dst, "--skip-if", "md5", "-j", "4")
    assert out.returncode == 0, out.stderr
    assert "3 copied" in out.stdout and "38 up to date" in out.stdout
    counts = ops(s3)
    assert counts.get("GET", 0) == 0, counts  # user.md5 came from the ETags: no byte read back
    assert keys(s3, "backup/")["backup/d0/f000.bin"] == bytes(same_size)
    assert keys(s3, "backup/")["backup/d3/new.bin"] == b"new file"
    assert not [k for k in keys(s3) if "conflict" in k or "gstore-sync" in k]

    # Nothing left to do, by either rule.
    for args in ([], ["--skip-if", "md5"]):
        again = gstore("sync", local, dst, *args)
        assert again.returncode == 0 and " 0 copied" in again.stdout, again.stdout

    # --delete removes what the source no longer has, in the bucket at once.
    (local / "d1/f005.bin").unlink()
    out = gstore("sync", local, dst, "--delete", "-v")
    assert out.returncode == 0, out.stderr
    assert "deleted d1/f005.bin" in out.stdout
    assert "backup/d1/f005.bin" not in keys(s3, "backup/")


def test_sync_mount_to_local_and_within_the_mount(s3, mount, tmp_path):
    rng = random.Random(3)
    for i in range(12):
        s3.put(f"src/{i % 3}/f{i}.dat", rng.randbytes(5000 + i))
    m = mount("test:")
    local = tmp_path / "copy"
    out = gstore("sync", m.path / "src", local)
    assert out.returncode == 0, out.stderr
    assert "12 copied" in out.stdout and "durable" not in out.stdout  # a local destination: no flush
    for key, data in keys(s3, "src/").items():
        assert (local / key[len("src/"):]).read_bytes() == data
    s3.reset_stats()
    again = gstore("sync", m.path / "src", local)  # times were kept: the quick check skips all
    assert again.returncode == 0 and "12 up to date" in again.stdout
    assert ops(s3).get("GET", 0) == 0

    # Between two folders of the same mount (an ordinary copy through the mount).
    within = gstore("sync", m.path / "src", m.path / "dst", "--skip-if", "md5")
    assert within.returncode == 0, within.stderr
    assert {k[4:]: v for k, v in keys(s3, "dst/").items()} == {k[4:]: v for k, v in keys(s3, "src/").items()}


def test_sync_failure_to_a_read_only_mount_exits_1(s3, mount, tmp_path):
    local = tmp_path / "local"
    make_tree(local, 3)
    m = mount("test:", "--read-only")
    out = gstore("sync", local, m.path / "x")
    assert out.returncode == 1
    assert "Read-only file system" in out.stderr
    assert keys(s3) == {}
