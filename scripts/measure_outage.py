#!/usr/bin/env python3
"""What works on a gstore mount during an outage: one operation per row, its result and time.

A mount reaches a local S3 endpoint (moto, 127.0.0.1) through the fault proxy
(gstore.testing.faultproxy) with 1 s TTLs. The mount first lists two folders and
reads one file (what it "knows"), then every connection is reset (an outage),
the TTLs run out, the mount goes offline, and each operation below runs once:
its outcome (ok, or the errno) and how long it took. Then the outage ends,
``gstore flush`` runs, and the bucket is compared with what the operations
should have left there.

With ``--hang`` the proxy accepts connections and never answers instead, and
the script also times three lookups of uncached names one after another.

To measure another checkout (a "before" figure), put its ``src`` first:
``PYTHONPATH=/path/to/old/src .venv/bin/python scripts/measure_outage.py``
(the daemon is started with this interpreter and inherits PYTHONPATH).

Usage: .venv/bin/python scripts/measure_outage.py [--hang]
"""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gstore
from gstore.testing.faultproxy import FaultProxy
from gstore.testing.localmount import mount_bucket, unmount
from gstore.testing.s3server import S3TestServer

KiB = 1024


def outcome(action: Callable[[], object]) -> tuple[str, float]:
    started = time.monotonic()
    try:
        action()
        result = "ok"
    except OSError as exc:
        result = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return result, time.monotonic() - started


def wait_offline(mnt: Path, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.listdir(mnt / "dir")
        except OSError:
            pass
        try:
            if '"state": "offline"' in (mnt / ".gstore" / "status.json").read_text():
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hang", action="store_true", help="a backend that never answers instead of resets")
    args = parser.parse_args()
    print(f"gstore from {Path(gstore.__file__).parent}")
    with S3TestServer() as server, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        client = server.client()
        client.create_bucket(Bucket="bench")
        cached = os.urandom(300 * KiB)
        for key, body in {"dir/cached.bin": cached, "dir/uncached.bin": os.urandom(100 * KiB),
                          "dir/remove-me.txt": b"x\n", "dir/move-me.bin": os.urandom(50 * KiB),
                          "dir/empty/": b"", "dir/folder/inside.txt": b"in\n", "top.txt": b"top\n"}.items():
            client.put_object(Bucket="bench", Key=key, Body=body)
        proxy = FaultProxy(server.endpoint_url).start()
        mnt = work / "mnt"
        mnt.mkdir()
        try:
            mount_bucket(proxy.endpoint_url, work, mnt, "--request-timeout", "3", "--attr-ttl", "1",
                         "--dir-cache-ttl", "1", "--negative-ttl", "1", "--write-back-delay", "0.2",
                         "--block-size", "1M")
            try:
                for folder in ("", "dir", "dir/empty", "dir/folder"):
                    os.listdir(mnt / folder)
                for name in ("cached.bin", "move-me.bin"):
                    (mnt / "dir" / name).read_bytes()
                if args.hang:
                    proxy.inject("hang")
                    time.sleep(1.5)  # the listing of dir/ has expired: each lookup must ask
                    started = time.monotonic()
                    results = [outcome(lambda name=name: os.stat(mnt / "dir" / f"never-seen-{name}"))[0]
                               for name in ("n1", "n2", "n3")]
                    print(f"three lookups of uncached names against the hung backend (--request-timeout 3): "
                          f"{time.monotonic() - started:.2f} s in all ({', '.join(results)})")
                else:
                    proxy.outage(3600)
                time.sleep(1.5)  # every TTL has run out
                print(f"offline: {wait_offline(mnt)}")
                d = mnt / "dir"
                operations: list[tuple[str, Callable[[], object]]] = [
                    ("ls of a known folder", lambda: os.listdir(d)),
                    ("read a cached file", lambda: (d / "cached.bin").read_bytes()),
                    ("read an uncached file", lambda: (d / "uncached.bin").read_bytes()),
                    ("create a new file", lambda: (d / "new.txt").write_bytes(b"new\n")),
                    (">> to a cached file", lambda: open(d / "cached.bin", "ab").write(b"+")),
                    ("truncate a cached file", lambda: os.truncate(d / "move-me.bin", 10 * KiB)),
                    ("chmod a file", lambda: os.chmod(d / "cached.bin", 0o600)),
                    ("touch (utimens) a file", lambda: os.utime(d / "cached.bin", (1e9, 1e9))),
                    ("mkdir", lambda: os.mkdir(d / "made")),
                    ("rm a file", lambda: os.unlink(d / "remove-me.txt")),
                    ("rmdir an empty folder", lambda: os.rmdir(d / "empty")),
                    ("mv a file", lambda: os.rename(d / "move-me.bin", d / "moved.bin")),
                    ("mv a folder", lambda: os.rename(d / "folder", d / "folder2")),
                    ("rm top.txt (folder never read)", lambda: os.unlink(mnt / "top.txt")),
                ]
                print(f"\n| during the outage | result | time s |\n|---|---|---:|")
                for what, action in operations:
                    result, took = outcome(action)
                    print(f"| {what} | {result} | {took:.2f} |")
                proxy.clear()
                proxy.end_outage()
                started = time.monotonic()
                while '"state": "offline"' in (mnt / ".gstore" / "status.json").read_text():
                    time.sleep(0.1)  # the breaker's next probe finds the backend back
                print(f"\nonline again {time.monotonic() - started:.1f} s after the outage ended")
                started = time.monotonic()
                flushed = subprocess.run(
                    [sys.executable, "-c", "import sys; from gstore.cli import main; sys.exit(main())",
                     "flush", "--timeout", "60", str(mnt)], capture_output=True, text=True)
                print(f"after the outage: gstore flush exit {flushed.returncode} in "
                      f"{time.monotonic() - started:.1f} s {flushed.stdout.strip()} {flushed.stderr.strip()}")
                keys = sorted(o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="bench")
                              for o in page.get("Contents", []))
                print("bucket:", ", ".join(keys))
            finally:
                proxy.clear()
                proxy.end_outage()
                unmount(mnt, timeout=30)
        finally:
            proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
