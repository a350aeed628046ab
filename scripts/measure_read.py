#!/usr/bin/env python3
"""Read-path figures on a local S3 endpoint (127.0.0.1), for notes and docs.

Measures, with the project's own S3 test endpoint (moto + range fast path):
  * a direct single-stream GET of a 256 MiB object (boto3, streamed to nowhere),
  * cat of the same object through gstore: cold (empty cache), warm in the same
    mount (kernel page cache), warm after a remount (on-disk block cache only),
  * ffprobe of a 100+ MiB MP4 through the mount: bytes and requests it costs.
Usage: .venv/bin/python scripts/measure_read.py [--size-mib 256] [--block-size 4M] [--latency 0]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gstore.testing.localmount import mount_bucket, unmount
from gstore.testing.s3server import S3TestServer

MiB = 1024 * 1024


def timed_cat(path: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["cat", str(path)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--block-size", default="4M")
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    size = args.size_mib * MiB

    with S3TestServer(latency=args.latency) as server, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        client = server.client()
        client.create_bucket(Bucket="bench")
        payload = os.urandom(size)
        client.put_object(Bucket="bench", Key="big.bin", Body=payload)
        video = work / "video.mp4"
        subprocess.run(
            ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=640x360:rate=25,noise=alls=60:allf=t",
             "-t", "30", "-c:v", "mpeg4", "-q:v", "2", "-y", str(video)], check=True)
        client.put_object(Bucket="bench", Key="video.mp4", Body=video.read_bytes())
        video_size = video.stat().st_size
        del payload

        start = time.perf_counter()
        body = client.get_object(Bucket="bench", Key="big.bin")["Body"]
        while body.read(MiB):
            pass
        direct = time.perf_counter() - start

        mnt = work / "mnt"
        mnt.mkdir()
        mount_bucket(server.endpoint_url, work, mnt, "--block-size", args.block_size)
        try:
            os.stat(mnt / "big.bin")
            server.stats.reset()
            cold = timed_cat(mnt / "big.bin")
            cold_stats = server.stats.snapshot()
            page_cache = timed_cat(mnt / "big.bin")
        finally:
            unmount(mnt)
        mount_bucket(server.endpoint_url, work, mnt, "--block-size", args.block_size)
        try:
            os.stat(mnt / "big.bin")
            os.stat(mnt / "video.mp4")
            server.stats.reset()
            warm = timed_cat(mnt / "big.bin")
            warm_stats = server.stats.snapshot()
            server.stats.reset()
            subprocess.run(["ffprobe", "-v", "error", "-show_format", "-show_streams", str(mnt / "video.mp4")],
                           check=True, stdout=subprocess.DEVNULL)
            probe = server.stats.snapshot()
        finally:
            unmount(mnt)

    mib = size / MiB
    print(f"object: {mib:.0f} MiB, block size {args.block_size}, endpoint latency {args.latency * 1000:.0f} ms")
    print(f"direct single-stream GET (boto3):        {mib / direct:8.1f} MiB/s ({direct:.2f} s)")
    print(f"gstore cold (empty cache):               {mib / cold:8.1f} MiB/s ({cold:.2f} s), "
          f"{cold_stats['GET']} GETs, {cold_stats['bytes_sent'] / MiB:.1f} MiB from the backend")
    print(f"gstore warm, same mount (page cache):    {mib / page_cache:8.1f} MiB/s ({page_cache:.2f} s)")
    print(f"gstore warm after remount (block cache): {mib / warm:8.1f} MiB/s ({warm:.2f} s), {warm_stats['GET']} GETs")
    print(f"ffprobe of a {video_size / MiB:.1f} MiB MP4: {probe['GET']} GETs, {probe['HEAD']} HEADs, "
          f"{probe['LIST']} LISTs, {probe['bytes_sent'] / MiB:.2f} MiB fetched "
          f"({100 * probe['bytes_sent'] / video_size:.1f}% of the file)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
