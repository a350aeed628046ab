"""fsx (from xfstests, in shared/conformance) through a real gstore mount of the local S3 endpoint.

``test_fsx_matrix_and_persistence`` builds fsx, runs the 8-run matrix of
shared/conformance/README.md (s1..s8, each on a new file) on one mount, then the 16
persistence checks: each final file's checksum through the mount must equal the object
in the bucket after unmounting (pending uploads drain) and what a fresh mount with an
empty cache reads. It runs the code of ``scripts/conformance``
(gstore.testing.conformance), which can also run pjdfstest.

The sources are found at REPO/../shared/conformance or $GSTORE_CONFORMANCE_SRC; without
them the test skips, except with CI=true, where it fails.

The other tests check the harness itself (parsing fsx's and TAP output, choosing files,
grouping failures) without a mount.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import require_fuse
from gstore.testing import conformance as cf


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _skip_or_fail(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


@pytest.mark.fuse
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fsx_matrix_and_persistence(s3, tmp_path, tmp_path_factory):
    require_fuse()
    problem = None
    try:
        sources = cf.locate_sources(need=("fsx",))
    except cf.SourcesMissing as exc:
        problem = str(exc)
    if problem is None and shutil.which("gcc") is None:
        problem = "gcc is not installed (scripts/setup installs build-essential)"
    if problem is not None:
        _skip_or_fail(problem)
    try:
        fsx = cf.build_fsx(sources, tmp_path_factory.mktemp("fsx-build"))
    except cf.BuildError as exc:
        problem = f"building fsx failed: {exc}"
    if problem is not None:
        pytest.fail(problem)

    result = cf.fsx_suite(fsx, s3.endpoint, s3.bucket, s3.client, tmp_path / "fsx",
                          timeout=300, io_timeout=120, progress=print)
    report = cf.format_fsx(result)
    print("\n" + report)
    assert result.passed and not result.daemon_errors, (
        report + "\n\n" + "\n\n".join(result.failed_run_details()) + f"\n\nlogs: {result.work_dir}"
    )


# --------------------------------------------------------------------------- the harness itself

# A failing fsx run, in the shape of fsx's output (made up for this test).
FSX_FAILURE = """\
Seed set to 9
main: filesystem does not support fallocate mode 0, disabling!
main: filesystem does not support fallocate mode FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, disabling!
main: filesystem does not support copy range, disabling!
main: atomic writes need O_DIRECT (-Z), disabling!
truncating to largest ever: 0x1000
READ BAD DATA: offset = 0x10, size = 0x20, fname = /mnt/f
OFFSET      GOOD    BAD     RANGE
0x10        0x0102  0x0000  0x0
LOG DUMP (3 total operations):
1(  1 mod 256): WRITE    0x0 thru 0xfff\t(0x1000 bytes) HOLE
2(  2 mod 256): FSYNC
\t\tCLOSE/OPEN
3(  3 mod 256): READ     0x10 thru 0x2f\t(0x20 bytes)\t***RRRR***
Correct content saved for comparison
"""


def test_parse_fsx_failure():
    parsed = cf.parse_fsx_output(FSX_FAILURE)
    assert parsed["unsupported"] == [
        "fallocate", "fallocate FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE", "copy range"]
    assert parsed["other_disabled"] == ["atomic writes need O_DIRECT (-Z), disabling!"]
    assert parsed["first_failure"] == "READ BAD DATA: offset = 0x10, size = 0x20, fname = /mnt/f"
    assert parsed["operations"] == 3
    assert parsed["failed_operation"] == "READ 0x10 thru 0x2f (0x20 bytes) ***RRRR***"
    # an annotation line belongs to the operation before it
    without_last = FSX_FAILURE.replace("LOG DUMP (3", "LOG DUMP (2").splitlines(keepends=True)
    del without_last[-2]  # the READ
    parsed = cf.parse_fsx_output("".join(without_last))
    assert parsed["failed_operation"] == "FSYNC, then CLOSE/OPEN"


def test_parse_tap_scores_a_file():
    t = cf.parse_tap("x/01.t", "1..5\nok 1\nnot ok 2 - tried 'chown a 65534 -1', expected 0, got EPERM\n"
                               "ok 3\nnot ok 4 # TODO known\n")
    assert (t.planned, t.ok, t.not_ok, t.todo, t.missing) == (5, 2, 1, 1, 1)
    assert t.first_failure.startswith("not ok 2 - tried 'chown")
    assert cf.failure_cause(t) == "chown: expected 0, got EPERM"
    other = cf.parse_tap("y.t", "1..1\nnot ok 1 - tried '-u 65534 -g 65534 stat d/f mode,uid', "
                                "expected 0644,65534, got 0600,0\n")
    assert cf.failure_cause(other) == "stat mode,uid (as another uid): a different value"
    assert cf.parse_tap("z.t", "1..1\nok 1\n").not_applicable
    bailed = cf.parse_tap("b.t", "1..7\nok 1\ncannot tell the width of st_atime\nBail out!\n")
    assert (bailed.missing, bailed.bail_out) == (6, "Bail out! cannot tell the width of st_atime")
    assert cf.failure_cause(bailed) == "bailed out"
    assert cf.shorten_names("tried 'stat " + "n" * 255 + " mode'") == "tried 'stat " + "n" * 20 + "...(255 chars) mode'"


def test_pjdfstest_file_selection(tmp_path):
    for rel in ("chmod/00.t", "chmod/10.t", "chmod/2.t", "open/00.t"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text("")
    assert cf.list_pjdfstest_files(tmp_path) == ["chmod/00.t", "chmod/2.t", "chmod/10.t", "open/00.t"]
    assert cf.list_pjdfstest_files(tmp_path, ["open", "/elsewhere/pjdfstest/tests/chmod/10.t"]) == [
        "open/00.t", "chmod/10.t"]
    with pytest.raises(cf.ConformanceError):
        cf.list_pjdfstest_files(tmp_path, ["rename"])


def test_sources_override_and_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(cf.ENV_SOURCES, str(tmp_path))
    with pytest.raises(cf.SourcesMissing, match="GSTORE_CONFORMANCE_SRC"):
        cf.locate_sources()
    (tmp_path / "fsx").mkdir()
    (tmp_path / "fsx" / "fsx.c").write_text("")
    assert cf.locate_sources(need=("fsx",)) == tmp_path.resolve()
    with pytest.raises(cf.ConformanceError, match="inside the repository"):
        cf.build_fsx(tmp_path, Path(cf.__file__).resolve().parents[3] / "fsx-build")


def test_persistence_comparison():
    same = cf._compare("f", "bucket", ("ab" * 32, 5), ("ab" * 32, 5), "no object")
    assert same.passed
    missing = cf._compare("f", "bucket", ("ab" * 32, 5), None, "no object in the bucket")
    assert not missing.passed and missing.detail == "no object in the bucket"
    differs = cf._compare("f", "fresh mount", ("ab" * 32, 5), ("cd" * 32, 4), "")
    assert not differs.passed and "4 bytes" in differs.detail
    unreadable = cf._compare("f", "bucket", "f: open: No such file or directory (2)", ("cd" * 32, 4), "")
    assert not unreadable.passed and "could not read it" in unreadable.detail
