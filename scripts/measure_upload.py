#!/usr/bin/env python3
"""Write-path figures on a local S3 endpoint (127.0.0.1), with their references from the same run.

Measures, against the project's own S3 test endpoint (moto + range fast path, TCP_NODELAY):
  * a 256 MiB file written through a gstore mount in 1 MiB writes, then ``gstore flush``:
    seconds to the close and to durable (flush exit 0), against boto3's ``upload_file``
    of the same bytes with 10 threads (TransferConfig(max_concurrency=10));
  * the daemon's peak RSS (VmHWM) over each phase;
  * 1,000 files of 4 KiB created one after another in a new folder (open, write, close),
    then ``gstore flush``: seconds to the last close and to durable, and the requests the
    upload phase cost, against 1,000 PutObject of 4 KiB on 8 threads through boto3.
References and gstore share the endpoint, the machine and the run; the ratio is what
the issue's targets are stated in.

Usage: .venv/bin/python scripts/measure_upload.py [--size-mib 256] [--files 1000] [--file-kib 4]
       [--rounds 1] [--skip-large] [--skip-small] [-- extra gstore-mount options]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gstore.testing.localmount import mount_bucket, unmount
from gstore.testing.s3server import S3TestServer

MiB = 1024 * 1024


def gstore_flush(mnt: Path) -> None:
    subprocess.run([str(Path(sys.executable).with_name("gstore")), "flush", str(mnt)], check=True,
                   stdout=subprocess.DEVNULL)


def reference_upload_file(client: object, source: Path, key: str) -> float:
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(max_concurrency=10, use_threads=True)
    start = time.perf_counter()
    client.upload_file(str(source), "bench", key, Config=config)  # type: ignore[attr-defined]
    return time.perf_counter() - start


def reference_puts(client: object, count: int, body: bytes, prefix: str) -> float:
    def put(i: int) -> None:
        client.put_object(Bucket="bench", Key=f"{prefix}/f{i:05d}.bin", Body=body)  # type: ignore[attr-defined]

    with ThreadPoolExecutor(max_workers=8) as pool:
        start = time.perf_counter()
        list(pool.map(put, range(count)))
        return time.perf_counter() - start


def daemon_peak_mib(mountpoint: Path) -> float:
    """VmHWM (peak RSS) of the gstore-mount daemon serving ``mountpoint``, in MiB."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if any(b"gstore-mount" in part for part in cmd) and str(mountpoint).encode() in cmd:
                for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            continue
    return float("nan")


def write_large(mnt: Path, data: bytes) -> tuple[float, float]:
    """Seconds to the close and to durable (``gstore flush``), from the open."""
    start = time.perf_counter()
    fd = os.open(mnt / "big.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        for offset in range(0, len(data), MiB):
            os.write(fd, view[offset:offset + MiB])
    finally:
        os.close(fd)
    closed = time.perf_counter() - start
    gstore_flush(mnt)
    return closed, time.perf_counter() - start


def write_small(mnt: Path, folder: str, payloads: list[bytes]) -> tuple[float, float]:
    """Seconds to the last close and to durable (``gstore flush``), from the mkdir."""
    start = time.perf_counter()
    os.mkdir(mnt / folder)
    for i, body in enumerate(payloads):
        with open(mnt / folder / f"f{i:05d}.bin", "wb") as f:
            f.write(body)
    closed = time.perf_counter() - start
    gstore_flush(mnt)
    return closed, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--file-kib", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--skip-small", action="store_true")
    parser.add_argument("mount_options", nargs="*", help="passed to gstore-mount (after --)")
    args = parser.parse_args()

    with S3TestServer() as server, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        client = server.client()
        client.create_bucket(Bucket="bench")
        mnt = work / "mnt"
        mnt.mkdir()
        print(f"endpoint {server.endpoint_url} (moto + range fast path); mount options: {args.mount_options}")
        results: dict[str, list[float]] = {}

        def note(name: str, value: float) -> None:
            results.setdefault(name, []).append(value)

        for round_no in range(args.rounds):
            if not args.skip_large:
                data = os.urandom(args.size_mib * MiB)
                source = work / "source.bin"
                source.write_bytes(data)
                note("large: boto3 upload_file (10 threads) s", reference_upload_file(client, source, f"ref{round_no}.bin"))
                source.unlink()
                mount_bucket(server.endpoint_url, work, mnt, *args.mount_options)
                try:
                    client.delete_object(Bucket="bench", Key="big.bin")
                    server.stats.reset()
                    closed, durable = write_large(mnt, data)
                    stats = server.stats.snapshot()
                    note("large: daemon peak RSS MiB", daemon_peak_mib(mnt))
                finally:
                    unmount(mnt, timeout=60)
                head = client.head_object(Bucket="bench", Key="big.bin")
                assert head["ContentLength"] == len(data), head
                note("large: gstore close s", closed)
                note("large: gstore durable s", durable)
                print(f"round {round_no}: large requests {stats}")
                del data
            if not args.skip_small:
                payloads = [os.urandom(args.file_kib * 1024) for _ in range(args.files)]
                note("small: boto3 PUTs (8 threads) s", reference_puts(client, args.files, payloads[0], f"ref{round_no}"))
                mount_bucket(server.endpoint_url, work, mnt, *args.mount_options)
                try:
                    server.stats.reset()
                    closed, durable = write_small(mnt, f"small{round_no}", payloads)
                    stats = server.stats.snapshot()
                    note("small: daemon peak RSS MiB", daemon_peak_mib(mnt))
                finally:
                    unmount(mnt, timeout=60)
                listed = client.list_objects_v2(Bucket="bench", Prefix=f"small{round_no}/")
                count = 0
                kwargs = {"Bucket": "bench", "Prefix": f"small{round_no}/"}
                while True:
                    count += sum(1 for item in listed.get("Contents", ()) if not item["Key"].endswith("/"))
                    if not listed.get("IsTruncated"):
                        break
                    listed = client.list_objects_v2(**kwargs, ContinuationToken=listed["NextContinuationToken"])
                assert count == args.files, count
                note("small: gstore last close s", closed)
                note("small: gstore durable s", durable)
                print(f"round {round_no}: small-file requests {stats}")

    print()
    for name, values in results.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"{name:42s} median {statistics.median(values):6.2f}   ({shown})")
    if not args.skip_large:
        ratio = statistics.median(results["large: gstore durable s"]) / statistics.median(
            results["large: boto3 upload_file (10 threads) s"])
        print(f"large durable / boto3 upload_file: {ratio:.2f}x")
    if not args.skip_small:
        ratio = statistics.median(results["small: gstore durable s"]) / statistics.median(
            results["small: boto3 PUTs (8 threads) s"])
        print(f"small durable / boto3 PUTs: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
