"""`gstore flush` and the flush control file (no FUSE): the request, the per-file verdict,
exit codes and quoting, the polling that keeps it interruptible; retries of failed uploads
reset when the backend is back."""

from __future__ import annotations

import errno
import inspect
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from gstore import cli
from gstore.backends import make_backend
from gstore.backends.base import Listing, ObjectInfo
from gstore.backends.resilience import CLOSED, ResiliencePolicy, ResilientBackend
from gstore.config import MountOptions
from gstore.core import build_core
from gstore.vfs.control import ControlFiles, ControlHandle, FlushRequest, flush_report, parse_flush_request
from gstore.write.scheduler import MAX_BACKOFF, UploadScheduler


def handle_with(data: bytes) -> ControlHandle:
    handle = ControlHandle("flush")
    ControlFiles.write(handle, data)
    return handle


def request_bytes(**asked: Any) -> bytes:
    return b"\0" + json.dumps(asked).encode()


# --------------------------------------------------------------------------- the request


def test_flush_requests_are_json_after_a_nul_or_plain_lines() -> None:
    asked = parse_flush_request(handle_with(request_bytes(paths=["a\nb.txt", "dir/", "."], retry=True,
                                                          timeout=2.5, poll=0.5)))
    assert asked == FlushRequest(paths=["a\nb.txt", "dir", ""], retry=True, timeout=2.5, poll=0.5)
    assert parse_flush_request(handle_with(request_bytes())) == FlushRequest()
    assert parse_flush_request(handle_with(b"x.txt\n./\n")) == FlushRequest(paths=["x.txt", ""])
    assert parse_flush_request(handle_with(b"")) == FlushRequest()
    for bad in (b"\0not json", request_bytes(paths="x"), request_bytes(timeout=-1),
                request_bytes(timeout=True), request_bytes(poll=0), b"\0[1]"):
        verdict = parse_flush_request(handle_with(bad)).error_verdict()
        assert verdict is not None and "malformed flush request" in verdict["error"], bad


# --------------------------------------------------------------------------- the verdict


class FakePending:
    """Just what flush_report reads of PendingFiles, with scripted outcomes."""

    def __init__(self, outcomes: dict[str, str]) -> None:
        self.files = [SimpleNamespace(id=f"id-{p}", path=p, generation=1, expect="etag:old", unlinked=False)
                      for p in outcomes]
        self.outcomes = outcomes
        self.uploaded: set[str] = set()
        self.scheduler = SimpleNamespace(attempts={})
        self.stats = SimpleNamespace(conflicts=0)
        self.folder: dict[str, ObjectInfo] = {}
        self.backend = SimpleNamespace(list_dir=self._list_dir)
        self.asked: tuple[Any, ...] = ()
        # failing.txt had failed once before this flush
        self.scheduler.attempts["id-failing.txt"] = SimpleNamespace(failures=1, permanent=False, last_error="old")

    async def _list_dir(self, path: str, *, max_pages: int | None = None) -> Listing:
        return Listing(entries=dict(self.folder))

    def pending(self) -> list[Any]:
        return list(self.files)

    def durable(self, staged: Any, generation: int) -> bool:
        return staged.id in self.uploaded

    async def flush(self, chosen: list[Any], *, timeout: float | None = None, retry_parked: bool = False) -> list[str]:
        self.asked = ([s.path for s in chosen], timeout, retry_parked)
        for staged in chosen:
            outcome = self.outcomes[staged.path]
            if outcome == "ok":
                self.uploaded.add(staged.id)
                staged.expect = "etag:new"  # what a confirmed upload does
            elif outcome == "conflict":
                self.uploaded.add(staged.id)  # ours went to the conflict name; expect unchanged
                self.stats.conflicts += 1
                stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                self.folder[f"{staged.path}.conflict-{stamp}"] = ObjectInfo(name="c", is_dir=False)
                self.folder[f"{staged.path}.conflict-20000101T000000Z"] = ObjectInfo(name="old", is_dir=False)
            elif outcome == "parked":
                self.scheduler.attempts[staged.id] = SimpleNamespace(
                    failures=1, permanent=True, last_error="Access Denied")
            elif outcome == "failed":
                self.scheduler.attempts[staged.id] = SimpleNamespace(
                    failures=2, permanent=False, last_error="503 Slow Down")
        return []


def test_the_verdict_lists_each_file_that_is_not_durable_at_its_path() -> None:
    async def main() -> None:
        pending = FakePending({"ok.txt": "ok", "parked.txt": "parked", "failing.txt": "failed",
                               "slow.txt": "slow", "conflict.txt": "conflict"})
        verdict = await flush_report(pending, FlushRequest(timeout=3, retry=True))
        assert pending.asked == (["ok.txt", "parked.txt", "failing.txt", "slow.txt", "conflict.txt"], 3, True)
        states = {f["path"]: f["state"] for f in verdict["files"]}
        assert states == {"parked.txt": "parked", "failing.txt": "failed", "slow.txt": "timed out",
                          "conflict.txt": "conflict"}
        by_path = {f["path"]: f for f in verdict["files"]}
        assert by_path["parked.txt"]["parked"] is True and by_path["parked.txt"]["error"] == "Access Denied"
        assert by_path["slow.txt"]["error"] == "not uploaded within 3s; still queued"
        assert by_path["conflict.txt"]["saved_as"].startswith("conflict.txt.conflict-2")
        assert "20000101" not in by_path["conflict.txt"]["saved_as"]  # an older copy is not this one
        assert verdict["ok"] is False and verdict["parked"] == 1 and verdict["timed_out"] and verdict["conflicts"] == 1
        assert sorted(verdict["failed"]) == ["failing.txt: 503 Slow Down", "parked.txt: Access Denied",
                                             "slow.txt: not uploaded within 3s; still queued"]

        only = FakePending({"a/x.txt": "ok", "b/y.txt": "parked"})
        verdict = await flush_report(only, FlushRequest(paths=["a"]))
        assert only.asked[0] == ["a/x.txt"] and verdict["ok"] and verdict["files"] == []
        assert (await flush_report(None, FlushRequest()))["ok"]  # read-only mount: nothing pending

    trio.run(main)


def test_reads_of_a_polled_flush_return_within_the_poll_and_close_stops_it() -> None:
    async def main() -> None:
        release = trio.Event()

        async def report(request: FlushRequest) -> dict[str, Any]:
            await release.wait()
            return {"ok": True, "failed": [], "files": [], "paths": request.paths or "all"}

        files = ControlFiles(status=dict, flush=None, flush_report=report)  # type: ignore[arg-type]
        handle = handle_with(request_bytes(paths=["x"], poll=0.05))
        with trio.fail_after(5):
            first = json.loads(await files.read(handle, 0, 1 << 16))
        assert first["running"] is True
        release.set()
        with trio.fail_after(5):
            done = json.loads(await files.read(handle, 0, 1 << 16))
        assert done == {"ok": True, "failed": [], "files": [], "paths": ["x"]}

        forever = ControlFiles(status=dict, flush=None,  # type: ignore[arg-type]
                               flush_report=lambda request: trio.sleep_forever())  # type: ignore[arg-type,return-value]
        stuck = handle_with(request_bytes(poll=0.05))
        assert json.loads(await forever.read(stuck, 0, 1 << 16))["running"]
        await forever.closing(stuck)  # the reader went away (Ctrl-C): the job stops waiting
        assert stuck.job is not None
        with trio.fail_after(5):
            await stuck.job.done.wait()
        assert "stopped" in stuck.job.verdict["error"]  # type: ignore[index]

        plain = handle_with(b"x\n")  # an old-style reader: one read, waits for the verdict
        assert json.loads(await files.read(plain, 0, 1 << 16))["paths"] == ["x"]

    trio.run(main)


def test_a_verdict_that_arrives_between_two_reads_never_splices_into_the_running_answer() -> None:
    """gstore flush reads the file from offset 0 until a short read: a verdict that lands
    between the read at 0 and the next one must not come back as its tail (found by
    scripts/measure_memory.py: "Extra data" from json.loads)."""
    async def main() -> None:
        release = trio.Event()

        async def report(request: FlushRequest) -> dict[str, Any]:
            await release.wait()
            return {"ok": True, "failed": [], "files": [], "paths": request.paths or "all", "padding": "x" * 500}

        files = ControlFiles(status=dict, flush=None, flush_report=report)  # type: ignore[arg-type]
        handle = handle_with(request_bytes(poll=0.05))
        with trio.fail_after(5):
            first = await files.read(handle, 0, 1 << 16)
        release.set()
        assert handle.job is not None
        with trio.fail_after(5):
            await handle.job.done.wait()
        rest = await files.read(handle, len(first), 1 << 16)
        assert json.loads(first + rest)["running"] is True
        with trio.fail_after(5):
            assert json.loads(await files.read(handle, 0, 1 << 16))["ok"] is True

    trio.run(main)


# --------------------------------------------------------------------------- exit codes and lines


def test_exit_codes_and_one_quoted_line_per_file() -> None:
    code, lines = cli.flush_outcome({"ok": True, "failed": [], "files": []})
    assert (code, lines) == (0, [])
    code, lines = cli.flush_outcome({"files": [
        {"path": "a\nb.txt", "state": "timed out", "error": "not uploaded within 2s; still queued"},
        {"path": 'q"uote.txt', "state": "conflict", "saved_as": 'q"uote.txt.conflict-20260101T000000Z'}]})
    assert code == 3
    assert lines == ['gstore: timed out: "a\\nb.txt": not uploaded within 2s; still queued',
                     'gstore: conflict: "q\\"uote.txt": changed on the backend since this mount read it; '
                     'this mount\'s version was saved as "q\\"uote.txt.conflict-20260101T000000Z"']
    code, lines = cli.flush_outcome({"files": [{"path": "c.txt", "state": "conflict", "saved_as": "c.txt.conflict-x"}]})
    assert code == 5
    code, lines = cli.flush_outcome({"files": [
        {"path": "d.txt", "state": "parked", "parked": True, "error": "Access\nDenied"},
        {"path": "e.txt", "state": "timed out", "error": "late"},
        {"path": "f.txt", "state": "conflict", "saved_as": "f.txt.conflict-x"}]})
    assert code == 4  # the most serious wins: 4, then 3, then 5
    assert lines[0].startswith('gstore: parked: "d.txt": Access Denied (refused by the backend')
    assert all("\n" not in line for line in lines)
    assert cli.flush_outcome({"error": "malformed flush request: x", "usage": True})[0] == 2
    assert cli.flush_outcome({"error": "the flush failed: RuntimeError: x"})[0] == 4
    assert cli.flush_outcome({"ok": False, "failed": ["x: boom"]}) == (4, ["gstore: not durable: x: boom"])
    bad_utf8 = "caf\udce9.txt"  # a name that is not UTF-8 (surrogate escapes) still prints
    _, lines = cli.flush_outcome({"files": [{"path": bad_utf8, "state": "failed", "error": "x"}]})
    assert lines[0].encode("utf-8")


def test_flush_timeout_must_be_a_number_of_seconds(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["flush", "--timeout", "-1", str(tmp_path)])
    assert info.value.code == 2


# --------------------------------------------------------------------------- retries after an outage


def test_retry_delays_are_capped_at_a_minute() -> None:
    async def main() -> None:
        async def upload(upload_id: str) -> None:
            return None

        scheduler = UploadScheduler(upload, delay=0)
        delays = [scheduler.failed("x", "down", permanent=False) for _ in range(30)]
        assert max(d for d in delays if d is not None) <= MAX_BACKOFF == 60.0

    trio.run(main)


class Switch:
    """Any backend, which can be switched off (connection refused)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.down = False

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if not inspect.iscoroutinefunction(value):
            return value

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise ConnectionRefusedError(errno.ECONNREFUSED, "connection refused")
            return await value(*args, **kwargs)

        return call


def test_failed_uploads_go_at_once_when_the_circuit_closes(tmp_path: Path) -> None:
    """A new file created offline in a known folder is queued; when the backend is back, the
    upload goes at once, not after its backoff (here a minute, as after many failures)."""
    root = tmp_path / "bucket"
    root.mkdir()

    async def main() -> None:
        switch = Switch(make_backend("file", str(root), {}, request_timeout=2, resilient=False))
        backend = ResilientBackend(switch, ResiliencePolicy(retries=0, deadline=2, breaker_threshold=1,
                                                            breaker_cooldown=0.1))  # type: ignore[arg-type]
        options = MountOptions(cache_dir=tmp_path / "cache", write_back_delay=0, request_timeout=2)
        core = build_core(backend, tmp_path / "state", options)
        async with trio.open_nursery() as nursery:
            await nursery.start(core.run)
            assert await core.fs.list_dir("") == {}  # the folder is known
            switch.down = True
            fh, _ = await core.fs.create(1, "new.txt", 0o644, os.O_WRONLY | os.O_CREAT)
            await core.fs.write(fh, 0, b"written offline\n")
            await core.fs.flush(fh)
            await core.fs.release(fh)
            pending = core.pending
            assert pending is not None
            staged = pending.get("new.txt")
            assert staged is not None
            with trio.fail_after(10):
                while staged.id not in pending.scheduler.attempts:
                    await trio.sleep(0.02)
            assert backend.health()["state"] != CLOSED
            # As after eight failures: the next attempt would be a minute away.
            pending.scheduler._due[staged.id] = trio.current_time() + MAX_BACKOFF  # noqa: SLF001
            switch.down = False
            with trio.fail_after(10):  # the probe closes the circuit; the queue retries at once
                while not ((root / "new.txt").exists() and (root / "new.txt").read_bytes() == b"written offline\n"):
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
        core.close()

    trio.run(main)
