"""The request format of ``MNT/.gstore/copy`` (the copy itself is tested on real mounts:
tests/fuse/test_sync.py)."""

from __future__ import annotations

import pytest

from gstore.vfs.server_copy import CopyRequest, parse_copy_request


@pytest.mark.parametrize(("raw", "expected"), [
    (b"a/b.txt\0c/d.txt", CopyRequest("a/b.txt", "c/d.txt", None)),
    (b"/a/b.txt/\0./c/d.txt\n", CopyRequest("a/b.txt", "c/d.txt", None)),
    (b"a\0b\0absent", CopyRequest("a", "b", "")),
    (b'a\0b\0etag:"0123abcd"', CopyRequest("a", "b", "0123abcd")),
    ("caf\u00e9\0x".encode(), CopyRequest("caf\u00e9", "x", None)),
])
def test_requests_that_parse(raw: bytes, expected: CopyRequest) -> None:
    assert parse_copy_request(raw) == expected


@pytest.mark.parametrize("raw", [
    b"", b"only-one", b"a\0b\0c\0d", b"a\0b\0etag:", b"a\0b\0maybe", b"a\0a", b".\0b", b"a\0",
    b"a\0../b", b"../a\0b", b"a\0.gstore/status.json", b".gstore/flush\0b",
])
def test_requests_that_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_copy_request(raw)
