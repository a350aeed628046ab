"""fsx-style and concurrency tests: every byte checked against a local reference.

* ``test_fsx_*``: random write / truncate / extend / read / fsync / reopen with a
  fixed seed on one file, compared with an in-memory model after every step,
  then after unmount and a fresh mount, and in the bucket.
* many readers and writers at once, in threads and in processes, on the same
  and on different files;
* open files keep working across a metadata refresh (and an object replaced
  remotely while open is either the old bytes or ESTALE, never a mix);
* a cache much smaller than the working set with many readers waiting: no
  deadlock, right bytes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuse

KiB = 1024
MiB = 1024 * KiB


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def drop_page_cache(fd: int) -> None:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def read_all(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        drop_page_cache(fd)
        out = bytearray()
        while chunk := os.read(fd, MiB):
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def flush(mnt: Path) -> None:
    with open(mnt / ".gstore" / "flush", "rb") as f:
        verdict = json.loads(f.read() or b"{}")
    assert not verdict.get("failed"), verdict


def status(mnt: Path) -> dict:
    with open(mnt / ".gstore" / "status.json", encoding="utf-8") as f:
        return json.load(f)


def run_fsx(path: Path, model: bytearray, seed: int, steps: int, max_size: int) -> dict[str, int]:
    """Random operations on ``path`` mirrored on ``model``; checks after every step."""
    rng = random.Random(seed)
    counts = {"write": 0, "truncate": 0, "extend": 0, "read": 0, "fsync": 0, "reopen": 0, "bytes": 0}
    fd = os.open(path, os.O_RDWR)
    try:
        for step in range(steps):
            op = rng.choices(["write", "truncate", "extend", "read", "fsync", "reopen"], [40, 8, 8, 30, 4, 10])[0]
            if op == "write":
                offset = rng.randrange(0, min(max_size, len(model) + 64 * KiB))
                data = rng.randbytes(rng.randrange(1, 128 * KiB))
                data = data[: max_size - offset] or b"x"
                assert os.pwrite(fd, data, offset) == len(data)
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + len(data)] = data
            elif op == "truncate":
                size = rng.randrange(0, len(model) + 1)
                os.ftruncate(fd, size)
                del model[size:]
            elif op == "extend":
                size = rng.randrange(len(model), max_size + 1)
                os.ftruncate(fd, size)
                model.extend(bytes(size - len(model)))
            elif op == "read":
                offset = rng.randrange(0, len(model) + 1)
                size = rng.randrange(1, 256 * KiB)
                got = os.pread(fd, size, offset)
                assert got == bytes(model[offset : offset + size]), f"step {step}: read {offset}+{size}"
                counts["bytes"] += len(got)
            elif op == "fsync":
                os.fsync(fd)
            else:
                os.close(fd)
                fd = os.open(path, os.O_RDWR)
            counts[op] += 1
            assert os.fstat(fd).st_size == len(model), f"step {step} ({op}): size"
            if step % 25 == 24:
                drop_page_cache(fd)
                whole = os.pread(fd, len(model) + 1, 0)
                assert whole == bytes(model), f"step {step}: whole-file check"
                counts["bytes"] += len(whole)
    finally:
        os.close(fd)
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("start", ["new", "existing"])
def test_fsx_random_operations_then_remount(s3, mount, start):
    seed = 20240611 if start == "new" else 77
    args = ("--block-size", "256K", "--write-back-delay", "0.3")
    m = mount("test:", *args)
    if start == "existing":
        model = bytearray(payload(5, 2 * MiB + 333))
        s3.put("fsx.bin", bytes(model))
    else:
        model = bytearray()
        (m.path / "fsx.bin").write_bytes(b"")
    counts = run_fsx(m.path / "fsx.bin", model, seed, steps=300, max_size=3 * MiB)
    assert read_all(m.path / "fsx.bin") == bytes(model)
    flush(m.path)
    assert s3.get("fsx.bin") == bytes(model)
    m.stop()
    m2 = mount("test:", *args)
    assert read_all(m2.path / "fsx.bin") == bytes(model)
    print(f"\n[fsx {start}] seed={seed} ops={counts} final size={len(model)} data lost=0")


def test_many_threads_read_and_write_same_and_different_files(s3, mount):
    shared = {f"shared{i}.bin": payload(900 + i, 2 * MiB + 17 * i) for i in range(3)}
    for name, data in shared.items():
        s3.put(name, data)
    m = mount("test:", "--block-size", "256K", "--write-back-delay", "0.2")
    errors: list[str] = []
    verified = [0]
    lock = threading.Lock()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            name = rng.choice(list(shared))
            offset = rng.randrange(len(shared[name]))
            size = rng.randrange(1, 300 * KiB)
            with open(m.path / name, "rb") as f:
                f.seek(offset)
                got = f.read(size)
            if got != shared[name][offset : offset + size]:
                errors.append(f"{name}@{offset}")
            with lock:
                verified[0] += len(got)

    def writer(seed: int) -> None:
        for n in range(5):
            data = payload(seed * 100 + n, random.Random(seed + n).randrange(1, 600 * KiB))
            target = m.path / f"t{seed}-{n}.bin"
            target.write_bytes(data)
            if read_all(target) != data:
                errors.append(f"{target.name}: read back")
            with lock:
                verified[0] += len(data)

    # Two writers share one file at disjoint stripes (like pwrite from two programs).
    stripe, stripes = 64 * KiB, 16
    (m.path / "striped.bin").write_bytes(bytes(stripe * stripes))
    expected = bytearray(stripe * stripes)

    def striper(parity: int) -> None:
        fd = os.open(m.path / "striped.bin", os.O_WRONLY)
        try:
            for i in range(parity, stripes, 2):
                data = payload(parity * 1000 + i, stripe)
                os.pwrite(fd, data, i * stripe)
                expected[i * stripe : (i + 1) * stripe] = data
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(6)]
    threads += [threading.Thread(target=writer, args=(s,)) for s in range(4)]
    threads += [threading.Thread(target=striper, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    assert not errors, errors[:5]
    assert read_all(m.path / "striped.bin") == bytes(expected)
    flush(m.path)
    assert s3.get("striped.bin") == bytes(expected)
    for seed in range(4):
        for n in range(5):
            assert s3.get(f"t{seed}-{n}.bin") == payload(seed * 100 + n, random.Random(seed + n).randrange(1, 600 * KiB))
    print(f"\n[threads] ops={6 * 60 + 4 * 5 + stripes} bytes verified={verified[0]} data lost=0")


_WORKER = r"""
import hashlib, json, os, random, sys
mnt, seed = sys.argv[1], int(sys.argv[2])
def payload(s, n): return random.Random(s).randbytes(n)
shared = {f"p{i}.bin": payload(700 + i, 1536 * 1024 + i) for i in range(2)}
rng = random.Random(seed)
verified = 0
written = {}
for n in range(4):
    data = payload(seed * 10 + n, rng.randrange(1, 400 * 1024))
    written[f"proc{seed}-{n}.bin"] = hashlib.sha256(data).hexdigest()
    path = os.path.join(mnt, f"proc{seed}-{n}.bin")
    with open(path, "wb") as f:
        f.write(data)
    with open(path, "rb") as f:
        assert f.read() == data, path
    verified += len(data)
    for _ in range(10):
        name = rng.choice(sorted(shared))
        off = rng.randrange(len(shared[name]))
        size = rng.randrange(1, 200 * 1024)
        with open(os.path.join(mnt, name), "rb") as f:
            f.seek(off)
            got = f.read(size)
        assert got == shared[name][off:off + size], (name, off, size)
        verified += len(got)
print(json.dumps({"verified": verified, "written": written}))
"""


def test_many_processes_read_and_write(s3, mount):
    for i in range(2):
        s3.put(f"p{i}.bin", payload(700 + i, 1536 * KiB + i))
    m = mount("test:", "--block-size", "256K", "--write-back-delay", "0.2")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(m.path), str(seed)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in range(6)]
    verified = 0
    written: dict[str, str] = {}
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        result = json.loads(out)
        verified += result["verified"]
        written.update(result["written"])
    flush(m.path)
    assert len(written) == 24
    for name, digest in written.items():
        assert hashlib.sha256(s3.get(name)).hexdigest() == digest, name
    print(f"\n[processes] 6 processes, bytes verified={verified} data lost=0")


def test_open_file_survives_metadata_refresh_and_remote_change(s3, mount):
    old = payload(1, 3 * MiB)
    s3.put("live.bin", old)
    m = mount("test:", "--attr-ttl", "0.2", "--dir-cache-ttl", "0.2", "--negative-ttl", "0.2",
              "--block-size", "256K", "--readahead", "0")
    fd = os.open(m.path / "live.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, MiB, 0) == old[:MiB]
        time.sleep(0.5)
        assert "live.bin" in os.listdir(m.path)  # a fresh listing
        assert os.stat(m.path / "live.bin").st_size == len(old)
        assert os.pread(fd, MiB, MiB) == old[MiB : 2 * MiB]
        # Replaced remotely while open: the handle reads its own version or fails
        # with ESTALE; it never mixes the two.
        new = payload(2, 3 * MiB)
        s3.put("live.bin", new)
        time.sleep(0.5)
        os.listdir(m.path)
        drop_page_cache(fd)
        try:
            tail = os.pread(fd, MiB, 2 * MiB)
        except OSError as exc:
            assert exc.errno == errno.ESTALE
        else:
            # A short read is allowed (the kernel stops at the first page that failed).
            assert tail and tail == old[2 * MiB : 2 * MiB + len(tail)], (
                "new bytes" if tail == new[2 * MiB : 2 * MiB + len(tail)] else "other bytes", len(tail))
    finally:
        os.close(fd)
    assert read_all(m.path / "live.bin") == new  # a new open sees the new version


def test_tiny_cache_many_waiting_readers_no_deadlock(s3, mount):
    files = {f"big{i}.bin": payload(50 + i, 3 * MiB + i) for i in range(6)}
    for name, data in files.items():
        s3.put(name, data)
    s3.server.latency = 0.02  # type: ignore[attr-defined]
    try:
        m = mount("test:", "--cache-size", "1M", "--block-size", "256K", "--fetch-concurrency", "2",
                  "--readahead", "1M")
        errors: list[str] = []

        def reader(name: str) -> None:
            for _ in range(2):
                if read_all(m.path / name) != files[name]:
                    errors.append(name)

        threads = [threading.Thread(target=reader, args=(n,)) for n in files for _ in range(2)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=150)
        assert not any(t.is_alive() for t in threads), "readers stuck with a full cache"
        assert not errors, errors
        cache = status(m.path)["cache"]
        assert cache["used"] <= cache["capacity"]
        print(f"\n[tiny cache] 12 readers, {sum(len(d) for d in files.values()) * 4} bytes verified "
              f"in {time.monotonic() - started:.1f}s, evictions={cache['evictions']}")
    finally:
        s3.server.latency = 0.0  # type: ignore[attr-defined]
