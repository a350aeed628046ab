"""End to end: ``gstore sync`` to, from and within a mount of the local S3 endpoint."""

from __future__ import annotations

import json
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

    # Between two folders of the same mount (copies made by the storage: see the tests below).
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


def control_copy(m, request: bytes) -> dict:
    """One request to the mount's ``.gstore/copy``: the verdict."""
    fd = os.open(m.path / ".gstore" / "copy", os.O_RDWR)
    try:
        os.write(fd, request)
        answer = b""
        while chunk := os.pread(fd, 65536, len(answer)):
            answer += chunk
    finally:
        os.close(fd)
    return json.loads(answer)


def head(s3, key: str) -> dict:
    return s3.client.head_object(Bucket=s3.bucket, Key=key)


STORED = {"mode": str(0o100640), "uid": "1234", "gid": "4321", "mtime": "1600000000.5"}


def test_sync_within_a_mount_copies_on_the_server(s3, mount):
    rng = random.Random(7)
    data: dict[str, bytes] = {}
    for i in range(8):
        key = f"src/{i % 2}/f{i}.bin"
        data[key] = rng.randbytes(3000 + 1000 * i)
        if i % 2 == 0:  # POSIX attributes stored with the object, and a Content-Type
            s3.put(key, data[key], Metadata=STORED, ContentType="image/png")
        else:  # nothing stored: the mount shows LastModified, and so must the copy
            s3.put(key, data[key])
    m = mount("test:")
    s3.reset_stats()
    out = gstore("sync", m.path / "src", m.path / "dst", "--skip-if", "md5", "-v")
    assert out.returncode == 0, out.stderr
    assert "8 copied" in out.stdout and "8 server-side" in out.stdout and "destination durable" in out.stdout
    assert "copied 0/f0.bin (2.9 KiB, server-side)" in out.stdout
    records = s3.server.stats.records()
    # The storage copied each object: one COPY each, no byte read and no object PUT from this host.
    assert sorted(r.key for r in records if r.op == "COPY") == sorted("dst/" + k[4:] for k in data)
    assert [r.key for r in records if r.op == "PUT" and not r.key.endswith("/")] == []
    assert [r for r in records if r.op == "GET"] == []
    assert s3.stats()["bytes_received"] < 20_000  # requests only: the tree is 52 KiB

    for key, body in data.items():
        target = "dst/" + key[4:]
        assert s3.get(target) == body
        source_head, target_head = head(s3, key), head(s3, target)
        assert target_head["ETag"] == source_head["ETag"]  # user.md5 stays free on the copy
        assert target_head["ContentType"] == source_head["ContentType"]
        if "mtime" in source_head["Metadata"]:
            assert target_head["Metadata"] == source_head["Metadata"] == STORED
        else:
            assert float(target_head["Metadata"]["mtime"]) == source_head["LastModified"].timestamp()
        # The mount's view of the copy is fresh and shows the source's attributes.
        shown, copy = os.stat(m.path / key), os.stat(m.path / target)
        assert (copy.st_size, copy.st_mode, copy.st_uid, copy.st_gid, copy.st_mtime) == \
            (shown.st_size, shown.st_mode, shown.st_uid, shown.st_gid, shown.st_mtime)
        assert (m.path / target).read_bytes() == body
    assert os.stat(m.path / "dst/0/f0.bin").st_mtime == 1600000000.5
    assert os.stat(m.path / "dst/0/f0.bin").st_mode & 0o7777 == 0o640

    # Up to date by both rules, at no cost beyond the listings.
    s3.reset_stats()
    for args in ([], ["--skip-if", "md5"]):
        again = gstore("sync", m.path / "src", m.path / "dst", *args)
        assert again.returncode == 0 and " 0 copied" in again.stdout, again.stdout
    assert not {"COPY", "PUT", "GET"} & set(ops(s3)), ops(s3)

    # A changed source replaces the existing copy (an If-Match copy), on the server again.
    s3.put("src/1/f1.bin", b"new bytes")
    assert gstore("refresh", m.path / "src").returncode == 0
    s3.reset_stats()
    out = gstore("sync", m.path / "src", m.path / "dst", "--skip-if", "md5", "-v")
    assert out.returncode == 0, out.stderr
    assert "1 copied" in out.stdout and "1 server-side" in out.stdout, out.stdout
    assert ops(s3).get("COPY") == 1 and ops(s3).get("GET", 0) == 0
    assert s3.get("dst/1/f1.bin") == b"new bytes" and (m.path / "dst/1/f1.bin").read_bytes() == b"new bytes"


def test_sync_within_a_mount_copies_pending_files_through_the_mount(s3, mount):
    s3.put("src/a.txt", b"remote a")
    m = mount("test:", "--write-back-delay", "600")
    (m.path / "src/b.txt").write_bytes(b"local b, not uploaded yet")  # pending for ten minutes
    s3.reset_stats()
    out = gstore("sync", m.path / "src", m.path / "dst", "-v")
    assert out.returncode == 0, out.stderr
    assert "2 copied" in out.stdout and "1 server-side" in out.stdout, out.stdout
    assert "copied a.txt (8 bytes, server-side)" in out.stdout and "copied b.txt (25 bytes)" in out.stdout
    counts = ops(s3)
    assert [r.key for r in s3.server.stats.records() if r.op == "COPY"] == ["dst/a.txt"]
    assert counts.get("GET", 0) == 0
    # The pending file went through the write-back queue; the sync's flush made it durable.
    assert s3.get("dst/b.txt") == b"local b, not uploaded yet"
    assert s3.get("dst/a.txt") == b"remote a"
    assert "src/b.txt" not in keys(s3)  # the source's own upload is still waiting: untouched


def test_copy_control_file_never_overwrites_a_changed_target(s3, mount):
    s3.put("src/a.txt", b"source a")
    s3.put("dst/c.txt", b"old c")
    m = mount("test:", "--write-back-delay", "600")
    seen = os.getxattr(m.path / "dst/c.txt", "user.etag").decode()
    s3.put("dst/c.txt", b"changed behind the mount")  # another host's write
    s3.reset_stats()
    for request in (b"src/a.txt\0dst/c.txt\0etag:" + seen.encode(),  # the version the caller saw
                    b"src/a.txt\0dst/c.txt\0absent",  # the caller saw no file there
                    b"src/a.txt\0dst/new.txt\0etag:" + seen.encode()):  # expected a file that is not there
        verdict = control_copy(m, request)
        assert verdict["ok"] is False and verdict["conflict"] is True and not verdict["fallback"], verdict
    assert "COPY" not in ops(s3) and "PUT" not in ops(s3)
    assert s3.get("dst/c.txt") == b"changed behind the mount"
    assert "dst/new.txt" not in keys(s3)
    # The mount shows the other host's version now (the refresh machinery ran).
    assert (m.path / "dst/c.txt").read_bytes() == b"changed behind the mount"

    # With what it shows now as the expectation, the copy replaces it.
    current = os.getxattr(m.path / "dst/c.txt", "user.etag").decode()
    verdict = control_copy(m, b"src/a.txt\0dst/c.txt\0etag:" + current.encode())
    assert verdict["ok"] is True and verdict["server_side"] is True, verdict
    assert s3.get("dst/c.txt") == b"source a" and (m.path / "dst/c.txt").read_bytes() == b"source a"

    # A pending source (or target) is for the write-back queue: the caller copies through the mount.
    (m.path / "src/p.txt").write_bytes(b"pending")
    assert control_copy(m, b"src/p.txt\0dst/p.txt")["fallback"] is True
    assert control_copy(m, b"src/a.txt\0src/p.txt")["fallback"] is True
    assert "dst/p.txt" not in keys(s3) and s3.get("src/a.txt") == b"source a"
    # Malformed requests and missing sources are errors, not fallbacks.
    for request, code in ((b"src/a.txt", 22), (b"src/a.txt\0../x", 22), (b"src/missing\0dst/m", 2)):
        verdict = control_copy(m, request)
        assert verdict["ok"] is False and verdict["fallback"] is False and verdict["errno"] == code, verdict
