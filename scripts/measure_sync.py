#!/usr/bin/env python3
"""``gstore sync --skip-if md5`` against ``rsync -rc`` (and ``rclone sync --checksum`` when installed),
on a mount of a local S3 endpoint (127.0.0.1): what it costs to bring a 1,000-file tree up to date
when 10 files changed.

Each tool gets its own bucket holding the same tree (put directly with boto3), a fresh gstore mount
with an empty block cache, and the same local source (the tree with 10 files changed: same sizes,
other bytes). The figures cover the tool's run plus, for tools other than gstore sync (which ends
with one), a ``gstore flush``, so every run ends with the 10 files durable in the bucket. Bytes read
are the GET response bodies the endpoint sent; requests are counted by the endpoint.

Usage: .venv/bin/python scripts/measure_sync.py [--files 1000] [--changed 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gstore.testing.localmount import mount_bucket, unmount
from gstore.testing.s3server import S3TestServer

KiB = 1024


def gstore_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from gstore.cli import main; sys.exit(main())", *args]


def make_tree(root: Path, count: int, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {}
    for i in range(count):
        rel = f"dir{i % 20:02d}/file{i:04d}.bin"
        files[rel] = rng.randbytes(rng.randrange(4 * KiB, 64 * KiB + 1))
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def seed_bucket(client, bucket: str, files: dict[str, bytes]) -> None:
    client.create_bucket(Bucket=bucket)
    for rel, data in files.items():
        client.put_object(Bucket=bucket, Key=f"tree/{rel}", Body=data)


def bucket_digest(client, bucket: str) -> dict[str, str]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="tree/"):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            out[item["Key"][len("tree/"):]] = hashlib.md5(body).hexdigest()
    return out


def run_tool(name: str, command: list[str], server: S3TestServer, mnt: Path, flush: bool) -> dict:
    server.stats.reset()
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr[-2000:]}")
    if flush:
        subprocess.run(gstore_cmd("flush", str(mnt)), check=True)
    elapsed = time.perf_counter() - start
    records = server.stats.records()
    counts: dict[str, int] = {}
    for r in records:
        counts[r.op] = counts.get(r.op, 0) + 1
    gets = [r for r in records if r.op == "GET"]
    return {"tool": name, "seconds": elapsed, "requests": len(records), "ops": counts,
            "bytes_read": sum(r.bytes_sent for r in gets), "received": server.stats.snapshot()["bytes_received"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--changed", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool (median time reported)")
    args = parser.parse_args()

    tools: list[tuple[str, list[str], bool]] = []
    with S3TestServer() as server, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        client = server.client()
        original = make_tree(work / "seed", args.files, seed=1)
        local = work / "local"
        shutil.copytree(work / "seed", local)
        rng = random.Random(2)
        changed = rng.sample(sorted(original), args.changed)
        for rel in changed:
            (local / rel).write_bytes(rng.randbytes(len(original[rel])))  # same size, other bytes
        expected = {rel: hashlib.md5((local / rel).read_bytes()).hexdigest() for rel in original}
        total = sum(len(v) for v in original.values())
        print(f"tree: {args.files} files, {total / 2**20:.1f} MiB; {args.changed} changed (same sizes)")

        def candidates(mnt: Path) -> list[tuple[str, list[str], bool]]:
            found = [("gstore sync --skip-if md5", gstore_cmd("sync", "-q", "--skip-if", "md5", f"{local}/",
                                                              str(mnt / "tree")), False),
                     ("rsync -rc", ["rsync", "-rc", f"{local}/", f"{mnt}/tree/"], True)]
            if shutil.which("rclone"):
                found.append(("rclone sync --checksum", ["rclone", "sync", "--checksum", f"{local}/",
                                                         f"{mnt}/tree/"], True))
            return found

        results: dict[str, list[dict]] = {}
        for attempt in range(args.repeat):
            for index, (name, _, _) in enumerate(candidates(work)):
                bucket = f"run-{attempt}-{index}"
                seed_bucket(client, bucket, original)
                run_dir = work / bucket
                mnt = run_dir / "mnt"
                mnt.mkdir(parents=True)
                config = run_dir / "mounts.toml"
                mount_bucket(server.endpoint_url, run_dir, mnt, "--block-size", "1M", bucket=bucket)
                try:
                    _, command, flush = candidates(mnt)[index]
                    results.setdefault(name, []).append(run_tool(name, command, server, mnt, flush))
                finally:
                    unmount(mnt, timeout=60)
                assert bucket_digest(client, bucket) == expected, f"{name}: the bucket does not match"
                del config

        print()
        print("| tool | bytes read (GET bodies) | GET | HEAD | LIST | PUT | other | requests | time (median) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, runs in results.items():
            first = runs[0]
            ops = first["ops"]
            other = first["requests"] - sum(ops.get(k, 0) for k in ("GET", "HEAD", "LIST", "PUT"))
            times = sorted(r["seconds"] for r in runs)
            print(f"| {name} | {first['bytes_read'] / 2**20:,.2f} MiB | {ops.get('GET', 0)} | {ops.get('HEAD', 0)} | "
                  f"{ops.get('LIST', 0)} | {ops.get('PUT', 0)} | {other} | {first['requests']} | "
                  f"{times[len(times) // 2]:.2f} s |")
        if not shutil.which("rclone"):
            print("\n(rclone is not installed: no rclone row)")
        for name, runs in results.items():
            print(f"{name}: ops of the first run {runs[0]['ops']}; times {[round(r['seconds'], 2) for r in runs]}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    sys.exit(main())
