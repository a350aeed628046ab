"""Namespace changes during an outage: accepted, shown, journaled, replayed in order (issue #13).

The backend is switched off behind the core (every call fails the way a refused
connection does: a transient error); programs keep working on what the mount
knows; after a kill -9 in the middle of the outage the queued changes are still
there; when the backend answers again they reach it in order, each checked
against what the backend has (a removal of an object someone else changed
meanwhile is not applied).
"""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from gstore.errors import BackendError
from gstore.vfs.control import FlushRequest, flush_report

from .conftest import open_core
from .model import pattern


class Switch:
    """Whether the backend answers; shared by every backend the harness builds."""

    def __init__(self) -> None:
        self.down = False
        self.refused = 0


class SwitchableBackend:
    """A proxy whose every request fails like a refused connection while ``switch.down``."""

    def __init__(self, inner: Any, switch: Switch) -> None:
        self._inner = inner
        self._switch = switch
        self.display = inner.display
        self.cache_namespace = inner.cache_namespace

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr) or name in ("add_listener", "health", "cache_key", "key_bytes", "capabilities",
                                          "part_size", "supports_server_copy", "min_copy_part"):
            return attr
        import inspect
        if not inspect.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        async def maybe_refused(*args: Any, **kwargs: Any) -> Any:
            if self._switch.down:
                self._switch.refused += 1
                await trio.lowlevel.checkpoint()
                raise BackendError(errno.EIO, "connection refused (test switch)", transient=True)
            return await attr(*args, **kwargs)

        return maybe_refused


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def _switched(switch: Switch) -> Any:
    return lambda inner: SwitchableBackend(inner, switch)


async def _replayed(h: Any, timeout: float = 30.0) -> None:
    """Back online: the queue is replayed and every pending file uploaded."""
    failures = await h.drain(timeout)
    assert failures == [], f"not everything reached the backend: {failures}"
    assert len(h.core.pending.namespace) == 0


async def test_changes_during_an_outage_survive_a_crash_and_reach_the_backend_in_order(
        tmp_path: Path, backend: str) -> None:
    seeds = {"gone.txt": pattern("gone", 700), "moved.bin": pattern("moved", 5000),
             "log.txt": pattern("log", 300), "empty/.keep": b"", "old/x": pattern("x", 10)}
    switch = Switch()
    async with open_core(tmp_path, backend=backend, seed_files=seeds, wrap_backend=_switched(switch),
                         attr_ttl=0.2, dir_cache_ttl=0.2, negative_ttl=0.2) as h:
        k = h.kernel
        # What the mount knows before the outage: the listings and two files' bytes.
        assert sorted(await k.listdir()) == ["empty", "gone.txt", "log.txt", "moved.bin", "old"]
        await k.unlink("empty/.keep")
        assert await k.listdir("empty") == []
        assert await k.listdir("old") == ["x"]
        assert await k.read_file("moved.bin") == seeds["moved.bin"]
        assert await k.read_file("log.txt") == seeds["log.txt"]

        switch.down = True
        await trio.sleep(0.3)  # every TTL has run out: only the last known state is left
        await k.unlink("gone.txt")
        await k.mkdir("new")
        await k.write_file("new/f.txt", b"made offline")
        await k.rmdir("empty")
        await k.rename("moved.bin", "renamed.bin")
        fd = await k.open("log.txt", os.O_WRONLY | os.O_APPEND)
        await k.append(fd, b"+offline")
        await k.close(fd)
        await k.unlink("old/x")  # old/ becomes empty: it stays (a marker is queued)
        await k.write_file("gone.txt", b"a new gone.txt")  # the removal first, then this one

        expected_names = ["gone.txt", "log.txt", "new", "old", "renamed.bin"]
        assert sorted(await k.listdir()) == expected_names
        assert await k.read_file("renamed.bin") == seeds["moved.bin"]
        assert await k.read_file("log.txt") == seeds["log.txt"] + b"+offline"
        assert switch.refused > 0, "the switch was in the way"
        assert len(h.core.pending.namespace) >= 3
        with pytest.raises(OSError) as excinfo:
            await k.stat("empty")
        assert excinfo.value.errno == errno.ENOENT

        await h.crash()  # kill -9 in the middle of the outage
        k = h.kernel
        assert len(h.core.pending.namespace) >= 3, "the queue survived the crash"
        assert sorted(h.recovered) == ["gone.txt", "log.txt", "new/f.txt", "renamed.bin"]
        # (A new process knows no listing: lookups wait for the backend, the queue is kept.)

        switch.down = False
        # Back: before the replay has run, the view already shows the queued changes.
        with pytest.raises(OSError):
            await k.stat("empty")
        assert await k.read_file("new/f.txt") == b"made offline"
        await _replayed(h)
        files = h.backend_files()
        assert files == {"gone.txt": b"a new gone.txt", "renamed.bin": seeds["moved.bin"],
                         "log.txt": seeds["log.txt"] + b"+offline", "new/f.txt": b"made offline"}
        dirs = h.backend_dirs()
        assert "new" in dirs and "old" in dirs and "empty" not in dirs
        assert sorted(await k.listdir()) == expected_names


async def test_a_queued_removal_of_an_object_changed_meanwhile_keeps_theirs(tmp_path: Path, backend: str) -> None:
    switch = Switch()
    async with open_core(tmp_path, backend=backend, seed_files={"shared.txt": b"v1"},
                         wrap_backend=_switched(switch)) as h:
        k = h.kernel
        assert await k.listdir() == ["shared.txt"]
        switch.down = True
        await k.unlink("shared.txt")
        assert await k.listdir() == []
        # Another host writes a new version meanwhile.
        if h.bucket is not None:
            h.bucket.put("shared.txt", b"their v2")
        else:
            (h.root / "shared.txt").write_bytes(b"their v2")
            os.utime(h.root / "shared.txt", (1_900_000_000, 1_900_000_000))  # a new version (mtime)
        switch.down = False
        await _replayed(h)
        assert h.backend_files() == {"shared.txt": b"their v2"}, "their version was kept"
        problems = h.core.pending.namespace.problems
        assert [(p.change.path, p.outcome) for p in problems] == [("shared.txt", "conflict")]
        # The next `gstore flush` reports it (exit 5: a conflict), once.
        verdict = await flush_report(h.core.pending, FlushRequest())
        assert [(f["path"], f["state"]) for f in verdict["files"]] == [("shared.txt", "conflict")]
        assert "not applied" in verdict["files"][0]["error"]
        assert (await flush_report(h.core.pending, FlushRequest()))["files"] == []


async def test_while_unreachable_a_flush_reports_the_queued_changes(tmp_path: Path) -> None:
    switch = Switch()
    async with open_core(tmp_path, seed_files={"a": b"1"}, wrap_backend=_switched(switch)) as h:
        k = h.kernel
        assert await k.listdir() == ["a"]
        switch.down = True
        await k.unlink("a")
        failures = await h.core.pending.flush(timeout=2)
        assert any(line.startswith("a: queued removal not applied yet") for line in failures), failures
        switch.down = False
        await _replayed(h)
        assert h.backend_files() == {}
