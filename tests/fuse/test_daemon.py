"""The daemon as users run it: start-up contract, errors, signals, secrets."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BUCKET, daemon_env, daemon_pid, gstore_mount_cmd, require_fuse, write_config

pytestmark = pytest.mark.fuse


def run_mount(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(gstore_mount_cmd() + list(args), capture_output=True, text=True, timeout=timeout,
                          env=daemon_env())


def wait_gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def daemon_mounts(tmp_path):
    """Mount points used by daemonized mounts; unmounted and their daemons ended after the test."""
    started: list[tuple[Path, Path]] = []
    yield started
    for mountpoint, cache_dir in started:
        pid = daemon_pid(cache_dir)
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        if pid and not wait_gone(pid, 10):
            os.kill(pid, signal.SIGKILL)


def test_daemon_mode_returns_only_once_the_mount_is_live(s3, tmp_path, daemon_mounts):
    require_fuse()
    s3.put("hello.txt", b"hello")
    config = write_config(tmp_path / "m.toml", s3.endpoint)
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    daemon_mounts.append((mnt, cache))
    result = run_mount("--config", str(config), "--cache-dir", str(cache), "test:", str(mnt))
    assert result.returncode == 0, result.stderr
    # Usable on the very next line: no polling.
    assert os.path.ismount(mnt)
    assert (mnt / "hello.txt").read_bytes() == b"hello"
    assert "INFO" not in result.stderr  # the terminal gets warnings only; the rest goes to the log file
    pid = daemon_pid(cache)
    assert pid and pid != os.getpid()
    log_files = list(cache.glob("*/gstore-mount.log"))
    assert log_files and "mounted s3://test-bucket" in log_files[0].read_text()
    # Unmounting ends the daemon by itself.
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    assert wait_gone(pid), "daemon still running after unmount"
    assert not os.path.ismount(mnt)


def test_missing_bucket_fails_the_start_with_a_clear_message(s3, tmp_path):
    require_fuse()
    config = write_config(tmp_path / "m.toml", s3.endpoint, root="no-such-bucket/x")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for extra in ([], ["-f"]):
        result = run_mount(*extra, "--config", str(config), "--cache-dir", str(tmp_path / "c"), "test:", str(mnt))
        assert result.returncode == 1, result
        assert "bucket does not exist" in result.stderr
        assert not os.path.ismount(mnt)


def test_already_mounted_and_missing_mountpoint_are_refused(s3, mount, tmp_path):
    m = mount("test:")
    result = run_mount("--config", str(m.config_path), "--cache-dir", str(tmp_path / "c2"), "test:", str(m.path))
    assert result.returncode != 0 and "already a mount point" in result.stderr
    result = run_mount("--config", str(m.config_path), "test:", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "nowhere" in result.stderr


def test_a_second_daemon_on_the_same_cache_is_refused(s3, mount, tmp_path):
    m = mount("test:")
    other = tmp_path / "other"
    other.mkdir()
    result = run_mount("-f", "--config", str(m.config_path), "--cache-dir", str(m.cache_dir), "test:", str(other))
    assert result.returncode == 1 and "in use by another gstore-mount" in result.stderr
    assert not os.path.ismount(other)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[mounts.test\nprotocol = 's3'", ["line"]),
        ("[mounts.test]\nprotocol = 's4'\nroot = 'b'", ['"test"', "protocol", "s4"]),
        ("[mounts.test]\nprotocol = 's3'\nroot = 'b'\ncache_size = true", ['"test"', "cache_size"]),
        ("[mounts.test]\nprotocol = 's3'\nroot = 42", ['"test"', "root"]),
        ("[mounts.other]\nprotocol = 's3'\nroot = 'b'", ['"test"', "other"]),
    ],
)
def test_config_errors_name_the_file_mount_and_key(tmp_path, content, expected):
    config = tmp_path / "bad.toml"
    config.write_text(content)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = run_mount("--config", str(config), "test:", str(mnt))
    assert result.returncode == 2
    assert str(config) in result.stderr
    for fragment in expected:
        assert fragment in result.stderr, result.stderr
    assert not os.path.ismount(mnt)


def test_sigint_and_sigterm_unmount_cleanly(s3, mount):
    for sig in (signal.SIGINT, signal.SIGTERM):
        m = mount("test:")
        os.listdir(m.path)
        assert m.stop(sig) == 0
        assert not os.path.ismount(m.path)
        assert "received: stopping" in m.log()


def test_fstab_style_options(s3, mount, tmp_path):
    s3.put("f.txt", b"fstab")
    m = mount("test:", "-o", "block_size=1M,cache_size=64M,ro,_netdev,nofail,x-systemd.automount,noatime")
    assert (m.path / "f.txt").read_bytes() == b"fstab"
    assert f"({64 * 1024 * 1024} bytes, blocks of {1024 * 1024})" in m.log()
    mounts = Path("/proc/mounts").read_text()
    line = next(l for l in mounts.splitlines() if f" {m.path} " in l)
    assert " ro," in line or " ro " in line


def test_secrets_never_reach_the_log(s3, mount):
    s3.put("f.txt", b"x")
    m = mount("test:")  # DEBUG logging, credentials in the config file
    assert (m.path / "f.txt").read_bytes() == b"x"
    os.listdir(m.path)
    m.stop()
    log = m.log()
    assert "DEBUG" in log
    assert "testing-secret-value" not in log
    assert "testing-key-id" not in log


def test_backend_failures_become_errnos_and_the_daemon_survives(s3, mount, tmp_path):
    from gstore.testing.s3server import S3TestServer

    s3.put("kept.txt", b"cached")
    s3.put("gone.txt", b"soon deleted")
    s3.put("dir/x.txt", b"x")
    with S3TestServer() as private:
        require_fuse()
        config = write_config(tmp_path / "private.toml", private.endpoint_url)
        mnt = tmp_path / "pmnt"
        mnt.mkdir()
        proc = subprocess.Popen(
            gstore_mount_cmd() + ["-f", "--config", str(config), "--cache-dir", str(tmp_path / "pc"),
                                  "--request-timeout", "3", "test:", str(mnt)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=daemon_env(),
        )
        try:
            deadline = time.monotonic() + 30
            while not os.path.ismount(mnt):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            assert (mnt / "kept.txt").read_bytes() == b"cached"
            os.stat(mnt / "gone.txt")
            s3.client.delete_object(Bucket=BUCKET, Key="gone.txt")
            with pytest.raises(OSError) as info:
                (mnt / "gone.txt").read_bytes()
            assert info.value.errno in (errno.ENOENT, errno.ESTALE)
            private.stop()  # the backend disappears
            start = time.monotonic()
            with pytest.raises(OSError) as info:
                os.listdir(mnt / "dir")
            assert info.value.errno != errno.ENOENT
            assert time.monotonic() - start < 60
            # Still serving what it has.
            assert (mnt / "kept.txt").read_bytes() == b"cached"
            assert proc.poll() is None
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        assert "Traceback" not in output, output
