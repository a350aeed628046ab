"""The block store's trust marker (blocks of this boot are not re-read to check their CRC)
and its readahead of block files (gstore.cache.blockstore)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import stat
import threading
import time
import zlib
from pathlib import Path

import pytest

from gstore.cache import blockstore
from gstore.cache.blockstore import BlockStore


def key(n: int | str) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()[:40]


A, B, C = key("a"), key("b"), key("c")
SIZE = 64 * 1024


def data_of(k: str, index: int, size: int = SIZE) -> bytes:
    seed = hashlib.sha256(f"{k}/{index}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def block_path(root: Path, k: str, index: int, data: bytes) -> Path:
    return root / k[:2] / f"{k}.{index}.{zlib.crc32(data):08x}"


def open_store(root: Path, boot: str | None, capacity: int = 1 << 24, **kw) -> BlockStore:
    return BlockStore(root, capacity, boot_id=lambda: boot, **kw)


def fill(root: Path, boot: str | None, blocks: list[tuple[str, int]]) -> None:
    """A run that writes ``blocks`` and closes (writing the marker)."""
    store = open_store(root, boot)
    for k, i in blocks:
        store.put(k, i, data_of(k, i))
    store.close()


def verified(store: BlockStore, k: str, index: int) -> bool:
    return store._index[(k, index)][2]  # noqa: SLF001


def marker(root: Path) -> dict:
    return json.loads((root / "trust.json").read_text())


def kill(store: BlockStore) -> None:
    """What kill -9 leaves: no close(), no marker written; the fds go with the process."""
    with store._lock:  # noqa: SLF001
        for handle in store._open.values():  # noqa: SLF001
            os.close(handle.fd)
        store._open.clear()  # noqa: SLF001
        store._closed = True  # noqa: SLF001 - nothing else happens to this dead store


def flip_byte_in_place(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def write_marker(root: Path, boot: str, unverified: list[str]) -> None:
    doc = {"format": 1, "boot_id": boot, "unverified": unverified}
    (root / "trust.json").write_text(json.dumps(doc))


@pytest.fixture
def preads(monkeypatch):
    """Lengths of every pread the store makes (a whole block: a CRC check)."""
    lengths: list[int] = []
    real = blockstore._pread_exact

    def counting(fd, length, offset):
        lengths.append(length)
        return real(fd, length, offset)

    monkeypatch.setattr(blockstore, "_pread_exact", counting)
    return lengths


# -- trust across restarts ------------------------------------------------------------


def test_same_boot_reopen_does_not_read_the_whole_block(tmp_path, preads):
    fill(tmp_path, "boot-1", [(A, 0), (A, 1)])
    store = open_store(tmp_path, "boot-1")
    assert verified(store, A, 0) and verified(store, A, 1)
    assert store.read(A, 0, 100, 10, SIZE) == data_of(A, 0)[100:110]
    assert preads == [10]  # the range only: no CRC check
    store.close()

    rebooted = open_store(tmp_path, "boot-2")
    assert not verified(rebooted, A, 0) and not verified(rebooted, A, 1)
    preads.clear()
    assert rebooted.read(A, 0, 100, 10, SIZE) == data_of(A, 0)[100:110]
    assert preads == [SIZE]  # the whole block, for its CRC
    assert verified(rebooted, A, 0) and not verified(rebooted, A, 1)


def test_trusted_block_is_served_unchecked_a_rebooted_one_is_checked(tmp_path):
    """What trust means: a damaged block the marker vouches for is served as it is (only a
    crash could damage it, and a crash changes the boot id); after a reboot it is caught."""
    fill(tmp_path, "boot-1", [(A, 0)])
    path = block_path(tmp_path, A, 0, data_of(A, 0))
    flip_byte_in_place(path, SIZE // 2)
    time.sleep(0.02)  # the marker must be newer than the edit (coarse timestamps)
    write_marker(tmp_path, "boot-1", [])  # as if the edit had been there when it was written

    same = open_store(tmp_path, "boot-1")
    assert verified(same, A, 0)
    got = same.read(A, 0, 0, SIZE, SIZE)
    assert got is not None and got != data_of(A, 0)
    same.close()

    write_marker(tmp_path, "boot-1", [])
    rebooted = open_store(tmp_path, "boot-2")
    assert rebooted.read(A, 0, 0, 10, SIZE) is None
    assert rebooted.stats().corrupt == 1 and not path.exists()


def test_block_changed_after_the_marker_is_checked_in_the_same_boot(tmp_path):
    """The marker vouches for files as they were when it was written: a block edited in
    place afterwards (its ctime is newer) is checked, even in the same boot."""
    fill(tmp_path, "boot-1", [(A, 0), (A, 1)])
    time.sleep(0.02)
    path = block_path(tmp_path, A, 0, data_of(A, 0))
    flip_byte_in_place(path, 7)
    store = open_store(tmp_path, "boot-1")
    assert not verified(store, A, 0) and verified(store, A, 1)
    assert store.read(A, 0, 100, 10, SIZE) is None
    assert store.stats().corrupt == 1
    assert store.read(A, 1, 0, SIZE, SIZE) == data_of(A, 1)


def test_block_copied_in_after_the_marker_is_checked(tmp_path):
    fill(tmp_path, "boot-1", [(A, 0)])
    time.sleep(0.02)
    foreign = data_of(B, 3)
    (tmp_path / B[:2]).mkdir(mode=0o700, exist_ok=True)
    # The right length, the wrong bytes:
    block_path(tmp_path, B, 3, foreign).write_bytes(foreign[:-1] + b"!")
    store = open_store(tmp_path, "boot-1")
    assert verified(store, A, 0) and not verified(store, B, 3)
    assert store.read(B, 3, 0, 10, SIZE) is None
    assert store.stats().corrupt == 1


def test_trusted_block_still_gets_the_length_check(tmp_path):
    fill(tmp_path, "boot-1", [(A, 0)])
    path = block_path(tmp_path, A, 0, data_of(A, 0))
    os.truncate(path, SIZE - 1)
    time.sleep(0.02)
    write_marker(tmp_path, "boot-1", [])  # vouches for the cut block all the same
    store = open_store(tmp_path, "boot-1")
    assert store.read(A, 0, 0, 10, SIZE) is None  # the index holds the cut length
    assert store.stats().corrupt == 1 and not path.exists()
    # ...and a block cut short while its fd table entry is cold is caught by the fstat.
    store.put(A, 1, data_of(A, 1))
    store.close()
    os.truncate(block_path(tmp_path, A, 1, data_of(A, 1)), SIZE - 1)
    again = open_store(tmp_path, "boot-1")
    assert again.read(A, 1, 0, 10, SIZE) is None


def test_marker_from_another_boot_makes_every_block_unverified(tmp_path):
    fill(tmp_path, "boot-1", [(A, 0), (A, 1), (B, 0)])
    assert marker(tmp_path)["boot_id"] == "boot-1"
    store = open_store(tmp_path, "boot-2")
    blocks = [(A, 0), (A, 1), (B, 0)]
    assert not any(verified(store, k, i) for k, i in blocks)
    store.close()
    assert marker(tmp_path) == {
        "format": 1,
        "boot_id": "boot-2",
        "unverified": sorted(block_path(tmp_path, k, i, data_of(k, i)).name for k, i in blocks),
    }


def test_unverified_blocks_stay_unverified_across_same_boot_restarts(tmp_path):
    fill(tmp_path, "boot-1", [(A, 0), (A, 1), (B, 0)])
    first = open_store(tmp_path, "boot-2")
    assert first.read(A, 1, 0, 10, SIZE) == data_of(A, 1)[:10]  # checks A/1
    first.put(C, 0, data_of(C, 0))  # written in this boot
    first.close()
    for _restart in range(2):
        store = open_store(tmp_path, "boot-2")
        states = [verified(store, k, i) for k, i in [(A, 0), (A, 1), (B, 0), (C, 0)]]
        assert states == [False, True, False, True]
        store.close()


def test_kill_in_the_same_boot_keeps_unverified_blocks_unverified(tmp_path):
    fill(tmp_path, "boot-1", [(A, 0), (B, 0)])
    second = open_store(tmp_path, "boot-2")
    second.put(C, 0, data_of(C, 0))
    second.close()  # marker: boot-2, A/0 and B/0 unverified; C/0 vouched for

    time.sleep(0.02)
    third = open_store(tmp_path, "boot-2")
    assert [verified(third, k, 0) for k in (A, B, C)] == [False, False, True]
    assert third.read(A, 0, 0, 10, SIZE) is not None  # verified, but only in memory...
    third.put(C, 1, data_of(C, 1))  # ...and a block written after the marker
    kill(third)

    fourth = open_store(tmp_path, "boot-2")
    assert [verified(fourth, k, 0) for k in (A, B, C)] == [False, False, True]
    assert not verified(fourth, C, 1)  # newer than the marker: checked (never wrongly trusted)
    assert fourth.read(C, 1, 0, SIZE, SIZE) == data_of(C, 1)


def test_kill_after_a_reboot_trusts_nothing(tmp_path):
    fill(tmp_path, "boot-1", [(A, 0)])
    after_reboot = open_store(tmp_path, "boot-2")
    after_reboot.put(B, 0, data_of(B, 0))
    kill(after_reboot)
    store = open_store(tmp_path, "boot-2")
    assert not verified(store, A, 0) and not verified(store, B, 0)


@pytest.mark.parametrize("umask", [0, 0o077, 0o777])
def test_marker_file_mode_is_0600(tmp_path, umask):
    fill(tmp_path, "boot-1", [(A, 0)])
    store = open_store(tmp_path, "boot-1")
    old = os.umask(umask)
    try:
        store.close()
    finally:
        os.umask(old)
    st = (tmp_path / "trust.json").stat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"\xff\xfe",
        b"[]",
        b"null",
        b'{"format": 1, "boot_id": "boot-1"}',
        b'{"format": 2, "boot_id": "boot-1", "unverified": []}',
        b'{"format": 1, "boot_id": 7, "unverified": []}',
        b'{"format": 1, "boot_id": "boot-1", "unverified": "x"}',
        b'{"format": 1, "boot_id": "boot-1", "unverified": [1]}',
        b'{"format": 1, "boot_id": "boot-1", "unverified": {}}',
    ],
)
def test_corrupt_marker_verifies_everything(tmp_path, content):
    fill(tmp_path, "boot-1", [(A, 0), (A, 1)])
    (tmp_path / "trust.json").write_bytes(content)
    store = open_store(tmp_path, "boot-1")
    assert not verified(store, A, 0) and not verified(store, A, 1)
    assert store.read(A, 0, 0, SIZE, SIZE) == data_of(A, 0)
    store.close()  # replaces the bad marker with a good one
    assert marker(tmp_path)["unverified"] == [block_path(tmp_path, A, 1, data_of(A, 1)).name]


def test_marker_that_is_not_a_file_verifies_everything(tmp_path):
    fill(tmp_path, "boot-1", [(A, 0)])
    (tmp_path / "trust.json").unlink()
    (tmp_path / "trust.json").mkdir()
    store = open_store(tmp_path, "boot-1")
    assert not verified(store, A, 0)
    store.close()  # cannot replace a directory: a warning, nothing trusted
    assert (tmp_path / "trust.json").is_dir()
    assert not verified(open_store(tmp_path, "boot-1"), A, 0)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_marker_symlink_is_not_followed(tmp_path):
    fill(tmp_path, "boot-1", [(A, 0)])
    real = tmp_path.parent / f"{tmp_path.name}-elsewhere.json"
    real.write_text((tmp_path / "trust.json").read_text())
    (tmp_path / "trust.json").unlink()
    (tmp_path / "trust.json").symlink_to(real)
    assert not verified(open_store(tmp_path, "boot-1"), A, 0)


def test_marker_that_cannot_be_written_is_removed(tmp_path, monkeypatch):
    fill(tmp_path, "boot-1", [(A, 0)])
    store = open_store(tmp_path, "boot-1")
    assert verified(store, A, 0)
    real = blockstore._write_marker_file

    def half_then_fail(path, tmp, content):
        with open(tmp, "wb") as f:
            f.write(content[: len(content) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(blockstore, "_write_marker_file", half_then_fail)
    store.close()
    assert not (tmp_path / "trust.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    monkeypatch.setattr(blockstore, "_write_marker_file", real)
    assert not verified(open_store(tmp_path, "boot-1"), A, 0)


def test_leftover_marker_temp_files_are_removed_at_startup(tmp_path):
    fill(tmp_path, "boot-1", [(A, 0)])
    (tmp_path / ".tmp.trust.0123456789abcdef").write_text('{"format": 1, "boot_id": "boo')
    (tmp_path / ".tmp.unrelated").write_text("not ours")
    store = open_store(tmp_path, "boot-1")
    assert not (tmp_path / ".tmp.trust.0123456789abcdef").exists()
    assert (tmp_path / ".tmp.unrelated").exists()  # the root holds nothing else of ours
    assert (tmp_path / "trust.json").exists() and verified(store, A, 0)


def test_no_boot_id_trusts_nothing_and_writes_no_marker(tmp_path):
    fill(tmp_path, None, [(A, 0)])
    assert not (tmp_path / "trust.json").exists()
    assert not verified(open_store(tmp_path, None), A, 0)
    fill(tmp_path, "boot-1", [])
    assert not verified(open_store(tmp_path, None), A, 0)  # a marker but no boot id to compare


def test_boot_id_source_defaults_to_the_module_function(tmp_path, monkeypatch):
    monkeypatch.setattr(blockstore, "current_boot_id", lambda: "faked")
    store = BlockStore(tmp_path, 1 << 20)
    store.close()
    assert marker(tmp_path)["boot_id"] == "faked"


def test_current_boot_id(monkeypatch, tmp_path):
    real = Path("/proc/sys/kernel/random/boot_id")
    if real.exists():
        assert blockstore.current_boot_id() == real.read_text().strip()
    fake = tmp_path / "boot_id"
    fake.write_text("\n")
    monkeypatch.setattr(blockstore, "_BOOT_ID_PATH", str(fake))
    assert blockstore.current_boot_id() is None
    monkeypatch.setattr(blockstore, "_BOOT_ID_PATH", str(tmp_path / "missing"))
    assert blockstore.current_boot_id() is None


# -- verify=False: the caller checks unverified blocks elsewhere -------------------------


def test_verify_false_defers_an_unverified_block(tmp_path, preads):
    fill(tmp_path, "boot-1", [(A, 0)])
    store = open_store(tmp_path, "boot-2")
    before = store.stats()
    assert store.read(A, 0, 0, 10, SIZE, verify=False) is None
    assert preads == [] and store.stats() == before  # no I/O, nothing counted
    assert store.contains(A, 0)  # tells the caller: not a plain miss
    assert store.read(A, 0, 0, 10, SIZE) == data_of(A, 0)[:10]
    assert preads == [SIZE]
    assert store.read(A, 0, 5, 10, SIZE, verify=False) == data_of(A, 0)[5:15]
    s = store.stats()
    assert (s.hits, s.misses) == (2, 0)


def test_verify_false_serves_trusted_blocks_and_checks_lengths(tmp_path):
    store = open_store(tmp_path, "boot-1")
    store.put(A, 0, data_of(A, 0))
    # Not in the fd table yet: opened and served.
    assert store.read(A, 0, 0, 10, SIZE, verify=False) == data_of(A, 0)[:10]
    fill(tmp_path, "boot-1", [(B, 0)])
    rebooted = open_store(tmp_path, "boot-2")
    # The wrong length: dropped at once, unverified or not.
    assert rebooted.read(B, 0, 0, 10, SIZE - 1, verify=False) is None
    assert not rebooted.contains(B, 0) and rebooted.stats().corrupt == 1


# -- readahead ---------------------------------------------------------------------------


@pytest.fixture
def advised(monkeypatch):
    """Inodes of the files the store asked the kernel to read ahead."""
    inodes: list[int] = []
    real = blockstore._fadvise

    def recording(fd, offset, length, advice):
        assert (offset, length, advice) == (0, 0, os.POSIX_FADV_WILLNEED)
        inodes.append(os.fstat(fd).st_ino)
        if real is not None:
            real(fd, offset, length, advice)

    monkeypatch.setattr(blockstore, "_fadvise", recording)
    return inodes


def ino(root: Path, k: str, index: int) -> int:
    return block_path(root, k, index, data_of(k, index)).stat().st_ino


def opened(store: BlockStore) -> dict[tuple[str, int], tuple[int, bool]]:
    return {k: (h.users, h.ahead) for k, h in store._open.items()}  # noqa: SLF001


def test_opening_a_block_advises_it_and_the_next_one(tmp_path, advised):
    store = open_store(tmp_path, "boot-1")
    for i in range(4):
        store.put(A, i, data_of(A, i))
    assert store.read(A, 0, 0, 10, SIZE) == data_of(A, 0)[:10]
    assert advised == [ino(tmp_path, A, 0), ino(tmp_path, A, 1)]
    assert opened(store) == {(A, 0): (0, False), (A, 1): (0, True)}


def test_sequential_reads_stay_one_block_ahead_one_open_per_block(tmp_path, advised, monkeypatch):
    store = open_store(tmp_path, "boot-1")
    for i in range(4):
        store.put(A, i, data_of(A, i))
    opens: list[str] = []
    real_open = blockstore.os.open
    monkeypatch.setattr(blockstore.os, "open",
                        lambda p, f, *a: opens.append(p) or real_open(p, f, *a))
    step = SIZE // 4
    for i in range(4):
        for off in range(0, SIZE, step):
            assert store.read(A, i, off, step, SIZE) == data_of(A, i)[off:off + step]
            if i < 3:  # the first read of block i already had block i + 1 opened and advised
                assert opened(store)[(A, i + 1)] == (0, True)
    assert advised == [ino(tmp_path, A, i) for i in range(4)]
    assert len(opens) == 4  # each block opened once, blocks 1-3 by the readahead
    assert all(users == 0 and not ahead for users, ahead in opened(store).values())


def test_no_readahead_of_the_next_block_for_a_read_inside_a_block(tmp_path, advised):
    store = open_store(tmp_path, "boot-1")
    store.put(A, 0, data_of(A, 0))
    store.put(A, 1, data_of(A, 1))
    assert store.read(A, 0, 4096, 10, SIZE) is not None  # random access: the block only
    assert advised == [ino(tmp_path, A, 0)]
    assert list(opened(store)) == [(A, 0)]


def test_readahead_of_an_unverified_block_keeps_no_fd_and_it_is_still_checked(tmp_path, advised):
    fill(tmp_path, "boot-1", [(A, 0), (A, 1)])
    flip_byte_in_place(block_path(tmp_path, A, 1, data_of(A, 1)), SIZE - 1)
    store = open_store(tmp_path, "boot-2")
    assert store.read(A, 0, 0, 10, SIZE) == data_of(A, 0)[:10]
    assert advised == [ino(tmp_path, A, 0), ino(tmp_path, A, 1)]  # block 1's pages are on their way
    assert list(opened(store)) == [(A, 0)]  # but no fd in the table: it holds checked blocks only
    assert store.read(A, 1, 0, 10, SIZE) is None  # the flip is caught
    assert store.stats().corrupt == 1


def test_readahead_fd_leaves_with_its_block(tmp_path):
    store = open_store(tmp_path, "boot-1")
    store.put(A, 0, data_of(A, 0))
    store.put(A, 1, data_of(A, 1))
    store.read(A, 0, 0, 10, SIZE)
    fd = store._open[(A, 1)].fd  # noqa: SLF001
    store.put(A, 1, data_of(B, 1))  # replaced: the old fd closes with it
    with pytest.raises(OSError):
        os.fstat(fd)
    assert store.read(A, 1, 0, SIZE, SIZE) == data_of(B, 1)
    store.read(A, 0, 0, 10, SIZE)
    store.discard_object(A)
    assert store._open == {}  # noqa: SLF001


def test_block_replaced_during_its_readahead_keeps_no_stale_fd(tmp_path, monkeypatch):
    """The table's rule: an fd goes in only if the entry is still the one whose file was opened."""
    store = open_store(tmp_path, "boot-1")
    store.put(A, 0, data_of(A, 0))
    store.put(A, 1, data_of(A, 1))
    old_ino = ino(tmp_path, A, 1)

    def replace_block_1(fd, offset, length, advice):
        if os.fstat(fd).st_ino == old_ino:
            store.put(A, 1, data_of(B, 1))  # between the open and the table insert

    monkeypatch.setattr(blockstore, "_fadvise", replace_block_1)
    assert store.read(A, 0, 0, 10, SIZE) == data_of(A, 0)[:10]
    assert (A, 1) not in opened(store)
    assert store.read(A, 1, 0, SIZE, SIZE) == data_of(B, 1)


def test_readahead_respects_the_fd_limit_and_skips_missing_blocks(tmp_path):
    store = open_store(tmp_path, "boot-1", max_open=2)
    for i in (0, 1, 2, 4):
        store.put(A, i, data_of(A, i))
    for i in (0, 1, 2):
        assert store.read(A, i, 0, 10, SIZE) is not None
        assert len(opened(store)) <= 2
    assert list(opened(store)) == [(A, 1), (A, 2)]  # block 3 is not cached: nothing read ahead
    single = open_store(tmp_path / "one", "boot-1", max_open=1)
    single.put(A, 0, data_of(A, 0))
    single.put(A, 1, data_of(A, 1))
    single.read(A, 0, 0, 10, SIZE)
    assert list(opened(single)) == [(A, 0)]  # one slot: keep the block being read


def test_readahead_with_fadvise_failing_or_missing(tmp_path, monkeypatch):
    def failing(fd, offset, length, advice):
        raise OSError(errno.ESPIPE, "Illegal seek")

    store = open_store(tmp_path, "boot-1")
    store.put(A, 0, data_of(A, 0))
    store.put(A, 1, data_of(A, 1))
    monkeypatch.setattr(blockstore, "_fadvise", failing)
    assert store.read(A, 0, 0, SIZE, SIZE) == data_of(A, 0)
    monkeypatch.setattr(blockstore, "_fadvise", None)
    assert store.read(A, 1, 0, SIZE, SIZE) == data_of(A, 1)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_sequential_readers_racing_puts_and_evictions(tmp_path):
    """Readahead puts fds into the table from many threads while blocks are replaced,
    evicted and discarded: readers only ever get the right bytes, and no fd leaks."""
    before = open_fds()
    size = 4096
    store = open_store(tmp_path, "boot-1", capacity=12 * size, max_open=6)
    keys = [key(i) for i in range(3)]
    errors: list[str] = []
    stop = threading.Event()

    def content(k: str, index: int, version: int) -> bytes:
        return data_of(f"{k}/{version}", index, size)

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                k = rng.choice(keys)
                for index in range(6):
                    for off in range(0, size, 1024):
                        got = store.read(k, index, off, 1024, size)
                        if got is not None and got not in (content(k, index, 0)[off:off + 1024],
                                                           content(k, index, 1)[off:off + 1024]):
                            errors.append(f"wrong bytes for {k[:6]}/{index}")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(600):
                k = rng.choice(keys)
                if rng.random() < 0.05:
                    store.discard_object(k)
                else:
                    index = rng.randrange(6)
                    store.put(k, index, content(k, index, rng.randrange(2)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    readers = [threading.Thread(target=reader, args=(n,)) for n in range(3)]
    writers = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    s = store.stats()
    assert s.corrupt == 0 and s.hits > 0
    store.close()
    assert open_fds() == before
