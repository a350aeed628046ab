"""Mount a bucket of a local test endpoint with gstore-mount, for measurement scripts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def mount_bucket(endpoint: str, work: Path, mountpoint: Path, *options: str, bucket: str = "bench") -> None:
    """Mount ``bucket`` of ``endpoint`` on ``mountpoint`` (daemonized, returns once live);
    the config file and the cache go in ``work``."""
    config = work / "mounts.toml"
    config.write_text(
        f'[mounts.bench]\nprotocol = "s3"\nroot = "{bucket}"\n[mounts.bench.options]\n'
        f'endpoint_url = "{endpoint}"\nkey = "k"\nsecret = "s"\n'
        'client_kwargs = { region_name = "us-east-1" }\n'
    )
    subprocess.run(
        [str(Path(sys.executable).with_name("gstore-mount")), "--config", str(config),
         "--cache-dir", str(work / "cache"), *options, "bench:", str(mountpoint)],
        check=True,
    )


def unmount(mountpoint: Path, timeout: float = 5.0) -> None:
    """Unmount (pending uploads drain first) and wait until the mount is gone."""
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
    deadline = time.monotonic() + timeout
    while os.path.ismount(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
