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
from typing import Any

import pytest
import trio

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


class AnswerLostBackend:
    """A proxy whose uploads land and then never answer (until ``answer`` is set): what a
    kill -9 between the backend's write and its reply leaves behind."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.display = inner.display
        self.cache_namespace = inner.cache_namespace
        self.landed: list[str] = []
        self.hang = True

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in ("put_bytes", "put_local_file") or not callable(attr):
            return attr

        async def landed_then_silent(path: str, *args: Any, **kwargs: Any) -> Any:
            result = await attr(path, *args, **kwargs)
            if self.hang and not path.startswith(".gstore/"):  # not the mount's write probe
                self.landed.append(path)
                await trio.sleep_forever()
            return result

        return landed_then_silent


@pytest.mark.parametrize("backend", ["file", "s3"])
async def test_an_upload_whose_answer_was_lost_is_recognised_as_ours_after_a_crash(
        tmp_path: Path, backend: str) -> None:
    """An upload landed, then the daemon died before it learnt so: the journal still has the
    file (expected absent) and the backend has our object. The next start must recognise
    it as its own (by MD5 ETag on S3; by its bytes where the ETag is no MD5, as on a local
    folder), not upload a conflict copy. Found by the model test in CI (mount-defaults,
    seed 20250601: ``sub/d.conflict-...`` after a crash)."""
    proxies: list[AnswerLostBackend] = []

    def wrap(inner: Any) -> Any:
        proxies.append(AnswerLostBackend(inner))
        return proxies[-1]

    files = {"empty.txt": b"", "d/new.bin": pattern("n", 5000)}
    async with open_core(tmp_path, backend=backend, write_back_delay=0.0, wrap_backend=wrap) as h:
        await h.kernel.mkdir("d")
        for name, data in files.items():
            await h.kernel.write_file(name, data)
        with trio.fail_after(30):
            while sorted(p for proxy in proxies for p in proxy.landed) != sorted(files):
                await trio.sleep(0.02)
        for proxy in proxies:
            proxy.hang = False
        await h.crash()
        for proxy in proxies:
            proxy.hang = False
        assert await h.drain() == []
        assert {k: v for k, v in h.backend_files().items() if not k.startswith(".gstore/")} == files
