"""End to end under injected faults: a mount talks to S3 through the fault proxy.

What each test shows (see docs/reliability.md):

* reads retry through connection resets, truncated bodies, 500 and 503
  SlowDown, and the bytes served are exactly the object's, also after a
  restart from the cache;
* a hanging backend makes a read fail with EIO within --request-timeout, the
  daemon keeps answering meanwhile, and nothing partial was cached;
* through an outage, written files stay queued, fsync reports EIO, the circuit
  breaker opens (fail fast, visible in .gstore/status.json) and closes by
  itself, and everything goes up once the backend is back;
* an upload whose response was lost after the backend applied it is not
  turned into a conflict copy;
* kill -9 in the middle of reads and writes, plus a truncated and a corrupted
  block file, never lead to wrong bytes after the restart.

Every test keeps a tally (faults injected, operations, bytes verified) that
is printed at the end of the test (``-s`` shows it; docs/reliability.md
quotes a run).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import BUCKET, MountFactory
from gstore.testing.faultproxy import FaultProxy

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024
KiB = 1024


@dataclass
class _Endpoint:
    endpoint: str


@dataclass
class Tally:
    faults: int = 0
    operations: int = 0
    bytes_verified: int = 0
    lost: int = 0

    def report(self, name: str, proxy: FaultProxy | None = None) -> None:
        counts = proxy.counts() if proxy is not None else {}
        if proxy is not None:
            self.faults = sum(v for k, v in counts.items() if k not in ("requests", "forwarded"))
        print(f"\n[{name}] faults injected={self.faults} {counts} operations={self.operations} "
              f"bytes verified={self.bytes_verified} data lost={self.lost}")


@pytest.fixture
def proxy(s3):  # type: ignore[no-untyped-def]
    p = FaultProxy(s3.endpoint).start()
    try:
        yield p
    finally:
        p.clear()
        p.stop()


class _ProxiedMounts(MountFactory):
    def __call__(self, spec: str = "test:", *args: str, **kw):  # type: ignore[no-untyped-def,override]
        # INFO: botocore logs every failed connection with a traceback at DEBUG, which
        # the fixture would take for a daemon crash.
        return super().__call__(spec, "--log-level", "INFO", *args, **kw)


@pytest.fixture
def pmount(tmp_path: Path, s3, proxy):  # type: ignore[no-untyped-def]
    """Like ``mount``, but the daemon reaches S3 only through the fault proxy."""
    factory = _ProxiedMounts(tmp_path, _Endpoint(proxy.endpoint_url))  # type: ignore[arg-type]
    try:
        yield factory
    finally:
        proxy.clear()  # let a draining daemon finish
        factory.cleanup()


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def read_uncached(path: Path) -> bytes:
    """The file's bytes as the daemon serves them now (the kernel page cache dropped first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 1 * MiB):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def status(path: Path) -> dict:
    with open(path / ".gstore" / "status.json", encoding="utf-8") as f:
        return json.load(f)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def s3_has(s3, key: str, data: bytes) -> bool:  # type: ignore[no-untyped-def]
    try:
        return s3.get(key) == data
    except Exception:  # noqa: BLE001 - not there yet
        return False


def ranged_gets(s3) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for r in s3.get_records() if r.range)


# ---------------------------------------------------------------------------------------------


def test_reads_retry_through_resets_truncation_and_5xx(s3, proxy, pmount):
    tally = Tally()
    files = {f"f{i}.bin": payload(i, 3 * MiB + 123 * i + 7) for i in range(5)}
    for name, data in files.items():
        s3.put(name, data)
    # Each file gets its own kind of fault, on the first try of *every* block fetch;
    # f4 gets two faults per block (a reset, then a truncated body).
    proxy.inject("latency", delay=0.01, methods={"GET"})
    proxy.inject("reset", per_request=1, ranged_only=True, path="/f0.bin")
    proxy.inject("truncate", per_request=1, ranged_only=True, path="/f1.bin")
    proxy.inject("status", status=503, code="SlowDown", per_request=1, ranged_only=True, path="/f2.bin")
    proxy.inject("status", status=500, code="InternalError", per_request=1, ranged_only=True, path="/f3.bin")
    proxy.inject("reset", per_request=1, ranged_only=True, path="/f4.bin")
    proxy.inject("truncate", per_request=1, ranged_only=True, path="/f4.bin")
    m = pmount("test:", "--request-timeout", "8", "--block-size", "1M", "--readahead", "2M")
    for name, data in files.items():
        got = (m.path / name).read_bytes()
        tally.operations += 1
        assert got == data, f"{name}: wrong bytes under faults"
        tally.bytes_verified += len(got)
    # Every fetch met its fault (a fetch may carry several consecutive blocks: count GETs,
    # not blocks); each fault cost one retry, and the bytes above are right all the same.
    faults = [(f.kind, f.path, f.injected) for f in proxy._faults if f.kind != "latency"]
    assert all(injected >= 1 for _, _, injected in faults), faults
    injected = sum(n for _, _, n in faults)
    health = status(m.path)["backend_health"]
    assert health is not None and health["state"] == "closed"
    assert health["retries"] >= injected, (health, faults)
    assert m.process.poll() is None
    tally.report("reads under faults", proxy)
    m.stop()

    # The blocks cached under faults are whole: a fresh daemon on the same cache
    # verifies each one (length and CRC) and serves it without a single GET.
    proxy.clear()
    s3.reset_stats()
    m2 = pmount("test:", "--block-size", "1M")
    for name, data in files.items():
        assert read_uncached(m2.path / name) == data
        tally.bytes_verified += len(data)
    assert ranged_gets(s3) == 0
    assert status(m2.path)["cache"]["corrupt_blocks_dropped"] == 0
    tally.report("reads under faults, after restart")


def test_hanging_backend_fails_with_eio_within_the_timeout(s3, proxy, pmount):
    tally = Tally()
    data = payload(42, 2 * MiB + 5)
    s3.put("slow.bin", data)
    s3.put("other.txt", b"still here\n")
    m = pmount("test:", "--request-timeout", "3", "--block-size", "1M", "--readahead", "0")
    assert os.stat(m.path / "slow.bin").st_size == len(data)  # metadata before the hang
    hang = proxy.inject("hang", ranged_only=True, path="/slow.bin")

    answers: list[bool] = []

    def poke() -> None:  # the daemon keeps serving other requests during the hang
        for _ in range(10):
            answers.append(os.listdir(m.path) is not None and (m.path / "other.txt").exists())
            time.sleep(0.1)

    poker = threading.Thread(target=poke)
    poker.start()
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        read_uncached(m.path / "slow.bin")
    elapsed = time.monotonic() - started
    poker.join()
    tally.operations += 1 + len(answers)
    assert info.value.errno == errno.EIO
    assert elapsed < 3 + 2.5, f"EIO took {elapsed:.1f}s with --request-timeout 3"
    assert all(answers) and len(answers) == 10
    assert m.process.poll() is None
    assert proxy.counts()["hang"] >= 2  # the hung attempt was tried again within the budget

    proxy.remove(hang)
    time.sleep(0.6)  # a block that just failed keeps failing for 0.5 s (the kernel's own retry)
    assert read_uncached(m.path / "slow.bin") == data  # nothing partial was cached
    tally.bytes_verified += len(data)
    errors = status(m.path)["recent_errors"]
    assert any(e["errno"] in ("EIO", errno.EIO) for e in errors), errors
    tally.report("hang", proxy)


def test_outage_queues_writes_fsync_fails_breaker_opens_and_recovers(s3, proxy, pmount):
    tally = Tally()
    cached = payload(7, 1 * MiB + 1)
    s3.put("cached.bin", cached)
    s3.put("uncached.bin", payload(8, 100 * KiB))
    m = pmount("test:", "--request-timeout", "3", "--write-back-delay", "0.2", "--block-size", "1M")
    assert (m.path / "cached.bin").read_bytes() == cached
    assert sorted(os.listdir(m.path)) == ["cached.bin", "uncached.bin"]

    proxy.outage(3600)  # until end_outage()
    written = {f"w{i}.bin": payload(100 + i, (i + 1) * 300 * KiB) for i in range(4)}
    for name, data in written.items():
        (m.path / name).write_bytes(data)
        tally.operations += 1

    # fsync says what is true: the file is not in the backend.
    fd = os.open(m.path / "synced.bin", os.O_CREAT | os.O_WRONLY, 0o644)
    synced = payload(200, 64 * KiB)
    os.write(fd, synced)
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        os.fsync(fd)
    assert info.value.errno == errno.EIO
    assert time.monotonic() - started < 15
    tally.operations += 2

    health = wait_for(lambda: (h := status(m.path)["backend_health"])["state"] != "closed" and h, 20,
                      "the circuit to open")
    assert health["times_opened"] >= 1
    st = status(m.path)
    assert st["uploads"]["pending"] == len(written) + 1
    # Fail fast while open; cached data still served; the daemon lives.
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        read_uncached(m.path / "uncached.bin")
    assert info.value.errno == errno.EIO and time.monotonic() - started < 2.0
    assert read_uncached(m.path / "cached.bin") == cached
    tally.bytes_verified += len(cached)
    for name, data in written.items():  # local reads of pending files are fine too
        assert read_uncached(m.path / name) == data
        tally.bytes_verified += len(data)
    assert m.process.poll() is None
    time.sleep(1.0)
    assert status(m.path)["backend_health"]["fast_failures"] > 0

    proxy.end_outage()
    wait_for(lambda: status(m.path)["backend_health"]["state"] == "closed", 15, "the circuit to close")
    for name, data in written.items():
        wait_for(lambda: s3_has(s3, name, data), 30, f"{name} to be uploaded")
        tally.bytes_verified += len(data)
    os.fsync(fd)  # now it is true
    os.close(fd)
    assert s3.get("synced.bin") == synced
    tally.bytes_verified += len(synced)
    wait_for(lambda: status(m.path)["uploads"]["pending"] == 0, 15, "the queue to empty")
    assert not [k for k in s3.client.list_objects_v2(Bucket=BUCKET).get("Contents", []) if "conflict" in k["Key"]]
    tally.report("outage", proxy)


def test_lost_upload_response_is_not_a_conflict(s3, proxy, pmount):
    """The PUT reached the backend but its response was reset: the retry must see our own object."""
    tally = Tally()
    m = pmount("test:", "--request-timeout", "4", "--write-back-delay", "0.1")
    data = payload(9, 200 * KiB)
    proxy.inject("reset", methods={"PUT"}, times=1)
    (m.path / "lost.bin").write_bytes(data)
    wait_for(lambda: status(m.path)["uploads"]["pending"] == 0, 30, "the upload")
    assert s3.get("lost.bin") == data
    keys = [o["Key"] for o in s3.client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert keys == ["lost.bin"], keys
    tally.operations, tally.bytes_verified = 1, len(data)
    tally.report("lost response", proxy)


@pytest.mark.slow
def test_kill9_during_reads_and_writes_never_serves_wrong_bytes(s3, mount):
    tally = Tally()
    sources = {f"src{i}.bin": payload(300 + i, 3 * MiB + i) for i in range(3)}
    for name, data in sources.items():
        s3.put(name, data)
    args = ("--block-size", "256K", "--write-back-delay", "0.5")
    m = mount("test:", *args)
    stop = threading.Event()
    closed: dict[str, bytes] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        names = list(sources)
        while not stop.is_set():
            name = rng.choice(names)
            data = sources[name]
            offset = rng.randrange(len(data))
            size = rng.randrange(1, 512 * KiB)
            try:
                with open(m.path / name, "rb") as f:
                    f.seek(offset)
                    got = f.read(size)
            except OSError:
                return  # the daemon is gone
            with lock:
                tally.operations += 1
                if got != data[offset : offset + size]:
                    errors.append(f"{name}@{offset}+{size}: wrong bytes")
                tally.bytes_verified += len(got)

    def writer(seed: int) -> None:
        n = 0
        while not stop.is_set():
            name = f"w{seed}-{n}.bin"
            data = payload(seed * 1000 + n, random.Random(seed + n).randrange(1, 700 * KiB))
            try:
                with open(m.path / name, "wb") as f:
                    f.write(data)
            except OSError:
                return
            with lock:
                closed[name] = data  # close() returned: this must survive kill -9
                tally.operations += 1
            n += 1

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    threads += [threading.Thread(target=writer, args=(s,)) for s in range(1, 4)]
    for t in threads:
        t.start()
    time.sleep(3)
    m.stop(sig=signal.SIGKILL)
    # A killed FUSE daemon leaves a dead mount that os.path.ismount() cannot see (ENOTCONN).
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False, capture_output=True)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors[:5]
    assert closed, "no writer finished a file before the kill"

    # Damage the cache the way a crash of the machine could: one block cut short,
    # one with a flipped byte (same name, so the CRC in the name no longer matches).
    blocks = sorted(p for p in (m.cache_dir).rglob("*") if p.is_file() and p.parent.parent.name == "blocks")
    assert len(blocks) >= 2, blocks
    with open(blocks[0], "r+b") as f:
        f.truncate(max(0, os.path.getsize(blocks[0]) // 2))
    with open(blocks[1], "r+b") as f:
        f.seek(os.path.getsize(blocks[1]) // 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))

    m2 = mount("test:", *args)
    for name, data in sources.items():
        assert read_uncached(m2.path / name) == data, name
        tally.bytes_verified += len(data)
    st = status(m2.path)
    assert st["cache"]["corrupt_blocks_dropped"] >= 1
    lost: list[str] = []
    for name, data in closed.items():
        try:
            got = read_uncached(m2.path / name)
        except OSError as exc:
            got = f"{exc}".encode()
        if got != data:
            tally.lost += 1
            lost.append(f"{name}: {len(got)} bytes, expected {len(data)}")
        tally.bytes_verified += len(got)
    with open(m2.path / ".gstore" / "flush", "rb") as f:
        verdict = f.read()
    assert b"ok" in verdict.lower() or verdict.strip() in (b"", b"{}") or b'"failed": []' in verdict, verdict
    for name, data in closed.items():
        if not s3_has(s3, name, data):
            tally.lost += 1
            lost.append(f"{name}: not in the bucket")
    tally.report("kill -9")
    assert tally.lost == 0, (lost, verdict)
    assert hashlib.sha256(b"".join(closed[k] for k in sorted(closed))).hexdigest()
