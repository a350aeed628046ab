"""POSIX attributes and the writer id as S3 user metadata (gstore.backends.objectmeta).

* What ``encode`` writes, ``decode`` and ``writer`` read back, under the names
  s3fs-fuse uses (and ``gstore-staged`` for the writer), whatever the key case.
* Reading is lenient: values other tools wrote that do not parse are ignored.
* The 2 KiB limit counts the writer id: attributes that fit without it but not
  with it are refused when set, not when the upload is sent.
"""

from __future__ import annotations

import errno
import stat

import pytest

from gstore.backends import objectmeta
from gstore.backends.objectmeta import PosixMeta


def test_attributes_and_writer_round_trip() -> None:
    meta = PosixMeta(mode=stat.S_IFREG | 0o640, uid=1000, gid=100, mtime=1700000000.25, ctime=1700000001.5,
                     atime=1700000002.0, xattrs=(("user.color", b"blue"), ("user.raw", bytes(range(8)))))
    stored = objectmeta.encode(meta, writer="0123456789abcdef01234567")
    assert stored["mode"] == str(stat.S_IFREG | 0o640) and stored["mtime"] == "1700000000.25"
    assert stored[objectmeta.WRITER] == "0123456789abcdef01234567"
    assert objectmeta.decode(stored) == meta
    # S3 returns user metadata keys in lower case; other stores may not.
    assert objectmeta.writer({"Gstore-Staged": "abc"}) == "abc"
    assert objectmeta.writer({"mode": "33188"}) is None
    assert objectmeta.writer(None) is None
    assert objectmeta.WRITER in objectmeta.MANAGED


def test_values_that_do_not_parse_are_ignored() -> None:
    meta = objectmeta.decode({"mode": "rwxr-xr-x", "uid": "-", "mtime": "nan", "xattr": "%7Bnot json"})
    assert meta == PosixMeta()
    assert objectmeta.decode({"mode": "420"}).mode == stat.S_IFREG | 0o644, "permission bits only: a file"


def test_the_size_limit_counts_the_writer_id() -> None:
    writer = "f" * 24
    room = objectmeta.USER_METADATA_LIMIT - len("xattr")
    # An xattr table exactly at the limit without the writer id...
    value = b"x"
    while len(objectmeta.encode(PosixMeta(xattrs=(("user.v", value),)))["xattr"]) < room:
        value += b"x"
    while len(objectmeta.encode(PosixMeta(xattrs=(("user.v", value),)))["xattr"]) > room:
        value = value[:-1]
    fits = PosixMeta(xattrs=(("user.v", value),))
    objectmeta.encode(fits)
    # ...is refused once the writer id is counted, as set_attributes checks it.
    with pytest.raises(OSError) as caught:
        objectmeta.encode(fits, writer=writer)
    assert caught.value.errno == errno.E2BIG
