"""``#EXT-X-MAP`` in ``.concat/@M`` manifests: the init segment of fMP4 HLS playlists."""

from __future__ import annotations

import errno

import pytest
import trio

from gstore.virtual import VirtualNames
from gstore.virtual.concat import ConcatLayout, read_concat
from gstore.virtual.names import VirtualPathError, parse_manifest, resolve_manifest

N = VirtualNames()

FMP4 = """#EXTM3U
#EXT-X-VERSION:7
#EXT-X-TARGETDURATION:4
#EXT-X-MEDIA-SEQUENCE:0
#EXT-X-PLAYLIST-TYPE:VOD
#EXT-X-MAP:URI="init.mp4"
#EXTINF:4.000000,
seg0.m4s
#EXTINF:4.000000,
seg1.m4s
#EXTINF:2.500000,
seg2.m4s
#EXT-X-ENDLIST
"""


def test_init_segment_comes_first_once():
    assert parse_manifest(FMP4) == ["init.mp4", "seg0.m4s", "seg1.m4s", "seg2.m4s"]
    assert parse_manifest(FMP4.replace("\n", "\r\n").encode()) == ["init.mp4", "seg0.m4s", "seg1.m4s", "seg2.m4s"]
    assert resolve_manifest("live", FMP4, N) == ["live/init.mp4", "live/seg0.m4s", "live/seg1.m4s", "live/seg2.m4s"]


def test_a_map_after_some_segments_applies_to_the_following_ones():
    text = "a.ts\n#EXT-X-MAP:URI=\"init.mp4\"\nb.m4s\nc.m4s\n"
    assert parse_manifest(text) == ["a.ts", "init.mp4", "b.m4s", "c.m4s"]


def test_each_map_before_its_segments_when_it_changes():
    text = """#EXTM3U
#EXT-X-MAP:URI="init-a.mp4"
#EXTINF:4,
a0.m4s
#EXTINF:4,
a1.m4s
#EXT-X-DISCONTINUITY
#EXT-X-MAP:URI="init-b.mp4"
#EXTINF:4,
b0.m4s
#EXT-X-DISCONTINUITY
#EXT-X-MAP:URI="init-b.mp4"
#EXTINF:4,
b1.m4s
#EXT-X-DISCONTINUITY
#EXT-X-MAP:URI="init-a.mp4"
#EXTINF:4,
a2.m4s
"""
    assert parse_manifest(text) == [
        "init-a.mp4", "a0.m4s", "a1.m4s",
        "init-b.mp4", "b0.m4s", "b1.m4s",  # the same map again: not repeated
        "init-a.mp4", "a2.m4s",  # back to the first one: its init again
    ]


def test_a_map_without_segments_adds_nothing():
    assert parse_manifest('#EXTM3U\n#EXT-X-MAP:URI="init.mp4"\n#EXT-X-ENDLIST\n') == []
    # A map replaced before any segment: only the one in force counts.
    assert parse_manifest('#EXT-X-MAP:URI="old.mp4"\n#EXT-X-MAP:URI="new.mp4"\ns.m4s\n') == ["new.mp4", "s.m4s"]


def test_attribute_lists():
    # Other attributes, spaces, a comma inside the quoted URI, an unquoted URI.
    assert parse_manifest('#EXT-X-MAP:X-FOO=1, URI="in,it.mp4" ,Y="z"\ns\n') == ["in,it.mp4", "s"]
    assert parse_manifest("#EXT-X-MAP:URI=init.mp4\ns\n") == ["init.mp4", "s"]
    assert parse_manifest('#EXT-X-MAP:URI="sub/init 1.mp4"\ns\n') == ["sub/init 1.mp4", "s"]
    # Not %-decoded, like every other line.
    assert parse_manifest('#EXT-X-MAP:URI="a%2Fb.mp4"\ns\n') == ["a%2Fb.mp4", "s"]


@pytest.mark.parametrize(
    ("line", "code", "words"),
    [
        ('#EXT-X-MAP:URI="init.mp4",BYTERANGE="720@0"', errno.EINVAL, "BYTERANGE is not supported"),
        ("#EXT-X-MAP:BYTERANGE=720,URI=\"init.mp4\"", errno.EINVAL, "BYTERANGE is not supported"),
        ("#EXT-X-MAP:", errno.EINVAL, "without a URI"),
        ('#EXT-X-MAP:URI=""', errno.EINVAL, "without a URI"),
        ('#EXT-X-MAP:FOO="x"', errno.EINVAL, "without a URI"),
        ('#EXT-X-MAP:URI="init.mp4', errno.EINVAL, "malformed EXT-X-MAP"),
        ("#EXT-X-MAP:uri=\"init.mp4\"", errno.EINVAL, "malformed EXT-X-MAP"),
        ('#EXT-X-MAP:URI="https://cdn.example/init.mp4"', errno.EINVAL, "URLs are not supported"),
        ('#EXT-X-MAP:URI="/etc/passwd"', errno.EACCES, "absolute paths"),
        ("#EXT-X-BYTERANGE:1000@0", errno.EINVAL, "EXT-X-BYTERANGE segments are not supported"),
    ],
)
def test_refusals_name_the_line(line, code, words):
    text = f"#EXTM3U\n#EXT-X-VERSION:7\n{line}\n#EXTINF:4,\nseg0.m4s\n"
    with pytest.raises(VirtualPathError) as info:
        parse_manifest(text)
    assert info.value.errno == code
    assert "line 3:" in str(info.value) and words in str(info.value), str(info.value)


def test_map_paths_are_checked_like_segments():
    assert resolve_manifest("a/b", '#EXT-X-MAP:URI="../init.mp4"\ns.m4s\n', N) == ["a/init.mp4", "a/b/s.m4s"]
    assert resolve_manifest("hls", '#EXT-X-MAP:URI=".versions/init.mp4/-2"\ns\n', N) == [
        "hls/.versions/init.mp4/-2", "hls/s"]
    for text, code in [
        ('#EXT-X-MAP:URI="../../init.mp4"\ns\n', errno.EACCES),
        ('#EXT-X-MAP:URI=".concat/a+b"\ns\n', errno.EINVAL),
        ('#EXT-X-MAP:URI="a//b"\ns\n', errno.EINVAL),
    ]:
        with pytest.raises(VirtualPathError) as info:
            resolve_manifest("hls", text, N)
        assert info.value.errno == code, text
        assert "manifest line 1:" in str(info.value)


def test_init_segments_count_towards_the_entry_limit():
    text = '#EXT-X-MAP:URI="init.mp4"\n' + "s\n" * 9
    assert len(parse_manifest(text, max_entries=10)) == 10
    with pytest.raises(VirtualPathError) as info:
        parse_manifest(text + "s\n", max_entries=10)
    assert info.value.errno == errno.E2BIG


def test_joined_bytes_are_init_then_segments():
    """What a player reads: the init segment's bytes, then each media segment's, at any offset."""
    files = {
        "hls/init.mp4": b"ftyp....moov" * 3,
        "hls/seg0.m4s": b"moof0mdat0" * 5,
        "hls/seg1.m4s": b"moof1mdat1" * 7,
        "hls/seg2.m4s": b"moof2",
    }
    paths = resolve_manifest("hls", FMP4, N)
    layout = ConcatLayout([(p, len(files[p])) for p in paths])
    whole = b"".join(files[p] for p in ["hls/init.mp4", "hls/seg0.m4s", "hls/seg1.m4s", "hls/seg2.m4s"])
    assert layout.total_size == len(whole)

    async def read_part(index: int, offset: int, length: int) -> bytes:
        return files[paths[index]][offset:offset + length]

    async def check() -> None:
        assert await read_concat(layout, 0, layout.total_size, read_part) == whole
        for offset in range(0, len(whole), 7):
            assert await read_concat(layout, offset, 13, read_part) == whole[offset:offset + 13]

    trio.run(check)


def test_plain_playlists_are_unchanged():
    ts = "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\na.ts\n#EXTINF:10,\nb.ts\n#EXT-X-ENDLIST\n"
    assert parse_manifest(ts) == ["a.ts", "b.ts"]
    assert parse_manifest("# EXT-X-MAP:URI=\"x\"\na\n") == ["a"]  # a comment, not the tag
