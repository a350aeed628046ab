"""End to end: real programs read a real FUSE mount of a real S3 endpoint."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def assert_fetched_once(records: list, size: int) -> None:
    """Every byte of the object came in exactly one GET (readahead asks for several blocks at once)."""
    spans = sorted(tuple(int(x) for x in r.range.removeprefix("bytes=").split("-")) for r in records)
    assert spans and spans[0][0] == 0 and spans[-1][1] == size - 1, spans
    for before, after in zip(spans, spans[1:], strict=False):
        assert after[0] == before[1] + 1, f"bytes fetched twice or never: {before} then {after}"


def block_files(cache_dir: Path) -> list[Path]:
    return [p for p in cache_dir.rglob("*") if p.is_file() and p.parent.parent.name == "blocks"]


def test_cat_and_cmp_objects_of_many_sizes(s3, mount, tmp_path):
    sizes = {"empty": 0, "one": 1, "small.txt": 1000, "block": MiB, "block_plus": MiB + 1, "multi.bin": 5 * MiB + 123}
    for name, size in sizes.items():
        s3.put(name, blob(size, seed=size))
    m = mount("test:", "--block-size", "1M")
    for name, size in sizes.items():
        local = tmp_path / f"ref-{name}"
        local.write_bytes(blob(size, seed=size))
        subprocess.run(["cmp", str(local), str(m.path / name)], check=True)
        out = subprocess.run(["cat", str(m.path / name)], check=True, capture_output=True).stdout
        assert out == blob(size, seed=size)
    assert sorted(os.listdir(m.path)) == sorted(sizes)


def test_dd_with_skip_reads_the_right_bytes(s3, mount):
    data = blob(7 * MiB + 4321, seed=7)
    s3.put("video.ts", data)
    m = mount("test:", "--block-size", "1M")
    for bs, skip, count in [(4096, 0, 1), (4096, 300, 5), (65536, 17, 3), (1000, 7001, 2), (MiB, 6, 4)]:
        out = subprocess.run(
            ["dd", f"if={m.path / 'video.ts'}", f"bs={bs}", f"skip={skip}", f"count={count}", "status=none"],
            check=True,
            capture_output=True,
        ).stdout
        assert out == data[bs * skip : bs * (skip + count)], (bs, skip, count)


def test_random_reads_fetch_only_the_blocks_they_need(s3, mount):
    data = blob(32 * MiB, seed=3)
    s3.put("big.bin", data)
    m = mount("test:", "--block-size", "1M")
    os.stat(m.path / "big.bin")
    s3.reset_stats()
    fd = os.open(m.path / "big.bin", os.O_RDONLY)
    try:
        for offset in (20 * MiB + 5, 3 * MiB, 31 * MiB + 100):
            assert os.pread(fd, 4096, offset) == data[offset : offset + 4096]
    finally:
        os.close(fd)
    gets = s3.stats()["GET"]
    assert 3 <= gets <= 6, s3.get_records()
    assert s3.stats()["bytes_sent"] <= 6 * MiB


def test_sequential_read_fetches_each_block_once_with_readahead(s3, mount, tmp_path):
    data = blob(24 * MiB + 17, seed=4)
    s3.put("seq.bin", data)
    m = mount("test:", "--block-size", "1M", "--readahead", "8M")
    os.stat(m.path / "seq.bin")
    s3.reset_stats()
    digest = hashlib.sha256((m.path / "seq.bin").read_bytes()).hexdigest()
    assert digest == hashlib.sha256(data).hexdigest()
    assert_fetched_once(s3.get_records(), len(data))


def test_two_concurrent_readers_share_fetches(s3, mount):
    data = blob(16 * MiB, seed=5)
    s3.put("shared.bin", data)
    m = mount("test:", "--block-size", "1M")
    os.stat(m.path / "shared.bin")
    s3.reset_stats()

    def read_all(_: int) -> bytes:
        return (m.path / "shared.bin").read_bytes()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(read_all, range(4)))
    assert all(r == data for r in results)
    assert_fetched_once(s3.get_records(), len(data))


def test_stat_sizes_mtimes_modes_and_owner(s3, mount):
    s3.put("dir/a.txt", b"hello")
    s3.put("b.bin", blob(3000))
    head = s3.client.head_object(Bucket=s3.bucket, Key="b.bin")
    m = mount("test:")
    st = os.stat(m.path / "b.bin")
    assert st.st_size == 3000
    assert int(st.st_mtime) == int(head["LastModified"].timestamp())
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert st.st_uid == os.getuid() and st.st_gid == os.getgid()
    d = os.stat(m.path / "dir")
    assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o755
    assert os.stat(m.path / "dir" / "a.txt").st_size == 5
    # Inode numbers are stable while mounted.
    assert os.stat(m.path / "b.bin").st_ino == st.st_ino


def test_directory_markers_and_prefixes_are_directories(s3, mount):
    s3.put("marker/", b"")
    s3.put("implicit/deep/file.txt", b"x")
    s3.put("marker/inside.txt", b"y")
    m = mount("test:")
    assert sorted(os.listdir(m.path)) == ["implicit", "marker"]
    assert os.path.isdir(m.path / "marker") and os.path.isdir(m.path / "implicit" / "deep")
    assert os.listdir(m.path / "marker") == ["inside.txt"]
    assert (m.path / "implicit" / "deep" / "file.txt").read_bytes() == b"x"


def test_keys_that_are_not_posix_names_are_skipped_and_logged(s3, mount):
    long_name = "n" * 300
    s3.put("ok.txt", b"fine")
    s3.put("a//b", b"double slash")
    s3.put(long_name, b"too long")
    s3.put("both", b"object")
    s3.put("both/child", b"child")
    m = mount("test:")
    names = sorted(os.listdir(m.path))
    assert names == ["a", "both", "ok.txt"]
    assert os.path.isdir(m.path / "both")
    assert (m.path / "both" / "child").read_bytes() == b"child"
    assert os.listdir(m.path / "a") == []
    with pytest.raises(OSError):
        os.stat(m.path / long_name)
    log = m.log()
    assert "name longer than 255 bytes" in log
    assert "both an object and a prefix" in log
    assert "empty name" in log


def test_ls_of_10000_objects_is_one_paginated_listing(s3, mount):
    s3.server.seed(s3.bucket, {f"many/obj-{i:05d}.dat": b"%d" % i for i in range(10_000)})
    m = mount("test:")
    s3.reset_stats()
    out = subprocess.run(["ls", "-l", str(m.path / "many")], check=True, capture_output=True, text=True).stdout
    lines = [l for l in out.splitlines() if l.startswith("-")]
    assert len(lines) == 10_000
    counts = s3.stats()
    # The lookup of "many" itself is one HEAD (404) and one LIST; the 10,000 entries
    # cost 10 pages of LIST and not a single request each.
    assert counts["HEAD"] <= 1, counts
    assert counts["GET"] == 0, counts
    assert counts["LIST"] <= 11, counts
    # Warm: nothing at all goes to the backend.
    s3.reset_stats()
    subprocess.run(["ls", "-l", str(m.path / "many")], check=True, capture_output=True)
    assert s3.stats()["total"] == 0


def test_subfolder_mount_cannot_see_outside_its_prefix(s3, mount):
    s3.put("inside/a.txt", b"in")
    s3.put("inside/sub/b.txt", b"in2")
    s3.put("inside-not/c.txt", b"sibling with a common string prefix")
    s3.put("outside.txt", b"out")
    s3.reset_stats()
    m = mount("test:inside")
    assert sorted(os.listdir(m.path)) == ["a.txt", "sub"]
    assert not (m.path / "outside.txt").exists()
    assert not (m.path / "inside-not").exists()
    records = s3.server.stats.records()
    assert records
    for record in records:
        if record.op == "LIST":
            assert (record.prefix or "").startswith("inside/"), record
        elif record.key:
            assert record.key.startswith("inside/"), record


def test_blocks_survive_a_restart_cache_hits_cost_no_gets(s3, mount):
    data = blob(6 * MiB, seed=9)
    s3.put("keep.bin", data)
    m = mount("test:", "--block-size", "1M")
    assert (m.path / "keep.bin").read_bytes() == data
    assert m.stop() == 0
    assert not os.path.ismount(m.path)
    files = block_files(m.cache_dir)
    assert len(files) == 6
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for directory in [m.cache_dir, *{p.parent for p in files}]:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    m2 = mount("test:", "--block-size", "1M")
    s3.reset_stats()
    assert (m2.path / "keep.bin").read_bytes() == data
    assert s3.stats()["GET"] == 0


def test_cache_size_is_enforced_by_eviction(s3, mount):
    data = blob(10 * MiB, seed=10)
    s3.put("evict.bin", data)
    m = mount("test:", "--block-size", "1M", "--cache-size", "3M", "--readahead", "0")
    assert (m.path / "evict.bin").read_bytes() == data
    total = sum(p.stat().st_size for p in block_files(m.cache_dir))
    assert 0 < total <= 3 * MiB
    m.stop()
    # After a restart on the same cache: the tail is still cached, the head was evicted.
    m2 = mount("test:", "--block-size", "1M", "--cache-size", "3M", "--readahead", "0")
    os.stat(m2.path / "evict.bin")
    s3.reset_stats()
    with open(m2.path / "evict.bin", "rb") as f:
        f.seek(10 * MiB - 4096)
        assert f.read() == data[-4096:]
        assert s3.stats()["GET"] == 0
        f.seek(0)
        assert f.read(4096) == data[:4096]
        assert s3.stats()["GET"] == 1


def test_changed_object_is_seen_after_the_ttl(s3, mount):
    s3.put("conf.txt", b"version one")
    m = mount("test:", "--attr-ttl", "1", "--dir-cache-ttl", "1", "--negative-ttl", "1")
    assert (m.path / "conf.txt").read_bytes() == b"version one"
    s3.put("conf.txt", b"version TWO")  # same size, different bytes and ETag
    s3.put("new.txt", b"new")
    time.sleep(2.2)
    assert (m.path / "conf.txt").read_bytes() == b"version TWO"
    assert (m.path / "new.txt").read_bytes() == b"new"
    s3.put("conf.txt", b"version three, longer")
    time.sleep(2.2)
    assert (m.path / "conf.txt").read_bytes() == b"version three, longer"
    assert "new.txt" in os.listdir(m.path)


def test_read_only_mount_refuses_writes(s3, mount):
    s3.put("ro.txt", b"data")
    m = mount("test:", "--read-only")
    with pytest.raises(OSError):
        with open(m.path / "ro.txt", "wb") as f:
            f.write(b"nope")
    with pytest.raises(OSError):
        os.mkdir(m.path / "newdir")
    assert s3.get("ro.txt") == b"data"


def test_ffprobe_of_a_large_video_fetches_a_small_fraction(s3, mount, tmp_path):
    video = tmp_path / "clip.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=640x360:rate=25,noise=alls=60:allf=t",
         "-t", "20", "-c:v", "mpeg4", "-q:v", "2", "-y", str(video)],
        check=True,
    )
    data = video.read_bytes()
    s3.put("clip.mp4", data)
    m = mount("test:", "--block-size", "1M")
    os.stat(m.path / "clip.mp4")
    s3.reset_stats()
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(m.path / "clip.mp4")],
        check=True, capture_output=True, text=True,
    )
    assert abs(float(probe.stdout.strip()) - 20.0) < 0.5
    fetched = s3.stats()["bytes_sent"]
    assert fetched < len(data) / 2, (fetched, len(data))
