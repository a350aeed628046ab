"""The mount's boundary, file modes, and secrets, checked on a real mount.

* a mount of ``bucket/pfx`` never sends a request for a key outside ``pfx/``,
  whatever odd keys the bucket holds (``../x``, ``a/../../b``, ``//``,
  absolute-looking keys);
* the cache tree is 0700 (directories) and 0600 (files);
* credentials from the config never appear in the log (even at DEBUG), in
  status.json, or in error messages; a config file with credentials that other
  users can read gets a warning;
* allow_other is off unless asked for, and then default_permissions is on.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gstore.fuse_ops import mount_options

pytestmark = pytest.mark.fuse

ODD_KEYS = ["pfx/../x", "pfx/a/../../b", "pfx//c", "pfx/./d", "pfx/a/./e", "/abs", "pfx/ok.txt",
            "pfx/sub/in.txt", "outside.txt", "pfxother/z", "pfx/..", "pfx/.", "pfx/sub/../../../esc"]
SECRETS = ("testing-secret-value", "testing-key-id")


def test_prefix_is_a_hard_boundary_for_odd_keys(s3, mount):
    stored = []
    for key in ODD_KEYS:
        try:
            s3.put(key, f"content of {key}".encode())
            stored.append(key)
        except Exception:  # noqa: BLE001 - the client or server may refuse some of them
            pass
    assert "pfx/ok.txt" in stored
    m = mount("test:", root="test-bucket/pfx")
    s3.reset_stats()
    seen = []
    for dirpath, dirnames, filenames in os.walk(m.path):
        rel = os.path.relpath(dirpath, m.path)
        for name in dirnames + filenames:
            assert name not in (".", "..", "") and "/" not in name
            seen.append(os.path.normpath(os.path.join(rel, name)))
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                data = f.read()
            key = "pfx/" + os.path.normpath(os.path.join(rel, name))
            assert data == f"content of {key}".encode(), key  # each file shows its own key's bytes
    assert "ok.txt" in seen and "sub/in.txt" in seen
    assert not any(s.startswith("..") or "outside" in s or s.startswith("/") for s in seen), seen
    # Names that would climb out are refused by the kernel or by gstore, never sent as keys.
    for bad in ("../outside.txt", "a/../../outside.txt", "sub/../../outside.txt"):
        assert not (m.path / bad).resolve().is_relative_to(m.path) or not (m.path / bad).exists()
    for record in s3.server.stats.records():
        key = record.key or ""
        prefix = record.prefix or ""
        if record.op in ("GET", "HEAD", "PUT", "DELETE") and key:
            assert key.startswith("pfx/"), (record.op, key)
            assert "/../" not in "/" + key + "/" or key in stored, key
        if prefix:
            assert prefix.startswith("pfx/"), prefix


def test_cache_modes_and_no_secret_anywhere(s3, mount, tmp_path):
    s3.put("r.bin", os.urandom(300_000))
    m = mount("test:", "--block-size", "64K", "--write-back-delay", "3600")
    assert (m.path / "r.bin").read_bytes()
    (m.path / "w.txt").write_text("pending\n")
    with pytest.raises(OSError):
        open(m.path / "missing" / "x", "rb")
    status_text = (m.path / ".gstore" / "status.json").read_text()
    json.loads(status_text)
    checked = 0
    for root, dirs, files in os.walk(m.cache_dir):
        for d in dirs:
            mode = stat.S_IMODE(os.lstat(os.path.join(root, d)).st_mode)
            assert mode == 0o700, (os.path.join(root, d), oct(mode))
            checked += 1
        for f in files:
            if f.endswith(".log"):
                continue
            mode = stat.S_IMODE(os.lstat(os.path.join(root, f)).st_mode)
            assert mode == 0o600, (os.path.join(root, f), oct(mode))
            checked += 1
    assert checked >= 5
    assert stat.S_IMODE(os.stat(m.cache_dir).st_mode) == 0o700
    m.stop()
    log = m.log()
    assert "DEBUG" in log  # the most talkative level, and still
    for secret in SECRETS:
        assert secret not in log, secret
        assert secret not in status_text, secret
    # The test config is world-readable and holds credentials: the user was told.
    assert "chmod 600" in log


def test_allow_other_off_and_default_permissions_on_by_default(s3, mount):
    """Other users get nothing unless allow_other; the kernel checks the stored modes and
    owners unless --no-default-permissions says otherwise (then it must not)."""
    m = mount("test:")
    with open("/proc/self/mounts") as f:
        line = next(line for line in f if f" {m.path} " in line)
    options = line.split()[3].split(",")
    assert "allow_other" not in options, options
    assert "default_permissions" in options, options
    assert "default_permissions" in mount_options(fsname="x", read_only=False, allow_other=True,
                                                  default_permissions=True)
    assert "default_permissions" not in mount_options(fsname="x", read_only=False, allow_other=True,
                                                      default_permissions=False)
    docs = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    assert "allow_other" in docs and "default_permissions" in docs
