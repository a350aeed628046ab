#!/usr/bin/env python3
"""Creating small files, call by call: gstore against the bare pyfuse3 floor, on 127.0.0.1.

For N files of 4 KiB created one after another in a new folder (open(O_CREAT),
one write, close), the median and p90 of each call as the program sees it, and
the whole close phase; then ``gstore flush``, with the CPU seconds the daemon
and the endpoint spent on the uploads (``/proc/PID/stat``) next to boto3's for
the same number of PUTs on 8 threads (``--reference``). The same create loop
runs on ``bench.barefs_write`` with and without one fsync per close: the floor
of any Python FUSE daemon for these calls. The endpoint is the benchmark's
(``bench.endpoint``: moto with the range fast path, in its own process, so the
client's timings never wait for the endpoint's GIL).

    .venv/bin/python scripts/measure_create.py [--files 1000] [--latency-ms 0]
        [--no-bare] [--reference] [--cache-under DIR]
        [--profile FILE [--profile-phase create|flush] [--profile-gil | --profile-idle]] [-- extra gstore-mount options]
Needs root (FUSE). Run from the repository root (PYTHONPATH is set for bench/).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.endpoint import BUCKET, Endpoint  # noqa: E402
from gstore.testing.localmount import mount_bucket, unmount  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def create_loop(folder: Path, payloads: list[bytes]) -> dict[str, list[float]]:
    """mkdir, then open/write/close each file; the seconds of each call."""
    calls: dict[str, list[float]] = {"open": [], "write": [], "close": []}
    os.mkdir(folder)
    for i, body in enumerate(payloads):
        a = time.perf_counter()
        fd = os.open(folder / f"f{i:05d}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        b = time.perf_counter()
        os.write(fd, body)
        c = time.perf_counter()
        os.close(fd)
        d = time.perf_counter()
        calls["open"].append(b - a)
        calls["write"].append(c - b)
        calls["close"].append(d - c)
    return calls


def start_profile(output: str, pid: int, gil: bool, idle: bool = False) -> subprocess.Popen[bytes]:
    """py-spy on the daemon; ``gil``: only the thread holding the GIL (Python CPU, no system calls);
    ``idle``: also the samples of threads waiting (in a system call, for a lock or the GIL)."""
    spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--rate", "500",
                            "--format", "raw", "--threads", "--nonblocking", "--output", output]
                           + (["--gil"] if gil else []) + (["--idle"] if idle else []),
                           stdout=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    return spy


def stop_profile(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None:
        spy.send_signal(2)
        spy.wait(60)


def report(label: str, total: float, calls: dict[str, list[float]]) -> None:
    parts = []
    for name, values in calls.items():
        values = sorted(values)
        parts.append(f"{name} {statistics.median(values) * 1e3:.2f} ms (p90 {values[int(0.9 * len(values))] * 1e3:.2f})")
    print(f"{label:<28} close phase {total:6.2f} s   " + ", ".join(parts))


def bare(work: Path, payloads: list[bytes], fsync_close: bool) -> None:
    store, mnt = work / ("bare-store-f" if fsync_close else "bare-store"), work / "bare-mnt"
    store.mkdir()
    mnt.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "bench.barefs_write", str(store), str(mnt)] + (["--fsync-close"] if fsync_close else [])
    proc = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("bench.barefs_write did not mount")
            time.sleep(0.05)
        t0 = time.perf_counter()
        calls = create_loop(mnt / "d", payloads)
        report("bare pyfuse3" + (", fsync per close" if fsync_close else ""), time.perf_counter() - t0, calls)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--no-bare", action="store_true")
    parser.add_argument("--reference", action="store_true", help="also 1,000 boto3 PUTs on 8 threads")
    parser.add_argument("--profile", metavar="FILE",
                        help="py-spy record of the daemon (collapsed stacks with threads, 500 Hz) during one phase")
    parser.add_argument("--profile-gil", action="store_true", help="py-spy --gil: Python CPU only")
    parser.add_argument("--profile-idle", action="store_true",
                        help="py-spy --idle: also where threads wait (system calls, locks, the GIL)")
    parser.add_argument("--profile-phase", choices=("create", "flush"), default="create")
    parser.add_argument("--cache-under", metavar="DIR",
                        help="the daemon's cache (and staging) directory in a new folder under DIR, e.g. "
                             "/dev/shm to see what the local disk's metadata operations cost the closes")
    parser.add_argument("mount_options", nargs="*")
    args = parser.parse_args()
    payloads = [os.urandom(4096) for _ in range(args.files)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        endpoint = Endpoint(work, latency_s=args.latency_ms / 1000, bandwidth_bps=None, seeds={}, listings=[],
                            log_path=work / "endpoint.log")
        endpoint.start()
        try:
            mnt = work / "mnt"
            mnt.mkdir()
            cache = Path(tempfile.mkdtemp(dir=args.cache_under)) if args.cache_under else work / "cache"
            options = [*args.mount_options, *(["--cache-dir", str(cache)] if args.cache_under else [])]
            mount_bucket(endpoint.url, work, mnt, *options, bucket=BUCKET)
            try:
                pid = int(next(cache.glob("*/lock")).read_text().split()[0])
                endpoint.reset_stats()
                spy = start_profile(args.profile, pid, args.profile_gil, args.profile_idle) if args.profile and args.profile_phase == "create" else None
                t0 = time.perf_counter()
                calls = create_loop(mnt / "d", payloads)
                closed = time.perf_counter() - t0
                stop_profile(spy)
                spy = start_profile(args.profile, pid, args.profile_gil, args.profile_idle) if args.profile and args.profile_phase == "flush" else None
                report("gstore", closed, calls)
                during = endpoint.stats()
                daemon0, endpoint0, t1 = cpu_seconds(pid), endpoint.cpu() or 0.0, time.perf_counter()
                subprocess.run([str(Path(sys.executable).with_name("gstore")), "flush", str(mnt)], check=True,
                               stdout=subprocess.DEVNULL)
                flushed = time.perf_counter() - t1
                stop_profile(spy)
                print(f"{'gstore flush':<28} {flushed:6.2f} s; durable {closed + flushed:.2f} s after the mkdir; "
                      f"daemon CPU {cpu_seconds(pid) - daemon0:.2f} s, endpoint CPU "
                      f"{(endpoint.cpu() or 0.0) - endpoint0:.2f} s; requests during the creates: {during['total']}")
            finally:
                unmount(mnt, timeout=120)
                if args.cache_under:
                    shutil.rmtree(cache, ignore_errors=True)
            if args.reference:
                client = endpoint.client
                endpoint0, c0, t0 = endpoint.cpu() or 0.0, time.process_time(), time.perf_counter()
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(lambda i: client.put_object(Bucket=BUCKET, Key=f"ref/f{i:05d}", Body=payloads[i]),
                                  range(len(payloads))))
                print(f"{'boto3 PUTs, 8 threads':<28} {time.perf_counter() - t0:6.2f} s; client CPU "
                      f"{time.process_time() - c0:.2f} s, endpoint CPU {(endpoint.cpu() or 0.0) - endpoint0:.2f} s")
        finally:
            endpoint.stop()
        if not args.no_bare:
            bare(work, payloads, fsync_close=False)
            bare(work, payloads, fsync_close=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
