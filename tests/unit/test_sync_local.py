"""``gstore sync`` between local folders: decisions, copies, deletes, exit status (mounts: tests/fuse/test_sync.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gstore.sync import sync


def make(root: Path, files: dict[str, bytes], mtime: int = 1_700_000_000) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (mtime, mtime))


def contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def quiet_sync(src: Path, dst: Path, **kwargs) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = sync(str(src), str(dst), out=lines.append, progress=False, **kwargs)
    return code, lines


def test_first_sync_copies_everything_with_mode_and_mtime(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make(src, {"a.txt": b"a", "d/b.bin": b"b" * 5119, "d/e/c": b""})
    (src / "empty-dir").mkdir()
    os.chmod(src / "a.txt", 0o600)
    code, lines = quiet_sync(src, dst)
    assert code == 0
    assert contents(dst) == contents(src)
    assert (dst / "empty-dir").is_dir()
    assert (dst / "a.txt").stat().st_mode & 0o777 == 0o600
    assert (dst / "d/b.bin").stat().st_mtime == 1_700_000_000
    assert "3 files checked: 3 copied (5.0 KiB), 0 up to date, 0 deleted, 0 failed" in lines[-1]
    assert not [p for p in dst.rglob("*gstore-sync*")]  # no temporary file left


@pytest.mark.parametrize("skip_if, copied", [
    (None, {"size.txt", "mtime.txt"}),  # quick check: size or mtime differ
    ("size", {"size.txt"}),
    ("exists", set()),
    ("md5", {"size.txt", "content.txt"}),
    ("newer", {"mtime.txt"}),
])
def test_skip_modes(tmp_path, skip_if, copied):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make(src, {"same.txt": b"same", "size.txt": b"longer", "mtime.txt": b"abc", "content.txt": b"new"})
    make(dst, {"same.txt": b"same", "size.txt": b"short", "content.txt": b"old"})
    make(dst, {"mtime.txt": b"abc"}, mtime=1_600_000_000)  # older than the source
    code, lines = quiet_sync(src, dst, skip_if=skip_if, verbose=True)
    assert code == 0
    assert {line.split()[1] for line in lines if line.startswith("copied ")} == copied
    for rel in copied:
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()
    if skip_if == "md5":  # a file left alone is left alone: its time too (on S3 a new time is a COPY)
        assert (dst / "mtime.txt").stat().st_mtime == 1_600_000_000


def test_dry_run_changes_nothing_and_delete_removes_extras(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make(src, {"keep.txt": b"k", "new.txt": b"n"})
    make(dst, {"keep.txt": b"k", "old.txt": b"o", "olddir/x/y.txt": b"y"})
    before = contents(dst)
    code, lines = quiet_sync(src, dst, delete=True, dry_run=True)
    assert code == 0 and contents(dst) == before
    assert "would copy new.txt (1 bytes)" in lines
    assert {"would delete old.txt", "would delete olddir/x/y.txt", "would delete olddir/x/", "would delete olddir/"} <= set(lines)
    code, lines = quiet_sync(src, dst, delete=True)
    assert code == 0
    assert contents(dst) == contents(src)
    assert sorted(os.listdir(dst)) == ["keep.txt", "new.txt"]
    # Without --delete nothing goes.
    make(dst, {"extra.txt": b"e"})
    assert quiet_sync(src, dst)[0] == 0 and (dst / "extra.txt").exists()


def test_failures_give_exit_status_1_and_the_rest_is_copied(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make(src, {"ok.txt": b"fine", "clash": b"a file here"})
    (dst / "clash").mkdir(parents=True)  # a folder where the file should go
    code, _ = quiet_sync(src, dst, jobs=2)
    assert code == 1
    assert (dst / "ok.txt").read_bytes() == b"fine"


def test_single_file_and_usage_errors(tmp_path):
    src = tmp_path / "one.txt"
    src.write_bytes(b"one")
    (tmp_path / "folder").mkdir()
    assert quiet_sync(src, tmp_path / "folder")[0] == 0
    assert (tmp_path / "folder" / "one.txt").read_bytes() == b"one"
    assert quiet_sync(src, tmp_path / "renamed.txt")[0] == 0
    assert (tmp_path / "renamed.txt").read_bytes() == b"one"
    assert quiet_sync(tmp_path / "missing", tmp_path / "x")[0] == 2
    assert quiet_sync(tmp_path, tmp_path / "folder")[0] == 2  # overlapping trees


def test_command_line(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make(src, {"a": b"a"})
    code = "import sys; from gstore.cli import main; sys.exit(main())"
    out = subprocess.run([sys.executable, "-c", code, "sync", str(src), str(dst), "--skip-if", "md5", "-j", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "1 copied" in out.stdout
    assert out.stderr == ""  # no progress line: stderr is not a terminal
    bad = subprocess.run([sys.executable, "-c", code, "sync", str(src), str(dst), "--skip-if", "sha1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2


def test_progress_line_only_when_asked(tmp_path, capsys):
    import threading

    from gstore.sync import Progress, Totals

    totals = Totals(checked=3, to_check=10, copied=2, bytes_copied=2048)
    shown = threading.Event()
    with Progress(totals, True) as progress:
        while not shown.wait(0.05):  # until the first line is out (no timing asserted)
            shown.set() if progress._width else None
    err = capsys.readouterr().err
    assert "3/10 checked, 2 copied (2.0 KiB), 0 deleted, 0 failed" in err
    assert err.endswith("\r")  # the line is cleared at the end
    with Progress(totals, False):
        pass
    assert capsys.readouterr().err == ""
