"""End to end: programs write into the mount; the bucket ends up with exactly their bytes."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import BUCKET

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024


def gstore(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "import sys; from gstore.cli import main; sys.exit(main())", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"gstore {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def keys(s3, prefix: str = "") -> list[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def status(m) -> dict:
    return json.loads(gstore("status", "--json", str(m.path)).stdout)


def test_new_file_is_visible_at_once_and_durable_after_flush(s3, mount):
    m = mount("test:", "--write-back-delay", "3600")
    (m.path / "docs").mkdir()
    (m.path / "docs" / "note.txt").write_text("hello, bucket\n")
    assert (m.path / "docs" / "note.txt").read_text() == "hello, bucket\n"
    assert os.stat(m.path / "docs" / "note.txt").st_size == 14
    assert os.listdir(m.path / "docs") == ["note.txt"]
    assert "docs/note.txt" not in keys(s3)  # write-back: not uploaded yet
    pending = status(m)["uploads"]
    assert [p["path"] for p in pending["pending_paths"]] == ["docs/note.txt"]
    gstore("flush", str(m.path))
    head = s3.client.head_object(Bucket=BUCKET, Key="docs/note.txt")
    assert s3.get("docs/note.txt") == b"hello, bucket\n"
    assert head["ContentType"] == "text/plain"
    assert abs(float(head["Metadata"]["mtime"]) - time.time()) < 120
    assert status(m)["uploads"]["pending"] == 0
    # No zero-byte placeholder was ever written: one PUT for the marker, one for the file.
    assert "docs/" in keys(s3)


def test_random_offset_writes_match_a_local_reference(s3, mount, tmp_path):
    rng = random.Random(42)
    original = rng.randbytes(3 * MiB + 77)
    s3.put("random.bin", original)
    m = mount("test:", "--block-size", "1M", "--write-back-delay", "3600")
    reference = bytearray(original)
    fd = os.open(m.path / "random.bin", os.O_RDWR)
    try:
        for step in range(60):
            choice = rng.random()
            if choice < 0.8:
                offset = rng.randrange(0, len(reference) + 200_000)
                data = rng.randbytes(rng.choice([1, 7, 4096, 70_000, 300_000]))
                os.pwrite(fd, data, offset)
                if offset > len(reference):
                    reference.extend(bytes(offset - len(reference)))
                reference[offset : offset + len(data)] = data
            else:
                size = rng.randrange(0, len(reference) + 100_000)
                os.ftruncate(fd, size)
                if size < len(reference):
                    del reference[size:]
                else:
                    reference.extend(bytes(size - len(reference)))
            if step % 10 == 0:
                assert os.fstat(fd).st_size == len(reference)
                probe = rng.randrange(0, max(1, len(reference)))
                assert os.pread(fd, 5000, probe) == bytes(reference[probe : probe + 5000])
    finally:
        os.close(fd)
    assert (m.path / "random.bin").read_bytes() == bytes(reference)
    gstore("flush", str(m.path), str(m.path / "random.bin"))
    assert s3.get("random.bin") == bytes(reference)


def test_small_patch_of_a_large_object_copies_the_rest_server_side(s3, mount):
    rng = random.Random(7)
    original = rng.randbytes(48 * MiB)
    s3.put("large.bin", original)
    m = mount("test:", "--write-back-delay", "3600")
    os.stat(m.path / "large.bin")
    s3.reset_stats()
    with open(m.path / "large.bin", "r+b") as f:
        f.seek(20 * MiB + 5)
        f.write(b"0123456789")
    gstore("flush", str(m.path))
    expected = original[: 20 * MiB + 5] + b"0123456789" + original[20 * MiB + 15 :]
    stats = s3.stats()
    assert stats["COPY"] >= 2, stats  # UploadPartCopy for the untouched parts
    assert stats["bytes_received"] < 20 * MiB, stats  # only the touched part went up
    assert s3.get("large.bin") == expected


def test_ffmpeg_writes_an_mp4_straight_into_the_mount(s3, mount, tmp_path):
    m = mount("test:", "--write-back-delay", "1")
    out = m.path / "render.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25", "-t", "3",
         "-c:v", "mpeg4", "-y", str(out)],
        check=True,
    )
    gstore("flush", str(m.path))
    local = tmp_path / "downloaded.mp4"
    local.write_bytes(s3.get("render.mp4"))
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(local)],
        check=True, capture_output=True, text=True,
    )
    assert abs(float(probe.stdout.strip()) - 3.0) < 0.2
    assert s3.client.head_object(Bucket=BUCKET, Key="render.mp4")["ContentType"] == "video/mp4"


def test_rename_of_a_directory_with_nested_files(s3, mount):
    s3.put("d/a.txt", b"a")
    s3.put("d/sub/", b"")
    s3.put("d/sub/b.txt", b"b")
    s3.put("d/sub/deeper/c.txt", b"c")
    m = mount("test:", "--write-back-delay", "3600")
    (m.path / "d" / "pending.txt").write_bytes(b"not uploaded yet")
    os.rename(m.path / "d", m.path / "e")
    assert not (m.path / "d").exists()
    assert sorted(os.listdir(m.path / "e")) == ["a.txt", "pending.txt", "sub"]
    assert (m.path / "e" / "sub" / "deeper" / "c.txt").read_bytes() == b"c"
    gstore("flush", str(m.path))
    assert keys(s3) == ["e/a.txt", "e/pending.txt", "e/sub/", "e/sub/b.txt", "e/sub/deeper/c.txt"]
    assert s3.get("e/pending.txt") == b"not uploaded yet"


def test_file_rename_is_a_server_side_copy(s3, mount):
    payload = random.Random(1).randbytes(6 * MiB)
    s3.put("src.bin", payload)
    m = mount("test:")
    os.stat(m.path / "src.bin")
    s3.reset_stats()
    os.rename(m.path / "src.bin", m.path / "dst.bin")
    stats = s3.stats()
    assert stats["GET"] == 0 and stats["bytes_received"] < 1000, stats
    assert keys(s3) == ["dst.bin"]
    assert (m.path / "dst.bin").read_bytes() == payload


def test_kill_9_with_pending_uploads_then_restart_uploads_everything(s3, mount):
    m = mount("test:", "--write-back-delay", "3600")
    expected = {f"batch/file-{i:02d}.txt": f"content {i}\n".encode() * (i + 1) for i in range(20)}
    expected["batch/big.bin"] = random.Random(3).randbytes(12 * MiB + 5)
    (m.path / "batch").mkdir()
    for key, data in expected.items():
        (m.path / key).write_bytes(data)
    assert not any(k in keys(s3) for k in expected)
    m.process.send_signal(signal.SIGKILL)
    m.process.wait(timeout=10)
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False)
    assert not any(k in keys(s3) for k in expected)
    m2 = mount("test:", "--write-back-delay", "3600")
    # Pending files are served from the journal before anything else.
    assert (m2.path / "batch" / "file-03.txt").read_bytes() == expected["batch/file-03.txt"]
    gstore("flush", str(m2.path))
    for key, data in expected.items():
        assert s3.get(key) == data, key
    assert "were not uploaded yet; uploading them now" in m2.log()


def test_sigterm_drains_pending_uploads(s3, mount):
    m = mount("test:", "--write-back-delay", "3600")
    for i in range(5):
        (m.path / f"late-{i}.txt").write_bytes(b"x" * (i + 1))
    assert m.stop(signal.SIGTERM) == 0
    assert keys(s3) == [f"late-{i}.txt" for i in range(5)]
    assert "all pending uploads are durable" in m.log()


def test_conflicting_remote_change_keeps_both_versions(s3, mount):
    s3.put("shared.txt", b"original\n")
    m = mount("test:", "--write-back-delay", "3600")
    with open(m.path / "shared.txt", "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(b"ours\n")
    s3.put("shared.txt", b"theirs\n")  # another writer, after this mount read the object
    result = gstore("flush", str(m.path), check=False)
    assert result.returncode == 5 and "shared.txt.conflict-" in result.stderr, result  # 5: conflicts, listed
    assert s3.get("shared.txt") == b"theirs\n"
    conflicts = [k for k in keys(s3) if k.startswith("shared.txt.conflict-")]
    assert len(conflicts) == 1 and s3.get(conflicts[0]) == b"original\nours\n"
    assert "conflict" in m.log()


def test_conflict_policy_fail_reports_and_keeps_the_data(s3, mount):
    s3.put("guarded.txt", b"v1")
    m = mount("test:", "--write-back-delay", "3600", "--conflict", "fail")
    (m.path / "guarded.txt").write_bytes(b"mine")
    s3.put("guarded.txt", b"v2-theirs")
    result = gstore("flush", str(m.path), check=False)
    assert result.returncode == 4 and "guarded.txt" in result.stderr  # 4: uploads failed (parked), listed
    assert s3.get("guarded.txt") == b"v2-theirs"
    assert (m.path / "guarded.txt").read_bytes() == b"mine"  # still here, still pending
    assert status(m)["uploads"]["failing"] == 1


def test_conflict_policy_overwrite(s3, mount):
    s3.put("mine.txt", b"v1")
    m = mount("test:", "--write-back-delay", "3600", "--conflict", "overwrite")
    (m.path / "mine.txt").write_bytes(b"ours wins")
    s3.put("mine.txt", b"v2")
    gstore("flush", str(m.path))
    assert s3.get("mine.txt") == b"ours wins"


def test_namespace_operations(s3, mount):
    s3.put("dir/keep.txt", b"k")
    m = mount("test:")
    with pytest.raises(OSError) as info:
        os.rmdir(m.path / "dir")
    assert info.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileExistsError):
        os.open(m.path / "dir" / "keep.txt", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    fd = os.open(m.path / "dir" / "fresh.txt", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, b"fresh")
    os.close(fd)
    os.unlink(m.path / "dir" / "keep.txt")
    os.unlink(m.path / "dir" / "fresh.txt")
    assert os.listdir(m.path / "dir") == []
    os.rmdir(m.path / "dir")
    assert not (m.path / "dir").exists()
    os.mkdir(m.path / "made")
    assert os.path.isdir(m.path / "made")
    with pytest.raises(FileExistsError):
        os.mkdir(m.path / "made")
    os.symlink("target", m.path / "link")  # a small object holding the target (s3fs-fuse's layout)
    assert os.readlink(m.path / "link") == "target"
    gstore("flush", str(m.path))
    assert keys(s3) == ["link", "made/"]


def test_cp_p_shutil_copy2_and_rsync_a_work(s3, mount, tmp_path):
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("alpha")
    (source / "sub" / "b.bin").write_bytes(os.urandom(100_000))
    old = time.time() - 86400
    for p in (source / "a.txt", source / "sub" / "b.bin"):
        os.utime(p, (old, old))
    s3.put("existing.txt", b"written by another tool")
    m = mount("test:", "--write-back-delay", "3600")
    subprocess.run(["cp", "-p", str(source / "a.txt"), str(m.path / "cp.txt")], check=True)
    shutil.copy2(source / "a.txt", m.path / "copy2.txt")
    subprocess.run(["rsync", "-a", f"{source}/", f"{m.path}/synced/"], check=True)
    os.utime(m.path / "existing.txt", (old, old))  # on an object written by someone else: must not fail
    os.chmod(m.path / "existing.txt", 0o600)
    assert int(os.stat(m.path / "cp.txt").st_mtime) == int(old)
    gstore("flush", str(m.path))
    assert s3.get("cp.txt") == b"alpha" and s3.get("copy2.txt") == b"alpha"
    assert int(float(s3.client.head_object(Bucket=BUCKET, Key="cp.txt")["Metadata"]["mtime"])) == int(old)
    assert s3.get("synced/sub/b.bin") == (source / "sub" / "b.bin").read_bytes()


def test_rsync_again_after_upload_and_remount_transfers_nothing(s3, mount, tmp_path):
    """Listings carry only the upload time: the times rsync set must survive them."""
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    for i in range(5):
        (source / "sub" / f"f{i}.txt").write_text(f"file {i}")
        os.utime(source / "sub" / f"f{i}.txt", (1_600_000_000 + i, 1_600_000_000 + i))
    m = mount("test:", "--write-back-delay", "0", "--attr-ttl", "1", "--dir-cache-ttl", "1")
    subprocess.run(["rsync", "-a", f"{source}/", f"{m.path}/synced/"], check=True)
    gstore("flush", str(m.path))
    time.sleep(2.5)  # the cached listings expire; the next one comes from the backend
    assert int(os.stat(m.path / "synced" / "sub" / "f3.txt").st_mtime) == 1_600_000_003

    def transferred() -> list[str]:
        out = subprocess.run(["rsync", "-a", "--itemize-changes", f"{source}/", f"{m.path}/synced/"],
                             check=True, capture_output=True, text=True).stdout
        return [line for line in out.splitlines() if line.startswith(">f")]

    assert transferred() == []
    m.stop()
    m = mount("test:", "--attr-ttl", "1", "--dir-cache-ttl", "1")
    assert transferred() == []
    os.utime(m.path / "synced" / "sub" / "f1.txt", (1_700_000_000, 1_700_000_000))
    time.sleep(2.5)
    assert int(os.stat(m.path / "synced" / "sub" / "f1.txt").st_mtime) == 1_700_000_000


def test_writes_fail_with_enospc_when_the_cache_disk_is_full(s3, mount, tmp_path):
    cache_fs = tmp_path / "tinyfs"
    cache_fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(cache_fs)], check=True)
    try:
        m = mount("test:", "--write-back-delay", "3600", cache_dir=cache_fs / "cache")
        (m.path / "small.txt").write_bytes(b"fits")
        with pytest.raises(OSError) as info:
            with open(m.path / "huge.bin", "wb") as f:
                for _ in range(16):
                    f.write(b"z" * MiB)
        assert info.value.errno == errno.ENOSPC
        assert (m.path / "small.txt").read_bytes() == b"fits"  # nothing else was lost
        os.unlink(m.path / "huge.bin")
        gstore("flush", str(m.path))
        assert s3.get("small.txt") == b"fits"
        m.stop()
    finally:
        subprocess.run(["umount", "-l", str(cache_fs)], check=False)


def test_fsync_means_durable(s3, mount):
    m = mount("test:", "--write-back-delay", "3600")
    fd = os.open(m.path / "synced.txt", os.O_CREAT | os.O_WRONLY)
    try:
        os.write(fd, b"durable now")
        os.fsync(fd)
        assert s3.get("synced.txt") == b"durable now"  # before close
    finally:
        os.close(fd)
