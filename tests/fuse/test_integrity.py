"""Data integrity of the write path under the patterns real programs use.

One test per way the write path lost or mangled data: atomic saves (write a
temporary file, rename it over the original), two writers of one file,
fsync-close-then-stat/append, unlink while open, rm and create of the same
names racing, and SQLite's rollback journal. Each checks the result on the
live mount, in the bucket after a flush (byte for byte) and through a fresh
mount with an empty cache.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import (
    KiB,
    assert_files,
    check_three_ways,
    flush,
    fresh_mount,
    journal_errors,
    keys,
    live_files,
    read_all,
)

pytestmark = pytest.mark.fuse

# Uploads happen only when asked (fsync, flush): every test is deterministic.
HOLD = ("--write-back-delay", "3600")


# -- atomic save ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["fsync", "no-fsync", "rename-while-open"])
def test_atomic_save_replaces_the_file(s3, mount, variant):
    """Editors and config tools save as: write NAME.tmp, (fsync), close, rename over NAME."""
    m = mount("test:", *HOLD)
    conf, tmp = m.path / "conf.txt", m.path / "conf.txt.tmp"
    conf.write_bytes(b"version = 1\n")
    flush(m.path)
    assert s3.get("conf.txt") == b"version = 1\n", "setup: the old content is in the bucket"

    expected = b"version = 1\n"
    for version in (2, 3):
        new = f"version = {version}\n".encode() + b"# saved atomically\n" * version
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            if variant == "rename-while-open":
                # The rename comes while the temporary file is open; a write through the
                # descriptor after it belongs to the new name.
                os.write(fd, new[:10])
                os.fsync(fd)
                os.rename(tmp, conf)
                os.write(fd, new[10:])
            else:
                os.write(fd, new)
                if variant == "fsync":
                    os.fsync(fd)
        finally:
            os.close(fd)
        if variant != "rename-while-open":
            try:
                os.rename(tmp, conf)
            except OSError as exc:
                done = "writing, fsyncing" if variant == "fsync" else "writing"
                pytest.fail(f"save {version}: rename conf.txt.tmp -> conf.txt after {done} and closing "
                            f"the temporary file: {exc!r}")
        expected = new
        assert sorted(os.listdir(m.path)) == ["conf.txt"], f"save {version}: listing {os.listdir(m.path)}"
        assert conf.read_bytes() == new, f"save {version}: conf.txt right after the rename"
    m2 = check_three_ways(s3, mount, m, {"conf.txt": expected, "conf.txt.tmp": None}, *HOLD)
    assert keys(s3) == ["conf.txt"], f"bucket keys: {keys(s3)}"
    assert sorted(os.listdir(m2.path)) == ["conf.txt"]


# -- two writers, one file ---------------------------------------------------------------------

SHARED_SIZE = 64 * KiB
REGIONS = {"A": 0, "B": 40 * KiB}  # writer -> offset of its 4 KiB region


def _expected_shared(original: bytes) -> bytes:
    out = bytearray(original)
    for letter, offset in REGIONS.items():
        out[offset : offset + 4 * KiB] = letter.encode() * (4 * KiB)
    return bytes(out)


def _assert_regions(where: str, data: bytes) -> None:
    lost = [f"writer {letter}'s region at offset {offset}" for letter, offset in REGIONS.items()
            if data[offset : offset + 4 * KiB] != letter.encode() * (4 * KiB)]
    assert not lost, f"{where}: lost " + " and ".join(lost) + " (both writers closed without an error)"


def test_two_threads_write_different_regions_of_one_file(s3, mount):
    original = b"." * SHARED_SIZE
    s3.put("shared.bin", original)
    m = mount("test:", *HOLD)
    path = m.path / "shared.bin"
    assert os.stat(path).st_size == SHARED_SIZE
    barrier = threading.Barrier(2, timeout=60)
    errors: list[str] = []

    def writer(letter: str) -> None:
        try:
            barrier.wait()  # open at the same moment
            with open(path, "r+b", buffering=0) as f:
                barrier.wait()  # both are open before either writes
                f.seek(REGIONS[letter])
                f.write(letter.encode() * (4 * KiB))
                barrier.wait()  # both wrote before either closes
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{letter}: {exc!r}")
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(letter,)) for letter in REGIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a writer thread is stuck"
    assert not errors, errors
    _assert_regions("live mount", read_all(path))
    check_three_ways(s3, mount, m, {"shared.bin": _expected_shared(original)}, *HOLD)


_REGION_WRITER = r"""
import os, sys
path, offset, letter = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def step(word):
    print(word, flush=True)
    assert sys.stdin.readline().strip() == "go"
step("ready")
fd = os.open(path, os.O_RDWR)
step("opened")
os.pwrite(fd, letter.encode() * 4096, offset)
step("written")
os.close(fd)
print("closed", flush=True)
"""


def test_two_processes_write_different_regions_of_one_file(s3, mount):
    original = b"." * SHARED_SIZE
    s3.put("shared.bin", original)
    m = mount("test:", *HOLD)
    path = m.path / "shared.bin"
    assert os.stat(path).st_size == SHARED_SIZE
    procs = [subprocess.Popen([sys.executable, "-c", _REGION_WRITER, str(path), str(offset), letter],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for letter, offset in REGIONS.items()]
    try:
        # A barrier across processes: each step starts in both only once both finished the last.
        for word in ("ready", "opened", "written"):
            for p in procs:
                line = p.stdout.readline().strip()
                assert line == word, f"writer said {line!r} instead of {word!r}: {p.stderr.read()}"
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0 and out.strip() == "closed", f"writer failed ({p.returncode}): {err}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    _assert_regions("live mount", read_all(path))
    check_three_ways(s3, mount, m, {"shared.bin": _expected_shared(original)}, *HOLD)


# -- fsync, close, then stat / append -------------------------------------------------------------


def test_fsync_close_then_stat_and_append_an_existing_file(s3, mount):
    old = bytes(range(256)) * 3 + b"o" * 232  # 1,000 bytes
    s3.put("grow.bin", old)
    m = mount("test:", *HOLD)
    path = m.path / "grow.bin"
    assert os.stat(path).st_size == 1000
    new = bytes((i * 7) % 251 for i in range(5000))
    with open(path, "r+b", buffering=0) as f:
        f.write(new)
        os.fsync(f.fileno())
    size = os.stat(path).st_size
    assert size == 5000, f"stat right after fsync+close says {size} bytes, not 5000"
    with open(path, "ab", buffering=0) as f:
        f.write(b"+" * 100)
    expected = new + b"+" * 100
    got = read_all(path)
    at_old_end = got[:1100] == new[:1000] + b"+" * 100
    assert len(got) == 5100 and got == expected, (
        f"after appending 100 bytes: {len(got)} bytes"
        + (" (the append landed at offset 1,000: the old size)" if at_old_end else ""))
    check_three_ways(s3, mount, m, {"grow.bin": expected}, *HOLD)


def test_fsync_close_then_stat_a_new_file(s3, mount):
    m = mount("test:", *HOLD)
    path = m.path / "fresh.txt"
    data = b"written, fsynced, closed\n" * 120
    with open(path, "wb", buffering=0) as f:
        f.write(data)
        os.fsync(f.fileno())
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        pytest.fail("a new file that was written, fsynced and closed does not exist right after the close")
    assert size == len(data), f"stat right after fsync+close says {size} bytes, not {len(data)}"
    assert "fresh.txt" in os.listdir(m.path)
    assert read_all(path) == data
    check_three_ways(s3, mount, m, {"fresh.txt": data}, *HOLD)


# -- unlink while open --------------------------------------------------------------------------


@pytest.mark.parametrize("start", ["new", "existing"])
def test_unlink_while_open_keeps_the_open_file_and_uploads_nothing(s3, mount, start):
    original = b"uploaded before " * 640  # 10,240 bytes
    if start == "existing":
        s3.put("victim.bin", original)
    m = mount("test:", *HOLD)
    path = m.path / "victim.bin"
    first, second = b"F" * 3000, b"S" * 2000
    base = original if start == "existing" else b""
    after_first = bytearray(base.ljust(len(first), b"\0"))
    after_first[: len(first)] = first
    after_second = bytearray(after_first)
    after_second[len(first) : len(first) + len(second)] = second
    problems: list[str] = []
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, first, 0)
        os.unlink(path)
        if "victim.bin" in os.listdir(m.path):
            problems.append("the name is still listed after unlink")
        if os.path.exists(path):
            problems.append("the name still resolves after unlink")
        try:
            got = os.pread(fd, len(after_first) + 100, 0)
            if got != bytes(after_first):
                problems.append(f"pread on the open fd after unlink: {len(got)} bytes, "
                                f"not the {len(after_first)} written")
        except OSError as exc:
            problems.append(f"pread on the open fd after unlink: {exc}")
        try:
            os.pwrite(fd, second, len(first))
            os.fsync(fd)
            got = os.pread(fd, len(after_second) + 100, 0)
            if got != bytes(after_second):
                problems.append(f"pread after a write to the unlinked file: {len(got)} bytes, wrong content")
        except OSError as exc:
            problems.append(f"write+fsync on the open fd after unlink: {exc}")
        st = os.fstat(fd)
        if st.st_nlink != 0:
            problems.append(f"fstat of the unlinked file: st_nlink={st.st_nlink}, not 0")
        if st.st_size != len(after_second):
            problems.append(f"fstat of the unlinked file: st_size={st.st_size}, not {len(after_second)}")
    finally:
        os.close(fd)
    flush(m.path)
    if keys(s3):
        problems.append(f"after close and flush the bucket holds {keys(s3)}, expected nothing")
    m2 = fresh_mount(mount, m, *HOLD)
    if os.path.exists(m2.path / "victim.bin"):
        problems.append("a fresh mount shows the unlinked file")
    assert not problems, "unlink while open:\n  " + "\n  ".join(problems)


# -- rm and create of the same names, racing ----------------------------------------------------

NAMES = ["a", "b", "c", "d"]
ROUNDS = 25

_SH_LOOP = r'''
cd "$1" || exit 9
i=0
while [ $i -lt $2 ]; do
  for n in a b c d; do
    rm -f $n || echo "rm $n failed" >&2
    echo foo > $n || echo "echo > $n failed" >&2
  done
  i=$((i+1))
done
'''


def _thread_loop(folder: Path, errors: list[str]) -> None:
    for _ in range(ROUNDS):
        for name in NAMES:
            try:
                os.unlink(folder / name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append(f"unlink {name}: {exc}")
            try:
                fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, b"foo\n")
                finally:
                    os.close(fd)
            except OSError as exc:
                errors.append(f"create+write {name}: {exc}")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["processes", "threads"])
def test_racing_rm_and_create_of_the_same_names(s3, mount, how):
    m = mount("test:", "--write-back-delay", "0")  # uploads run while the loops go on
    errors: list[str] = []
    if how == "processes":
        procs = [subprocess.Popen(["sh", "-c", _SH_LOOP, "loop", str(m.path), str(ROUNDS)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        try:
            for p in procs:
                out, err = p.communicate(timeout=240)
                errors += [line for line in (out + err).splitlines() if line.strip()]
                if p.returncode != 0:
                    errors.append(f"sh exited with {p.returncode}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    else:
        threads = [threading.Thread(target=_thread_loop, args=(m.path, errors)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        assert not any(t.is_alive() for t in threads), "a loop is stuck"
    problems: list[str] = []
    if errors:
        problems.append(f"{len(errors)} failed operations (none may fail), first ones: {errors[:4]}")

    def check(where: str, actual: dict[str, bytes | None]) -> None:
        try:
            assert_files(where, actual, expected)
        except AssertionError as exc:
            problems.append(str(exc))

    def in_bucket() -> dict[str, bytes | None]:
        present = set(keys(s3))
        return {n: (s3.get(n) if n in present else None) for n in NAMES}

    def logged(where: str, log: str) -> None:
        if journal_errors(log):
            problems.append(f"{where} logged journal errors:\n  " + "\n  ".join(journal_errors(log)[:5]))

    # Each loop's last word on every name is a create: every name holds "foo\n".
    expected: dict[str, bytes | None] = {name: b"foo\n" for name in NAMES}
    check("live mount", live_files(m.path, NAMES))
    flush(m.path)
    check("bucket after flush", in_bucket())
    m.stop()
    logged("the mount", m.log())
    again = mount("test:", "--write-back-delay", "0")  # same cache: it reloads the journal
    check("next mount (same cache)", live_files(again.path, NAMES))
    flush(again.path)
    check("bucket after the next mount's flush", in_bucket())
    again.stop()
    logged("the next mount", again.log())
    assert not problems, "racing rm -f and create:\n" + "\n".join(problems)


# -- SQLite rollback journal ------------------------------------------------------------------------


@pytest.mark.slow
def test_sqlite_rollback_journal_is_created_written_and_unlinked(s3, mount):
    m = mount("test:", *HOLD)
    db = m.path / "app.db"
    try:
        con = sqlite3.connect(db)
        try:
            assert con.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
            con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
            con.executemany("INSERT INTO notes (body) VALUES (?)", [(f"note {i}",) for i in range(100)])
            con.commit()
            con.execute("UPDATE notes SET body = body || ' edited' WHERE id % 2 = 0")
            con.commit()
            assert con.execute("SELECT count(*) FROM notes").fetchone()[0] == 100
        finally:
            con.close()
    except sqlite3.Error as exc:
        pytest.fail(f"SQLite with journal_mode=DELETE on the mount: {exc}")
    assert sorted(os.listdir(m.path)) == ["app.db"], os.listdir(m.path)
    flush(m.path)
    assert keys(s3) == ["app.db"], f"bucket keys: {keys(s3)}"
    assert s3.get("app.db") == read_all(db), "the bucket's app.db differs from the mount's"
    m2 = fresh_mount(mount, m, *HOLD)
    con = sqlite3.connect(f"file:{m2.path / 'app.db'}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = con.execute("SELECT id, body FROM notes ORDER BY id").fetchall()
    finally:
        con.close()
    assert rows == [(i + 1, f"note {i}" + (" edited" if (i + 1) % 2 == 0 else "")) for i in range(100)]
