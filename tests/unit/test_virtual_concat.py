"""Unit tests of the concatenation layout (gstore.virtual.concat)."""

from __future__ import annotations

import errno
import time

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from gstore.errors import to_errno
from gstore.virtual.concat import ConcatError, ConcatLayout, read_concat


def make(sizes: list[int]) -> tuple[ConcatLayout, list[bytes]]:
    datas = [bytes((i * 7 + k) % 251 for k in range(size)) for i, size in enumerate(sizes)]
    return ConcatLayout([(f"p{i}", size) for i, size in enumerate(sizes)]), datas


def check_pieces(layout: ConcatLayout, datas: list[bytes], offset: int, length: int) -> None:
    whole = b"".join(datas)
    pieces = layout.locate(offset, length)
    expected = whole[offset : offset + length]
    # Rebuilt from the parts, the pieces give exactly the requested range.
    assert b"".join(datas[i][o : o + n] for i, o, n in pieces) == expected
    position = offset
    last_index = -1
    for index, part_offset, n in pieces:
        assert n > 0, "no empty pieces"
        assert index > last_index, "parts in order, each once"
        assert layout.sizes[index] > 0
        assert part_offset >= 0 and part_offset + n <= layout.sizes[index]
        start, _ = layout.part_range(index)
        assert start + part_offset == position, "no gap, no overlap"
        position += n
        last_index = index
    assert position == offset + len(expected)
    assert bool(pieces) == bool(expected)


def test_basic_layout():
    layout, datas = make([3, 0, 5, 2])
    assert layout.total_size == 10
    assert len(layout) == 4
    assert layout.paths == ("p0", "p1", "p2", "p3")
    assert layout.part_range(2) == (3, 8)
    assert layout.part_range(1) == (3, 3)
    assert layout.locate(0, 10) == [(0, 0, 3), (2, 0, 5), (3, 0, 2)]
    assert layout.locate(2, 2) == [(0, 2, 1), (2, 0, 1)]
    assert layout.locate(3, 1) == [(2, 0, 1)]
    assert layout.locate(8, 100) == [(3, 0, 2)]
    assert layout.locate(9, 1) == [(3, 1, 1)]
    assert layout.locate(10, 5) == []
    assert layout.locate(100, 5) == []
    assert layout.locate(4, 0) == []
    for offset in range(12):
        for length in range(12):
            check_pieces(layout, datas, offset, length)


def test_empty_and_all_zero_layouts():
    assert ConcatLayout([]).total_size == 0
    assert ConcatLayout([]).locate(0, 10) == []
    layout = ConcatLayout([("a", 0), ("b", 0)])
    assert layout.total_size == 0
    assert layout.locate(0, 1) == []


def test_leading_and_trailing_zero_parts():
    layout, datas = make([0, 0, 4, 0, 0, 1, 0])
    assert layout.locate(0, 5) == [(2, 0, 4), (5, 0, 1)]
    assert layout.locate(4, 1) == [(5, 0, 1)]
    for offset in range(7):
        for length in range(7):
            check_pieces(layout, datas, offset, length)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        ConcatLayout([("a", -1)])
    with pytest.raises(ValueError):
        ConcatLayout([("a", 1.5)])  # type: ignore[list-item]
    layout = ConcatLayout([("a", 3)])
    with pytest.raises(ValueError):
        layout.locate(-1, 2)
    with pytest.raises(ValueError):
        layout.locate(0, -2)


@settings(max_examples=300)
@given(
    st.lists(st.one_of(st.just(0), st.integers(1, 5), st.integers(1, 200)), max_size=25),
    st.integers(0, 2000),
    st.integers(0, 2000),
)
def test_locate_matches_slicing(sizes, offset, length):
    layout, datas = make(sizes)
    offset = offset % (layout.total_size + 3)
    check_pieces(layout, datas, offset, length)


def test_locate_is_logarithmic():
    layout = ConcatLayout([(f"p{i}", i % 3) for i in range(300_000)])
    start = time.perf_counter()
    for k in range(5000):
        offset = (k * 7919) % layout.total_size
        pieces = layout.locate(offset, 4)
        assert 1 <= len(pieces) <= 4
    # A linear scan would take seconds; the bisection takes milliseconds.
    assert time.perf_counter() - start < 1.0


# -- read_concat -------------------------------------------------------------------


def run_read(
    layout: ConcatLayout, datas: list[bytes], offset: int, size: int, calls: list | None = None
) -> bytes:
    async def read_part(index: int, part_offset: int, length: int) -> bytes:
        if calls is not None:
            calls.append((index, part_offset, length))
        await trio.sleep(0)
        return datas[index][part_offset : part_offset + length]

    async def main() -> bytes:
        return await read_concat(layout, offset, size, read_part)

    return trio.run(main)


def test_read_concat_touches_only_needed_parts():
    layout, datas = make([4, 0, 4, 4, 4])
    calls: list = []
    assert run_read(layout, datas, 5, 4, calls) == b"".join(datas)[5:9]
    assert calls == [(2, 1, 3), (3, 0, 1)]
    calls.clear()
    assert run_read(layout, datas, 100, 4, calls) == b""
    assert calls == []
    calls.clear()
    assert run_read(layout, datas, 14, 100, calls) == datas[4][2:]
    assert calls == [(4, 2, 2)]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=10), st.integers(0, 500), st.integers(0, 500))
def test_read_concat_matches_slicing(sizes, offset, size):
    layout, datas = make(sizes)
    assert run_read(layout, datas, offset, size) == b"".join(datas)[offset : offset + size]


def test_read_concat_with_asyncio():
    import asyncio

    layout, datas = make([2, 3])

    async def read_part(index: int, part_offset: int, length: int) -> bytes:
        return datas[index][part_offset : part_offset + length]

    assert asyncio.run(read_concat(layout, 1, 3, read_part)) == b"".join(datas)[1:4]


@pytest.mark.parametrize("delta", [-1, 1])
def test_read_concat_part_changed_is_estale(delta):
    layout, _ = make([4, 4])

    async def read_part(index: int, part_offset: int, length: int) -> bytes:
        return b"x" * (length + delta)

    async def main() -> bytes:
        return await read_concat(layout, 2, 4, read_part)

    with pytest.raises(ConcatError) as info:
        trio.run(main)
    assert info.value.errno == errno.ESTALE
    assert to_errno(info.value) == errno.ESTALE
    assert "p0" in str(info.value)
