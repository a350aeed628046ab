"""Unit tests of the virtual path parser (gstore.virtual.names)."""

from __future__ import annotations

import errno
import posixpath
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gstore.backends.base import check_relative_path
from gstore.errors import to_errno
from gstore.virtual.names import (
    ConcatManifestRef,
    ConcatRef,
    DiffRef,
    VersionRef,
    VersionsDirRef,
    VirtualDirRef,
    VirtualNames,
    VirtualPathError,
    concat_name,
    decode_part,
    diff_name,
    encode_part,
    manifest_name,
    parse_manifest,
    parse_virtual_path,
    resolve_manifest,
    resolve_relative,
)

N = VirtualNames()


def parse(path: str, names: VirtualNames = N):
    return parse_virtual_path(path, names)


def err(path: str, names: VirtualNames = N) -> int:
    with pytest.raises(VirtualPathError) as info:
        parse_virtual_path(path, names)
    return info.value.errno


# -- independent checks ------------------------------------------------------------


def inside_mount(path: str) -> bool:
    """A normalized mount-relative path: no leading '/', no '.', '..' or empty
    component, no NUL; and joining it to a root never leaves the root."""
    if path == "":
        return True
    if "\0" in path or path.startswith("/"):
        return False
    if any(c in ("", ".", "..") for c in path.split("/")):
        return False
    root = "/srv/mountroot"
    joined = posixpath.normpath(posixpath.join(root, path))
    return joined == root or joined.startswith(root + "/")


def reference_resolve(base_dir: str, rel: str) -> str | None:
    """Lexical resolution by a different method; None if it leaves the root."""
    depth = len(base_dir.split("/")) if base_dir else 0
    for comp in rel.split("/"):
        if comp == "..":
            depth -= 1
            if depth < 0:
                return None
        elif comp not in ("", "."):
            depth += 1
    joined = posixpath.normpath("/" + posixpath.join(base_dir, rel))
    return joined.lstrip("/")


_VALID_ESCAPES = re.compile(r"(?:[^%]|%2[FfBb5])*", re.S)


def reference_decode(raw: str) -> str | None:
    if not _VALID_ESCAPES.fullmatch(raw):
        return None
    return re.sub(r"%2([FfBb5])", lambda m: {"F": "/", "B": "+", "5": "%"}[m.group(1).upper()], raw)


def all_paths(ref) -> list[str]:
    paths = [ref.base_dir]
    if isinstance(ref, ConcatRef):
        paths += list(ref.parts)
    elif isinstance(ref, ConcatManifestRef):
        paths.append(ref.manifest)
    elif isinstance(ref, DiffRef):
        paths += [ref.a, ref.b]
    elif isinstance(ref, (VersionsDirRef, VersionRef)):
        paths.append(ref.target)
    return paths


def part_paths(ref) -> list[str]:
    if isinstance(ref, ConcatRef):
        return list(ref.parts)
    if isinstance(ref, ConcatManifestRef):
        return [ref.manifest]
    if isinstance(ref, DiffRef):
        return [ref.a, ref.b]
    return []


# -- VirtualNames ------------------------------------------------------------------


def test_default_names_and_roles():
    assert N.role_of(".concat") == "concat"
    assert N.role_of(".diff") == "diff"
    assert N.role_of(".versions") == "versions"
    assert N.role_of("concat") is None
    assert N.role_of(".CONCAT") is None
    assert N.role_of(".zip") == "zip"
    assert N.enabled() == {"concat": ".concat", "diff": ".diff", "versions": ".versions", "zip": ".zip"}


def test_names_configurable_and_disableable():
    names = VirtualNames.from_mapping({"concat": "_cat", "diff": None})
    assert names.role_of("_cat") == "concat"
    assert names.role_of(".concat") is None
    assert names.role_of(".diff") is None
    assert names.role_of(".versions") == "versions"
    # A disabled role's name is an ordinary path.
    assert parse("a/.diff/x+y", names) is None
    assert parse("a/.concat/x", names) is None
    assert isinstance(parse("a/_cat/x+y", names), ConcatRef)
    off = VirtualNames.disabled()
    for p in ["a/.concat/x", ".diff/a+b", ".versions/f/-1"]:
        assert parse(p, off) is None


@pytest.mark.parametrize(
    "mapping",
    [
        {"concat": ""},
        {"concat": "a/b"},
        {"diff": ".."},
        {"diff": "."},
        {"concat": "x", "diff": "x"},
        {"versions": "a\0"},
    ],
)
def test_invalid_names_rejected(mapping):
    with pytest.raises(ValueError):
        VirtualNames.from_mapping(mapping)


def test_unknown_role_rejected():
    with pytest.raises(ValueError, match="unknown virtual roles"):
        VirtualNames.from_mapping({"cat": ".cat"})


# -- parse_virtual_path: the contract's examples -----------------------------------


def test_ordinary_paths():
    for p in ["", "a", "a/b/c.txt", "x y/é", ".concatenate", "a/.concat.bak/x", "a/..diff"]:
        assert parse(p) is None


def test_virtual_dirs_themselves():
    assert parse("a/.concat") == VirtualDirRef("concat", "a", "a/.concat")
    assert parse(".diff") == VirtualDirRef("diff", "", ".diff")
    assert parse("x/y/.versions") == VirtualDirRef("versions", "x/y", "x/y/.versions")


def test_concat_parts():
    ref = parse("a/b/.concat/x+y%2Fz")
    assert ref == ConcatRef("a/b", ("a/b/x", "a/b/y/z"), "a/b/.concat/x+y%2Fz")
    assert ref.role == "concat"
    assert parse(".concat/videos%2Fpart1.ts+videos%2Fpart2.ts").parts == (
        "videos/part1.ts",
        "videos/part2.ts",
    )
    assert parse(".concat/a b+c d").parts == ("a b", "c d")
    assert parse("d/.concat/one").parts == ("d/one",)
    assert parse("d/.concat/a+a").parts == ("d/a", "d/a")


def test_concat_escapes():
    assert parse(".concat/a%2Bb+c%25d").parts == ("a+b", "c%d")
    assert parse(".concat/a%2bb+x%2fy").parts == ("a+b", "x/y")  # lowercase hex
    assert parse(".concat/100%2525").parts == ("100%25",)  # decoded once only


def test_concat_dotdot_between_folders():
    assert parse("a/b/.concat/..%2Fx+..%2F..%2Fy").parts == ("a/x", "y")
    assert parse("a/.concat/.%2Fx+sub%2F..%2Fz").parts == ("a/x", "a/z")


def test_concat_manifest():
    assert parse("hls/.concat/@index.m3u8") == ConcatManifestRef(
        "hls", "hls/index.m3u8", "hls/.concat/@index.m3u8"
    )
    assert parse(".concat/@hls%2Findex.m3u8").manifest == "hls/index.m3u8"
    assert parse(".concat/@a%2Bb").manifest == "a+b"
    ref = parse("d/.concat/@.versions%2Findex.m3u8%2F-2")
    assert ref.manifest == "d/.versions/index.m3u8/-2"
    assert err(".concat/@") == errno.EINVAL
    assert err(".concat/@a+b") == errno.EINVAL
    assert err(".concat/@..%2F..%2Fx") == errno.EACCES
    # '@' is only special at the start of a .concat name.
    assert parse(".concat/a+@b").parts == ("a", "@b")
    assert parse(".concat/.%2F@b").parts == ("@b",)
    assert parse(".diff/@a+b").a == "@a"


def test_diff_parts_and_labels():
    ref = parse("a/.diff/p+q")
    assert ref == DiffRef("a", "a/p", "a/q", "p", "q", "a/.diff/p+q")
    ref = parse("d/.diff/.versions%2Fconfig.json%2F-2+config.json")
    assert (ref.a, ref.b) == ("d/.versions/config.json/-2", "d/config.json")
    assert (ref.a_label, ref.b_label) == (".versions/config.json/-2", "config.json")
    ref = parse("d/.diff/..%2Fx+y")
    assert (ref.a, ref.a_label) == ("x", "../x")
    for bad in [".diff/a", ".diff/a+b+c", ".diff/a+", ".diff/+b"]:
        assert err(bad) == errno.EINVAL


def test_versions_paths():
    assert parse("a/.versions/f.txt") == VersionsDirRef(
        "a", "f.txt", "a/f.txt", "a/.versions/f.txt"
    )
    assert parse("a/.versions/f.txt/-2") == VersionRef(
        "a", "f.txt", "a/f.txt", "-2", "a/.versions/f.txt/-2"
    )
    assert parse(".versions/f%2Fg").target == "f%2Fg"  # no decoding in .versions
    assert (
        parse(".versions/x+y/20261121T101502.123Z_abcdef12").version
        == "20261121T101502.123Z_abcdef12"
    )


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        ".concat/..%2Fx",
        ".concat/..%2F..%2Fetc%2Fpasswd",
        "a/.concat/..%2F..%2Fetc",
        ".concat/%2Fetc%2Fpasswd",
        ".concat/a+%2Fetc",
        ".diff/%2F+a",
        "..",
        "a/../..",
        "/a",
        "/",
        ".versions/../../f",
    ],
)
def test_escaping_is_eacces(path):
    assert err(path) == errno.EACCES


@pytest.mark.parametrize(
    "path",
    [
        ".concat/%2E%2E%2Fx",  # %2E is not an escape
        ".concat/a%",
        ".concat/a%2",
        ".concat/a%41",
        ".concat/a%%2F",
        ".concat/a++b",
        ".concat/+a",
        ".concat/a+",
        ".concat/a%2F%2Fb",  # empty component
        ".concat/a%2F",  # trailing slash
        ".concat/a\0b",
        "a//b",
        "a/",
        "a/.concat/",
        ".concat/.concat%2Fx",  # nested
        ".concat/.diff%2Fa%2Bb",
        ".diff/.concat%2Fa%2Bb+c",
    ],
)
def test_malformed_is_einval(path):
    assert err(path) == errno.EINVAL


@pytest.mark.parametrize(
    "path",
    [
        ".concat/a+b/c",
        ".concat/a/b",
        ".diff/a+b/x",
        ".versions/f/-1/x",
        ".versions/f/-1/x/y",
        "d/.concat/@m/x",
    ],
)
def test_below_virtual_file_is_enotdir(path):
    assert err(path) == errno.ENOTDIR


@pytest.mark.parametrize(
    "path",
    [
        ".concat/.concat",
        ".concat/.diff",
        ".concat/.versions",
        ".concat/.versions%2Ff",
        ".diff/.versions%2Ff+a",
        ".concat/.%2F.",  # the root
        "a/.concat/..",  # not a part: the path normalizes to "a"
        "a/.concat/..%2F.concat",
        ".concat/@.versions",
    ],
)
def test_directory_part_is_eisdir(path):
    if path == "a/.concat/..":
        assert parse(path) is None
        return
    assert err(path) == errno.EISDIR


def test_versions_of_virtual_name_is_enoent():
    assert err(".versions/.concat") == errno.ENOENT
    assert err("a/.versions/.versions/-1") == errno.ENOENT
    assert err(".concat/.versions%2F.diff%2F-1") == errno.ENOENT


def test_version_parts_allowed():
    ref = parse(".concat/.versions%2Fa%2F-1+sub%2F.versions%2Fb%2F-2")
    assert ref.parts == (".versions/a/-1", "sub/.versions/b/-2")


def test_error_is_oserror_with_errno():
    with pytest.raises(OSError) as info:
        parse(".concat/..%2Fx")
    assert isinstance(info.value, VirtualPathError)
    assert to_errno(info.value) == errno.EACCES
    assert "part 1" in str(info.value)


def test_main_path_normalized():
    assert parse("a/./b/../.concat/x") == ConcatRef("a", ("a/x",), "a/.concat/x")
    assert parse("a/.concat/x/..") == VirtualDirRef("concat", "a", "a/.concat")


def test_first_virtual_component_decides():
    # .versions under .concat: the .concat file name contains no '/', so a
    # deeper path is ENOTDIR whatever follows.
    assert err(".concat/.versions/x") == errno.ENOTDIR
    ref = parse("a/.versions/.concatx/-1")
    assert isinstance(ref, VersionRef) and ref.name == ".concatx"


# -- resolve_relative --------------------------------------------------------------


def test_resolve_relative():
    assert resolve_relative("", "a") == "a"
    assert resolve_relative("a/b", "c") == "a/b/c"
    assert resolve_relative("a/b", "../c") == "a/c"
    assert resolve_relative("a/b", "../..") == ""
    assert resolve_relative("a", "./x/./y") == "a/x/y"
    assert resolve_relative("", ".") == ""


@pytest.mark.parametrize(
    ("base", "rel", "code"),
    [
        ("", "..", errno.EACCES),
        ("a", "../..", errno.EACCES),
        ("a", "x/../../..", errno.EACCES),
        ("a", "/etc", errno.EACCES),
        ("a", "", errno.EINVAL),
        ("a", "x//y", errno.EINVAL),
        ("a", "x/", errno.EINVAL),
        ("a", "x\0", errno.EINVAL),
        ("a/../b", "x", errno.EINVAL),
        ("/a", "x", errno.EINVAL),
        ("a/", "x", errno.EINVAL),
    ],
)
def test_resolve_relative_errors(base, rel, code):
    with pytest.raises(VirtualPathError) as info:
        resolve_relative(base, rel)
    assert info.value.errno == code


# -- encoding ----------------------------------------------------------------------


def test_encode_part():
    assert encode_part("a/b+c%d e") == "a%2Fb%2Bc%25d e"
    assert decode_part("a%2Fb%2Bc%25d e") == "a/b+c%d e"
    assert (
        concat_name(["videos/part1.ts", "videos/part2.ts"]) == "videos%2Fpart1.ts+videos%2Fpart2.ts"
    )
    assert concat_name(["@x", "y"]) == ".%2F@x+y"
    assert manifest_name("hls/index.m3u8") == "@hls%2Findex.m3u8"
    assert (
        diff_name(".versions/config.json/-2", "config.json")
        == ".versions%2Fconfig.json%2F-2+config.json"
    )
    with pytest.raises(ValueError):
        concat_name([])
    with pytest.raises(ValueError):
        diff_name("", "a")


@given(st.text())
def test_encode_decode_round_trip(text):
    encoded = encode_part(text)
    assert decode_part(encoded) == text
    assert "/" not in encoded and "+" not in encoded
    assert reference_decode(encoded) == text


@given(
    st.text(
        alphabet=st.sampled_from(["%", "2", "F", "f", "B", "5", "E", "a", "/", "+"]), max_size=12
    )
)
def test_decode_matches_reference(raw):
    expected = reference_decode(raw)
    if expected is None:
        with pytest.raises(VirtualPathError) as info:
            decode_part(raw)
        assert info.value.errno == errno.EINVAL
    else:
        assert decode_part(raw) == expected


_segment = st.text(
    alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=8,
).filter(lambda s: s not in (".", ".."))
_rel_path = st.lists(_segment, min_size=1, max_size=4).map("/".join)


@given(st.lists(_rel_path, min_size=1, max_size=4))
def test_concat_name_round_trip(parts):
    names = VirtualNames()
    if any(names.role_of(c) for p in parts for c in p.split("/")):
        return  # virtual components have their own rules (no nesting), tested elsewhere
    ref = parse_virtual_path("d/.concat/" + concat_name(parts), names)
    assert isinstance(ref, ConcatRef)
    assert ref.parts == tuple("d/" + p for p in parts)


@given(_rel_path, _rel_path)
def test_diff_name_round_trip(a, b):
    if any(N.role_of(c) for p in (a, b) for c in p.split("/")):
        return
    ref = parse("d/.diff/" + diff_name(a, b))
    assert (ref.a, ref.b, ref.a_label, ref.b_label) == ("d/" + a, "d/" + b, a, b)


# -- properties of the parser on arbitrary input -----------------------------------

_tokens = st.sampled_from(
    [
        "a", "b", "x y", "é", "..", ".", "", "/", "+", "@", "%", "%2F", "%2f", "%2B", "%25",
        "%2E", "%2E%2E", "..%2F", "%2F..", ".concat", ".diff", ".versions", "-1", "-2",
        "\0", "\n", "#", "http://", "_cat",
    ]
)  # fmt: skip
_tricky_path = st.lists(_tokens, max_size=12).map("".join)
_names = st.sampled_from(
    [VirtualNames(), VirtualNames(concat="_cat", diff=None), VirtualNames.disabled()]
)


def check_result(path: str, names: VirtualNames) -> None:
    try:
        ref = parse_virtual_path(path, names)
    except VirtualPathError as exc:
        assert exc.errno in (errno.EACCES, errno.EINVAL, errno.ENOTDIR, errno.EISDIR, errno.ENOENT)
        return
    if ref is None:
        return
    for p in all_paths(ref):
        assert inside_mount(p), (path, ref, p)
        assert check_relative_path(p) == p  # the backends' own boundary guard
    for p in part_paths(ref):
        assert p != ""
        again = parse_virtual_path(p, names)  # must not raise
        assert again is None or isinstance(again, VersionRef), (path, p, again)
    if isinstance(ref, (ConcatRef, DiffRef)):
        # Parts agree with an independent decoder and resolver.
        name = ref.path.rsplit("/", 1)[1]
        raws = name.split("+")
        got = ref.parts if isinstance(ref, ConcatRef) else (ref.a, ref.b)
        for raw, resolved in zip(raws, got, strict=True):
            decoded = reference_decode(raw)
            assert decoded is not None
            assert reference_resolve(ref.base_dir, decoded) == resolved


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(_tricky_path, _names)
def test_parser_only_raises_virtual_path_error_tricky(path, names):
    check_result(path, names)
    check_result("d/.concat/" + path, names)
    check_result("d/e/.diff/" + path, names)
    check_result(".versions/" + path, names)


@settings(max_examples=300)
@given(st.text(), _names)
def test_parser_only_raises_virtual_path_error_any_text(path, names):
    check_result(path, names)
    check_result(".concat/" + path, names)


@given(
    st.lists(st.sampled_from(["a", "b", "..", "."]), min_size=1, max_size=8),
    st.sampled_from(["", "a", "a/b"]),
)
def test_resolve_relative_matches_reference(comps, base):
    rel = "/".join(comps)
    expected = reference_resolve(base, rel)
    if expected is None:
        with pytest.raises(VirtualPathError) as info:
            resolve_relative(base, rel)
        assert info.value.errno == errno.EACCES
    else:
        got = resolve_relative(base, rel)
        assert got == expected
        assert inside_mount(got)


# -- manifests ---------------------------------------------------------------------

HLS = """#EXTM3U
#EXT-X-VERSION:3
#EXT-X-TARGETDURATION:10
#EXT-X-MEDIA-SEQUENCE:0

#EXTINF:10.0,
seg0.ts
#EXTINF:10.0,
seg 1.ts
#EXTINF:4.5,
sub/seg2.ts
#EXT-X-ENDLIST
"""


def test_parse_hls_playlist():
    assert parse_manifest(HLS) == ["seg0.ts", "seg 1.ts", "sub/seg2.ts"]
    assert parse_manifest(HLS.replace("\n", "\r\n")) == ["seg0.ts", "seg 1.ts", "sub/seg2.ts"]
    assert parse_manifest(HLS.encode()) == ["seg0.ts", "seg 1.ts", "sub/seg2.ts"]
    assert parse_manifest(b"\xef\xbb\xbfa\n  b  \n\t#c\n") == ["a", "b"]
    assert parse_manifest("\ufeffa") == ["a"]
    assert parse_manifest("") == []
    assert parse_manifest("# only comments\n\n") == []


def test_manifest_lines_are_not_percent_decoded():
    assert parse_manifest("a%2Fb\nc+d\n%zz") == ["a%2Fb", "c+d", "%zz"]


@pytest.mark.parametrize(
    ("text", "code", "line"),
    [
        ("a\nhttp://example.com/seg.ts\n", errno.EINVAL, 2),
        ("#x\n\nS3://bucket/key\n", errno.EINVAL, 3),
        ("file:///etc/passwd", errno.EINVAL, 1),
        ("a\nb\n/etc/passwd", errno.EACCES, 3),
        ("a\n  /abs\n", errno.EACCES, 2),
        ("a\nb\0c", errno.EINVAL, 2),
    ],
)
def test_manifest_refusals_name_the_line(text, code, line):
    with pytest.raises(VirtualPathError) as info:
        parse_manifest(text)
    assert info.value.errno == code
    assert f"line {line}:" in str(info.value)


def test_manifest_not_utf8():
    with pytest.raises(VirtualPathError) as info:
        parse_manifest(b"a\nb\n\xff\xfe\n")
    assert info.value.errno == errno.EINVAL and "line 3" in str(info.value)


def test_manifest_limits():
    with pytest.raises(VirtualPathError) as info:
        parse_manifest("a\n" * 11, max_entries=10)
    assert info.value.errno == errno.E2BIG
    assert len(parse_manifest("a\n" * 10, max_entries=10)) == 10
    from gstore.virtual.names import MANIFEST_MAX_BYTES

    with pytest.raises(VirtualPathError) as info:
        parse_manifest(b"a" * (MANIFEST_MAX_BYTES + 1))
    assert info.value.errno == errno.EFBIG


def test_resolve_manifest():
    assert resolve_manifest("hls", HLS, N) == ["hls/seg0.ts", "hls/seg 1.ts", "hls/sub/seg2.ts"]
    assert resolve_manifest("a/b", "../x\n.versions/y/-2\n", N) == ["a/x", "a/b/.versions/y/-2"]
    cases = [
        ("a\n../../x\n", errno.EACCES, 2),
        ("a\n\n.concat/x\n", errno.EINVAL, 3),
        (".diff/a+b", errno.EINVAL, 1),
        ("a//b", errno.EINVAL, 1),
        ("ok\n.versions/f", errno.EISDIR, 2),
        ("..", errno.EISDIR, 1),  # the root
        (".versions/f/-1/x", errno.ENOTDIR, 1),
    ]
    for text, code, line in cases:
        with pytest.raises(VirtualPathError) as info:
            resolve_manifest("hls", text, N)
        assert info.value.errno == code, text
        assert f"manifest line {line}:" in str(info.value), (text, str(info.value))


@given(st.text(max_size=80))
def test_resolve_manifest_never_escapes(text):
    try:
        paths = resolve_manifest("a/b", text, N)
    except VirtualPathError:
        return
    for p in paths:
        assert inside_mount(p) and p != ""
