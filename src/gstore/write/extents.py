"""Sets of byte ranges, kept sorted and merged.

A staged file remembers two of these: which ranges hold bytes written by
programs (``dirty``: what must reach the backend) and which ranges of the
staging file are valid at all (``present``: dirty plus ranges fetched from the
original object). Everything else is read from, or copied server-side from,
the original object.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator


class Extents:
    """Disjoint, non-adjacent half-open intervals ``[start, end)``."""

    __slots__ = ("_starts", "_ends")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges:
            self.add(start, end)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends))

    def __len__(self) -> int:
        return len(self._starts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Extents) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"Extents({list(self)!r})"

    def total(self) -> int:
        return sum(e - s for s, e in self)

    def to_list(self) -> list[list[int]]:
        return [[s, e] for s, e in self]

    def copy(self) -> Extents:
        clone = Extents()
        clone._starts, clone._ends = list(self._starts), list(self._ends)
        return clone

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        # Every interval touching or overlapping [start, end) merges into it.
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def remove(self, start: int, end: int) -> None:
        if end <= start:
            return
        lo = bisect.bisect_right(self._ends, start)
        hi = bisect.bisect_left(self._starts, end)
        keep_s: list[int] = []
        keep_e: list[int] = []
        for s, e in zip(self._starts[lo:hi], self._ends[lo:hi]):
            if s < start:
                keep_s.append(s)
                keep_e.append(start)
            if e > end:
                keep_s.append(end)
                keep_e.append(e)
        self._starts[lo:hi] = keep_s
        self._ends[lo:hi] = keep_e

    def truncate(self, size: int) -> None:
        """Forget everything at or beyond ``size``."""
        self.remove(size, max(size, self._ends[-1] if self._ends else size) + 1)

    def covers(self, start: int, end: int) -> bool:
        if end <= start:
            return True
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def overlaps(self, start: int, end: int) -> bool:
        if end <= start:
            return False
        i = bisect.bisect_right(self._starts, end - 1) - 1
        return i >= 0 and self._ends[i] > start

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The sub-ranges of ``[start, end)`` not covered."""
        out: list[tuple[int, int]] = []
        cursor = start
        i = max(0, bisect.bisect_right(self._ends, start))
        while cursor < end and i < len(self._starts):
            s, e = self._starts[i], self._ends[i]
            if s >= end:
                break
            if s > cursor:
                out.append((cursor, s))
            cursor = max(cursor, e)
            i += 1
        if cursor < end:
            out.append((cursor, end))
        return out

    def pieces(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        """Split ``[start, end)`` into runs, each marked covered (True) or not."""
        out: list[tuple[int, int, bool]] = []
        cursor = start
        for gap_start, gap_end in self.gaps(start, end):
            if gap_start > cursor:
                out.append((cursor, gap_start, True))
            out.append((gap_start, gap_end, False))
            cursor = gap_end
        if cursor < end:
            out.append((cursor, end, True))
        return out
