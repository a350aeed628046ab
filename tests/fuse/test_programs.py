"""Real programs on the mount: sqlite3, git, tar, rsync and a log appended by two processes.

Each program's own checks (PRAGMA integrity_check, git fsck, diff -r of what
tar gives back, rsync's transfer count) must pass on the live mount, and again
on a fresh mount with an empty cache after a flush; where the result is a set
of files, the bucket must hold them byte for byte.
"""

from __future__ import annotations

import os
import random
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (
    KiB,
    MiB,
    assert_files,
    bucket_files,
    check_three_ways,
    flush,
    fresh_mount,
    keys,
    read_all,
    require_program,
    run,
    tree_files,
)

pytestmark = pytest.mark.fuse

ARGS = ("--write-back-delay", "1")


# -- sqlite3 --------------------------------------------------------------------------------------

TRANSACTIONS = 30
ROWS_PER_TRANSACTION = 120
DIGEST = ("SELECT group_concat(x, ',') FROM "
          "(SELECT id || ':' || name || ':' || hex(payload) AS x FROM items ORDER BY id)")


def _integrity_cli(db: Path) -> str:
    return run(["sqlite3", str(db), "PRAGMA integrity_check;"]).stdout.strip()


def _count_cli(db: Path) -> int:
    return int(run(["sqlite3", str(db), "SELECT count(*) FROM items;"]).stdout.strip())


@pytest.mark.slow
@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_sqlite_many_transactions_stay_consistent(s3, mount, journal_mode):
    require_program("sqlite3")
    m = mount("test:", *ARGS)
    db = m.path / "data.db"
    rng = random.Random(journal_mode)
    try:
        con = sqlite3.connect(db)
        try:
            assert con.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0] == journal_mode
            con.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, payload BLOB)")
            con.execute("CREATE INDEX items_name ON items(name)")
            con.commit()
            for t in range(TRANSACTIONS):
                con.executemany("INSERT INTO items (name, payload) VALUES (?, ?)",
                                [(f"item {t}-{i}", rng.randbytes(rng.randrange(10, 400)))
                                 for i in range(ROWS_PER_TRANSACTION)])
                if t % 5 == 4:  # churn: rewrite and free pages too
                    con.execute("UPDATE items SET payload = zeroblob(64) WHERE id % 7 = ?", (t % 7,))
                    con.execute("DELETE FROM items WHERE id % 97 = ?", (t % 97,))
                con.commit()
            expected = con.execute("SELECT count(*) FROM items").fetchone()[0]
            digest = con.execute(DIGEST).fetchone()[0]
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok", "python, live mount"
        finally:
            con.close()
    except sqlite3.Error as exc:
        pytest.fail(f"SQLite ({journal_mode} journal) on the mount: {exc}")
    assert expected > 3000, f"only {expected} rows"
    assert _integrity_cli(db) == "ok", "sqlite3 CLI integrity_check on the live mount"
    assert _count_cli(db) == expected, "row count (sqlite3 CLI) on the live mount"
    listing = sorted(os.listdir(m.path))
    assert listing == ["data.db"], f"listing after the last connection closed: {listing}, not ['data.db']"
    flush(m.path)
    assert keys(s3) == ["data.db"], f"bucket keys after flush: {keys(s3)}"
    assert s3.get("data.db") == read_all(db), "the bucket's data.db differs from the live mount's"

    m2 = fresh_mount(mount, m, *ARGS)
    db2 = m2.path / "data.db"
    assert _integrity_cli(db2) == "ok", "sqlite3 CLI integrity_check on a fresh mount"
    assert _count_cli(db2) == expected, "row count (sqlite3 CLI) on a fresh mount"
    con = sqlite3.connect(db2)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok", "python, fresh mount"
        assert con.execute("SELECT count(*) FROM items").fetchone()[0] == expected
        assert con.execute(DIGEST).fetchone()[0] == digest, "rows differ on a fresh mount"
        # And it is still writable there.
        con.execute("INSERT INTO items (name) VALUES ('after remount')")
        con.commit()
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()


# -- git -----------------------------------------------------------------------------------------------


def _git_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
    })
    return env


@pytest.mark.slow
def test_git_clone_commit_fsck_and_remount(s3, mount, tmp_path):
    require_program("git")
    home = tmp_path / "home"
    home.mkdir()
    env = _git_env(home)

    def git(*args: str, cwd: Path) -> str:
        return run(["git", *args], cwd=cwd, env=env).stdout

    source = tmp_path / "origin"
    source.mkdir()
    git("-c", "init.defaultBranch=main", "init", "-q", ".", cwd=source)
    rng = random.Random(11)
    messages = []
    for n in range(4):
        (source / "src" / "pkg").mkdir(parents=True, exist_ok=True)
        (source / "README.md").write_text(f"# demo\n\nrevision {n}\n")
        (source / "src" / f"module{n}.py").write_text(f"VALUE = {n}\n" * (n * 50 + 1))
        (source / "src" / "pkg" / "data.bin").write_bytes(rng.randbytes(50 * KiB * (n + 1)))
        git("add", "-A", cwd=source)
        git("commit", "-q", "-m", f"commit {n}", cwd=source)
        messages.insert(0, f"commit {n}")

    m = mount("test:", *ARGS)
    repo = m.path / "repo"
    git("clone", "-q", str(source), str(repo), cwd=tmp_path)
    data = "src/pkg/data.bin"
    assert (repo / data).read_bytes() == (source / data).read_bytes(), f"{data} right after the clone"
    (repo / "README.md").write_text("# demo\n\nedited on the mount\n")
    (repo / "src" / "new.txt").write_text("a new file\n")
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "edit on the mount", cwd=repo)
    messages.insert(0, "edit on the mount")

    def verify(where: str, checkout: Path) -> None:
        fsck = run(["git", "fsck", "--full", "--strict"], cwd=checkout, env=env, check=False)
        assert fsck.returncode == 0 and "error" not in fsck.stderr.lower() and "missing" not in fsck.stdout, (
            f"{where}: git fsck --full exited {fsck.returncode}:\n"
            f"{fsck.stdout[-2000:]}\n{fsck.stderr[-2000:]}")
        assert git("log", "--format=%s", cwd=checkout).splitlines() == messages, f"{where}: git log"
        status = git("status", "--porcelain", "--untracked-files=all", cwd=checkout)
        assert status == "", f"{where}: git status is not clean:\n{status}"
        assert (checkout / "README.md").read_text() == "# demo\n\nedited on the mount\n"

    verify("live mount", repo)
    flush(m.path)
    assert "repo/.git/HEAD" in keys(s3, "repo/")
    m2 = fresh_mount(mount, m, *ARGS)
    verify("fresh mount with an empty cache", m2.path / "repo")
    # A clone back out of the mount has the whole history.
    copy = tmp_path / "copy"
    git("clone", "-q", str(m2.path / "repo"), str(copy), cwd=tmp_path)
    assert git("log", "--format=%s", cwd=copy).splitlines() == messages


# -- tar ------------------------------------------------------------------------------------------------


def _make_tree(root: Path, seed: int, *, big: bool = True) -> None:
    rng = random.Random(seed)
    sizes = [0, 1, 511, 4095, 4096, 4097, 65_537, 300_000]
    if big:
        sizes += [3 * MiB + 123, 5 * MiB]
    (root / "empty").mkdir(parents=True)
    (root / "nested" / "deeper" / "empty too").mkdir(parents=True)
    for i, size in enumerate(sizes):
        folder = root / ["", "nested", "nested/deeper", "other dir"][i % 4]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"file-{i}-{size}.bin").write_bytes(rng.randbytes(size))
    (root / "notes.txt").write_text("plain text\n" * 100)


def _diff(a: Path, b: Path, where: str) -> None:
    result = run(["diff", "-r", str(a), str(b)], check=False)
    assert result.returncode == 0, (
        f"{where}: diff -r differs:\n{result.stdout[-3000:]}{result.stderr[-1000:]}")


def _tar_names(archive: Path) -> list[str]:
    return sorted(n.rstrip("/") for n in run(["tar", "tf", str(archive)]).stdout.splitlines())


@pytest.mark.slow
def test_tar_extract_onto_the_mount_and_archive_it_back(s3, mount, tmp_path):
    require_program("tar")
    require_program("diff")
    tree = tmp_path / "tree"
    _make_tree(tree, 5)
    archive = tmp_path / "in.tar"
    run(["tar", "cf", str(archive), "-C", str(tree), "."])
    m = mount("test:", *ARGS)
    target = m.path / "unpacked"
    target.mkdir()
    run(["tar", "xf", str(archive), "-C", str(target)])

    def round_trip(where: str, folder: Path, n: int) -> None:
        out = tmp_path / f"out{n}.tar"
        run(["tar", "cf", str(out), "-C", str(folder), "."])
        assert _tar_names(out) == _tar_names(archive), f"{where}: tar c lists other names"
        back = tmp_path / f"back{n}"
        back.mkdir()
        run(["tar", "xf", str(out), "-C", str(back)])
        _diff(tree, back, where)

    _diff(tree, target, "live mount (diff -r against the mount itself)")
    round_trip("live mount", target, 1)
    flush(m.path)
    expected = tree_files(tree)
    assert_files("bucket after flush", bucket_files(s3, "unpacked/"), expected)
    listed = keys(s3, "unpacked/")
    assert "unpacked/empty/" in listed and "unpacked/nested/deeper/empty too/" in listed, (
        f"empty folders have no marker in the bucket: {listed}")
    m2 = fresh_mount(mount, m, *ARGS)
    round_trip("fresh mount with an empty cache", m2.path / "unpacked", 2)


# -- rsync ------------------------------------------------------------------------------------------------


def _rsync(source: Path, target: Path) -> tuple[int, list[str]]:
    out = run(["rsync", "-a", "--stats", "--itemize-changes", f"{source}/", f"{target}/"]).stdout
    found = re.search(r"Number of regular files transferred: ([\d,]+)", out)
    assert found, f"no transfer count in rsync's output:\n{out}"
    changed = [line for line in out.splitlines() if line[:2] in (">f", "cd", "*d")]
    return int(found.group(1).replace(",", "")), changed


@pytest.mark.slow
def test_rsync_twice_transfers_nothing_the_second_time(s3, mount, tmp_path):
    require_program("rsync")
    require_program("diff")
    source = tmp_path / "source"
    _make_tree(source, 9, big=False)
    m = mount("test:", *ARGS)
    count, _ = _rsync(source, m.path / "mirror")
    assert count == len(tree_files(source)), f"first rsync transferred {count} files"
    count, changed = _rsync(source, m.path / "mirror")
    assert count == 0, f"second rsync on the live mount transferred {count} files: {changed}"
    _diff(source, m.path / "mirror", "live mount")
    flush(m.path)
    assert_files("bucket after flush", bucket_files(s3, "mirror/"), tree_files(source))
    m2 = fresh_mount(mount, m, *ARGS)
    count, changed = _rsync(source, m2.path / "mirror")
    assert count == 0, f"rsync after a remount with an empty cache transferred {count} files: {changed}"
    _diff(source, m2.path / "mirror", "fresh mount with an empty cache")


# -- a log appended by two processes -----------------------------------------------------------------------

LINES = 300

_APPENDER = r"""
import os, sys
path, who, lines = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
assert sys.stdin.readline().strip() == "go"
fd = os.open(path, os.O_WRONLY | os.O_APPEND)
try:
    for seq in range(lines):
        line = f"{who} {seq:06d} ".encode() + who.encode() * (20 + seq % 50) + b"\n"
        assert os.write(fd, line) == len(line)
        if seq % 37 == 36:
            os.fsync(fd)
finally:
    os.close(fd)
print("done", flush=True)
"""

_LINE = re.compile(rb"^([AB]) (\d{6}) ([AB]+)$")


def _check_log(where: str, data: bytes) -> None:
    assert data.endswith(b"\n"), f"{where}: the log does not end with a complete line ({data[-60:]!r})"
    lines = data.split(b"\n")[:-1]
    assert lines[0] == b"log start", f"{where}: the first line is {lines[0][:60]!r}"
    seen: dict[bytes, list[int]] = {b"A": [], b"B": []}
    bad = []
    for number, line in enumerate(lines[1:], start=2):
        match = _LINE.match(line)
        if (not match or set(match.group(3)) != {match.group(1)[0]}
                or len(match.group(3)) != 20 + int(match.group(2)) % 50):
            nul = line.count(0)
            shown = line.lstrip(b"\0")[:40]
            bad.append(f"line {number}: " + (f"{nul} NUL bytes, then " if nul else "") + repr(shown))
            continue
        seen[match.group(1)].append(int(match.group(2)))
    assert not bad, (f"{where}: {len(lines) - 1} appended lines (expected {2 * LINES}), {len(bad)} of them "
                     f"mangled or interleaved ({data.count(0)} NUL bytes in the file), first: {bad[:3]}")
    for who, seqs in seen.items():
        assert seqs == list(range(LINES)), (
            f"{where}: process {who.decode()} has {len(seqs)} lines, expected {LINES} in order "
            f"(first out of place: {next((s for i, s in enumerate(seqs) if s != i), None)})")
    assert len(lines) == 1 + 2 * LINES


@pytest.mark.slow
def test_two_processes_append_to_one_log(s3, mount):
    m = mount("test:", *ARGS)
    log = m.path / "app.log"
    log.write_bytes(b"log start\n")
    flush(m.path)
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(log), who, str(LINES)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for who in "AB"]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0 and out.strip() == "done", f"appender failed ({p.returncode}): {err}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    data = read_all(log)
    _check_log("live mount", data)
    m2 = check_three_ways(s3, mount, m, {"app.log": data}, *ARGS)
    _check_log("fresh mount", read_all(m2.path / "app.log"))
