"""End to end: ``gstore refresh`` and ``MNT/.gstore/refresh`` make changes made behind the mount's back
visible at once, with TTLs long enough that nothing else would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.fuse

LONG_TTLS = ("--attr-ttl", "3600", "--dir-cache-ttl", "3600", "--negative-ttl", "3600")


def gstore(*args) -> subprocess.CompletedProcess:
    code = "import sys; from gstore.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=60)


def test_refresh_shows_objects_changed_behind_the_mounts_back(s3, mount):
    s3.put("d/a.txt", b"old")
    s3.put("d/gone.txt", b"soon deleted")
    m = mount("test:", *LONG_TTLS)
    d = m.path / "d"
    assert (d / "a.txt").read_bytes() == b"old"
    assert sorted(os.listdir(d)) == ["a.txt", "gone.txt"]
    assert not (d / "new.txt").exists()  # remembered as missing (negative entry, kernel and daemon)

    s3.put("d/a.txt", b"new content")
    s3.put("d/new.txt", b"hello")
    # The mount still trusts what it saw: a stale size, a stale "missing".
    assert (d / "a.txt").stat().st_size == 3
    assert not (d / "new.txt").exists()

    out = gstore("refresh", d / "a.txt", d / "new.txt")
    assert out.returncode == 0, out.stderr
    assert (d / "a.txt").stat().st_size == len(b"new content")
    assert (d / "a.txt").read_bytes() == b"new content"
    assert (d / "new.txt").read_bytes() == b"hello"

    # A folder, through the control file as a script would write it: everything below it.
    assert sorted(os.listdir(d)) == ["a.txt", "gone.txt", "new.txt"]  # listed again, remembered again
    s3.client.delete_object(Bucket=s3.bucket, Key="d/gone.txt")
    s3.put("d/sub/deep.txt", b"deep")
    s3.put("d/a.txt", b"third version")
    assert "gone.txt" in os.listdir(d)
    subprocess.run(["sh", "-c", f"echo d > '{m.path}/.gstore/refresh'"], check=True)
    assert sorted(os.listdir(d)) == ["a.txt", "new.txt", "sub"]
    assert (d / "sub" / "deep.txt").read_bytes() == b"deep"
    assert (d / "a.txt").read_bytes() == b"third version"

    # The whole mount.
    assert "top.txt" not in os.listdir(m.path)
    s3.put("top.txt", b"top")
    s3.put("d/a.txt", b"fourth")
    assert "top.txt" not in os.listdir(m.path)
    assert gstore("refresh", m.path).returncode == 0
    assert "top.txt" in os.listdir(m.path)
    assert (m.path / "top.txt").read_bytes() == b"top"
    assert (d / "a.txt").read_bytes() == b"fourth"


def test_refresh_never_drops_pending_writes(s3, mount):
    s3.put("p.txt", b"remote")
    m = mount("test:", "--write-back-delay", "60", *LONG_TTLS)
    (m.path / "p.txt").write_bytes(b"local, not uploaded yet")
    s3.put("p.txt", b"changed remotely")
    assert gstore("refresh", m.path / "p.txt").returncode == 0
    assert (m.path / "p.txt").read_bytes() == b"local, not uploaded yet"
    gstore("flush", m.path)  # its exit status reports the conflict; the policy decides where our bytes go
    names = {o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket).get("Contents", [])}
    uploaded = [s3.get(k) for k in names if k.startswith("p.txt")]
    assert b"local, not uploaded yet" in uploaded  # kept, whatever the policy did with the other


def test_refresh_verdict_and_errors(s3, mount, tmp_path):
    s3.put("a.txt", b"a")
    m = mount("test:")
    fd = os.open(m.path / ".gstore" / "refresh", os.O_RDWR)
    try:
        os.write(fd, b"a.txt\n../outside\n.gstore/status.json\n.concat/a.txt+a.txt\n")
        verdict = json.loads(os.pread(fd, 65536, 0))
    finally:
        os.close(fd)
    assert verdict["ok"] is False
    assert verdict["refreshed"] == ["a.txt"]
    assert len(verdict["errors"]) == 3
    out = gstore("refresh", tmp_path)
    assert out.returncode == 2 and "not on a gstore mount" in out.stderr
    # Reading it without writing refreshes nothing.
    assert json.loads((m.path / ".gstore" / "refresh").read_bytes()) == {"ok": True, "refreshed": [], "errors": []}
