"""Byte layout of a STORED (uncompressed) zip archive of known files, for a read-only view.

``D/.zip/FOLDER.zip`` shows the files under ``D/FOLDER`` as one zip archive
that is never written anywhere: its bytes are computed for the range a reader
asks for. Everything in a zip except the CRC-32s depends only on the members'
names, sizes and times, so :class:`ZipLayout` knows the archive's size and
where every header and every member's bytes sit without reading any member;
``stat`` needs no data. The CRC-32 of a member is needed by its local header
(just before its bytes) and by the central directory (at the end, which most
readers, ``unzip`` and Python's ``zipfile`` included, read first).
:func:`read_zip` asks for a member's CRC only when a read touches a header that
carries it, so a sequential copy streams each member once for its CRC right
before its bytes are read (the second read is served by the caller's cache),
and a reader that starts at the central directory makes every member be read
once first.

Format (APPNOTE 6.3.x):

* every member: local file header, then its bytes; method 0 (stored), no data
  descriptor (the CRC is in the local header), bit 11 set when the name is not
  ASCII (names are UTF-8), an extended-timestamp extra field (``UT``, the
  modification time in UTC, which ``unzip`` uses) when the time fits in it,
  DOS date and time in the daemon's local time zone as zip tools expect,
  Unix permissions in the external attributes (version made by: Unix);
* the central directory, then the end-of-central-directory record;
* ZIP64: a member of 4 GiB - 1 or more, or whose local header starts at or
  past 4 GiB - 1, gets a ZIP64 extra field (sizes, offset) with 0xFFFFFFFF in
  the 32-bit fields; more than 65,534 members or a central directory past
  4 GiB - 1 adds the ZIP64 end record and locator before the end record.
  ``force_zip64`` uses them everywhere (tests exercise the readers' ZIP64 path
  with small archives).

Pure code: no I/O, no framework; :func:`read_zip` awaits caller-supplied
coroutines (trio or asyncio).
"""

from __future__ import annotations

import errno
import struct
import time
import zlib
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

#: The 32-bit fields' "see the ZIP64 extra field" marker; a value this large needs ZIP64.
ZIP32_LIMIT = 0xFFFFFFFF
#: Members in an archive without the ZIP64 end record (0xFFFF is the marker).
ZIP32_MAX_ENTRIES = 0xFFFE

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # 30 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
_END = struct.Struct("<IHHHHIIH")  # 22 bytes
_END64 = struct.Struct("<IQHHIIQQQQ")  # 56 bytes
_LOCATOR64 = struct.Struct("<IIQI")  # 20 bytes
_LOCAL_SIG, _CENTRAL_SIG, _END_SIG = 0x04034B50, 0x02014B50, 0x06054B50
_END64_SIG, _LOCATOR64_SIG = 0x06064B50, 0x07064B50
_UT_TAG, _ZIP64_TAG = 0x5455, 0x0001
_UT_SIZE = 9  # tag, length, flags, mtime (local and central alike: mtime only)
_MADE_BY_UNIX = 3 << 8
_VERSION_STORED, _VERSION_ZIP64 = 10, 45
_FLAG_UTF8 = 1 << 11
_S_IFREG = 0o100000


class ZipError(OSError):
    """A member did not deliver the bytes its size promised (ESTALE), or a bad member."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


@dataclass(frozen=True, slots=True)
class ZipMember:
    """One file of the archive: its name inside the zip ("a/b.txt"), size, mtime, permissions."""

    name: str
    size: int
    mtime: float
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class _Entry:
    name: bytes
    flags: int
    size: int
    dos_time: int
    dos_date: int
    unix_time: int | None  # for the UT extra field
    mode: int
    local_offset: int
    data_offset: int
    size64: bool  # sizes in a ZIP64 extra field (local and central)
    offset64: bool  # local header offset in the central ZIP64 extra field


def _dos_time(mtime: float) -> tuple[int, int]:
    """(time, date) in MS-DOS format, local time, clamped to 1980-01-01 .. 2107-12-31."""
    try:
        t = time.localtime(max(0.0, mtime))
    except (OverflowError, OSError, ValueError):
        t = time.localtime(0)
    if t.tm_year < 1980:
        return 0, (1 << 5) | 1  # 1980-01-01 00:00:00
    if t.tm_year > 2107:
        return (23 << 11) | (59 << 5) | 29, (127 << 9) | (12 << 5) | 31
    return (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2), ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday


def _check_name(name: str) -> bytes:
    if not name or name.startswith("/") or name.endswith("/") or "\0" in name:
        raise ValueError(f"invalid zip member name {name!r}")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"invalid zip member name {name!r}")
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > 0xFFFF:
        raise ValueError(f"zip member name longer than 65535 bytes: {name[:80]!r}...")
    return encoded


class ZipLayout:
    """Where everything is in the archive of ``members`` (in that order); no CRC needed."""

    def __init__(self, members: Sequence[ZipMember], *, force_zip64: bool = False) -> None:
        entries: list[_Entry] = []
        local_starts: list[int] = []
        offset = 0
        seen: set[bytes] = set()
        for member in members:
            if not isinstance(member.size, int) or isinstance(member.size, bool) or member.size < 0:
                raise ValueError(f"member {member.name!r} has an invalid size {member.size!r}")
            name = _check_name(member.name)
            if name in seen:
                raise ValueError(f"duplicate zip member name {member.name!r}")
            seen.add(name)
            flags = 0 if name.isascii() else _FLAG_UTF8
            dos_time, dos_date = _dos_time(member.mtime)
            unix_time = int(member.mtime) if 0 <= member.mtime <= 0x7FFFFFFF else None
            size64 = force_zip64 or member.size >= ZIP32_LIMIT
            offset64 = force_zip64 or offset >= ZIP32_LIMIT
            extra = (_UT_SIZE if unix_time is not None else 0) + (20 if size64 else 0)
            data_offset = offset + _LOCAL.size + len(name) + extra
            entries.append(_Entry(name, flags, member.size, dos_time, dos_date, unix_time,
                                  member.mode & 0o7777, offset, data_offset, size64, offset64))
            local_starts.append(offset)
            offset = data_offset + member.size
        self._entries = tuple(entries)
        self._local_starts = tuple(local_starts)
        self.central_offset = offset
        self.central_size = sum(_CENTRAL.size + len(e.name) + self._central_extra_size(e) for e in entries)
        central_end = self.central_offset + self.central_size
        self.zip64 = (force_zip64 or len(entries) > ZIP32_MAX_ENTRIES or self.central_offset >= ZIP32_LIMIT
                      or self.central_size >= ZIP32_LIMIT)
        self._force = force_zip64
        self.end_offset = central_end
        end_size = _END.size + ((_END64.size + _LOCATOR64.size) if self.zip64 else 0)
        self.total_size = central_end + end_size

    @staticmethod
    def _central_extra_size(entry: _Entry) -> int:
        fields = (2 if entry.size64 else 0) + (1 if entry.offset64 else 0)
        return (_UT_SIZE if entry.unix_time is not None else 0) + ((4 + 8 * fields) if fields else 0)

    def __len__(self) -> int:
        return len(self._entries)

    def member_range(self, index: int) -> tuple[int, int]:
        """``(start, end)`` of member ``index``'s bytes in the archive."""
        entry = self._entries[index]
        return entry.data_offset, entry.data_offset + entry.size

    def name(self, index: int) -> str:
        return self._entries[index].name.decode("utf-8", "surrogateescape")

    def size(self, index: int) -> int:
        return self._entries[index].size

    # -- bytes of the structures ----------------------------------------------------------------

    def local_header(self, index: int, crc: int) -> bytes:
        e = self._entries[index]
        extra = b""
        if e.unix_time is not None:
            extra += struct.pack("<HHBI", _UT_TAG, 5, 1, e.unix_time)
        if e.size64:
            extra += struct.pack("<HHQQ", _ZIP64_TAG, 16, e.size, e.size)
        size32 = ZIP32_LIMIT if e.size64 else e.size
        version = _VERSION_ZIP64 if (e.size64 or e.offset64) else _VERSION_STORED
        return _LOCAL.pack(_LOCAL_SIG, version, e.flags, 0, e.dos_time, e.dos_date, crc & 0xFFFFFFFF,
                           size32, size32, len(e.name), len(extra)) + e.name + extra

    def central_directory(self, crcs: Sequence[int]) -> bytes:
        if len(crcs) != len(self._entries):
            raise ValueError(f"{len(crcs)} CRCs for {len(self._entries)} members")
        out: list[bytes] = []
        for e, crc in zip(self._entries, crcs):
            extra = b""
            if e.unix_time is not None:
                extra += struct.pack("<HHBI", _UT_TAG, 5, 1, e.unix_time)
            values = ([e.size, e.size] if e.size64 else []) + ([e.local_offset] if e.offset64 else [])
            if values:
                extra += struct.pack(f"<HH{len(values)}Q", _ZIP64_TAG, 8 * len(values), *values)
            size32 = ZIP32_LIMIT if e.size64 else e.size
            version = _VERSION_ZIP64 if values else _VERSION_STORED
            out.append(_CENTRAL.pack(
                _CENTRAL_SIG, _MADE_BY_UNIX | _VERSION_ZIP64, version, e.flags, 0, e.dos_time, e.dos_date,
                crc & 0xFFFFFFFF, size32, size32, len(e.name), len(extra), 0, 0, 0,
                ((_S_IFREG | e.mode) << 16) & 0xFFFFFFFF, ZIP32_LIMIT if e.offset64 else e.local_offset,
            ))
            out.append(e.name)
            out.append(extra)
        data = b"".join(out)
        assert len(data) == self.central_size
        return data

    def end_records(self) -> bytes:
        count = len(self._entries)
        out = b""
        if self.zip64:
            out += _END64.pack(_END64_SIG, _END64.size - 12, _MADE_BY_UNIX | _VERSION_ZIP64, _VERSION_ZIP64,
                               0, 0, count, count, self.central_size, self.central_offset)
            out += _LOCATOR64.pack(_LOCATOR64_SIG, 0, self.end_offset, 1)

        def clamp(value: int, limit: int) -> int:
            return limit if (self._force or value >= limit) else value

        entries16 = clamp(count, 0xFFFF)
        out += _END.pack(_END_SIG, 0, 0, entries16, entries16, clamp(self.central_size, ZIP32_LIMIT),
                         clamp(self.central_offset, ZIP32_LIMIT), 0)
        return out

    # -- mapping a read ---------------------------------------------------------------------------

    def locate(self, offset: int, length: int) -> list[tuple[str, int, int, int]]:
        """The pieces ``[offset, offset + length)`` touches, clipped to the end, in order:
        ``(kind, member index, offset in the piece, length)`` with kind ``"local"`` (a
        local header), ``"data"`` (a member's bytes), ``"central"`` (index -1) or
        ``"end"`` (the end records, index -1)."""
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length: {offset}, {length}")
        end = min(offset + length, self.total_size)
        pieces: list[tuple[str, int, int, int]] = []
        position = offset
        index = max(0, bisect_right(self._local_starts, offset) - 1)
        count = len(self._entries)
        while position < end:
            if index < count and position < self.central_offset:
                entry = self._entries[index]
                if position < entry.data_offset:
                    take = min(entry.data_offset, end) - position
                    pieces.append(("local", index, position - entry.local_offset, take))
                    position += take
                    continue
                data_end = entry.data_offset + entry.size
                if position < data_end:
                    take = min(data_end, end) - position
                    pieces.append(("data", index, position - entry.data_offset, take))
                    position += take
                    continue
                index += 1
                continue
            if position < self.end_offset:
                take = min(self.end_offset, end) - position
                pieces.append(("central", -1, position - self.central_offset, take))
            else:
                take = end - position
                pieces.append(("end", -1, position - self.end_offset, take))
            position += take
        return pieces


ReadMember = Callable[[int, int, int], Awaitable[bytes]]


class ZipReader:
    """Reads of one archive: member bytes and CRCs come from the caller's coroutines.

    ``crc(index)`` returns member ``index``'s CRC-32 (computing it may read the
    member; the caller caches and single-flights it); ``all_crcs()`` returns
    every CRC, in order (the caller may compute them in parallel). The central
    directory is built once, at the first read that touches it.
    """

    def __init__(self, layout: ZipLayout, read_member: ReadMember, crc: Callable[[int], Awaitable[int]],
                 all_crcs: Callable[[], Awaitable[Sequence[int]]]) -> None:
        self.layout = layout
        self._read_member = read_member
        self._crc = crc
        self._all_crcs = all_crcs
        self._central: bytes | None = None
        self._end = layout.end_records()

    @property
    def size(self) -> int:
        return self.layout.total_size

    async def read(self, offset: int, size: int) -> bytes:
        chunks: list[bytes] = []
        for kind, index, piece_offset, length in self.layout.locate(offset, size):
            if kind == "data":
                data = await self._read_member(index, piece_offset, length)
                if len(data) != length:
                    raise ZipError(errno.ESTALE, (
                        f"member {self.layout.name(index)!r} returned {len(data)} bytes at offset "
                        f"{piece_offset} instead of {length}: it changed since the archive was opened"))
                chunks.append(data)
            elif kind == "local":
                header = self.layout.local_header(index, await self._crc(index))
                chunks.append(header[piece_offset:piece_offset + length])
            elif kind == "central":
                if self._central is None:
                    self._central = self.layout.central_directory(list(await self._all_crcs()))
                chunks.append(self._central[piece_offset:piece_offset + length])
            else:
                chunks.append(self._end[piece_offset:piece_offset + length])
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def crc32_of(read: Callable[[int, int], Awaitable[bytes]], size: int, *, chunk: int = 8 * 1024 * 1024,
                   update: Callable[[bytes, int], Awaitable[int]] | None = None) -> int:
    """CRC-32 of ``size`` bytes read with ``read(offset, length)`` in chunks.

    ``update(data, crc)`` may run :func:`zlib.crc32` elsewhere (a worker thread
    for large chunks); by default it runs inline. A short read is ESTALE.
    """
    crc = 0
    offset = 0
    while offset < size:
        length = min(chunk, size - offset)
        data = await read(offset, length)
        if len(data) != length:
            raise ZipError(errno.ESTALE, f"short read at {offset} of {size} bytes while computing a CRC-32")
        crc = await update(data, crc) if update is not None else zlib.crc32(data, crc)
        offset += length
    return crc & 0xFFFFFFFF


__all__ = ["ZIP32_LIMIT", "ZIP32_MAX_ENTRIES", "ZipError", "ZipLayout", "ZipMember", "ZipReader", "crc32_of"]
