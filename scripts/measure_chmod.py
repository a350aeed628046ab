#!/usr/bin/env python3
"""What changing attributes costs in backend requests: one ``chmod``, and ``chmod -R`` of a
1,000-file tree, on a mount of the local S3 endpoint (127.0.0.1).

The tree is put directly into the bucket (no gstore metadata, as another tool would leave
it), then mounted with an empty cache. Counted by the endpoint: the requests of the
``chmod`` commands themselves, then of the upload of the changed attributes (``gstore
flush``), separately, so the coalescing through the write-back queue shows.

Usage: .venv/bin/python scripts/measure_chmod.py [--files 1000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gstore.testing.localmount import mount_bucket, unmount
from gstore.testing.s3server import S3TestServer


def flush(mountpoint: Path) -> None:
    subprocess.run([sys.executable, "-c", "import sys; from gstore.cli import main; sys.exit(main())",
                    "flush", str(mountpoint)], check=True)


def counts(server: S3TestServer) -> dict[str, int]:
    snap = server.stats.snapshot()
    return {k: v for k, v in snap.items() if v and k not in ("bytes_sent", "bytes_received")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    args = parser.parse_args()
    server = S3TestServer(host="127.0.0.1", port=0)
    server.start()
    try:
        client = server.client()
        client.create_bucket(Bucket="bench")
        for i in range(args.files):
            client.put_object(Bucket="bench", Key=f"tree/d{i % 10}/f{i:04d}", Body=b"x" * 100)
        client.put_object(Bucket="bench", Key="one.txt", Body=b"hello\n")
        with tempfile.TemporaryDirectory() as tmp:
            work, mnt = Path(tmp) / "work", Path(tmp) / "mnt"
            work.mkdir()
            mnt.mkdir()
            mount_bucket(server.endpoint_url, work, mnt, "--write-back-delay", "0.5")
            try:
                rows = []
                for label, command, target in (
                    ("chmod 600 one.txt", ["chmod", "600", str(mnt / "one.txt")], None),
                    (f"chmod -R go-rwx tree ({args.files} files, 10 folders)",
                     ["chmod", "-R", "go-rwx", str(mnt / "tree")], None),
                ):
                    del target
                    server.stats.reset()
                    started = time.monotonic()
                    subprocess.run(command, check=True)
                    took = time.monotonic() - started
                    during = counts(server)
                    server.stats.reset()
                    started = time.monotonic()
                    flush(mnt)
                    upload = time.monotonic() - started
                    rows.append((label, during, took, counts(server), upload))
            finally:
                unmount(mnt)
    finally:
        server.stop()
    print("| command | requests during the command | time | requests to make it durable (flush) | time |")
    print("|---|---|---:|---|---:|")
    for label, during, took, after, upload in rows:
        print(f"| `{label}` | {during} | {took:.2f} s | {after} | {upload:.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
