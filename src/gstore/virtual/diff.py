"""Unified diffs, byte for byte as GNU ``diff -u`` prints them.

:func:`unified_diff_bytes` produces what GNU diffutils (3.x) ``diff -u A B``
prints for two text files, including which lines it pairs up: the same
line splitting, the same shortest-edit-script search (Myers' bidirectional
middle-snake search, with diff's discarding of lines that cannot or can hardly
match and its cost cut-off for large inputs) and the same sliding of change
blocks afterwards, so hunks are identical, not merely equivalent. The
implementation is independent, checked against ``/usr/bin/diff`` by the tests.

Format
    * Empty output when the inputs are equal.
    * Header lines ``--- A`` and ``+++ B``: the two labels, quoted exactly as
      diff quotes file names (``"a b"``, ``"\\303\\251"``, ``"a\\tb"``, i.e.
      within double quotes with C escapes when a name holds a space, ``"``,
      ``\\``, a control character or a non-ASCII byte). With ``a_mtime`` /
      ``b_mtime`` the header also carries a tab and the time as diff prints it
      (``2026-11-21 10:15:02.123000000 +0000``, in the datetime's own
      timezone; a naive datetime is taken as UTC). Without them the header
      carries just the labels, which is what ``diff -u --label A --label B``
      prints for names that need no quoting.
    * Hunks with ``context`` (3) lines of context, merged when at most
      ``2 * context`` unchanged lines separate them; ``@@ -l,s +l,s @@`` ranges
      as diff prints them (``-l`` alone for one line, ``-l,0`` for none).
    * A last line without newline is followed by ``\\ No newline at end of
      file``; such a line differs from the same line with a newline.
    * Lines end at ``\\n`` only; ``\\r`` is an ordinary byte (CRLF files diff
      as diff shows them, with the ``\\r`` kept).

Errors (:class:`DiffError`, an ``OSError``)
    * ``EFBIG`` when either input is larger than ``limit`` bytes (default
      :data:`DIFF_SIZE_LIMIT`, 8 MiB). :func:`check_diff_sizes` checks sizes
      before the inputs are fetched.
    * ``EFBIG`` too when the inputs differ so much that the search would
      exceed ``max_work`` (default :data:`DIFF_WORK_LIMIT`, a few seconds of
      CPU): diff's search costs about (lines) x (differences), so two unrelated
      files of some thousand lines each hit it, while a small change to a file
      of 100,000 lines takes well under a second.
    * ``EINVAL`` when either input is binary, meaning it contains a NUL byte
      anywhere (diff itself only looks at the start and then prints "Binary
      files ... differ"; we never produce a diff holding NULs). Invalid UTF-8
      is *not* binary: diff compares bytes and so do we, so Latin-1 text diffs
      fine. Equal inputs give empty output even if binary (as with diff).

The work is CPU-bound (pure Python); call it from a worker thread
(``trio.to_thread.run_sync``) for large inputs.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from datetime import datetime, timezone

#: Largest input :func:`unified_diff_bytes` accepts by default (per side).
DIFF_SIZE_LIMIT = 8 * 1024 * 1024
#: Default bound on the search effort (diagonals visited, summed over the
#: whole search): about a few seconds of CPU. Inputs that need more fail with
#: EFBIG instead of tying up a thread for minutes.
DIFF_WORK_LIMIT = 50_000_000
#: Lines of context, as ``diff -u``.
DEFAULT_CONTEXT = 3

_NO_NEWLINE = b"\n\\ No newline at end of file\n"


class DiffError(OSError):
    """The inputs cannot be diffed: EFBIG (too large) or EINVAL (binary)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


def check_diff_sizes(size_a: int, size_b: int, *, limit: int = DIFF_SIZE_LIMIT) -> None:
    """Raise EFBIG :class:`DiffError` if either size is over ``limit``."""
    for which, size in (("first", size_a), ("second", size_b)):
        if size > limit:
            raise DiffError(
                errno.EFBIG,
                f"cannot diff: the {which} file has {size} bytes, more than the limit of {limit}",
            )


# -- header ------------------------------------------------------------------------

_C_ESCAPES = {
    7: b"\\a",
    8: b"\\b",
    9: b"\\t",
    10: b"\\n",
    11: b"\\v",
    12: b"\\f",
    13: b"\\r",
    34: b'\\"',
    92: b"\\\\",
}


def quote_name(name: str) -> bytes:
    """A file name as diff prints it in a header line."""
    raw = name.encode("utf-8", "surrogateescape")
    if not any(c <= 0x20 or c >= 0x80 or c in (0x22, 0x5C) for c in raw):
        return raw
    out = bytearray(b'"')
    for c in raw:
        escape = _C_ESCAPES.get(c)
        if escape is not None:
            out += escape
        elif c < 0x20 or c >= 0x80:
            out += b"\\%03o" % c
        else:
            out.append(c)
    out += b'"'
    return bytes(out)


def format_header_time(when: datetime) -> str:
    """A time as diff prints it after the file name: ``%Y-%m-%d %H:%M:%S.%N %z``."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    offset = when.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset is not None else 0
    sign = "-" if minutes < 0 else "+"
    hours, mins = divmod(abs(minutes), 60)
    return (
        f"{when.year:04d}-{when.month:02d}-{when.day:02d} "
        f"{when.hour:02d}:{when.minute:02d}:{when.second:02d}.{when.microsecond * 1000:09d} "
        f"{sign}{hours:02d}{mins:02d}"
    )


def _header(mark: bytes, label: str, when: datetime | None) -> bytes:
    line = mark + b" " + quote_name(label)
    if when is not None:
        line += b"\t" + format_header_time(when).encode("ascii")
    return line + b"\n"


# -- lines -------------------------------------------------------------------------


def _split_lines(data: bytes) -> list[bytes]:
    """Lines with their ``\\n``; a last line without one is kept without."""
    pieces = data.split(b"\n")
    last = pieces.pop()
    lines = [piece + b"\n" for piece in pieces]
    if last:
        lines.append(last)
    return lines


# -- the edit script ---------------------------------------------------------------


def _discardable(own: list[int], other_counts: dict[int, int]) -> list[int]:
    """Per line: 0 keep, 1 discard (no match in the other file), 2 provisional
    (very many matches), then reduced to the provisional lines that sit inside a
    run of discards, as diff does before searching."""
    n = len(own)
    many = 5
    tem = n // 64
    while True:
        tem >>= 2
        if tem <= 0:
            break
        many *= 2
    marks = [0] * n
    for i, cls in enumerate(own):
        matches = other_counts.get(cls, 0)
        if matches == 0:
            marks[i] = 1
        elif matches > many:
            marks[i] = 2

    i = 0
    while i < n:
        mark = marks[i]
        if mark == 2:
            marks[i] = 0
        elif mark == 1:
            # A run of discardable lines starting at a definite discard.
            end = i
            provisional = 0
            while end < n and marks[end] != 0:
                if marks[end] == 2:
                    provisional += 1
                end += 1
            while end > i and marks[end - 1] == 2:
                end -= 1
                marks[end] = 0
                provisional -= 1
            length = end - i
            if provisional * 4 > length:
                for k in range(i, end):
                    if marks[k] == 2:
                        marks[k] = 0
            else:
                minimum = 1
                tem = length >> 2
                while True:
                    tem >>= 2
                    if tem <= 0:
                        break
                    minimum <<= 1
                minimum += 1
                # Long stretches of provisional lines inside the run are kept.
                consec = 0
                k = 0
                while k < length:
                    if marks[i + k] != 2:
                        consec = 0
                    else:
                        consec += 1
                        if consec == minimum:
                            k -= consec
                        elif consec > minimum:
                            marks[i + k] = 0
                    k += 1
                # Near either end of the run, provisional lines are kept unless
                # three definite discards in a row come first.
                consec = 0
                for k in range(length):
                    mark_k = marks[i + k]
                    if k >= 8 and mark_k == 1:
                        break
                    if mark_k == 2:
                        consec = 0
                        marks[i + k] = 0
                    elif mark_k == 0:
                        consec = 0
                    else:
                        consec += 1
                    if consec == 3:
                        break
                i += length - 1
                consec = 0
                for k in range(length):
                    mark_k = marks[i - k]
                    if k >= 8 and mark_k == 1:
                        break
                    if mark_k == 2:
                        consec = 0
                        marks[i - k] = 0
                    elif mark_k == 0:
                        consec = 0
                    else:
                        consec += 1
                    if consec == 3:
                        break
        i += 1
    return marks


class _Search:
    """Shortest edit script between two int sequences, marking changed lines."""

    def __init__(
        self,
        xv: list[int],
        yv: list[int],
        xreal: list[int],
        yreal: list[int],
        xchanged: list[bool],
        ychanged: list[bool],
        max_work: int,
    ) -> None:
        self.xv = xv
        self.yv = yv
        self.xreal = xreal
        self.yreal = yreal
        self.xchanged = xchanged
        self.ychanged = ychanged
        size = len(xv) + len(yv) + 3
        self.offset = len(yv) + 1
        self.fd = [0] * size
        self.bd = [0] * size
        diags = size
        too_expensive = 1
        while diags:
            diags >>= 2
            too_expensive <<= 1
        self.too_expensive = max(4096, too_expensive)
        self.work = 0
        self.max_work = max_work

    def run(self) -> None:
        xv, yv = self.xv, self.yv
        stack = [(0, len(xv), 0, len(yv), False)]
        while stack:
            xoff, xlim, yoff, ylim, minimal = stack.pop()
            while xoff < xlim and yoff < ylim and xv[xoff] == yv[yoff]:
                xoff += 1
                yoff += 1
            while xoff < xlim and yoff < ylim and xv[xlim - 1] == yv[ylim - 1]:
                xlim -= 1
                ylim -= 1
            if xoff == xlim:
                for y in range(yoff, ylim):
                    self.ychanged[self.yreal[y]] = True
            elif yoff == ylim:
                for x in range(xoff, xlim):
                    self.xchanged[self.xreal[x]] = True
            else:
                xmid, ymid, lo_minimal, hi_minimal = self._middle(xoff, xlim, yoff, ylim, minimal)
                stack.append((xmid, xlim, ymid, ylim, hi_minimal))
                stack.append((xoff, xmid, yoff, ymid, lo_minimal))

    def _middle(
        self, xoff: int, xlim: int, yoff: int, ylim: int, minimal: bool
    ) -> tuple[int, int, bool, bool]:
        """A point on an optimal (or, past the cost cut-off, good) path,
        searching from both corners at once."""
        xv, yv, fd, bd, o = self.xv, self.yv, self.fd, self.bd, self.offset
        dmin = xoff - ylim
        dmax = xlim - yoff
        fmid = xoff - yoff
        bmid = xlim - ylim
        fmin = fmax = fmid
        bmin = bmax = bmid
        odd = (fmid - bmid) & 1
        fd[fmid + o] = xoff
        bd[bmid + o] = xlim
        far = xlim + ylim + 1
        cost = 0
        visits = 0
        while True:
            cost += 1
            if fmin > dmin:
                fmin -= 1
                fd[fmin - 1 + o] = -1
            else:
                fmin += 1
            if fmax < dmax:
                fmax += 1
                fd[fmax + 1 + o] = -1
            else:
                fmax -= 1
            # Diagonal d lives at index k = d + o of fd and bd.
            visits += fmax - fmin + 2
            if odd:
                kmin, kmax = bmin + o, bmax + o
                for k in range(fmax + o, fmin + o - 1, -2):
                    lo = fd[k - 1]
                    hi = fd[k + 1]
                    x = hi if lo < hi else lo + 1
                    y = x - k + o
                    while x < xlim and y < ylim and xv[x] == yv[y]:
                        x += 1
                        y += 1
                    fd[k] = x
                    if kmin <= k <= kmax and bd[k] <= x:
                        self.work += visits
                        return x, y, True, True
            else:
                for k in range(fmax + o, fmin + o - 1, -2):
                    lo = fd[k - 1]
                    hi = fd[k + 1]
                    x = hi if lo < hi else lo + 1
                    y = x - k + o
                    while x < xlim and y < ylim and xv[x] == yv[y]:
                        x += 1
                        y += 1
                    fd[k] = x

            if bmin > dmin:
                bmin -= 1
                bd[bmin - 1 + o] = far
            else:
                bmin += 1
            if bmax < dmax:
                bmax += 1
                bd[bmax + 1 + o] = far
            else:
                bmax -= 1
            visits += bmax - bmin + 2
            if odd:
                for k in range(bmax + o, bmin + o - 1, -2):
                    lo = bd[k - 1]
                    hi = bd[k + 1]
                    x = lo if lo < hi else hi - 1
                    y = x - k + o
                    while x > xoff and y > yoff and xv[x - 1] == yv[y - 1]:
                        x -= 1
                        y -= 1
                    bd[k] = x
            else:
                kmin, kmax = fmin + o, fmax + o
                for k in range(bmax + o, bmin + o - 1, -2):
                    lo = bd[k - 1]
                    hi = bd[k + 1]
                    x = lo if lo < hi else hi - 1
                    y = x - k + o
                    while x > xoff and y > yoff and xv[x - 1] == yv[y - 1]:
                        x -= 1
                        y -= 1
                    bd[k] = x
                    if kmin <= k <= kmax and x <= fd[k]:
                        self.work += visits
                        return x, y, True, True

            if self.work + visits > self.max_work:
                raise DiffError(
                    errno.EFBIG,
                    "cannot diff: the files differ too much to compare within the work limit "
                    f"({self.max_work})",
                )

            if minimal or cost < self.too_expensive:
                continue

            # Too expensive: settle for the furthest point reached either way.
            fxy_best = -1
            fx_best = 0
            for d in range(fmax, fmin - 1, -2):
                x = min(fd[d + o], xlim)
                y = x - d
                if y > ylim:
                    x = ylim + d
                    y = ylim
                if x + y > fxy_best:
                    fxy_best = x + y
                    fx_best = x
            bxy_best = far * 2
            bx_best = 0
            for d in range(bmax, bmin - 1, -2):
                x = max(xoff, bd[d + o])
                y = x - d
                if y < yoff:
                    x = yoff + d
                    y = yoff
                if x + y < bxy_best:
                    bxy_best = x + y
                    bx_best = x
            self.work += visits
            if (xlim + ylim) - bxy_best < fxy_best - (xoff + yoff):
                return fx_best, fxy_best - fx_best, True, False
            return bx_best, bxy_best - bx_best, False, True


def _slide(changed: list[bool], other: list[bool], eq: list[int]) -> None:
    """Move each block of changed lines as far down as equal lines allow,
    merging blocks, then back up to line up with a change in the other file
    when possible (diff's boundary shifting)."""
    n = len(changed)
    m = len(other)

    def other_at(j: int) -> bool:
        return 0 <= j < m and other[j]

    i = 0
    j = 0
    while True:
        while i < n and not changed[i]:
            while other_at(j):
                j += 1
            j += 1
            i += 1
        if i == n:
            return
        start = i
        i += 1
        while i < n and changed[i]:
            i += 1
        while other_at(j):
            j += 1
        while True:
            run_length = i - start
            while start > 0 and eq[start - 1] == eq[i - 1]:
                start -= 1
                changed[start] = True
                i -= 1
                changed[i] = False
                while start > 0 and changed[start - 1]:
                    start -= 1
                j -= 1
                while other_at(j):
                    j -= 1
            corresponding = i if other_at(j - 1) else n
            while i != n and eq[start] == eq[i]:
                changed[start] = False
                start += 1
                changed[i] = True
                i += 1
                while i < n and changed[i]:
                    i += 1
                j += 1
                while other_at(j):
                    corresponding = i
                    j += 1
            if run_length == i - start:
                break
        while corresponding < i:
            start -= 1
            changed[start] = True
            i -= 1
            changed[i] = False
            j -= 1
            while other_at(j):
                j -= 1


def _changes(
    lines0: list[bytes], lines1: list[bytes], horizon: int, max_work: int
) -> list[tuple[int, int, int, int]]:
    """(line0, line1, deleted, inserted) blocks, 0-based, in order."""
    n0, n1 = len(lines0), len(lines1)
    prefix = 0
    while prefix < n0 and prefix < n1 and lines0[prefix] == lines1[prefix]:
        prefix += 1
    # Identical lines at either end are left out of the search, but for a few
    # next to the changes (as diff does: it affects which lines it discards
    # and how far blocks can slide).
    skip_front = max(0, prefix - horizon)
    bound = min(n0, n1) - skip_front
    suffix = 0
    while suffix < bound and lines0[n0 - 1 - suffix] == lines1[n1 - 1 - suffix]:
        suffix += 1
    skip_back = max(0, suffix - horizon)

    classes: dict[bytes, int] = {}
    eq0 = [classes.setdefault(line, len(classes)) for line in lines0[skip_front : n0 - skip_back]]
    eq1 = [classes.setdefault(line, len(classes)) for line in lines1[skip_front : n1 - skip_back]]

    counts0: dict[int, int] = {}
    for cls in eq0:
        counts0[cls] = counts0.get(cls, 0) + 1
    counts1: dict[int, int] = {}
    for cls in eq1:
        counts1[cls] = counts1.get(cls, 0) + 1
    marks0 = _discardable(eq0, counts1)
    marks1 = _discardable(eq1, counts0)

    changed0 = [mark != 0 for mark in marks0]
    changed1 = [mark != 0 for mark in marks1]
    xreal = [i for i, mark in enumerate(marks0) if mark == 0]
    yreal = [i for i, mark in enumerate(marks1) if mark == 0]
    _Search(
        [eq0[i] for i in xreal], [eq1[i] for i in yreal], xreal, yreal, changed0, changed1, max_work
    ).run()

    _slide(changed0, changed1, eq0)
    _slide(changed1, changed0, eq1)

    out: list[tuple[int, int, int, int]] = []
    r0, r1 = len(changed0), len(changed1)
    i0 = i1 = 0
    while i0 < r0 or i1 < r1:
        if (i0 < r0 and changed0[i0]) or (i1 < r1 and changed1[i1]):
            s0, s1 = i0, i1
            while i0 < r0 and changed0[i0]:
                i0 += 1
            while i1 < r1 and changed1[i1]:
                i1 += 1
            out.append((s0 + skip_front, s1 + skip_front, i0 - s0, i1 - s1))
        else:
            i0 += 1
            i1 += 1
    return out


# -- output ------------------------------------------------------------------------


def _range(first: int, last: int) -> bytes:
    """diff's ``l,s`` for 0-based lines first..last (inclusive, may be empty)."""
    a, b = first + 1, last + 1
    if b < a:
        return b"%d,0" % b
    if a == b:
        return b"%d" % a
    return b"%d,%d" % (a, b - a + 1)


def _hunks(
    changes: list[tuple[int, int, int, int]], context: int
) -> Iterator[list[tuple[int, int, int, int]]]:
    group: list[tuple[int, int, int, int]] = []
    for change in changes:
        if group:
            prev = group[-1]
            if change[0] - (prev[0] + prev[2]) >= 2 * context + 1:
                yield group
                group = []
        group.append(change)
    if group:
        yield group


def _line(out: bytearray, mark: bytes, line: bytes) -> None:
    out += mark
    if line.endswith(b"\n"):
        out += line
    else:
        out += line
        out += _NO_NEWLINE


def unified_diff_bytes(
    a: bytes,
    b: bytes,
    a_label: str,
    b_label: str,
    *,
    limit: int = DIFF_SIZE_LIMIT,
    a_mtime: datetime | None = None,
    b_mtime: datetime | None = None,
    context: int = DEFAULT_CONTEXT,
    max_work: int = DIFF_WORK_LIMIT,
) -> bytes:
    """``diff -u`` of ``a`` and ``b`` (``-U context``), labelled ``a_label`` and
    ``b_label``; b"" when equal. Raises :class:`DiffError` (EFBIG over
    ``limit``, EINVAL for binary input)."""
    if context < 0:
        raise ValueError("context must be >= 0")
    check_diff_sizes(len(a), len(b), limit=limit)
    if a == b:
        return b""
    for which, data in (("first", a), ("second", b)):
        if b"\0" in data:
            raise DiffError(
                errno.EINVAL, f"cannot diff: the {which} file is binary (it contains NUL bytes)"
            )

    lines0 = _split_lines(a)
    lines1 = _split_lines(b)
    changes = _changes(lines0, lines1, context, max_work)
    n0 = len(lines0)

    out = bytearray()
    out += _header(b"---", a_label, a_mtime)
    out += _header(b"+++", b_label, b_mtime)
    for hunk in _hunks(changes, context):
        first0, first1 = hunk[0][0], hunk[0][1]
        last = hunk[-1]
        last0 = last[0] + last[2] - 1
        last1 = last[1] + last[3] - 1
        before = min(context, first0)  # == min(context, first1): aligned lines
        first0 -= before
        first1 -= before
        after = min(context, n0 - 1 - last0)
        last0 += after
        last1 += after
        out += b"@@ -" + _range(first0, last0) + b" +" + _range(first1, last1) + b" @@\n"
        i = first0
        for line0, line1, deleted, inserted in hunk:
            for k in range(i, line0):
                _line(out, b" ", lines0[k])
            for k in range(line0, line0 + deleted):
                _line(out, b"-", lines0[k])
            for k in range(line1, line1 + inserted):
                _line(out, b"+", lines1[k])
            i = line0 + deleted
        for k in range(i, last0 + 1):
            _line(out, b" ", lines0[k])
    return bytes(out)
