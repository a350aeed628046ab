"""Byte ranges of a concatenation, mapped onto its parts.

A ``.concat`` file is the bytes of its parts one after the other.
:class:`ConcatLayout` is built from the parts' sizes (as stat gave them when
the file was looked up or opened) and maps a read of the whole onto reads of
the parts in O(log n); :func:`read_concat` performs such a read with a
caller-supplied coroutine that reads one part.

Zero-size parts take no room and are never read. Reads past the end are
clipped (a read starting at or past the end returns ``b""``), as for any file.

If a part returns fewer or more bytes than the layout expects (the object
changed size since the layout was made), :func:`read_concat` raises
:class:`ConcatError` with ESTALE rather than returning shifted bytes: the
caller should make a new layout (reopen).
"""

from __future__ import annotations

import errno
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Sequence


class ConcatError(OSError):
    """A part did not deliver the bytes its size promised (ESTALE)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


class ConcatLayout:
    """The parts of a concatenation: ``(path, size)`` pairs, in order."""

    __slots__ = ("_paths", "_sizes", "_starts", "_total")

    def __init__(self, parts: Sequence[tuple[str, int]]) -> None:
        paths: list[str] = []
        sizes: list[int] = []
        starts: list[int] = []
        total = 0
        for path, size in parts:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"part {path!r} has an invalid size {size!r}")
            paths.append(path)
            sizes.append(size)
            starts.append(total)
            total += size
        self._paths = tuple(paths)
        self._sizes = tuple(sizes)
        self._starts = tuple(starts)
        self._total = total

    @property
    def total_size(self) -> int:
        """Size of the concatenation in bytes."""
        return self._total

    @property
    def paths(self) -> tuple[str, ...]:
        return self._paths

    @property
    def sizes(self) -> tuple[int, ...]:
        return self._sizes

    def __len__(self) -> int:
        return len(self._paths)

    def part_range(self, index: int) -> tuple[int, int]:
        """``(start, end)`` offsets of part ``index`` in the concatenation."""
        start = self._starts[index]
        return start, start + self._sizes[index]

    def locate(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """``(part_index, part_offset, length)`` for each part the byte range
        ``[offset, offset + length)`` touches, in order, clipped to the end.

        The pieces are contiguous, non-empty, and cover exactly the clipped
        range; zero-size parts never appear.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length: {offset}, {length}")
        end = min(offset + length, self._total)
        if offset >= end:
            return []
        starts, sizes = self._starts, self._sizes
        # The last part starting at or before offset: with zero-size parts
        # sharing a start, that is the non-empty one holding the offset.
        index = bisect_right(starts, offset) - 1
        pieces: list[tuple[int, int, int]] = []
        position = offset
        count = len(sizes)
        while position < end and index < count:
            size = sizes[index]
            if size:
                part_offset = position - starts[index]
                take = min(size - part_offset, end - position)
                pieces.append((index, part_offset, take))
                position += take
            index += 1
        return pieces


ReadPart = Callable[[int, int, int], Awaitable[bytes]]


async def read_concat(layout: ConcatLayout, offset: int, size: int, read_part: ReadPart) -> bytes:
    """Read ``size`` bytes at ``offset`` of the concatenation.

    Awaits ``read_part(index, part_offset, length)`` once per part the range
    touches, in order (sequentially; the caller may prefetch or cache inside
    ``read_part``). Works with any async framework (trio, asyncio).
    """
    pieces = layout.locate(offset, size)
    if not pieces:
        return b""
    chunks: list[bytes] = []
    for index, part_offset, length in pieces:
        data = await read_part(index, part_offset, length)
        if len(data) != length:
            raise ConcatError(
                errno.ESTALE,
                f"part {index} ({layout.paths[index]!r}) returned {len(data)} bytes at offset "
                f"{part_offset} instead of {length}: it changed since the concatenation was opened",
            )
        chunks.append(data)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
