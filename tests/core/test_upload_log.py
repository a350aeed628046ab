"""What the log says about uploads: large ones one by one, the rest summed up.

A line per uploaded file at INFO was a line per file in the journal (1,000 for
``tar x`` of 1,000 files) and 2.6% of the daemon's Python time uploading them.
Files of at least ``LOGGED_UPLOAD_SIZE`` keep their INFO line; smaller ones log
at DEBUG, and ``PendingFiles`` writes one INFO summary per interval in which
uploads finished or failed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from gstore.write import pending as pending_module
from gstore.write import uploader as uploader_module
from gstore.write.pending import upload_summary

from .conftest import open_core
from .model import pattern


def test_the_summary_counts_what_changed_between_two_snapshots() -> None:
    assert upload_summary((1, 10, 0, 0, 0), (1, 10, 0, 0, 0), 10, 0) is None
    assert upload_summary((1, 10, 0, 0, 0), (4, 10 + 3 * 1048576, 0, 0, 0), 10, 2) == (
        "uploaded 3 file(s), 3.0 MiB in the last 10s; 2 file(s) pending")
    assert upload_summary((0, 0, 0, 0, 0), (1, 1048576, 2097152, 2, 1), 9.6, 0) == (
        "uploaded 1 file(s), 1.0 MiB (+2.0 MiB copied server-side) in the last 10s; 2 failed attempt(s); "
        "1 conflict(s); 0 file(s) pending")


async def test_small_uploads_are_summed_up_and_large_ones_logged_each(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pending_module, "UPLOAD_SUMMARY_INTERVAL", 0.2)
    monkeypatch.setattr(uploader_module, "LOGGED_UPLOAD_SIZE", 100_000)
    caplog.set_level(logging.INFO, logger="gstore")
    async with open_core(tmp_path, write_back_delay=0.0) as h:
        for i in range(3):
            await h.kernel.write_file(f"small{i}.txt", pattern(f"s{i}", 1000))
        await h.kernel.write_file("large.bin", pattern("l", 150_000))
        assert await h.drain() == []
        with trio.fail_after(10):
            while not any(r.getMessage().startswith("uploaded 4 file(s)") or
                          r.getMessage().startswith("uploaded 3 file(s)") for r in caplog.records):
                await trio.sleep(0.05)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith("uploaded large.bin (150000 bytes)") for m in infos), infos
    assert not any(m.startswith("uploaded small") for m in infos), infos
    summaries = [m for m in infos if m.startswith("uploaded ") and "file(s)" in m]
    assert sum(int(m.split()[1]) for m in summaries) == 4, summaries
