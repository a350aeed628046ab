"""Shared fixtures: a real S3 endpoint on 127.0.0.1 and real FUSE mounts of it.

Every mount is a ``gstore-mount -f`` subprocess we start ourselves; teardown
stops it by PID and unmounts whatever is left, even when the test failed.
With ``CI=true`` a missing FUSE fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BUCKET = "test-bucket"
REPO = Path(__file__).resolve().parent.parent


def fuse_unavailable_reason() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


def require_fuse() -> None:
    reason = fuse_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"FUSE is required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[object]:
    from gstore.testing.s3server import S3TestServer

    server = S3TestServer(host="127.0.0.1", port=0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class S3:
    """One test's view of the endpoint: a fresh bucket and request counters."""

    server: object
    bucket: str = BUCKET
    client: object = None

    @property
    def endpoint(self) -> str:
        return self.server.endpoint_url  # type: ignore[attr-defined]

    def put(self, key: str, data: bytes, **kwargs: object) -> dict:
        return self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **kwargs)  # type: ignore[attr-defined]

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()  # type: ignore[attr-defined]

    def stats(self) -> dict[str, int]:
        return self.server.stats.snapshot()  # type: ignore[attr-defined]

    def reset_stats(self) -> None:
        self.server.stats.reset()  # type: ignore[attr-defined]

    def get_records(self) -> list:
        return [r for r in self.server.stats.records() if r.op == "GET"]  # type: ignore[attr-defined]


@pytest.fixture
def s3(s3_server: object) -> S3:
    s3_server.reset()  # type: ignore[attr-defined]
    client = s3_server.client()  # type: ignore[attr-defined]
    client.create_bucket(Bucket=BUCKET)
    handle = S3(server=s3_server, client=client)
    handle.reset_stats()
    return handle


@dataclass
class Mount:
    path: Path
    process: subprocess.Popen
    log_path: Path
    config_path: Path
    cache_dir: Path
    args: list[str] = field(default_factory=list)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        """Stop the daemon we started (by PID) and make sure nothing stays mounted."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False, capture_output=True)
        return self.process.returncode


def write_config(path: Path, endpoint: str, *, root: str = BUCKET, name: str = "test", extra: str = "") -> Path:
    path.write_text(
        f"""
[mounts.{name}]
protocol = "s3"
root = "{root}"
{extra}
[mounts.{name}.options]
endpoint_url = "{endpoint}"
key = "testing-key-id"
secret = "testing-secret-value"
client_kwargs = {{ region_name = "us-east-1" }}
"""
    )
    return path


def daemon_pid(cache_dir: Path) -> int | None:
    """The PID of the daemon serving a mount whose cache is ``cache_dir`` (from its lock file)."""
    for lock in cache_dir.glob("*/lock"):
        text = lock.read_text().strip()
        if text:
            return int(text)
    return None


def daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AWS_PROFILE", None)
    env.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    return env


def gstore_mount_cmd() -> list[str]:
    return [sys.executable, "-c", "import sys; from gstore.cli import mount_main; sys.exit(mount_main())"]


class MountFactory:
    def __init__(self, tmp_path: Path, s3: S3) -> None:
        self._tmp = tmp_path
        self._s3 = s3
        self._mounts: list[Mount] = []
        self.cache_dir = tmp_path / "cache"

    def __call__(
        self,
        spec: str = "test:",
        *args: str,
        root: str = BUCKET,
        extra_config: str = "",
        wait: float = 30,
        cache_dir: Path | None = None,
    ) -> Mount:
        require_fuse()
        index = len(self._mounts)
        mountpoint = self._tmp / f"mnt{index}"
        mountpoint.mkdir()
        config = write_config(self._tmp / f"mounts{index}.toml", self._s3.endpoint, root=root, extra=extra_config)
        log_path = self._tmp / f"daemon{index}.log"
        cache = cache_dir or self.cache_dir
        cmd = gstore_mount_cmd() + [
            "-f", "--config", str(config), "--cache-dir", str(cache), "--log-level", "DEBUG",
            *args, spec, str(mountpoint),
        ]
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=daemon_env())
        mount = Mount(mountpoint, process, log_path, config, cache, list(args))
        self._mounts.append(mount)
        deadline = time.monotonic() + wait
        while not os.path.ismount(mountpoint):
            if process.poll() is not None:
                pytest.fail(f"gstore-mount exited with {process.returncode}:\n{mount.log()}")
            if time.monotonic() > deadline:
                mount.stop()
                pytest.fail(f"mount did not appear within {wait}s:\n{mount.log()}")
            time.sleep(0.05)
        return mount

    def cleanup(self) -> None:
        for mount in self._mounts:
            mount.stop()
        for mount in self._mounts:
            log = mount.log()
            # A daemon crash or an unexpected exception is a failure of whatever test saw it.
            if "Traceback" in log or "failed unexpectedly" in log:
                pytest.fail(f"the daemon logged an unexpected error:\n{log[-5000:]}")


@pytest.fixture
def mount(tmp_path: Path, s3: S3) -> Iterator[MountFactory]:
    factory = MountFactory(tmp_path, s3)
    try:
        yield factory
    finally:
        factory.cleanup()
