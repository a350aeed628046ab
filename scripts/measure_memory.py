#!/usr/bin/env python3
"""Peak RSS of the gstore daemon while writing and then reading a large file (default 4 GiB).

Against the local S3 endpoint (127.0.0.1): ``dd`` writes the file into the mount,
``gstore flush`` uploads it (multipart), the mount is restarted with an empty
cache, and ``cat`` reads it back cold. The daemon's RSS is sampled every 50 ms
from /proc. The endpoint (moto) keeps objects in memory, so the machine needs
about twice the file size in free RAM, and the cache disk the file size.
Usage: .venv/bin/python scripts/measure_memory.py [--size-gib 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gstore.testing.localmount import mount_bucket, unmount
from gstore.testing.s3server import S3TestServer

MiB = 1024 * 1024


def daemon_pid(mountpoint: Path) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(b"gstore-mount" in part for part in cmd) and str(mountpoint).encode() in cmd:
                return int(entry)
    raise RuntimeError(f"no gstore-mount process for {mountpoint}")


class RssSampler:
    """Samples VmRSS of one process until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kib, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-gib", type=float, default=4.0)
    args = parser.parse_args()
    size_mib = int(args.size_gib * 1024)
    gstore = str(Path(sys.executable).with_name("gstore"))
    with S3TestServer() as server, tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        server.client().create_bucket(Bucket="bench")
        mnt = work / "mnt"
        mnt.mkdir()
        options = ("--cache-size", f"{size_mib + 1024}M")
        mount_bucket(server.endpoint_url, work, mnt, *options)
        try:
            with RssSampler(daemon_pid(mnt)) as write_rss:
                start = time.perf_counter()
                with RssSampler(daemon_pid(mnt)) as dd_rss:
                    subprocess.run(["dd", "if=/dev/urandom", f"of={mnt / 'big.bin'}", "bs=4M",
                                    f"count={size_mib // 4}", "status=none"], check=True)
                closed = time.perf_counter() - start
                flushed = subprocess.run([gstore, "flush", str(mnt)], capture_output=True, text=True)
                if flushed.returncode != 0:
                    raise SystemExit(f"gstore flush failed:\n{flushed.stdout}{flushed.stderr}\n"
                                     f"{(work / 'cache').glob('*/gstore-mount.log')}")
                durable = time.perf_counter() - start
        finally:
            unmount(mnt, timeout=600)
        shutil.rmtree(work / "cache")
        mount_bucket(server.endpoint_url, work, mnt, *options)
        try:
            with RssSampler(daemon_pid(mnt)) as read_rss:
                start = time.perf_counter()
                subprocess.run(["cat", str(mnt / "big.bin")], check=True, stdout=subprocess.DEVNULL)
                read = time.perf_counter() - start
        finally:
            unmount(mnt)
    print(f"{size_mib / 1024:.1f} GiB file, 4 MiB blocks")
    print(f"write (dd, then gstore flush): close {closed:.1f} s, durable {durable:.1f} s, "
          f"daemon peak RSS {write_rss.peak_kib / 1024:.0f} MiB ({dd_rss.peak_kib / 1024:.0f} MiB while dd wrote)")
    print(f"cold read (cat after a restart with an empty cache): {size_mib / read:.0f} MiB/s, "
          f"daemon peak RSS {read_rss.peak_kib / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
