"""unified_diff_bytes (gstore.virtual.diff) against the real GNU ``diff -u``."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gstore.errors import to_errno
from gstore.virtual.diff import (
    DIFF_SIZE_LIMIT,
    DiffError,
    check_diff_sizes,
    format_header_time,
    quote_name,
    unified_diff_bytes,
)


def _gnu_diff() -> str | None:
    path = shutil.which("diff")
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    return path if "GNU diffutils" in out else None


DIFF = _gnu_diff()
pytestmark = pytest.mark.skipif(DIFF is None, reason="GNU diff (diffutils) is not installed")


class Reference:
    """Runs the real diff on two files in a scratch directory."""

    def __init__(self, directory: Path) -> None:
        self.a = directory / "A"
        self.b = directory / "B"

    def diff(self, a: bytes, b: bytes, context: int = 3) -> bytes:
        self.a.write_bytes(a)
        self.b.write_bytes(b)
        result = subprocess.run(
            [DIFF, f"-U{context}", "--label", "A", "--label", "B", str(self.a), str(self.b)],
            capture_output=True,
            env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "")},
        )
        assert result.returncode in (0, 1), result.stderr
        return result.stdout

    def check(self, a: bytes, b: bytes, context: int = 3) -> bytes:
        expected = self.diff(a, b, context)
        got = unified_diff_bytes(a, b, "A", "B", context=context)
        assert got == expected, (
            f"a={a!r}\nb={b!r}\nexpected:\n{expected.decode(errors='replace')}\ngot:\n{got.decode(errors='replace')}"
        )
        return got


@pytest.fixture
def ref(tmp_path: Path) -> Reference:
    return Reference(tmp_path)


# -- hand-picked cases -------------------------------------------------------------

CASES: list[tuple[bytes, bytes]] = [
    (b"", b"a\n"),
    (b"a\n", b""),
    (b"", b"a"),
    (b"a", b""),
    (b"a", b"a\n"),
    (b"a\n", b"a"),
    (b"a", b"b"),
    (b"a\nb", b"a\nc"),
    (b"x\na\nb", b"x\na\nb\n"),
    (b"a\nb\nc\n", b"a\nB\nc\n"),
    (b"a\r\nb\r\nc\r\n", b"a\r\nb\nc\r\n"),
    (b"line one\r\n", b"line one\n"),
    ("héllo\nwörld\n日本\n".encode(), "héllo\nworld\n日本語\n".encode()),
    ("caf\xe9\n".encode("latin-1"), b"cafe\n"),  # not UTF-8: still text
    (b"\n\n\n", b"\n\n"),
    (b" a\n", b"a\n"),
    (b"a\tb\n", b"a    b\n"),
    (
        b"".join(b"%d\n" % i for i in range(40)),
        b"".join(b"%d\n" % i for i in range(40) if i not in (5, 20, 21)),
    ),
    (
        b"".join(b"%d\n" % i for i in range(40)),
        b"".join(b"%d\n" % i for i in range(40) if i not in (5, 12)),
    ),
    (
        b"".join(b"%d\n" % i for i in range(40)),
        b"".join(b"%d\n" % i for i in range(40) if i not in (5, 13)),
    ),
    (b"x\n" * 10, b"x\n" * 11),
    (b"x\n" * 10, b"x\n" * 3),
    (b"a\nb\n" * 8, b"a\nb\n" * 9),
    (b"}\n\n}\n\n}\n", b"}\n\n}\n"),
    (b"a\nb\nc\nd\ne\nf\ng\nh\ni\n", b"i\nh\ng\nf\ne\nd\nc\nb\na\n"),
    (b"\\ No newline at end of file\n", b"x\n"),
]


@pytest.mark.parametrize(("a", "b"), CASES)
def test_hand_picked_cases(ref, a, b):
    out = ref.check(a, b)
    assert out  # all cases differ


@pytest.mark.parametrize("context", [0, 1, 2, 5])
@pytest.mark.parametrize(("a", "b"), CASES[14:22])
def test_other_context_sizes(ref, a, b, context):
    ref.check(a, b, context)


def test_equal_inputs_give_empty_output():
    assert unified_diff_bytes(b"", b"", "a", "b") == b""
    assert unified_diff_bytes(b"same\n", b"same\n", "a", "b") == b""
    assert unified_diff_bytes(b"\0bin", b"\0bin", "a", "b") == b""  # as diff: identical, no output


def test_no_newline_marker():
    out = unified_diff_bytes(b"a", b"a\n", "x", "y")
    assert out == b"--- x\n+++ y\n@@ -1 +1 @@\n-a\n\\ No newline at end of file\n+a\n"


# -- generated cases ---------------------------------------------------------------


def _random_lines(rng: random.Random) -> list[bytes]:
    alphabet = [b"a", b"b", b"c", b"", b"}", b"x y", b"a\r", "é".encode(), b"  {"][
        : rng.randint(1, 9)
    ]
    return [rng.choice(alphabet) for _ in range(rng.choice([0, 1, 2, 3, 5, 8, 13, 30, 80, 200]))]


def _mutate(rng: random.Random, lines: list[bytes]) -> list[bytes]:
    lines = list(lines)
    for _ in range(rng.randint(0, 10)):
        op = rng.random()
        if op < 0.3 and lines:
            del lines[rng.randrange(len(lines))]
        elif op < 0.6:
            lines.insert(rng.randint(0, len(lines)), rng.choice([b"a", b"b", b"new", b"", b"}"]))
        elif lines:
            lines[rng.randrange(len(lines))] = rng.choice([b"q", b"a", b"zz"])
    return lines


def _join(lines: list[bytes], final_newline: bool) -> bytes:
    data = b"\n".join(lines)
    return data + b"\n" if lines and final_newline else data


def test_generated_cases_match_diff(ref):
    rng = random.Random(20261121)
    differing = 0
    for _ in range(400):
        a_lines = _random_lines(rng)
        b_lines = _mutate(rng, a_lines) if rng.random() < 0.8 else _random_lines(rng)
        a = _join(a_lines, rng.random() < 0.85)
        b = _join(b_lines, rng.random() < 0.85)
        context = rng.choice([3, 3, 3, 0, 1, 4])
        differing += bool(ref.check(a, b, context))
    assert differing > 300


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.sampled_from([b"a", b"b", b"c", b"", b"a\r", b"d e"]), max_size=25),
    st.lists(st.sampled_from([b"a", b"b", b"c", b"", b"f", b"d e"]), max_size=25),
    st.booleans(),
    st.booleans(),
)
def test_hypothesis_matches_diff(ref, a_lines, b_lines, a_nl, b_nl):
    ref.check(_join(a_lines, a_nl), _join(b_lines, b_nl))


def test_repetitive_inputs_match_diff(ref):
    # Many repeats of a few lines: exercises diff's discarding of lines with
    # very many matches and the sliding of change blocks.
    rng = random.Random(7)
    for n in (300, 1000):
        a_lines = [rng.choice([b"}", b"", b"x", b"y%d" % rng.randrange(50)]) for _ in range(n)]
        for _ in range(3):
            ref.check(_join(a_lines, True), _join(_mutate(rng, _mutate(rng, a_lines)), True))


def test_large_file_with_few_changes(ref):
    rng = random.Random(3)
    a_lines = [b"line %d %d" % (i, rng.randrange(1000)) for i in range(20000)]
    b_lines = list(a_lines)
    for _ in range(40):
        i = rng.randrange(len(b_lines))
        choice = rng.random()
        if choice < 0.4:
            b_lines[i] = b"changed %d" % i
        elif choice < 0.7:
            del b_lines[i]
        else:
            b_lines.insert(i, b"inserted")
    ref.check(_join(a_lines, True), _join(b_lines, True))


# -- header ------------------------------------------------------------------------


def test_header_without_times_is_like_label(ref):
    out = unified_diff_bytes(b"a\n", b"b\n", "config.json", ".versions/config.json/-2")
    assert out.splitlines()[:2] == [b"--- config.json", b"+++ .versions/config.json/-2"]


@pytest.mark.parametrize(
    ("name", "quoted"),
    [
        ("plain.txt", b"plain.txt"),
        ("with space", b'"with space"'),
        ("tab\there", b'"tab\\there"'),
        ("new\nline", b'"new\\nline"'),
        ('quo"te', b'"quo\\"te"'),
        ("back\\slash", b'"back\\\\slash"'),
        ("é", b'"\\303\\251"'),
        ("\x01x", b'"\\001x"'),
        ("a!#$%&'()*+,-.:;<=>?@[]^_`{|}~", b"a!#$%&'()*+,-.:;<=>?@[]^_`{|}~"),
    ],
)
def test_quote_name(name, quoted):
    assert quote_name(name) == quoted


def test_header_with_times_matches_diff(tmp_path):
    names = [
        "plain.txt",
        "with space",
        "tab\there",
        "new\nline",
        "é.txt",
        'quo"te',
        "back\\slash",
        "a+b@c",
    ]
    when = datetime(2026, 11, 21, 10, 15, 2, 123456, tzinfo=timezone.utc)
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(b"x\n%d\n" % i)
        stamp = when + timedelta(seconds=i)
        ns = int(stamp.timestamp()) * 10**9 + stamp.microsecond * 1000
        os.utime(tmp_path / name, ns=(ns, ns))
    zones = [
        ("UTC0", timezone.utc),
        ("IST-5:30", timezone(timedelta(hours=5, minutes=30))),
        ("EST5", timezone(timedelta(hours=-5))),
    ]
    for tz_env, tz in zones:
        for i in range(len(names) - 1):
            a_name, b_name = names[i], names[i + 1]
            expected = subprocess.run(
                [DIFF, "-u", a_name, b_name],
                cwd=tmp_path,
                capture_output=True,
                env={"TZ": tz_env, "LC_ALL": "C", "PATH": os.environ.get("PATH", "")},
            ).stdout
            got = unified_diff_bytes(
                (tmp_path / a_name).read_bytes(),
                (tmp_path / b_name).read_bytes(),
                a_name,
                b_name,
                a_mtime=(when + timedelta(seconds=i)).astimezone(tz),
                b_mtime=(when + timedelta(seconds=i + 1)).astimezone(tz),
            )
            assert got == expected, (tz_env, a_name, b_name, got, expected)


def test_format_header_time():
    assert (
        format_header_time(datetime(2026, 1, 2, 3, 4, 5, 6))
        == "2026-01-02 03:04:05.000006000 +0000"
    )
    minus = timezone(timedelta(hours=-3, minutes=-30))
    assert (
        format_header_time(datetime(2026, 1, 2, 3, 4, 5, tzinfo=minus))
        == "2026-01-02 03:04:05.000000000 -0330"
    )


# -- errors ------------------------------------------------------------------------


def test_binary_inputs_are_einval():
    for a, b in [(b"a\0b\n", b"a\n"), (b"a\n", b"\0"), (b"x" * 100000 + b"\0", b"y")]:
        with pytest.raises(DiffError) as info:
            unified_diff_bytes(a, b, "a", "b")
        assert info.value.errno == errno.EINVAL
        assert to_errno(info.value) == errno.EINVAL
        assert "binary" in str(info.value)


def test_size_limit_is_efbig():
    assert DIFF_SIZE_LIMIT == 8 * 1024 * 1024
    with pytest.raises(DiffError) as info:
        unified_diff_bytes(b"a" * 11, b"b", "a", "b", limit=10)
    assert info.value.errno == errno.EFBIG
    assert "first" in str(info.value) and "limit of 10" in str(info.value)
    with pytest.raises(DiffError) as info:
        unified_diff_bytes(b"a", b"b" * 11, "a", "b", limit=10)
    assert info.value.errno == errno.EFBIG and "second" in str(info.value)
    # Exactly at the limit is fine; identical inputs over it are still refused.
    assert unified_diff_bytes(b"a" * 10, b"b" * 10, "a", "b", limit=10)
    with pytest.raises(DiffError):
        unified_diff_bytes(b"a" * 11, b"a" * 11, "a", "b", limit=10)
    check_diff_sizes(10, 10, limit=10)
    with pytest.raises(DiffError) as info:
        check_diff_sizes(DIFF_SIZE_LIMIT + 1, 0)
    assert info.value.errno == errno.EFBIG


def test_work_limit_is_efbig():
    rng = random.Random(1)
    a = b"".join(b"%d\n" % rng.randrange(20) for _ in range(600))
    b = b"".join(b"%d\n" % rng.randrange(20) for _ in range(600))
    assert unified_diff_bytes(a, b, "a", "b")  # fine with the default limit
    with pytest.raises(DiffError) as info:
        unified_diff_bytes(a, b, "a", "b", max_work=10_000)
    assert info.value.errno == errno.EFBIG
    assert "differ too much" in str(info.value)


def test_negative_context_rejected():
    with pytest.raises(ValueError):
        unified_diff_bytes(b"a", b"b", "a", "b", context=-1)
