"""The .zip view's layout, checked against Python's zipfile (a reader written by others)."""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import time
import zipfile
import zlib

import pytest

from gstore.virtual.zipview import ZIP32_LIMIT, ZipError, ZipLayout, ZipMember, ZipReader, crc32_of


def run(coro):
    """Drive a coroutine whose awaits never suspend (our callbacks are plain data)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the coroutine suspended")


class Archive:
    """A ZipReader over in-memory members (or generated ones), recording what it was asked."""

    def __init__(self, members: list[ZipMember], data: dict[int, bytes] | None = None, *,
                 force_zip64: bool = False, crcs: dict[int, int] | None = None) -> None:
        self.layout = ZipLayout(members, force_zip64=force_zip64)
        self.data = data or {}
        self.fixed_crcs = crcs or {}
        self.crc_asked: list[int] = []
        self.reads: list[tuple[int, int, int]] = []
        self.reader = ZipReader(self.layout, self._read_member, self._crc, self._all)

    def member_bytes(self, index: int, offset: int, length: int) -> bytes:
        if index in self.data:
            return self.data[index][offset:offset + length]
        return bytes(length)  # generated members are zeros

    async def _read_member(self, index: int, offset: int, length: int) -> bytes:
        self.reads.append((index, offset, length))
        return self.member_bytes(index, offset, length)

    async def _crc(self, index: int) -> int:
        self.crc_asked.append(index)
        if index in self.fixed_crcs:
            return self.fixed_crcs[index]
        return zlib.crc32(self.member_bytes(index, 0, self.layout.size(index)))

    async def _all(self) -> list[int]:
        return [await self._crc(i) for i in range(len(self.layout))]

    def read(self, offset: int, size: int) -> bytes:
        return run(self.reader.read(offset, size))

    def whole(self) -> bytes:
        return self.read(0, self.layout.total_size)


class LazyFile(io.RawIOBase):
    """A seekable file object over an Archive, reading only what is asked."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.position, 2: self.archive.layout.total_size}[whence]
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        data = self.archive.read(self.position, len(buffer))
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)


def sample(seed: int = 1) -> tuple[list[ZipMember], dict[int, bytes]]:
    rng = random.Random(seed)
    names = ["a.txt", "empty", "sub/b.bin", "sub/deeper/c d.txt", "ünïcödé/ñ.txt", "x+y%z.dat"]
    members, data = [], {}
    for i, name in enumerate(names):
        size = 0 if name == "empty" else rng.randrange(1, 70_000)
        data[i] = rng.randbytes(size)
        members.append(ZipMember(name, size, 1_700_000_000 + 3600 * i + 0.5, 0o640 if i % 2 else 0o755))
    return members, data


@pytest.mark.parametrize("force_zip64", [False, True])
def test_zipfile_reads_every_member_with_its_metadata(force_zip64):
    members, data = sample()
    archive = Archive(members, data, force_zip64=force_zip64)
    whole = archive.whole()
    assert len(whole) == archive.layout.total_size
    with zipfile.ZipFile(io.BytesIO(whole)) as z:
        assert z.testzip() is None  # every CRC checks out
        assert z.namelist() == [m.name for m in members]
        for i, info in enumerate(z.infolist()):
            assert info.compress_type == zipfile.ZIP_STORED
            assert info.file_size == info.compress_size == members[i].size
            assert z.read(info) == data[i]
            assert info.external_attr >> 16 == 0o100000 | members[i].mode
            assert info.create_system == 3  # Unix: unzip applies the permissions
            assert info.date_time == time.localtime(members[i].mtime)[:5] + (time.localtime(members[i].mtime)[5] // 2 * 2,)
            if not members[i].name.isascii():
                assert info.flag_bits & 0x800
            # The member's bytes are where the layout says.
            start, end = archive.layout.member_range(i)
            assert whole[start:end] == data[i]


def test_size_and_offsets_need_no_crc():
    members, data = sample()
    archive = Archive(members, data)
    total = archive.layout.total_size
    # Name lengths, header sizes and data are all that the size depends on.
    assert total == sum(30 + len(m.name.encode()) + 9 + m.size + 46 + len(m.name.encode()) + 9 for m in members) + 22
    assert archive.crc_asked == []
    # A read of the first member's header asks for its CRC only; its data for none.
    archive.read(0, 40)
    assert archive.crc_asked == [0]
    start, end = archive.layout.member_range(2)
    archive.crc_asked.clear()
    assert archive.read(start, end - start) == data[2]
    assert archive.crc_asked == []
    # The central directory needs them all; the end record none.
    archive.read(archive.layout.central_offset, 10)
    assert archive.crc_asked == list(range(len(members)))
    archive.crc_asked.clear()
    archive.read(total - 22, 22)
    assert archive.crc_asked == []


def test_reads_at_any_offset_match_the_whole():
    members, data = sample(2)
    archive = Archive(members, data)
    whole = archive.whole()
    rng = random.Random(5)
    for _ in range(300):
        offset = rng.randrange(0, len(whole) + 10)
        size = rng.choice([1, 7, 29, 30, 31, 4096, 70_000, 10**6])
        assert archive.read(offset, size) == whole[offset:offset + size], (offset, size)
    assert archive.read(len(whole), 10) == b""


def test_locate_pieces_are_contiguous_and_cover_the_range():
    members, _ = sample(3)
    layout = ZipLayout(members)
    rng = random.Random(1)
    for _ in range(300):
        offset = rng.randrange(0, layout.total_size)
        length = rng.randrange(0, layout.total_size)
        pieces = layout.locate(offset, length)
        assert sum(p[3] for p in pieces) == min(offset + length, layout.total_size) - offset
        assert all(p[3] > 0 for p in pieces)


def test_empty_archive_is_a_valid_zip():
    archive = Archive([])
    whole = archive.whole()
    assert len(whole) == 22
    with zipfile.ZipFile(io.BytesIO(whole)) as z:
        assert z.namelist() == []


def test_more_than_65534_members_use_zip64_end_records():
    count = 70_000
    members = [ZipMember(f"d{i // 1000}/f{i}", i % 3, 1_700_000_000) for i in range(count)]
    data = {i: bytes([i % 251]) * (i % 3) for i in range(count)}
    archive = Archive(members, data)
    assert archive.layout.zip64
    with zipfile.ZipFile(io.BytesIO(archive.whole())) as z:
        infos = z.infolist()
        assert len(infos) == count
        for i in (0, 1, 2, 65_534, 65_535, 65_536, count - 1):
            assert infos[i].filename == members[i].name
            assert z.read(infos[i]) == data[i]


def test_members_past_4_gib_use_zip64_sizes_and_offsets():
    big = ZIP32_LIMIT + 10  # zeros, never materialized
    members = [ZipMember("small-1", 5, 1_700_000_000), ZipMember("big.bin", big, 1_700_000_000),
               ZipMember("small-2", 11, 1_700_000_000)]
    data = {0: b"hello", 2: b"after 4 GiB"}
    archive = Archive(members, data, crcs={1: 0x12345678})
    layout = archive.layout
    assert layout.zip64 and layout.total_size > 2**32
    with zipfile.ZipFile(LazyFile(archive)) as z:
        infos = z.infolist()
        assert [i.filename for i in infos] == ["small-1", "big.bin", "small-2"]
        assert infos[1].file_size == big
        assert infos[2].header_offset == layout.member_range(1)[1] > ZIP32_LIMIT
        assert z.read("small-2") == b"after 4 GiB"  # the ZIP64 offset leads to it
        assert z.read("small-1") == b"hello"
        with z.open("big.bin") as f:  # its local header parses; its bytes start where they should
            assert f.read(100) == bytes(100)
    # Only the pieces asked for were read: nothing close to 4 GiB.
    assert sum(length for _, _, length in archive.reads) < 10 * 2**20


def test_a_member_that_shrank_is_estale():
    members, data = sample()
    archive = Archive(members, data)
    data[2] = data[2][:-1]
    start, end = archive.layout.member_range(2)
    with pytest.raises(ZipError) as caught:
        archive.read(start, end - start)
    assert caught.value.errno == 116  # ESTALE


def test_invalid_members_are_refused():
    for name in ["", "/abs", "dir/", "a//b", "../up", "a/./b", "nul\0"]:
        with pytest.raises(ValueError):
            ZipLayout([ZipMember(name, 1, 0)])
    with pytest.raises(ValueError):
        ZipLayout([ZipMember("a", 1, 0), ZipMember("a", 2, 0)])
    with pytest.raises(ValueError):
        ZipLayout([ZipMember("a", -1, 0)])


def test_times_outside_the_dos_range_are_clamped():
    archive = Archive([ZipMember("old", 1, 0), ZipMember("future", 1, 5e9)], {0: b"x", 1: b"y"})
    with zipfile.ZipFile(io.BytesIO(archive.whole())) as z:
        assert z.getinfo("old").date_time[0] == 1980
        assert z.getinfo("future").date_time[0] <= 2107
        assert z.read("old") == b"x"


def test_crc32_of_streams_in_chunks():
    payload = random.Random(3).randbytes(100_000)

    async def read(offset: int, length: int) -> bytes:
        return payload[offset:offset + length]

    assert run(crc32_of(read, len(payload), chunk=4096)) == zlib.crc32(payload)
    with pytest.raises(ZipError):
        run(crc32_of(read, len(payload) + 1, chunk=4096))


@pytest.mark.skipif(shutil.which("unzip") is None, reason="unzip is not installed")
@pytest.mark.parametrize("force_zip64", [False, True])
def test_unzip_tests_and_extracts_it(tmp_path, force_zip64):
    members, data = sample(4)
    path = tmp_path / "view.zip"
    path.write_bytes(Archive(members, data, force_zip64=force_zip64).whole())
    out = subprocess.run(["unzip", "-t", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No errors detected" in out.stdout
    subprocess.run(["unzip", "-q", str(path), "-d", str(tmp_path / "x")], check=True)
    for i, member in enumerate(members):
        extracted = tmp_path / "x" / member.name
        assert extracted.read_bytes() == data[i]
        assert int(extracted.stat().st_mtime) == int(member.mtime)  # from the UT extra field
        assert extracted.stat().st_mode & 0o777 == member.mode


# -- names: D/.zip/F.zip -------------------------------------------------------------------------------


def test_zip_names_parse_into_the_folder_they_archive():
    import errno

    from gstore.virtual import VirtualNames, ZipRef, parse_virtual_path, zip_name

    names = VirtualNames()
    assert parse_virtual_path("a/.zip/b.zip", names) == ZipRef("a", "a/b", "a/.zip/b.zip")
    assert parse_virtual_path(".zip/..zip", names) == ZipRef("", "", ".zip/..zip")  # the mount root
    assert parse_virtual_path("a/.zip/..%2Fc%2Fd.zip", names) == ZipRef("a", "c/d", "a/.zip/..%2Fc%2Fd.zip")
    assert parse_virtual_path("a/.zip/" + zip_name("x+y %/z"), names).folder == "a/x+y %/z"
    cases = {"a/.zip/b": errno.EINVAL, "a/.zip/.zip": errno.EINVAL, "a/.zip/.concat.zip": errno.EINVAL,
             ".zip/..%2Fup.zip": errno.EACCES, "a/.zip/b.zip/c": errno.ENOTDIR, "a/.zip/%2E%2E.zip": errno.EINVAL}
    for path, expected in cases.items():
        with pytest.raises(OSError) as caught:
            parse_virtual_path(path, names)
        assert caught.value.errno == expected, path
    # Not nestable in .concat parts; off like the other roles.
    with pytest.raises(OSError) as caught:
        parse_virtual_path(".concat/.zip%2Fa.zip", names)
    assert caught.value.errno == errno.EINVAL
    assert parse_virtual_path("a/.zip/b.zip", VirtualNames(zip=None)) is None
    assert parse_virtual_path("a/_z/b.zip", VirtualNames(zip="_z")) == ZipRef("a", "a/b", "a/_z/b.zip")
