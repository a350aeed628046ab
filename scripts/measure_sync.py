#!/usr/bin/env python3
"""``gstore sync`` against ``rsync`` and ``rclone sync`` on the same tree, on a local S3 endpoint
(127.0.0.1): bytes read, bytes sent, requests and time for four jobs.

1. first copy: a local tree of N files into an empty bucket folder;
2. again, nothing changed;
3. again, after changing a few files (same sizes, other bytes: only a checksum sees it);
4. inside the bucket: the folder copied to another folder of the same bucket.

Compared: ``gstore sync --skip-if md5`` (through a gstore mount; job 4 is its server-side copy),
``rsync -rc`` (through a gstore mount; every run followed by ``gstore flush`` so it ends durable
too), and ``rclone sync --checksum`` talking to the endpoint with its own S3 backend (its best
case: MD5s from the listing's ETags, CopyObject inside a bucket). Each tool has its own bucket;
every job gets a fresh mount with an empty cache (a later day, not a warm cache). Requests are
counted by the endpoint, after the mount is up; bytes read are GET response bodies, bytes sent
are request bodies the endpoint received. The endpoint is moto behind gstore's test wrapper
(single ranges served from the stored bytes, TCP_NODELAY).

Usage: .venv/bin/python scripts/measure_sync.py [--files 1000] [--changed 5] [--repeat 1]
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
from collections.abc import Callable
from pathlib import Path

from gstore.testing.localmount import mount_bucket, unmount
from gstore.testing.s3server import S3TestServer

KiB = 1024
JOBS = ("1. first copy", "2. nothing changed", "3. {changed} files changed", "4. copy inside the bucket")


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


def bucket_digest(client, bucket: str, prefix: str) -> dict[str, str]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if item["Key"].endswith("/"):
                continue  # folder markers
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            out[item["Key"][len(prefix):]] = hashlib.md5(body).hexdigest()
    return out


def rclone_env(endpoint: str) -> dict[str, str]:
    """An rclone remote "gs" for the endpoint, from the environment (no config file)."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}  # rclone 1.60 rejects it
    env.update(RCLONE_CONFIG_GS_TYPE="s3", RCLONE_CONFIG_GS_PROVIDER="Other", RCLONE_CONFIG_GS_ENDPOINT=endpoint,
               RCLONE_CONFIG_GS_ACCESS_KEY_ID="k", RCLONE_CONFIG_GS_SECRET_ACCESS_KEY="s",
               RCLONE_CONFIG_GS_REGION="us-east-1", RCLONE_CONFIG="/dev/null")
    return env


class Bench:
    def __init__(self, server: S3TestServer, work: Path) -> None:
        self.server = server
        self.work = work
        self.client = server.client()
        self.runs = 0

    def measure(self, bucket: str, command: Callable[[Path], list[str]], *, mounted: bool, flush: bool,
                env: dict[str, str] | None = None) -> dict:
        """One run of ``command(mountpoint)`` (with a fresh mount of ``bucket`` when ``mounted``)."""
        self.runs += 1
        run_dir = self.work / f"run{self.runs}"
        mnt = run_dir / "mnt"
        mnt.mkdir(parents=True)
        if mounted:
            mount_bucket(self.server.endpoint_url, run_dir, mnt, "--block-size", "1M", bucket=bucket)
        try:
            self.server.stats.reset()
            start = time.perf_counter()
            done = subprocess.run(command(mnt), capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"{command(mnt)} failed ({done.returncode}): {done.stderr[-2000:]}")
            if flush:
                subprocess.run(gstore_cmd("flush", str(mnt)), check=True, capture_output=True)
            elapsed = time.perf_counter() - start
            records = self.server.stats.records()
            received = self.server.stats.snapshot()["bytes_received"]
        finally:
            if mounted:
                unmount(mnt, timeout=120)
        counts: dict[str, int] = {}
        for r in records:
            counts[r.op] = counts.get(r.op, 0) + 1
        return {"seconds": elapsed, "requests": len(records), "ops": counts, "stdout": done.stdout,
                "bytes_read": sum(r.bytes_sent for r in records if r.op == "GET"), "bytes_sent": received}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--changed", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all jobs (median time reported)")
    args = parser.parse_args()
    have_rclone = shutil.which("rclone") is not None

    with S3TestServer() as server, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bench = Bench(server, work)
        client = bench.client
        original = make_tree(work / "seed", args.files, seed=1)
        total = sum(len(v) for v in original.values())
        print(f"tree: {args.files} files, {total / 2**20:.1f} MiB in 20 folders; job 3 changes {args.changed} "
              "(same sizes, other bytes)")
        rclone = rclone_env(server.endpoint_url)

        # tool -> (command for jobs 1-3 given (local, mnt, bucket), command for job 4, mounted, flush, env)
        def tools() -> list[tuple[str, Callable, Callable, bool, bool, dict | None]]:
            found = [
                ("gstore sync --skip-if md5",
                 lambda local, mnt, b: gstore_cmd("sync", "-q", "--skip-if", "md5", f"{local}/", str(mnt / "tree")),
                 lambda mnt, b: gstore_cmd("sync", "-q", "--skip-if", "md5", str(mnt / "tree"), str(mnt / "copy")),
                 True, False, None),
                ("rsync -rc",
                 lambda local, mnt, b: ["rsync", "-rc", f"{local}/", f"{mnt}/tree/"],
                 lambda mnt, b: ["rsync", "-rc", f"{mnt}/tree/", f"{mnt}/copy/"],
                 True, True, None),
            ]
            if have_rclone:
                found.append((
                    "rclone sync --checksum",
                    lambda local, mnt, b: ["rclone", "sync", "--checksum", "--s3-no-check-bucket", f"{local}/",
                                           f"gs:{b}/tree"],
                    lambda mnt, b: ["rclone", "sync", "--checksum", "--s3-no-check-bucket", f"gs:{b}/tree",
                                    f"gs:{b}/copy"],
                    False, False, rclone))
            return found

        results: dict[tuple[str, str], list[dict]] = {}
        for round_ in range(args.repeat):
            for index, (name, to_tree, inside, mounted, flush, env) in enumerate(tools()):
                bucket = f"r{round_}-t{index}"
                client.create_bucket(Bucket=bucket)
                local = work / f"local-{bucket}"
                shutil.copytree(work / "seed", local)
                expected = {rel: hashlib.md5(data).hexdigest() for rel, data in original.items()}
                rng = random.Random(2)
                changed = rng.sample(sorted(original), args.changed)
                for job in JOBS:
                    label = job.format(changed=args.changed)
                    if job.startswith("3."):
                        for rel in changed:
                            data = rng.randbytes(len(original[rel]))
                            (local / rel).write_bytes(data)
                            expected[rel] = hashlib.md5(data).hexdigest()
                    if job.startswith("4."):
                        command = (lambda mnt, b=bucket, f=inside: f(mnt, b))
                        prefix = "copy/"
                    else:
                        command = (lambda mnt, b=bucket, f=to_tree, l=local: f(l, mnt, b))
                        prefix = "tree/"
                    result = bench.measure(bucket, command, mounted=mounted, flush=flush, env=env)
                    results.setdefault((label, name), []).append(result)
                    got = bucket_digest(client, bucket, prefix)
                    assert got == expected, f"{name}, {label}: the bucket does not match the source"

        print()
        print("| job | tool | bytes read (GET) | bytes sent | GET | HEAD | LIST | PUT | COPY | other | requests "
              "| time |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for (label, name), runs in results.items():
            first = runs[0]
            ops = first["ops"]
            main_ops = ("GET", "HEAD", "LIST", "PUT", "COPY")
            other = first["requests"] - sum(ops.get(k, 0) for k in main_ops)
            times = sorted(r["seconds"] for r in runs)
            print(f"| {label} | {name} | {first['bytes_read'] / 2**20:,.2f} MiB | {first['bytes_sent'] / 2**20:,.2f} MiB"
                  f" | " + " | ".join(str(ops.get(k, 0)) for k in main_ops) +
                  f" | {other} | {first['requests']:,} | {times[len(times) // 2]:.2f} s |")
        if not have_rclone:
            print("\n(rclone is not installed: no rclone rows)")
        for (label, name), runs in results.items():
            print(f"{label} / {name}: ops {runs[0]['ops']}; times {[round(r['seconds'], 2) for r in runs]}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    sys.exit(main())
