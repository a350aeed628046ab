"""Unit tests of the on-disk block store (gstore.cache.blockstore)."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import stat
import tempfile
import threading
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gstore.cache import blockstore
from gstore.cache.blockstore import BlockStore, StoreStats


def key(n: int | str) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()[:40]


A, B, C, D = key("a"), key("b"), key("c"), key("d")


def block_files(root: Path) -> dict[str, int]:
    """Block-named files under root (name -> size), temp files excluded."""
    out = {}
    for shard in root.iterdir():
        if shard.is_dir() and len(shard.name) == 2:
            for f in shard.iterdir():
                if blockstore._BLOCK_NAME_RE.fullmatch(f.name):
                    out[f.name] = f.stat().st_size
    return out


def temp_files(root: Path) -> list[Path]:
    return [f for f in root.glob("*/.tmp.*")]


def block_path(root: Path, k: str, index: int, data: bytes) -> Path:
    return root / k[:2] / f"{k}.{index}.{zlib.crc32(data):08x}"


def read_all(store: BlockStore, k: str, index: int, size: int) -> bytes | None:
    return store.read(k, index, 0, size, size)


# -- basics -----------------------------------------------------------------------


def test_round_trip_offsets_and_clipping(tmp_path):
    store = BlockStore(tmp_path / "blocks", 1 << 20)
    data = b"0123456789"
    store.put(A, 0, data)
    assert store.read(A, 0, 0, 10, 10) == data
    assert store.read(A, 0, 3, 4, 10) == b"3456"
    assert store.read(A, 0, 8, 100, 10) == b"89"
    assert store.read(A, 0, 10, 5, 10) == b""
    assert store.read(A, 0, 50, 5, 10) == b""
    assert store.read(A, 0, 2, 0, 10) == b""
    assert store.read(A, 1, 0, 10, 10) is None
    assert store.read(B, 0, 0, 10, 10) is None
    store.put(A, 7, memoryview(b"xyz" * 1000))
    assert store.read(A, 7, 2998, 10, 3000) == b"yz"
    store.put(B, 0, b"")
    assert store.read(B, 0, 0, 10, 0) == b""
    s = store.stats()
    assert isinstance(s, StoreStats)
    assert (s.blocks, s.used_bytes, s.puts) == (3, 3010, 3)
    assert s.misses == 2 and s.hits == 8
    assert store.usage() == 3010


def test_contains(tmp_path):
    store = BlockStore(tmp_path, 1000)
    assert not store.contains(A, 0)
    store.put(A, 0, b"x")
    assert store.contains(A, 0)
    assert not store.contains(A, 1)
    assert not store.contains(B, 0)


def test_layout_on_disk(tmp_path):
    store = BlockStore(tmp_path, 1000)
    store.put(A, 12, b"hello")
    path = block_path(tmp_path, A, 12, b"hello")
    assert path.read_bytes() == b"hello"
    assert path.parent.name == A[:2]
    assert temp_files(tmp_path) == []
    # Only the shard that was needed exists.
    assert [p.name for p in tmp_path.iterdir()] == [A[:2]]


def test_lru_eviction_order_and_capacity(tmp_path):
    store = BlockStore(tmp_path, 300)
    for k in (A, B, C):
        store.put(k, 0, b"x" * 100)
    assert store.usage() == 300
    assert store.read(A, 0, 0, 1, 100) is not None  # A becomes most recent
    store.put(D, 0, b"d" * 100)  # evicts B, the least recently used
    assert not store.contains(B, 0)
    assert all(store.contains(k, 0) for k in (A, C, D))
    assert len(block_files(tmp_path)) == 3
    store.put(B, 0, b"b" * 150)  # needs 150 bytes: evicts C then A
    assert [store.contains(k, 0) for k in (A, B, C, D)] == [False, True, False, True]
    assert store.usage() == 250
    s = store.stats()
    assert (s.evictions, s.evicted_bytes) == (3, 300)
    assert sum(block_files(tmp_path).values()) == 250


def test_capacity_never_exceeded(tmp_path):
    rng = random.Random(1)
    store = BlockStore(tmp_path, 5000)
    for i in range(300):
        store.put(key(rng.randrange(20)), rng.randrange(5), os.urandom(rng.randrange(1, 2000)))
        assert store.usage() <= 5000
    assert sum(block_files(tmp_path).values()) == store.usage()
    assert len(block_files(tmp_path)) == store.stats().blocks


def test_block_filling_whole_capacity_and_too_large(tmp_path):
    store = BlockStore(tmp_path, 100)
    store.put(A, 0, b"a" * 40)
    store.put(B, 0, b"b" * 100)
    assert not store.contains(A, 0) and store.contains(B, 0)
    with pytest.raises(ValueError):
        store.put(C, 0, b"c" * 101)
    assert store.usage() == 100 and temp_files(tmp_path) == []


def test_replace_accounts_correctly(tmp_path):
    store = BlockStore(tmp_path, 1000)
    store.put(A, 0, b"x" * 100)
    store.put(A, 0, b"y" * 50)
    assert store.usage() == 50
    assert read_all(store, A, 0, 50) == b"y" * 50
    assert read_all(store, A, 0, 100) is None  # the old length is no longer valid...
    assert store.usage() == 0  # ...and the check deletes the block
    store.put(A, 0, b"z" * 10)
    store.put(A, 0, b"z" * 10)  # same content, same file name
    assert store.usage() == 10
    assert list(block_files(tmp_path).values()) == [10]
    assert temp_files(tmp_path) == []


def test_discard_object(tmp_path):
    store = BlockStore(tmp_path, 10_000)
    for i in range(5):
        store.put(A, i, b"a" * 10)
        store.put(B, i, b"b" * 10)
    store.discard_object(A)
    assert not any(store.contains(A, i) for i in range(5))
    assert all(store.contains(B, i) for i in range(5))
    assert store.usage() == 50
    assert all(name.startswith(B) for name in block_files(tmp_path))
    store.discard_object(C)  # unknown object: nothing happens
    assert store.usage() == 50


@pytest.mark.parametrize(
    "bad_key",
    [
        "", "abc", "A" * 40, "g" * 40, "a" * 15, "a" * 129, "../" + "a" * 40, "a" * 40 + "/x",
        "a" * 40 + "\n", "a" * 40 + ".1", b"a" * 40, None, 123,
    ],
)
def test_bad_keys_rejected(tmp_path, bad_key):
    store = BlockStore(tmp_path, 1000)
    with pytest.raises(ValueError):
        store.put(bad_key, 0, b"x")
    with pytest.raises(ValueError):
        store.read(bad_key, 0, 0, 1, 1)
    with pytest.raises(ValueError):
        store.contains(bad_key, 0)
    with pytest.raises(ValueError):
        store.discard_object(bad_key)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad_index", [-1, True, 1.0, "1", None, 2**63, 10**400])
def test_bad_index_rejected(tmp_path, bad_index):
    store = BlockStore(tmp_path, 1000)
    with pytest.raises(ValueError):
        store.put(A, bad_index, b"x")
    with pytest.raises(ValueError):
        store.read(A, bad_index, 0, 1, 1)
    with pytest.raises(ValueError):
        store.contains(A, bad_index)
    with pytest.raises(ValueError):
        store.read(A, 0, -1, 1, 1)
    with pytest.raises(ValueError):
        store.read(A, 0, 0, -1, 1)


def test_bad_capacity_rejected(tmp_path):
    for bad in (0, -1, 1.5, None):
        with pytest.raises(ValueError):
            BlockStore(tmp_path, bad)


def test_permissions_with_umask_000(tmp_path):
    old = os.umask(0)
    try:
        store = BlockStore(tmp_path / "blocks", 1000)
        store.put(A, 0, b"data")
    finally:
        os.umask(old)
    root = tmp_path / "blocks"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / A[:2]).stat().st_mode) == 0o700
    assert stat.S_IMODE(block_path(root, A, 0, b"data").stat().st_mode) == 0o600


def test_permissions_with_strict_umask(tmp_path):
    old = os.umask(0o777)
    try:
        store = BlockStore(tmp_path / "blocks", 1000)
        store.put(A, 0, b"data")
    finally:
        os.umask(old)
    root = tmp_path / "blocks"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / A[:2]).stat().st_mode) == 0o700
    assert stat.S_IMODE(block_path(root, A, 0, b"data").stat().st_mode) == 0o600
    assert read_all(store, A, 0, 4) == b"data"


def test_existing_loose_root_is_tightened(tmp_path):
    root = tmp_path / "blocks"
    root.mkdir()
    os.chmod(root, 0o755)
    (root / "ab").mkdir()
    os.chmod(root / "ab", 0o777)
    BlockStore(root, 1000)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "ab").stat().st_mode) == 0o700


# -- persistence ------------------------------------------------------------------


def test_persistence_and_lru_order_from_mtime(tmp_path):
    content = {A: b"a" * 100, B: b"b" * 100, C: b"c" * 100, D: b"d" * 100}
    store = BlockStore(tmp_path, 1000)
    for k, data in content.items():
        store.put(k, 3, data)
    store.close()
    # Recency on disk: C oldest, then A, D, B.
    for age, k in zip((40, 30, 20, 10), (C, A, D, B)):
        t = 1_600_000_000 - age
        os.utime(block_path(tmp_path, k, 3, content[k]), (t, t))

    again = BlockStore(tmp_path, 1000)
    assert again.usage() == 400 and again.stats().blocks == 4
    assert all(again.contains(k, 3) for k in content)
    again.close()  # no reads: the mtimes stay as they are

    shrunk = BlockStore(tmp_path, 250)  # keeps the two most recent: D and B
    assert [shrunk.contains(k, 3) for k in (A, B, C, D)] == [False, True, False, True]
    assert shrunk.usage() == 200
    assert shrunk.stats().evictions == 2
    kept = sorted(block_path(tmp_path, k, 3, content[k]).name for k in (B, D))
    assert sorted(block_files(tmp_path)) == kept
    assert read_all(shrunk, B, 3, 100) == content[B]
    assert read_all(shrunk, D, 3, 100) == content[D]


def test_read_recency_survives_restart(tmp_path):
    store = BlockStore(tmp_path, 1000)
    for k in (A, B, C):
        store.put(k, 0, b"x" * 100)
    assert read_all(store, A, 0, 100) is not None  # order now B, C, A
    store.close()
    again = BlockStore(tmp_path, 200)
    assert [again.contains(k, 0) for k in (A, B, C)] == [True, False, True]


def test_leftover_temp_files_removed_unrelated_files_kept(tmp_path):
    store = BlockStore(tmp_path, 1000)
    store.put(A, 0, b"block")
    store.close()
    shard = tmp_path / A[:2]
    (shard / ".tmp.deadbeef").write_bytes(b"half a bl")
    (tmp_path / "README").write_text("not a block")
    (shard / "notes.txt").write_text("not a block either")
    (tmp_path / "zz").mkdir()  # not a hex shard
    (tmp_path / "zz" / f"{key('z')}.0.00000000").write_bytes(b"ignored")
    # A well-formed block nobody told this store about counts.
    foreign = key("foreign")
    (tmp_path / foreign[:2]).mkdir(exist_ok=True)
    block_path(tmp_path, foreign, 5, b"foreign!").write_bytes(b"foreign!")

    again = BlockStore(tmp_path, 1000)
    assert temp_files(tmp_path) == []
    assert (tmp_path / "README").exists() and (shard / "notes.txt").exists()
    assert (tmp_path / "zz" / f"{key('z')}.0.00000000").exists()
    assert again.stats().blocks == 2 and again.usage() == 5 + 8
    assert read_all(again, foreign, 5, 8) == b"foreign!"
    assert read_all(again, A, 0, 5) == b"block"


def test_startup_keeps_newer_of_duplicate_block_files(tmp_path):
    store = BlockStore(tmp_path, 1000)
    store.put(A, 0, b"old")
    store.close()
    old = block_path(tmp_path, A, 0, b"old")
    new = block_path(tmp_path, A, 0, b"new")
    new.write_bytes(b"new")
    os.utime(old, (1_000, 1_000))
    again = BlockStore(tmp_path, 1000)
    assert not old.exists() and again.usage() == 3
    assert read_all(again, A, 0, 3) == b"new"


def test_startup_scan_of_many_blocks(tmp_path):
    n = 20_000
    for i in range(n):
        k = key(i)
        data = i.to_bytes(4, "little")
        d = tmp_path / k[:2]
        if i < 256 or not d.exists():
            d.mkdir(mode=0o700, exist_ok=True)
        (d / f"{k}.0.{zlib.crc32(data):08x}").write_bytes(data)
    store = BlockStore(tmp_path, 1 << 30)
    assert store.stats().blocks == n and store.usage() == 4 * n
    assert read_all(store, key(12345), 0, 4) == (12345).to_bytes(4, "little")
    store.close()
    small = BlockStore(tmp_path, 4 * 1000)
    assert small.stats().blocks == 1000
    assert len(block_files(tmp_path)) == 1000


# -- damaged blocks ----------------------------------------------------------------


def test_truncated_block_detected(tmp_path):
    store = BlockStore(tmp_path, 1000)
    store.put(A, 0, b"x" * 100)
    path = block_path(tmp_path, A, 0, b"x" * 100)
    os.truncate(path, 60)
    assert store.read(A, 0, 0, 10, 100) is None
    assert not path.exists()
    assert not store.contains(A, 0)
    assert store.usage() == 0
    assert store.stats().corrupt == 1


def test_truncated_block_found_at_startup(tmp_path):
    store = BlockStore(tmp_path, 1000)
    store.put(A, 0, b"x" * 100)
    store.close()
    path = block_path(tmp_path, A, 0, b"x" * 100)
    os.truncate(path, 60)
    again = BlockStore(tmp_path, 1000)
    assert again.read(A, 0, 0, 10, 100) is None
    assert not path.exists() and again.stats().corrupt == 1


def test_flipped_byte_in_previous_run_caught_by_crc(tmp_path):
    data = bytes(range(256)) * 4
    store = BlockStore(tmp_path, 10_000, boot_id=lambda: "boot-1")
    store.put(A, 0, data)
    store.put(A, 1, data)
    store.close()
    path = block_path(tmp_path, A, 0, data)
    raw = bytearray(path.read_bytes())
    raw[500] ^= 0x01
    path.write_bytes(bytes(raw))

    again = BlockStore(tmp_path, 10_000, boot_id=lambda: "boot-2")  # after a reboot: all checked
    assert again.read(A, 0, 0, 4, len(data)) is None  # the flip is far from the range read
    assert not path.exists() and not again.contains(A, 0)
    assert again.stats().corrupt == 1
    # The intact block verifies and is then served (and stays trusted).
    assert again.read(A, 1, 10, 4, len(data)) == data[10:14]
    assert again.read(A, 1, 0, len(data), len(data)) == data
    assert again.stats().corrupt == 1


def test_wrong_expected_len(tmp_path):
    store = BlockStore(tmp_path, 1000)
    store.put(A, 0, b"x" * 100)
    assert store.read(A, 0, 0, 10, 99) is None
    assert not store.contains(A, 0)
    assert block_files(tmp_path) == {}
    s = store.stats()
    assert (s.corrupt, s.misses, s.hits, s.used_bytes) == (1, 1, 0, 0)


def test_block_deleted_behind_our_back(tmp_path):
    store = BlockStore(tmp_path, 1000)
    store.put(A, 0, b"x" * 100)
    store.put(B, 0, b"y" * 100)
    block_path(tmp_path, A, 0, b"x" * 100).unlink()
    assert store.read(A, 0, 0, 10, 100) is None
    assert not store.contains(A, 0)
    assert store.usage() == 100
    s = store.stats()
    assert (s.corrupt, s.misses, s.hits) == (0, 1, 0)


def test_closed_store(tmp_path):
    store = BlockStore(tmp_path, 1000)
    store.put(A, 0, b"abc")
    store.close()
    store.close()
    assert store.read(A, 0, 0, 3, 3) is None
    assert not store.contains(A, 0)
    store.put(B, 0, b"abc")  # dropped
    assert list(block_files(tmp_path)) == [block_path(tmp_path, A, 0, b"abc").name]


# -- disk full --------------------------------------------------------------------


def failing_write_once(monkeypatch, code=errno.ENOSPC, times=1):
    real = blockstore._write_all
    calls = {"n": 0}

    def fake(fd, data):
        calls["n"] += 1
        if calls["n"] <= times:
            os.write(fd, bytes(data[: len(data) // 2]))  # a partial temp file to clean up
            raise OSError(code, os.strerror(code))
        real(fd, data)

    monkeypatch.setattr(blockstore, "_write_all", fake)
    return calls


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_evicts_and_retries(tmp_path, monkeypatch, code):
    store = BlockStore(tmp_path, 10_000)
    for k in (A, B, C):
        store.put(k, 0, b"z" * 100)
    calls = failing_write_once(monkeypatch, code)
    store.put(D, 0, b"d" * 150)  # makes room for 150 bytes: A and B go
    assert calls["n"] == 2
    assert [store.contains(k, 0) for k in (A, B, C, D)] == [False, False, True, True]
    assert read_all(store, D, 0, 150) == b"d" * 150
    assert store.usage() == 250 == sum(block_files(tmp_path).values())
    assert temp_files(tmp_path) == []
    assert store.stats().evictions == 2


def test_disk_full_twice_raises(tmp_path, monkeypatch):
    store = BlockStore(tmp_path, 10_000)
    store.put(A, 0, b"a" * 100)
    store.put(B, 0, b"b" * 100)
    failing_write_once(monkeypatch, times=2)
    with pytest.raises(OSError) as info:
        store.put(C, 0, b"c" * 100)
    assert info.value.errno == errno.ENOSPC
    assert temp_files(tmp_path) == []
    assert not store.contains(C, 0)
    assert store.usage() == sum(block_files(tmp_path).values())


def test_disk_full_with_nothing_to_evict_raises(tmp_path, monkeypatch):
    store = BlockStore(tmp_path, 10_000)
    calls = failing_write_once(monkeypatch)
    with pytest.raises(OSError):
        store.put(A, 0, b"a" * 100)
    assert calls["n"] == 1 and temp_files(tmp_path) == []


def test_other_write_errors_are_not_retried(tmp_path, monkeypatch):
    store = BlockStore(tmp_path, 10_000)
    store.put(A, 0, b"a" * 100)
    calls = failing_write_once(monkeypatch, errno.EIO)
    with pytest.raises(OSError):
        store.put(B, 0, b"b" * 100)
    assert calls["n"] == 1 and store.contains(A, 0) and temp_files(tmp_path) == []


# -- threads ------------------------------------------------------------------------


def payload(k: str, index: int) -> bytes:
    seed = hashlib.sha256(f"{k}/{index}".encode()).digest()
    length = 50 + seed[0] * 3
    return (seed * (length // len(seed) + 1))[:length]


def test_thread_hammer(tmp_path):
    capacity = 3000
    store = BlockStore(tmp_path, capacity)
    keys = [key(i) for i in range(4)]
    errors: list[str] = []
    over: list[int] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(1500):
                k, i = rng.choice(keys), rng.randrange(8)
                want = payload(k, i)
                op = rng.random()
                if op < 0.45:
                    store.put(k, i, want)
                elif op < 0.71:
                    off, ln = rng.randrange(len(want) + 5), rng.randrange(len(want) + 5)
                    got = store.read(k, i, off, ln, len(want))
                    if got is not None and got != want[off : off + ln]:
                        errors.append(f"wrong bytes for {k[:6]}/{i}")
                elif op < 0.97:
                    off = rng.randrange(len(want) + 1)
                    ln = rng.randrange(len(want) - off + 1)
                    got = store.read_hit(k, i, off, ln, len(want))
                    if got is not None and got != want[off : off + ln]:
                        errors.append(f"wrong bytes from read_hit for {k[:6]}/{i}")
                elif op < 0.99:
                    store.contains(k, i)
                else:
                    store.discard_object(k)
                used = store.usage()
                if used > capacity:
                    over.append(used)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert over == []
    s = store.stats()
    assert s.hits > 0 and s.evictions > 0 and s.corrupt == 0
    files = block_files(tmp_path)
    assert sum(files.values()) == store.usage() <= capacity
    assert len(files) == s.blocks
    assert temp_files(tmp_path) == []
    for name in files:
        k, i, _crc = name.split(".")
        assert store.contains(k, int(i))


def test_racing_puts_of_one_block(tmp_path):
    store = BlockStore(tmp_path, 100_000)
    variants = [bytes([v]) * 1000 for v in (1, 2)]
    errors: list[str] = []
    stop = threading.Event()

    def writer(v: int) -> None:
        for _ in range(400):
            store.put(A, 0, variants[v])

    def reader() -> None:
        while not stop.is_set():
            got = store.read(A, 0, 100, 10, 1000)
            if got is not None and got not in (b"\1" * 10, b"\2" * 10):
                errors.append(repr(got))

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(v,)) for v in (0, 1)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    assert store.usage() == 1000
    files = block_files(tmp_path)
    assert list(files.values()) == [1000]
    assert read_all(store, A, 0, 1000) in variants
    assert temp_files(tmp_path) == []


def test_read_with_open_fd_survives_eviction(tmp_path, monkeypatch):
    """A block evicted between the index lookup and the open is a miss, not an error."""
    store = BlockStore(tmp_path, 200)
    store.put(A, 0, b"a" * 100)
    real_open = blockstore.os.open
    fired = {"done": False}

    def open_then_evict(path, flags, *args):
        if not fired["done"] and path.endswith(".0." + f"{zlib.crc32(b'a' * 100):08x}"):
            fired["done"] = True
            store.put(B, 0, b"b" * 150)  # evicts A
            assert not store.contains(A, 0)
        return real_open(path, flags, *args)

    monkeypatch.setattr(blockstore.os, "open", open_then_evict)
    assert store.read(A, 0, 0, 100, 100) is None
    monkeypatch.undo()
    assert store.usage() == 150 and store.stats().blocks == 1


def test_block_evicted_after_open_still_reads_right_bytes(tmp_path, monkeypatch):
    store = BlockStore(tmp_path, 200)
    store.put(A, 0, b"a" * 100)
    real_fstat = blockstore.os.fstat
    fired = {"done": False}

    def fstat_then_evict(fd):
        if not fired["done"]:
            fired["done"] = True
            store.put(B, 0, b"b" * 150)  # evicts A: its file is unlinked, our fd stays good
            assert block_files(tmp_path) == {block_path(tmp_path, B, 0, b"b" * 150).name: 150}
        return real_fstat(fd)

    monkeypatch.setattr(blockstore.os, "fstat", fstat_then_evict)
    assert store.read(A, 0, 10, 20, 100) == b"a" * 20
    monkeypatch.undo()
    assert not store.contains(A, 0) and store.usage() == 150


# -- the cache-hit path (read_hit) ---------------------------------------------------


def opened(store: BlockStore, k: str, data: bytes) -> None:
    """Put a block and read it once through read(), which puts its fd in the open table."""
    store.put(k, 0, data)
    assert store.read(k, 0, 0, 1, len(data)) == data[:1]


def test_read_hit_answers_only_blocks_read_once(tmp_path):
    store = BlockStore(tmp_path, 1000)
    store.put(A, 0, b"a" * 100)
    assert store.read_hit(A, 0, 0, 10, 100) is None  # no fd open yet: read() opens it
    assert store.read(A, 0, 0, 10, 100) == b"a" * 10
    assert store.read_hit(A, 0, 10, 20, 100) == b"a" * 20
    assert store.read_hit(A, 0, 0, 10, 99) is None  # not the length the caller expects
    assert store.read_hit(A, 0, 95, 10, 100) is None  # past the block's end: read() clips
    assert store.read_hit(B, 0, 0, 10, 100) is None
    assert store.stats().hits == 2  # the read and the one read_hit that answered


def test_read_hit_never_answers_an_evicted_or_replaced_block(tmp_path):
    store = BlockStore(tmp_path, 200)
    opened(store, A, b"a" * 100)
    store.put(A, 0, b"A" * 100)  # replaced: the old fd leaves the table with the old entry
    assert store.read_hit(A, 0, 0, 100, 100) is None
    assert store.read(A, 0, 0, 100, 100) == b"A" * 100
    assert store.read_hit(A, 0, 0, 100, 100) == b"A" * 100
    store.put(B, 0, b"b" * 150)  # evicts A
    assert store.read_hit(A, 0, 0, 100, 100) is None
    assert store._open == {}  # noqa: SLF001 - its fd was closed with it


def test_read_hit_pread_and_an_eviction_on_another_thread_do_not_overlap(tmp_path, monkeypatch):
    """An eviction racing the hit path's pread waits for it: the fd cannot be closed (and its
    number reused by the evicting put's new file) under the pread, which would answer EBADF or
    another block's bytes."""
    store = BlockStore(tmp_path, 200)
    opened(store, A, b"a" * 100)
    real_pread = blockstore.os.pread
    evicted = threading.Event()
    errors: list[BaseException] = []

    def evict() -> None:
        try:
            store.put(B, 0, b"b" * 150)  # evicts A and closes its fd
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        evicted.set()

    def pread_while_evicting(fd, length, offset):
        monkeypatch.setattr(blockstore.os, "pread", real_pread)
        thread = threading.Thread(target=evict)
        thread.start()
        # A hit path without the lock would let the put run to its end here.
        evicted.wait(0.5)
        return real_pread(fd, length, offset)

    monkeypatch.setattr(blockstore.os, "pread", pread_while_evicting)
    assert store.read_hit(A, 0, 0, 100, 100) == b"a" * 100
    assert evicted.wait(10) and errors == []
    assert not store.contains(A, 0) and store.read_hit(A, 0, 0, 100, 100) is None
    assert store.read(B, 0, 0, 150, 150) == b"b" * 150


def test_a_block_read_only_by_read_hit_is_still_recently_used(tmp_path):
    store = BlockStore(tmp_path, 300)
    for k in (A, B, C):
        opened(store, k, b"x" * 100)  # LRU order: A, B, C
    assert store.read_hit(A, 0, 0, 10, 100) is not None  # A is the most recent now
    store.put(D, 0, b"d" * 100)  # evicts B, not A
    assert [store.contains(k, 0) for k in (A, B, C, D)] == [True, False, True, True]
    store.put(B, 0, b"b" * 100)  # A had its second chance and was not read since: evicts C
    assert [store.contains(k, 0) for k in (A, B, C, D)] == [True, True, False, True]


def test_read_hit_keeps_its_fd_open_when_the_table_is_full(tmp_path):
    store = BlockStore(tmp_path, 1000, max_open=2)
    opened(store, A, b"a" * 100)
    opened(store, B, b"b" * 100)  # the table: A, B
    assert store.read_hit(A, 0, 0, 10, 100) is not None
    opened(store, C, b"c" * 100)  # one fd too many: B's is closed, A was just read
    assert set(store._open) == {(A, 0), (C, 0)}  # noqa: SLF001
    assert store.read_hit(A, 0, 0, 10, 100) == b"a" * 10
    assert store.read_hit(B, 0, 0, 10, 100) is None


def test_a_new_fd_stays_in_the_table_when_every_other_was_read(tmp_path):
    store = BlockStore(tmp_path, 1000, max_open=2)
    opened(store, A, b"a" * 100)
    opened(store, B, b"b" * 100)
    assert store.read_hit(A, 0, 0, 10, 100) is not None
    assert store.read_hit(B, 0, 0, 10, 100) is not None
    opened(store, C, b"c" * 100)  # both others had a second chance: the older of them goes
    assert list(store._open) == [(B, 0), (C, 0)]  # noqa: SLF001
    assert store.read_hit(C, 0, 0, 10, 100) == b"c" * 10


def test_read_hit_recency_survives_restart(tmp_path):
    store = BlockStore(tmp_path, 300)
    for k in (A, B, C):
        opened(store, k, b"x" * 100)
    assert store.read_hit(A, 0, 0, 10, 100) is not None
    store.close()
    store = BlockStore(tmp_path, 300)
    store.put(D, 0, b"d" * 100)  # evicts B, the least recently used before the restart
    assert [store.contains(k, 0) for k in (A, B, C, D)] == [True, False, True, True]


# -- model-based ------------------------------------------------------------------

MODEL_KEYS = [key(i) for i in range(3)]


class BlockStoreMachine(RuleBasedStateMachine):
    """The store against a dict: blocks may go missing (evicted), never come back wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="blockstore-model-"))
        self.capacity = 100
        self.boot = 0
        self.store = self._open()
        self.model: dict[tuple[str, int], bytes] = {}

    def _open(self) -> BlockStore:
        boot = f"boot-{self.boot}"
        return BlockStore(self.dir, self.capacity, boot_id=lambda: boot)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(k=st.sampled_from(MODEL_KEYS), index=st.integers(0, 3), data=st.binary(max_size=40))
    def put(self, k, index, data):
        self.store.put(k, index, data)
        self.model[(k, index)] = data
        assert self.store.contains(k, index)
        assert self.store.read(k, index, 0, len(data), len(data)) == data

    @rule(
        k=st.sampled_from(MODEL_KEYS),
        index=st.integers(0, 3),
        offset=st.integers(0, 45),
        length=st.integers(0, 45),
        guess=st.integers(0, 40),
    )
    def read(self, k, index, offset, length, guess):
        want = self.model.get((k, index))
        got = self.store.read(k, index, offset, length, guess if want is None else len(want))
        if want is None:
            assert got is None
        elif got is not None:
            assert got == want[offset : offset + length]

    @rule(k=st.sampled_from(MODEL_KEYS), index=st.integers(0, 3), offset=st.integers(0, 40),
          length=st.integers(0, 40))
    def read_hit(self, k, index, offset, length):
        want = self.model.get((k, index))
        if want is None:
            assert self.store.read_hit(k, index, 0, 0, 0) is None
            return
        offset, length = min(offset, len(want)), min(length, len(want) - min(offset, len(want)))
        got = self.store.read_hit(k, index, offset, length, len(want))
        if got is not None:
            assert got == want[offset : offset + length]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def read_with_wrong_length(self, data):
        k, index = data.draw(st.sampled_from(sorted(self.model)))
        want = self.model[(k, index)]
        assert self.store.read(k, index, 0, 10, len(want) + 1) is None
        assert not self.store.contains(k, index)

    @rule(k=st.sampled_from(MODEL_KEYS))
    def discard(self, k):
        self.store.discard_object(k)
        for mk in [mk for mk in self.model if mk[0] == k]:
            del self.model[mk]
        assert not any(self.store.contains(k, i) for i in range(4))

    @rule(capacity=st.sampled_from([40, 100, 200]), reboot=st.booleans())
    def reopen(self, capacity, reboot):
        self.store.close()
        self.capacity = capacity
        self.boot += reboot
        self.store = self._open()

    @rule()
    def kill_and_restart(self):
        """kill -9: no close(), so no marker and no LRU order written; the fds die with it."""
        with self.store._lock:  # noqa: SLF001
            for handle in self.store._open.values():  # noqa: SLF001
                os.close(handle.fd)
            self.store._open.clear()  # noqa: SLF001
            self.store._closed = True  # noqa: SLF001
        self.store = self._open()

    @invariant()
    def bounded_and_consistent(self):
        s = self.store.stats()
        assert s.used_bytes <= self.capacity
        files = block_files(self.dir)
        assert sum(files.values()) == s.used_bytes
        assert len(files) == s.blocks
        assert temp_files(self.dir) == []
        assert list(self.dir.glob(".tmp.*")) == []  # no marker temp file left in the root
        for k in MODEL_KEYS:
            for i in range(4):
                if self.store.contains(k, i):
                    assert (k, i) in self.model


TestBlockStoreModel = BlockStoreMachine.TestCase
TestBlockStoreModel.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
