"""Unit tests of gstore.virtual.content_type and gstore.virtual.versions."""

from __future__ import annotations

import errno
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

import gstore.virtual as virtual
from gstore.errors import to_errno
from gstore.virtual.content_type import guess_mimetype, is_generic, md5_from_etag
from gstore.virtual.versions import (
    ObjectVersion,
    VersionNotFoundError,
    VersionTable,
    format_version_time,
    parse_alias,
    version_hash,
    version_name,
)

# -- content types -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("index.m3u8", "application/vnd.apple.mpegurl"),
        ("hls/seg0.ts", "video/mp2t"),
        ("movie.mkv", "video/x-matroska"),
        ("clip.webm", "video/webm"),
        ("README.md", "text/markdown"),
        ("pyproject.toml", "application/toml"),
        ("config.yaml", "application/yaml"),
        ("config.YML", "application/yaml"),
        ("data.parquet", "application/vnd.apache.parquet"),
        ("a.txt", "text/plain"),
        ("photo.JPG", "image/jpeg"),
        ("page.html", "text/html"),
        ("doc.pdf", "application/pdf"),
        ("video.mp4", "video/mp4"),
        ("backup.tar.gz", "application/gzip"),
        ("old.Z", "application/x-compress"),
        ("noext", "application/octet-stream"),
        (".bashrc", "application/octet-stream"),
        ("dir.d/file", "application/octet-stream"),
        ("weird.xyzzy", "application/octet-stream"),
        ("data:x.png", "image/png"),  # not taken for a data: URL
        ("trailingdot.", "application/octet-stream"),
    ],
)
def test_guess_from_name(name, expected):
    assert guess_mimetype(name, None) == expected
    assert guess_mimetype(name, "binary/octet-stream") == expected
    assert guess_mimetype(name, "application/octet-stream") == expected
    assert guess_mimetype(name, "") == expected


def test_specific_content_type_wins():
    assert guess_mimetype("a.txt", "application/json") == "application/json"
    assert guess_mimetype("noext", "text/csv; charset=utf-8") == "text/csv; charset=utf-8"
    assert guess_mimetype("a.ts", " video/MP2T ") == "video/MP2T"


def test_generic_content_types():
    for value in [
        None,
        "",
        "  ",
        "binary/octet-stream",
        "Application/Octet-Stream",
        "application/octet-stream; x=1",
    ]:
        assert is_generic(value), value
    assert not is_generic("text/plain")


@given(st.text(max_size=30), st.one_of(st.none(), st.text(max_size=20)))
def test_guess_never_fails(name, content_type):
    result = guess_mimetype(name, content_type)
    assert isinstance(result, str) and result.strip() != ""


def test_md5_from_etag():
    md5 = "9e107d9d372bb6826bd81d3542a419d6"
    assert md5_from_etag(md5) == md5
    assert md5_from_etag(f'"{md5}"') == md5
    assert md5_from_etag(f'W/"{md5.upper()}"') == md5
    assert md5_from_etag(md5, sse="AES256") == md5
    assert md5_from_etag(f"{md5}-3") is None  # multipart
    assert md5_from_etag(f'"{md5}-12"') is None
    assert md5_from_etag(md5, sse="aws:kms") is None
    assert md5_from_etag(md5, sse="aws:kms:dsse") is None
    assert md5_from_etag(md5, sse_customer_algorithm="AES256") is None
    assert md5_from_etag(None) is None
    assert md5_from_etag("") is None
    assert md5_from_etag(md5[:-1]) is None
    assert md5_from_etag(md5 + "0") is None
    assert md5_from_etag("g" * 32) is None


# -- versions ----------------------------------------------------------------------

T0 = datetime(2026, 11, 21, 10, 15, 2, 123456, tzinfo=timezone.utc)


def v(vid: str | None, seconds: float, **kw) -> ObjectVersion:
    return ObjectVersion(vid, T0 + timedelta(seconds=seconds), kw.pop("size", 10), **kw)


def test_name_format():
    version = v("3HL4kqtJvjVBH40Nr8X8gdRQBpUMLUo", 0)
    name = version_name(version)
    assert name == "20261121T101502.123Z_" + version_hash("3HL4kqtJvjVBH40Nr8X8gdRQBpUMLUo")
    assert len(name.split("_")[1]) == 8
    assert (
        format_version_time(datetime(2026, 1, 2, 3, 4, 5, 999999)) == "20260102T030405.999Z"
    )  # naive = UTC
    east = timezone(timedelta(hours=2))
    assert format_version_time(datetime(2026, 1, 2, 1, 0, 0, tzinfo=east)) == "20260101T230000.000Z"
    assert version_hash(None) == version_hash("null")


def test_table_order_names_and_aliases():
    versions = [
        v("c", 20, is_latest=True),
        v("b", 10),
        v("a", 0),
    ]
    table = VersionTable(versions)
    assert [e.version.version_id for e in table.entries] == ["c", "b", "a"]
    assert [e.alias for e in table.entries] == ["-1", "-2", "-3"]
    names = table.names()
    assert names == sorted(names)
    assert [table.resolve(n).version.version_id for n in names] == ["a", "b", "c"]  # time order
    assert table.resolve("-1").version.version_id == "c"
    assert table.resolve("-2").version.version_id == "b"
    assert table.resolve("-3").version.version_id == "a"
    assert table.newest is not None and table.newest.version.version_id == "c"
    assert len(table) == 3 and bool(table)


def test_input_order_does_not_matter_for_distinct_times():
    versions = [v("a", 0), v("c", 20, is_latest=True), v("b", 10)]
    assert [e.version.version_id for e in VersionTable(versions)] == ["c", "b", "a"]


def test_equal_timestamps():
    # S3 lists a key's versions newest first; equal times keep that order,
    # except that IsLatest is always the newest.
    versions = [v("new", 0), v("mid", 0), v("old", 0)]
    table = VersionTable(versions)
    assert [e.version.version_id for e in table] == ["new", "mid", "old"]
    assert len(set(table.names())) == 3
    flagged = VersionTable([v("x", 0), v("y", 0, is_latest=True)])
    assert flagged.resolve("-1").version.version_id == "y"


def test_delete_markers_excluded():
    versions = [
        v("dm", 30, is_latest=True, is_delete_marker=True, size=0),
        v("b", 20),
        v("dm0", 15, is_delete_marker=True, size=0),
        v("a", 10),
    ]
    table = VersionTable(versions)
    assert [e.version.version_id for e in table] == ["b", "a"]
    assert table.resolve("-1").version.version_id == "b"  # deleted file still recoverable
    assert len(table.names()) == 2
    empty = VersionTable([v("dm", 0, is_delete_marker=True)])
    assert not empty and empty.names() == [] and empty.newest is None
    with pytest.raises(VersionNotFoundError):
        empty.resolve("-1")


def test_unversioned_object():
    table = VersionTable([v(None, 0, is_latest=True)])
    (name,) = table.names()
    assert name.endswith("_" + version_hash("null"))
    assert table.resolve("null").version.version_id is None
    assert table.resolve("-1") is table.resolve(name)


def test_raw_version_id_and_duplicates():
    table = VersionTable([v("abc", 10), v("abc", 5), v("def", 0)])
    assert len(table) == 2
    assert table.resolve("abc").version.last_modified == T0 + timedelta(seconds=10)
    assert table.resolve("def").alias == "-2"


@pytest.mark.parametrize("name", ["-0", "-01", "1", "+1", "-4", "--1", "-1.0", "", "nope", "-1 "])
def test_unknown_names_are_enoent(name):
    table = VersionTable([v("a", 0), v("b", 1), v("c", 2)])
    with pytest.raises(VersionNotFoundError) as info:
        table.resolve(name)
    assert info.value.errno == errno.ENOENT
    assert to_errno(info.value) == errno.ENOENT


def test_parse_alias():
    assert parse_alias("-1") == 1
    assert parse_alias("-25") == 25
    for bad in ["-0", "-01", "1", "-", "-1a", "\u22121"]:  # minus sign
        assert parse_alias(bad) is None


def test_names_are_stable_when_versions_are_added():
    base = [v("b", 10), v("a", 0)]
    before = {e.version.version_id: e.name for e in VersionTable(base)}
    after = {
        e.version.version_id: e.name for e in VersionTable([v("c", 20, is_latest=True), *base])
    }
    assert all(after[vid] == name for vid, name in before.items())
    # ...but the aliases move: -1 is now c.
    assert VersionTable([v("c", 20), *base]).resolve("-2").version.version_id == "b"


def test_hash_collisions_get_longer_names(monkeypatch):
    import gstore.virtual.versions as versions_module

    real = versions_module.version_hash

    def fake(version_id, length=8):
        return "00000000" if length == 8 else real(version_id, length)

    monkeypatch.setattr(versions_module, "version_hash", fake)
    table = VersionTable([v("x", 0), v("y", 0), v("z", 5)])
    names = table.names()
    assert len(set(names)) == 3
    by_vid = {e.version.version_id: e.name for e in table}
    assert by_vid["z"].endswith("_00000000")  # no collision at its own time
    assert len(by_vid["x"].split("_")[1]) == 16 and len(by_vid["y"].split("_")[1]) == 16


@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=6), st.integers(0, 5), st.booleans()),
        max_size=12,
    )
)
def test_table_properties(raw):
    versions = [
        ObjectVersion(vid, T0 + timedelta(milliseconds=ms), 1, is_delete_marker=dm)
        for vid, ms, dm in raw
    ]
    table = VersionTable(versions)
    names = table.names()
    assert len(names) == len(set(names)) == len(table)
    for name in names:
        assert "/" not in name and "\0" not in name and len(name) < 255
        entry = table.resolve(name)
        assert entry.name == name and table.resolve(entry.alias) is entry
    times = [e.version.last_modified for e in table]
    assert times == sorted(times, reverse=True)
    # Listing order follows time order.
    listed_times = [table.resolve(n).version.last_modified for n in names]
    assert listed_times == sorted(listed_times)
    assert all(not e.version.is_delete_marker for e in table)


def test_package_exports():
    for name in virtual.__all__:
        assert hasattr(virtual, name), name
