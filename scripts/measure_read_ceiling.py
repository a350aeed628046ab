#!/usr/bin/env python3
"""Read path against the Python-FUSE ceiling (issue #14), all in one run on 127.0.0.1.

  * cached: fio 4 KiB and 64 KiB random reads, O_DIRECT, QD1, on a file whose
    blocks are all in gstore's on-disk cache, and the same fio job on a bare
    pyfuse3 file system serving a local copy (scripts/bare_pyfuse3.py);
  * cold: one direct GET stream of a SIZE object (boto3) vs ``cat`` through a
    fresh gstore mount (empty cache), and the daemon's peak RSS;
  * ls: warm ``ls -l`` of a folder of N files (second run, xattrs on).
The endpoint is the project's S3 test server (moto + single-range fast path).
Usage: .venv/bin/python scripts/measure_read_ceiling.py [cached] [cold] [ls]
       [--size-mib 256] [--files 10000] [--runtime 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gstore.testing.localmount import mount_bucket, unmount
from gstore.testing.s3server import S3TestServer

MiB = 1024 * 1024
HERE = Path(__file__).resolve().parent


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fio(path: Path, bs: str, runtime: int, pid: int) -> tuple[float, float]:
    """IOPS of O_DIRECT QD1 random reads of ``path``, and the server's CPU µs per read.

    On a shared 2-core machine wall-clock IOPS swing with other load; the CPU
    time the file system process spends per request does much less so.
    """
    before = cpu_seconds(pid)
    out = subprocess.run(
        ["fio", "--name=r", f"--filename={path}", "--rw=randread", f"--bs={bs}", "--direct=1",
         "--ioengine=psync", "--iodepth=1", "--numjobs=1", f"--runtime={runtime}", "--time_based",
         "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    used = cpu_seconds(pid) - before
    job = json.loads(out)["jobs"][0]["read"]
    return float(job["iops"]), 1e6 * used / max(1, int(job["total_ios"]))


def daemon_pid(mnt: Path) -> int | None:
    for line in subprocess.run(["pgrep", "-a", "-f", "gstore-mount"], capture_output=True, text=True).stdout.splitlines():
        pid, _, cmd = line.partition(" ")
        if cmd.endswith(str(mnt)):
            return int(pid)
    return None


def peak_rss_mib(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cached(server: S3TestServer, work: Path, size: int, runtime: int, extra: list[str]) -> None:
    client = server.client()
    payload = os.urandom(size)
    client.put_object(Bucket="bench", Key="cached.bin", Body=payload)
    local = work / "local.bin"
    local.write_bytes(payload)
    del payload
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    mount_bucket(server.endpoint_url, work, mnt, *extra)
    try:
        subprocess.run(["cat", str(mnt / "cached.bin")], check=True, stdout=subprocess.DEVNULL)
        pid = daemon_pid(mnt)
        assert pid is not None, "no gstore-mount process found"
        server.stats.reset()
        g4, g4cpu = fio(mnt / "cached.bin", "4k", runtime, pid)
        g64, g64cpu = fio(mnt / "cached.bin", "64k", runtime, pid)
        gets = server.stats.snapshot()["GET"]
    finally:
        unmount(mnt)
    bare_mnt = work / "bare"
    bare_mnt.mkdir(exist_ok=True)
    bare = subprocess.Popen([sys.executable, str(HERE / "bare_pyfuse3.py"), str(local), str(bare_mnt)])
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(bare_mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        b4, b4cpu = fio(bare_mnt / "data", "4k", runtime, bare.pid)
        b64, b64cpu = fio(bare_mnt / "data", "64k", runtime, bare.pid)
    finally:
        subprocess.run(["fusermount3", "-u", str(bare_mnt)], check=False)
        bare.wait(timeout=10)
    print(f"cached 4 KiB randread O_DIRECT QD1:  gstore {g4:7.0f} IOPS {g4cpu:5.1f} µs CPU/read   "
          f"bare pyfuse3 {b4:7.0f} IOPS {b4cpu:5.1f} µs CPU/read  (IOPS {g4 / b4:.2f}x)")
    print(f"cached 64 KiB randread O_DIRECT QD1: gstore {g64:7.0f} IOPS {g64cpu:5.1f} µs CPU/read   "
          f"bare pyfuse3 {b64:7.0f} IOPS {b64cpu:5.1f} µs CPU/read  (IOPS {g64 / b64:.2f}x)   [{gets} GETs during fio]")


def cold(server: S3TestServer, work: Path, size: int, extra: list[str]) -> None:
    client = server.client()
    client.put_object(Bucket="bench", Key="big.bin", Body=os.urandom(size))
    start = time.perf_counter()
    body = client.get_object(Bucket="bench", Key="big.bin")["Body"]
    while body.read(MiB):
        pass
    direct = time.perf_counter() - start
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    cache = work / "cache"
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    mount_bucket(server.endpoint_url, work, mnt, *extra)
    try:
        os.stat(mnt / "big.bin")
        server.stats.reset()
        start = time.perf_counter()
        subprocess.run(["cat", str(mnt / "big.bin")], check=True, stdout=subprocess.DEVNULL)
        took = time.perf_counter() - start
        stats = server.stats.snapshot()
        rss = peak_rss_mib(daemon_pid(mnt))
    finally:
        unmount(mnt)
    mib = size / MiB
    print(f"cold seq read {mib:.0f} MiB: direct GET {mib / direct:7.1f} MiB/s   gstore cat {mib / took:7.1f} MiB/s"
          f"  ({direct / took:.2f}x), {stats['GET']} GETs, daemon peak RSS {rss:.0f} MiB")


def listing(server: S3TestServer, work: Path, files: int, extra: list[str]) -> None:
    client = server.client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.put_object(Bucket="bench", Key=f"many/f{i:05d}", Body=b"x"), range(files)))
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    mount_bucket(server.endpoint_url, work, mnt, *extra)
    try:
        subprocess.run(["ls", "-l", str(mnt / "many")], check=True, stdout=subprocess.DEVNULL)
        server.stats.reset()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run(["ls", "-l", str(mnt / "many")], check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
        stats = server.stats.snapshot()
    finally:
        unmount(mnt)
    print(f"warm ls -l of {files} files: best {min(times):.3f} s, runs {', '.join(f'{t:.3f}' for t in times)}"
          f"  ({sum(stats[k] for k in ('GET', 'HEAD', 'LIST'))} backend requests)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", nargs="*", default=["cached", "cold", "ls"])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--cached-mib", type=int, default=64)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--runtime", type=int, default=5)
    parser.add_argument("--mount-option", action="append", default=[])
    args = parser.parse_args()
    with S3TestServer() as server, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server.client().create_bucket(Bucket="bench")
        if "cached" in args.what:
            cached(server, work, args.cached_mib * MiB, args.runtime, args.mount_option)
        if "cold" in args.what:
            cold(server, work, args.size_mib * MiB, args.mount_option)
        if "ls" in args.what:
            listing(server, work, args.files, args.mount_option)
    return 0


if __name__ == "__main__":
    sys.exit(main())
