#!/usr/bin/env python3
"""What virtual files and xattrs cost in backend traffic, on a local S3 endpoint (127.0.0.1).

Seeds four 256 MiB parts (one of them a multipart upload, whose ETag is not an
MD5), mounts them with gstore and reports the GET requests and bytes that
  * stat and ``tail -c 1000`` of their 1 GiB ``.concat`` cost,
  * ``getfattr -n user.md5`` asked twice costs, for a single-part and a multipart object.
Usage: .venv/bin/python scripts/measure_virtual.py [--part-mib 256] [--block-size 4M]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gstore.testing.localmount import mount_bucket, unmount
from gstore.testing.s3server import S3TestServer

MiB = 1024 * 1024
PARTS = ["p0.ts", "p1.ts", "p2.ts", "p3.ts"]


def traffic(server: S3TestServer) -> str:
    records = [r for r in server.stats.records() if r.op == "GET"]
    others = {k: v for k, v in server.stats.snapshot().items() if k in ("HEAD", "LIST") and v}
    extra = "".join(f", {v} {k}" for k, v in others.items())
    return f"{len(records)} GETs, {sum(r.bytes_sent for r in records):,} bytes{extra}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part-mib", type=int, default=256)
    parser.add_argument("--block-size", default="4M")
    args = parser.parse_args()
    part = args.part_mib * MiB
    with S3TestServer() as server, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        client = server.client()
        client.create_bucket(Bucket="bench")
        digests = {}
        for index, name in enumerate(PARTS):
            data = os.urandom(part)
            digests[name] = hashlib.md5(data).hexdigest()
            if index == 1:
                upload = client.create_multipart_upload(Bucket="bench", Key=name)
                done = []
                for number, start in enumerate(range(0, part, 16 * MiB), 1):
                    r = client.upload_part(Bucket="bench", Key=name, UploadId=upload["UploadId"],
                                           PartNumber=number, Body=data[start:start + 16 * MiB])
                    done.append({"ETag": r["ETag"], "PartNumber": number})
                client.complete_multipart_upload(Bucket="bench", Key=name, UploadId=upload["UploadId"],
                                                 MultipartUpload={"Parts": done})
            else:
                client.put_object(Bucket="bench", Key=name, Body=data)
            tail = data[-1000:]
            del data
        mnt = work / "mnt"
        mnt.mkdir()
        mount_bucket(server.endpoint_url, work, mnt, "--cache-size", "4G", "--block-size", args.block_size)
        try:
            concat = mnt / ".concat" / "+".join(PARTS)
            server.stats.reset()
            size = concat.stat().st_size
            print(f"stat of the {size / MiB:.0f} MiB .concat of {len(PARTS)} parts: {traffic(server)}")
            server.stats.reset()
            out = subprocess.run(["tail", "-c", "1000", str(concat)], check=True, capture_output=True).stdout
            assert out == tail, "tail of the concatenation is wrong"
            print(f"tail -c 1000 of the .concat:                 {traffic(server)}")
            for name, kind in (("p0.ts", "single-part"), ("p1.ts", "multipart")):
                for ask in ("first", "second"):
                    server.stats.reset()
                    start = time.perf_counter()
                    value = subprocess.run(["getfattr", "--only-values", "-n", "user.md5", str(mnt / name)],
                                           check=True, capture_output=True).stdout.decode()
                    took = time.perf_counter() - start
                    assert value == digests[name], f"md5 of {name} is wrong"
                    print(f"getfattr -n user.md5, {kind} {args.part_mib} MiB, {ask} ask: "
                          f"{traffic(server)} ({took:.2f} s)")
        finally:
            unmount(mnt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
