"""End to end: ``D/.zip/FOLDER.zip``, a stored zip of a folder, read by unzip and Python's zipfile."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import zipfile
import zlib

import pytest

pytestmark = pytest.mark.fuse


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)


def gets(s3) -> list:
    return [r for r in s3.server.stats.records() if r.op == "GET"]


def tree(seed: int = 0) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {f"photos/{i:02d}.jpg": rng.randbytes(rng.randrange(1, 40_000)) for i in range(12)}
    files.update({"photos/raw/a.cr2": rng.randbytes(300_000), "photos/raw/deeper/b c.txt": b"spaces and all\n",
                  "photos/ünï.txt": "unicode name\n".encode(), "photos/empty": b"", "other/x.txt": b"not in it"})
    return files


def test_zip_of_a_folder_passes_unzip_and_zipfile(s3, mount, tmp_path):
    files = tree()
    for key, data in files.items():
        s3.put(key, data)
    m = mount("test:", "--block-size", "1M")
    view = m.path / ".zip" / "photos.zip"
    s3.reset_stats()
    size = view.stat().st_size  # the size needs listings only, no byte of any file
    assert gets(s3) == []
    assert size > sum(len(v) for k, v in files.items() if k.startswith("photos/"))
    assert oct(view.stat().st_mode & 0o777) == "0o444"

    test = run("unzip", "-t", view)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "No errors detected" in test.stdout
    listing = run(sys.executable, "-m", "zipfile", "-l", view, check=True).stdout
    members = {k[len("photos/"):]: v for k, v in files.items() if k.startswith("photos/")}
    for name in members:
        assert name in listing
    with zipfile.ZipFile(view) as z:
        assert sorted(z.namelist()) == sorted(members)
        for name, data in members.items():
            assert z.read(name) == data
    out = tmp_path / "out"
    run("unzip", "-q", view, "-d", out, check=True)
    for name, data in members.items():
        assert (out / name).read_bytes() == data
    # Every member was fetched once; its CRC pass filled the block cache for the rest.
    fetched = {r.key for r in gets(s3)}
    assert fetched == {f"photos/{n}" for n, d in members.items() if d}
    assert len(gets(s3)) == len(fetched)


def test_zip_reads_at_any_offset_and_cp_copies_it(s3, mount, tmp_path):
    files = tree(1)
    for key, data in files.items():
        s3.put(key, data)
    m = mount("test:", "--block-size", "1M")
    view = m.path / "photos" / ".zip" / "raw.zip"  # relative to the folder holding .zip
    copy = tmp_path / "raw.zip"
    run("cp", view, copy, check=True)
    whole = copy.read_bytes()
    assert len(whole) == view.stat().st_size
    with zipfile.ZipFile(copy) as z:
        assert z.read("a.cr2") == files["photos/raw/a.cr2"]
        assert z.read("deeper/b c.txt") == b"spaces and all\n"
        assert z.getinfo("a.cr2").CRC == zlib.crc32(files["photos/raw/a.cr2"])
    with open(view, "rb") as f:
        for offset in (0, 29, 31, 1000, len(whole) // 2, len(whole) - 22, len(whole) - 1):
            assert os.pread(f.fileno(), 4096, offset) == whole[offset:offset + 4096]
    # The whole mount and a folder given with escapes.
    root = m.path / ".zip" / "..zip"
    with zipfile.ZipFile(root) as z:
        assert "other/x.txt" in z.namelist() and "photos/raw/a.cr2" in z.namelist()
    with zipfile.ZipFile(m.path / ".zip" / "photos%2Fraw%2Fdeeper.zip") as z:
        assert z.namelist() == ["b c.txt"]


def test_zip_errors_and_pending_files(s3, mount):
    s3.put("d/a.txt", b"remote\n")
    s3.put("file.txt", b"x")
    m = mount("test:", "--write-back-delay", "60")
    (m.path / "d" / "new.txt").write_bytes(b"pending\n")  # not uploaded yet: in the zip all the same
    with zipfile.ZipFile(m.path / ".zip" / "d.zip") as z:
        assert z.read("new.txt") == b"pending\n"
        assert z.read("a.txt") == b"remote\n"
    cases = {"missing.zip": errno.ENOENT, "file.txt.zip": errno.ENOTDIR, "d": errno.EINVAL,
             "..%2Fup.zip": errno.EACCES, ".concat.zip": errno.EINVAL}
    for name, expected in cases.items():
        with pytest.raises(OSError) as caught:
            (m.path / ".zip" / name).stat()
        assert caught.value.errno == expected, (name, caught.value)
    with pytest.raises(OSError) as caught:
        (m.path / ".zip" / "d.zip").write_bytes(b"no")
    assert caught.value.errno in (errno.EROFS, errno.EACCES)
    assert ".zip" not in os.listdir(m.path)
    assert os.listdir(m.path / ".zip") == []


def test_zip_dir_can_be_renamed_or_turned_off(s3, mount):
    s3.put("d/a.txt", b"a")
    s3.put(".zip/real.txt", b"a real object")
    m = mount("test:", "-o", "zip_dir=off")
    assert (m.path / ".zip" / "real.txt").read_bytes() == b"a real object"
    m2 = mount("test:", "-o", "zip_dir=.gzip", cache_dir=m.cache_dir.parent / "cache2")
    with zipfile.ZipFile(m2.path / ".gzip" / "d.zip") as z:
        assert z.read("a.txt") == b"a"
