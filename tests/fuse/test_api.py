"""End to end: ``with gstore.mount(...) as root:`` against the local S3 endpoint."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

import gstore
from conftest import require_fuse

pytestmark = pytest.mark.fuse

CREDENTIALS = {"key": "testing-key-id", "secret": "testing-secret-value",
               "client_kwargs": {"region_name": "us-east-1"}}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.fixture
def mounts():
    """Every Mount a test entered: unmounted at teardown even if the test failed inside the block."""
    require_fuse()
    entered: list[gstore.Mount] = []
    yield entered
    for m in entered:
        if m.root is not None and os.path.ismount(m.root):
            subprocess.run(["fusermount3", "-u", "-z", str(m.root)], check=False, capture_output=True)


def test_mount_reads_writes_runs_programs_and_flushes_on_exit(s3, mounts, tmp_path):
    s3.put("pre/in.txt", b"hello from S3\n")
    m = gstore.mount(f"s3://{s3.bucket}/pre", endpoint_url=s3.endpoint, cache_dir=tmp_path / "cache",
                     write_back_delay=3600, **CREDENTIALS)  # uploads happen at exit, not before
    mounts.append(m)
    with m as root:
        assert os.path.ismount(root)
        assert stat.S_IMODE(root.parent.stat().st_mode) == 0o700  # a private folder
        assert not (root.parent / "mounts.toml").exists()  # the credentials file is gone once read
        assert (root / "in.txt").read_bytes() == b"hello from S3\n"
        subprocess.run(["cp", root / "in.txt", root / "out.txt"], check=True)
        (root / "sub").mkdir()
        (root / "sub" / "new.bin").write_bytes(b"\x00" * 100_000)
        pid = m.pid
        assert pid is not None and alive(pid)
        assert [k for k in s3.client.list_objects_v2(Bucket=s3.bucket).get("Contents", [])
                if k["Key"].endswith("out.txt")] == []  # not uploaded yet
    # Durable, unmounted, daemon gone, private folder removed.
    assert s3.get("pre/out.txt") == b"hello from S3\n"
    assert s3.get("pre/sub/new.bin") == b"\x00" * 100_000
    assert not os.path.ismount(root)
    assert not alive(pid)
    assert not root.parent.exists()


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_the_ffmpeg_example_of_the_docs(s3, mounts, tmp_path):
    source = tmp_path / "in.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=10", "-t", "2",
                    "-pix_fmt", "yuv420p", str(source)], check=True)
    s3.put("in.mp4", source.read_bytes())
    m = gstore.mount(f"s3://{s3.bucket}", endpoint_url=s3.endpoint, cache_dir=tmp_path / "cache", **CREDENTIALS)
    mounts.append(m)
    with m as root:
        subprocess.run(["ffmpeg", "-v", "error", "-i", root / "in.mp4", "-c", "copy", root / "out.mp4"], check=True)
    (tmp_path / "out.mp4").write_bytes(s3.get("out.mp4"))
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
                            str(tmp_path / "out.mp4")], capture_output=True, text=True, check=True)
    assert 1.5 <= float(probe.stdout) <= 2.5


def test_a_failed_start_raises_the_daemons_message(s3, mounts, tmp_path):
    require_fuse()
    before = set(os.listdir(tmp_path))
    with pytest.raises(gstore.MountError) as caught:
        with gstore.mount("s3://no-such-bucket", endpoint_url=s3.endpoint, cache_dir=tmp_path / "cache",
                          **CREDENTIALS):
            pytest.fail("the block must not run")
    assert "no-such-bucket" in str(caught.value) or "bucket" in str(caught.value).lower(), caught.value
    with pytest.raises(gstore.MountError) as caught:
        with gstore.mount("memory:", cache_size="not a size", cache_dir=tmp_path / "cache"):
            pass
    assert "cache" in str(caught.value) and "size" in str(caught.value)
    with pytest.raises(ValueError):
        gstore.mount("s3:", endpoint_url="http://127.0.0.1:1")  # backend options need a URL
    assert set(os.listdir(tmp_path)) - before <= {"cache"}


def test_failed_uploads_raise_after_unmounting(s3, mounts, tmp_path):
    s3.client.create_bucket(Bucket="doomed")
    m = gstore.mount("s3://doomed", endpoint_url=s3.endpoint, cache_dir=tmp_path / "cache",
                     write_back_delay=3600, drain_timeout=5, **CREDENTIALS)
    mounts.append(m)
    with pytest.raises(gstore.UploadError) as caught:
        with m as root:
            (root / "lost.txt").write_bytes(b"cannot go up")
            s3.client.delete_bucket(Bucket="doomed")  # behind the mount's back
    assert any("lost.txt" in f for f in caught.value.failed), caught.value.failed
    assert not os.path.ismount(root)
    # The bytes are kept in the cache directory for the next mount.
    assert any(p.read_bytes() == b"cannot go up" for p in (tmp_path / "cache").rglob("*") if p.is_file()
               and p.stat().st_size == len(b"cannot go up"))
