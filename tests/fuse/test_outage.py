"""Outages and hangs end to end: a mount talks to S3 through the fault proxy.

What each test shows (docs/reliability.md, "Offline"):

* during an outage longer than every TTL, known folders still list, cached
  files still read (the right bytes), names missing from a known listing are
  "not found", a new file can be created in a known folder, mkdir, rm and >> are
  queued and shown at once; status.json says
  offline (since when), the log says it once; after the outage the new file is
  in the bucket and the normal TTLs apply again;
* three lookups against a backend that accepts connections and never answers
  take about one --request-timeout together, not three;
* an upload the backend refuses for good (403 AccessDenied) is parked:
  ``gstore flush`` lists it and exits 4, ``--retry`` sends it again;
* ``gstore flush --timeout`` exits 3 (one line per file, names quoted even
  with a newline), SIGINT and SIGTERM stop it, a keep-both conflict exits 5
  and names the copy.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import BUCKET, MountFactory
from gstore.testing.faultproxy import FaultProxy

pytestmark = pytest.mark.fuse

KiB = 1024
MiB = 1024 * KiB


@dataclass
class _Endpoint:
    endpoint: str


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
        # INFO: botocore logs failed connections with tracebacks at DEBUG (the fixture
        # would take them for a daemon crash).
        return super().__call__(spec, "--log-level", "INFO", *args, **kw)


@pytest.fixture
def pmount(tmp_path: Path, s3, proxy):  # type: ignore[no-untyped-def]
    """Mounts that reach S3 only through the fault proxy; unmounted whatever happens."""
    factory = _ProxiedMounts(tmp_path, _Endpoint(proxy.endpoint_url))  # type: ignore[arg-type]
    try:
        yield factory
    finally:
        proxy.clear()  # let a draining daemon finish
        factory.cleanup()


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def read_uncached(path: Path) -> bytes:
    """The bytes the daemon serves now (the kernel's page cache dropped first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, MiB):
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


def gstore_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from gstore.cli import main; sys.exit(main())", *args]


def gstore(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(gstore_cmd(*args), capture_output=True, text=True, timeout=timeout)


def waits_on_flush(pid: int) -> bool:
    """Whether process ``pid`` has ``.gstore/flush`` open."""
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").endswith("/.gstore/flush")
                   for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def offline(m) -> bool:  # type: ignore[no-untyped-def]
    return status(m.path)["connectivity"]["state"] == "offline"


# ---------------------------------------------------------------------------------------------


def test_outage_longer_than_the_ttls_serves_known_metadata_and_cached_blocks(s3, proxy, pmount):
    cached = payload(1, MiB + 1)
    s3.put("dir/cached.bin", cached)
    s3.put("dir/uncached.bin", payload(2, 100 * KiB))
    s3.put("dir/sub/deep.txt", b"deep\n")
    s3.put("top.txt", b"top\n")
    m = pmount("test:", "--request-timeout", "3", "--attr-ttl", "1", "--dir-cache-ttl", "1",
               "--negative-ttl", "1", "--write-back-delay", "0.2", "--block-size", "1M")
    root_names = sorted(os.listdir(m.path))
    dir_names = sorted(os.listdir(m.path / "dir"))
    assert root_names == ["dir", "top.txt"] and dir_names == ["cached.bin", "sub", "uncached.bin"]
    assert read_uncached(m.path / "dir" / "cached.bin") == cached
    assert status(m.path)["connectivity"]["state"] == "online"

    proxy.outage(3600)  # every connection reset, until end_outage()
    time.sleep(2.5)  # every TTL (1 s) has run out
    # The first requests find out (retries, then the circuit opens); they are answered all the same.
    assert sorted(os.listdir(m.path / "dir")) == dir_names

    def went_offline() -> bool:
        assert sorted(os.listdir(m.path / "dir")) == dir_names  # each try adds failures until it opens
        return offline(m)

    wait_for(went_offline, 30, "the mount to go offline")
    conn = status(m.path)["connectivity"]
    assert conn["since"] and "cached blocks" in conn["serving"]

    time.sleep(1.5)  # past the TTLs again, offline this time
    assert sorted(os.listdir(m.path)) == root_names
    assert sorted(os.listdir(m.path / "dir")) == dir_names
    assert os.stat(m.path / "dir" / "cached.bin").st_size == len(cached)
    assert read_uncached(m.path / "dir" / "cached.bin") == cached  # the cached blocks of that version
    with pytest.raises(FileNotFoundError):  # not in the last known listing of dir/
        os.stat(m.path / "dir" / "not-there.txt")
    started = time.monotonic()
    with pytest.raises(OSError) as info:  # known name, blocks never fetched: EIO, at once
        read_uncached(m.path / "dir" / "uncached.bin")
    assert info.value.errno == errno.EIO and time.monotonic() - started < 2.0
    with pytest.raises(OSError) as info:  # a folder never listed: nothing is known, EIO (never ENOENT)
        os.stat(m.path / "dir" / "sub" / "deep.txt")
    assert info.value.errno == errno.EIO
    # Namespace changes and appends are queued (journaled), shown at once, replayed later.
    os.mkdir(m.path / "dir" / "newdir")
    (m.path / "dir" / "newdir" / "inner.txt").write_bytes(b"inner\n")
    os.unlink(m.path / "top.txt")
    with open(m.path / "dir" / "cached.bin", "ab") as f:  # >> to a fully cached file
        f.write(b"appended offline")
    assert sorted(os.listdir(m.path)) == ["dir"]
    assert sorted(os.listdir(m.path / "dir" / "newdir")) == ["inner.txt"]
    assert read_uncached(m.path / "dir" / "cached.bin") == cached + b"appended offline"
    assert status(m.path)["namespace_queue"]["queued"] >= 2

    # A new file in a known folder: staged locally, visible, queued.
    created = payload(3, 200 * KiB)
    (m.path / "dir" / "new.bin").write_bytes(created)
    assert read_uncached(m.path / "dir" / "new.bin") == created
    assert "new.bin" in os.listdir(m.path / "dir")
    st = status(m.path)
    assert st["connectivity"]["state"] == "offline" and st["connectivity"]["stale_metadata_answers"] > 0
    assert "dir/new.bin" in {e["path"] for e in st["uploads"]["pending_paths"] + st["uploads"]["failed_paths"]}
    assert m.process.poll() is None

    proxy.end_outage()
    wait_for(lambda: not offline(m), 20, "the mount to be online again")
    wait_for(lambda: s3_has(s3, "dir/new.bin", created), 30, "the new file in the bucket")
    wait_for(lambda: status(m.path)["uploads"]["pending"] == 0, 15, "the queue to empty")
    wait_for(lambda: status(m.path)["namespace_queue"]["queued"] == 0, 15, "the namespace queue to empty")
    assert s3_has(s3, "dir/newdir/inner.txt", b"inner\n")
    assert s3_has(s3, "dir/cached.bin", cached + b"appended offline")
    assert not s3_has(s3, "top.txt", b"top\n")
    assert sorted(os.listdir(m.path)) == ["dir"]
    cached += b"appended offline"
    log = m.log()
    assert log.count("backend unreachable") == 1, log  # one line per change of state
    assert log.count("backend reachable again") == 1, log

    # Online again: the normal TTLs, so a change made elsewhere shows within one.
    changed = payload(4, 2 * KiB)
    s3.put("dir/cached.bin", changed)
    wait_for(lambda: os.stat(m.path / "dir" / "cached.bin").st_size == len(changed), 10, "the new size")
    assert read_uncached(m.path / "dir" / "cached.bin") == changed


def test_three_lookups_against_a_hung_backend_take_about_one_timeout(s3, proxy, pmount):
    for i in range(3):
        s3.put(f"h{i}.txt", b"x")
    timeout = 3.0
    m = pmount("test:", "--request-timeout", str(timeout))
    proxy.inject("hang")  # connections accepted, requests read, never answered
    started = time.monotonic()
    for i in range(3):
        with pytest.raises(OSError) as info:
            os.stat(m.path / f"h{i}.txt")
        assert info.value.errno == errno.EIO
    elapsed = time.monotonic() - started
    # A behaviour bound, with a wide margin: one timeout opens the circuit and the
    # other lookups fail fast (before: each lookup waited the whole timeout).
    assert elapsed < 2 * timeout, f"three lookups took {elapsed:.1f}s with --request-timeout {timeout:g}"
    print(f"\n[hung backend] three lookups: {elapsed:.2f}s (--request-timeout {timeout:g})")
    health = status(m.path)["backend_health"]
    assert health["times_opened"] == 1 and health["opened_by"] == "timeout", health
    assert health["fast_failures"] >= 2

    proxy.clear()
    wait_for(lambda: not offline(m), 20, "the mount to be online again")
    assert os.stat(m.path / "h0.txt").st_size == 1


def test_upload_refused_for_good_is_parked_and_flush_exits_4(s3, proxy, pmount):
    m = pmount("test:", "--request-timeout", "5", "--write-back-delay", "3600")
    proxy.inject("status", status=403, code="AccessDenied", methods={"PUT"})
    (m.path / "denied.txt").write_bytes(b"mine\n")
    result = gstore("flush", str(m.path))
    assert result.returncode == 4, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('gstore: parked: "denied.txt": '), lines
    assert "injected by the fault proxy" in lines[0]  # the backend's own words
    uploads = status(m.path)["uploads"]
    assert uploads["parked"] == 1
    [entry] = uploads["failed_paths"]
    assert entry["path"] == "denied.txt" and entry["parked"] is True and "fault proxy" in entry["error"]
    assert "will not be retried" in m.log()

    proxy.clear()
    result = gstore("flush", str(m.path))  # parked: not tried again by itself
    assert result.returncode == 4 and "parked" in result.stderr
    result = gstore("flush", "--retry", str(m.path))
    assert result.returncode == 0, result
    assert s3.get("denied.txt") == b"mine\n"
    assert status(m.path)["uploads"]["pending"] == 0


def test_flush_timeout_exits_3_and_signals_stop_it(s3, proxy, pmount):
    m = pmount("test:", "--request-timeout", "5", "--write-back-delay", "3600")
    proxy.inject("hang", methods={"PUT"})
    quoted = 'say "hi".txt'
    (m.path / "two\nlines.txt").write_bytes(b"n\n")  # the test S3 server cannot store this key: never flushed
    (m.path / quoted).write_bytes(b"x\n")
    started = time.monotonic()
    result = gstore("flush", "--timeout", "2", str(m.path))
    elapsed = time.monotonic() - started
    assert result.returncode == 3, result
    lines = sorted(result.stderr.splitlines())
    assert lines == ['gstore: timed out: "say \\"hi\\".txt": not uploaded within 2s; still queued',
                     'gstore: timed out: "two\\nlines.txt": not uploaded within 2s; still queued'], lines
    assert elapsed < 2 + 20  # bounded by --timeout (generous margin for a loaded machine)

    for sig in (signal.SIGINT, signal.SIGTERM):
        flush = subprocess.Popen(gstore_cmd("flush", str(m.path)), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            # Its signal handlers are set before it opens the control file.
            wait_for(lambda: flush.poll() is not None or waits_on_flush(flush.pid), 30,
                     "gstore flush to wait for the daemon")
            time.sleep(0.5)
            assert flush.poll() is None, flush.communicate()
            started = time.monotonic()
            flush.send_signal(sig)
            _, err = flush.communicate(timeout=15)
            stopped_in = time.monotonic() - started
        finally:
            if flush.poll() is None:
                flush.kill()
                flush.wait()
        assert flush.returncode == 128 + sig, (flush.returncode, err)
        assert f"stopped by {signal.Signals(sig).name}" in err
        assert stopped_in < 10, stopped_in  # bounded (a read of .gstore/flush returns within 0.5 s)
    assert m.process.poll() is None

    proxy.clear()
    result = gstore("flush", str(m.path), str(m.path / quoted))
    assert result.returncode == 0, result
    assert s3.get(quoted) == b"x\n"


def test_keep_both_conflict_exits_5_and_names_the_copy(s3, proxy, pmount):
    s3.put("shared.txt", b"original\n")
    m = pmount("test:", "--write-back-delay", "3600")
    with open(m.path / "shared.txt", "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(b"ours\n")
    s3.put("shared.txt", b"theirs\n")  # another writer, after this mount read it
    result = gstore("flush", str(m.path))
    assert result.returncode == 5, result
    [line] = result.stderr.splitlines()
    copies = [o["Key"] for o in s3.client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
              if o["Key"].startswith("shared.txt.conflict-")]
    assert len(copies) == 1 and s3.get(copies[0]) == b"original\nours\n"
    assert line == (f'gstore: conflict: "shared.txt": changed on the backend since this mount read it; '
                    f'this mount\'s version was saved as "{copies[0]}"'), line
    assert s3.get("shared.txt") == b"theirs\n"
