"""close(2) against fsync(2) through the core, with the record sync thread held back.

A close of a small file returns before its record is fsynced (gstore.write.staging);
these check what that must not change: a crash of the daemon right after the close
still uploads the file at the next start, and an fsync after a close (no write in
between) still waits for the record on disk.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from gstore.write import staging as staging_module

from .conftest import open_core
from .model import pattern


class RecordSyncGate:
    """Holds ``os.fsync`` of final record files (only the record sync thread fsyncs those)."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.synced: list[str] = []
        self.uploaded = lambda name: False  # set by a test: whether the backend has the file
        self.temp_records_before_upload: list[str] = []
        self._real = os.fsync

    def fsync(self, fd: int) -> None:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.endswith(".json") and not name.startswith("."):
            assert self.open.wait(60), "gate never opened"
        self._real(fd)
        self.synced.append(name)
        if name.endswith(".json.tmp") and not self.uploaded(name):
            self.temp_records_before_upload.append(name)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch):
    g = RecordSyncGate()
    monkeypatch.setattr(staging_module.os, "fsync", g.fsync)
    yield g
    g.open.set()


async def test_a_crash_right_after_closes_whose_records_are_not_fsynced_loses_nothing(
        tmp_path: Path, gate: RecordSyncGate) -> None:
    files = {f"d/f{i}.bin": pattern(f"c{i}", 100 + 997 * i) for i in range(6)}
    async with open_core(tmp_path, write_back_delay=60.0) as h:
        await h.kernel.mkdir("d")
        for name, data in files.items():
            await h.kernel.write_file(name, data)
        assert not any(n.endswith(".json") and not n.startswith(".") for n in gate.synced)
        await h.crash()  # like kill -9: the records are in the page cache, never fsynced
        gate.open.set()
        assert {name: await h.kernel.read_file(name) for name in files} == files
        assert await h.drain() == []
        assert {k: v for k, v in h.backend_files().items() if k.startswith("d/")} == files


async def test_an_fsync_after_a_close_waits_for_the_record_on_disk(
        tmp_path: Path, gate: RecordSyncGate) -> None:
    async with open_core(tmp_path, write_back_delay=60.0) as h:
        k = h.kernel
        await k.write_file("a.txt", b"closed, not yet fsynced")
        fd = await k.open("a.txt", os.O_WRONLY)
        gate.uploaded = lambda name: "a.txt" in h.backend_files()
        await k.fsync(fd)  # the sync thread is still held: fsync must not rely on it
        assert gate.temp_records_before_upload, "fsync fsynced the record itself, before uploading"
        assert h.backend_files() == {"a.txt": b"closed, not yet fsynced"}
        await k.close(fd)
