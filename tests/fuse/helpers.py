"""Small helpers shared by the FUSE integrity and program tests.

Each check is made three ways where it makes sense: on the live mount, in the
bucket after a flush (byte for byte), and through a fresh mount whose cache is
empty (so nothing can be answered from what the first daemon kept locally).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import BUCKET

KiB = 1024
MiB = 1024 * KiB


def require_program(name: str) -> str:
    """The program's path; a missing one fails in CI (CI=true) and skips elsewhere."""
    found = shutil.which(name)
    if found:
        return found
    reason = f"{name} is not installed (apt-get install {name})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}: required in CI")
    pytest.skip(reason)


def run(cmd: list[str], *, cwd: Path | str | None = None, timeout: float = 120, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a program; on failure the assertion shows its exit code and both outputs."""
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited with {result.returncode}\n"
                             f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}")
    return result


def flush(mnt: Path) -> None:
    """Wait until every pending upload of the mount is durable (the .gstore/flush control file)."""
    with open(mnt / ".gstore" / "flush", "rb") as f:
        verdict = json.loads(f.read() or b"{}")
    assert not verdict.get("failed"), f"flush reported failed uploads: {verdict}"


def keys(s3, prefix: str = "") -> list[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def bucket_files(s3, prefix: str = "") -> dict[str, bytes]:
    """Every object under ``prefix`` (folder markers left out), by key relative to it."""
    return {k[len(prefix):]: s3.get(k) for k in keys(s3, prefix) if not k.endswith("/")}


def read_all(path: Path) -> bytes:
    """The file's bytes, not from the kernel page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = bytearray()
        while chunk := os.read(fd, MiB):
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def tree_files(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` by relative path (the .gstore control folder left out)."""
    found: dict[str, bytes] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not (Path(folder) == root and d == ".gstore"))
        for name in files:
            path = Path(folder) / name
            found[str(path.relative_to(root))] = read_all(path)
    return found


def describe(data: bytes | None) -> str:
    if data is None:
        return "absent"
    head = data[:40]
    return f"{len(data)} bytes {head!r}{'...' if len(data) > 40 else ''}"


def assert_files(where: str, actual: dict[str, bytes | None], expected: dict[str, bytes | None]) -> None:
    """Compare name -> bytes (None: must not exist), with one readable line per difference."""
    problems = []
    for name in sorted(set(actual) | set(expected)):
        got, want = actual.get(name), expected.get(name)
        if got == want:
            continue
        line = f"  {name}: expected {describe(want)}, got {describe(got)}"
        if got is not None and want is not None:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            line += (f"; first difference at offset {at}: "
                     f"expected {want[at:at + 16]!r}, got {got[at:at + 16]!r}")
        problems.append(line)
    assert not problems, f"{where}:\n" + "\n".join(problems)


def live_files(mnt: Path, names: list[str]) -> dict[str, bytes | None]:
    """Each name's bytes on the mount (None if it does not exist), read past the page cache."""
    out: dict[str, bytes | None] = {}
    for name in names:
        path = mnt / name
        try:
            data = read_all(path)
        except FileNotFoundError:
            out[name] = None
            continue
        size = os.stat(path).st_size
        assert size == len(data), f"{name}: stat says {size} bytes, reading gave {len(data)}"
        out[name] = data
    return out


def fresh_mount(mount, old, *args: str):
    """Stop ``old`` (by PID) and mount again with a new, empty cache directory."""
    old.stop()
    cache = Path(tempfile.mkdtemp(prefix="fresh-cache-", dir=old.cache_dir.parent))
    return mount("test:", *args, cache_dir=cache)


def check_three_ways(s3, mount, m, expected: dict[str, bytes | None], *args: str):
    """``expected`` (name -> bytes, None for absent) holds on the live mount, in the bucket
    after a flush and on a fresh mount with an empty cache. Returns the fresh mount."""
    names = sorted(expected)
    assert_files("live mount", live_files(m.path, names), expected)
    flush(m.path)
    present = set(keys(s3))
    in_bucket = {name: (s3.get(name) if name in present else None) for name in names}
    assert_files("bucket after flush", in_bucket, expected)
    m2 = fresh_mount(mount, m, *args)
    assert_files("fresh mount with an empty cache", live_files(m2.path, names), expected)
    return m2


_JOURNAL_ERROR = re.compile(r"^.*\bERROR\b.*$", re.M)


def journal_errors(log: str) -> list[str]:
    """ERROR lines of a daemon log that are about staging/journal records."""
    return [line for line in _JOURNAL_ERROR.findall(log)
            if re.search(r"staging|journal|record", line, re.I)]


def error_lines(log: str) -> list[str]:
    return _JOURNAL_ERROR.findall(log)
