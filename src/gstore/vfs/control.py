"""The ``.gstore`` control directory at the root of every mount.

Scripts and the ``gstore`` command talk to a running daemon through plain
files, so no socket, port or extra permission model is needed: whoever can use
the mount can ask it.

* ``.gstore/status.json``: a JSON snapshot of the mount (cache, reads,
  uploads, recent errors), generated when it is opened.
* ``.gstore/flush``: reading it uploads everything pending and blocks until it
  is durable; the content is a JSON verdict (``{"ok": true, "failed": []}``).
  Writing paths to it first (one per line, relative to the mount) limits the
  flush to those paths. What ``gstore flush`` writes instead is a NUL byte and
  a JSON object, ``{"paths": [...], "retry": true, "timeout": 30, "poll":
  0.5}`` (any name, even one with a newline; ``retry`` tries parked uploads
  again; with ``poll`` each read returns within that time, ``{"running":
  true}`` until the verdict is there, and closing the file stops the wait);
  the verdict then also lists each file that is not durable at its path
  (``files``: path, ``state`` parked/failed/timed out/conflict, ``error``,
  ``saved_as``).
* ``.gstore/refresh``: paths written to it (one per line, relative to the
  mount; ``.`` is the whole mount) are forgotten: attributes, listings,
  negative entries, kernel caches, never pending writes; the next access asks
  the backend. It happens when the file is read (the content is then a JSON
  verdict, ``{"ok": true, "refreshed": [...], "errors": []}``) or, if it never
  is, when it is closed: ``echo dir/file > MNT/.gstore/refresh`` is done when
  ``echo`` returns.
* ``.gstore/copy``: ``SRC\0DST`` written to it (mount-relative paths;
  optionally ``\0absent`` or ``\0etag:ETAG``: what DST must still be) copies
  one object on the storage, never through the reader's host, when SRC has no
  pending local changes; the content is a JSON verdict (:mod:`.server_copy`),
  ``{"ok": false, "fallback": true, ...}`` when the caller should copy through
  the mount instead. Run when read, or at close if never read.

``.gstore`` is never listed by readdir and shadows a backend object of that
name at the root of the mount (docs/semantics.md).
"""

from __future__ import annotations

import calendar
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

CONTROL_DIR = ".gstore"
STATUS_FILE = "status.json"
FLUSH_FILE = "flush"
REFRESH_FILE = "refresh"
COPY_FILE = "copy"
CONTROL_FILES = (STATUS_FILE, FLUSH_FILE, REFRESH_FILE, COPY_FILE)
#: The control files that may be opened for writing.
WRITABLE_CONTROL_FILES = (FLUSH_FILE, REFRESH_FILE, COPY_FILE)
#: Most bytes of paths one open of a writable control file takes.
MAX_CONTROL_WRITE = 1 << 20


def control_path(name: str | None = None) -> str:
    """The inode-table path of the control directory or one of its files."""
    return CONTROL_DIR if name is None else f"{CONTROL_DIR}/{name}"


def is_control_path(path: str) -> bool:
    return path == CONTROL_DIR or path.startswith(CONTROL_DIR + "/")


def written_paths(handle: ControlHandle) -> list[str]:
    """The paths written to a control file: one per line, surrounding blanks and slashes
    stripped, ``.`` meaning the whole mount (``""``)."""
    text = handle.written.decode("utf-8", "surrogateescape")
    paths = [line.strip().strip("/") for line in text.splitlines() if line.strip()]
    return ["" if p == "." else p for p in paths]


@dataclass
class ControlHandle:
    name: str
    content: bytes | None = None
    written: bytearray = field(default_factory=bytearray)
    job: FlushJob | None = field(default=None, repr=False)  # a flush running for this handle


class ControlFiles:
    """Produces the bytes of the control files."""

    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        flush: Callable[[list[str] | None], Awaitable[list[str]]],
        refresh: Callable[[list[str]], Awaitable[dict[str, Any]]] | None = None,
        flush_report: Callable[[FlushRequest], Awaitable[dict[str, Any]]] | None = None,
        copy: Callable[[bytes], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self._status = status
        self._flush = flush
        self._refresh = refresh
        self._copy = copy  # .gstore/copy: the written request -> its verdict
        self._flush_report = flush_report  # the detailed flush (see flush_report below)

    async def read(self, handle: ControlHandle, offset: int, size: int) -> bytes:
        if handle.name == FLUSH_FILE and self._flush_report is not None:
            await self._flush_step(handle, offset)
        elif handle.content is None:
            if handle.name == STATUS_FILE:
                handle.content = (json.dumps(self._status(), indent=2, sort_keys=True) + "\n").encode()
            elif handle.name == REFRESH_FILE:
                await self._run_refresh(handle)
            elif handle.name == COPY_FILE:
                await self._run_copy(handle)
            else:
                paths = written_paths(handle)  # "." is the whole mount
                failed = await self._flush(paths or None)
                verdict = {"ok": not failed, "failed": failed, "paths": paths or "all"}
                handle.content = (json.dumps(verdict, indent=2) + "\n").encode()
        assert handle.content is not None
        return handle.content[offset : offset + size]

    async def closing(self, handle: ControlHandle) -> None:
        """close(2) of a descriptor: paths written to ``refresh`` and never read are refreshed now;
        a flush nobody waits for any more (``gstore flush`` interrupted) stops waiting."""
        if handle.name == REFRESH_FILE and handle.content is None and handle.written:
            await self._run_refresh(handle)
        if handle.name == COPY_FILE and handle.content is None and handle.written:
            await self._run_copy(handle)
        if handle.job is not None:
            handle.job.scope.cancel()

    async def _flush_step(self, handle: ControlHandle, offset: int) -> None:
        """The detailed flush. With ``poll`` in the request it runs in the background and
        each read at offset 0 waits at most ``poll`` seconds for it, answering
        ``{"running": true}`` until the verdict is there: the reader (``gstore
        flush``) is never stuck in one long read, so Ctrl-C, SIGTERM and its own
        timeout work (a FUSE read the daemon has taken cannot be interrupted)."""
        assert self._flush_report is not None
        job = handle.job
        if job is None:
            if handle.content is not None:
                return  # answered already (a malformed request)
            request = parse_flush_request(handle)
            error = request.error_verdict()
            if error is not None:
                handle.content = _json(error)
                return
            job = handle.job = FlushJob(request)
            if request.poll is None:  # a plain reader: wait in this read
                await job.run(self._flush_report)
            else:
                trio.lowlevel.spawn_system_task(job.run, self._flush_report, name="gstore-flush")
        if job.verdict is None and (offset == 0 or handle.content is None):
            assert job.request.poll is not None
            with trio.move_on_after(job.request.poll):
                await job.done.wait()
        if offset != 0 and handle.content is not None:
            return  # the rest of the answer the read at offset 0 gave: one document, never two halves
        if job.verdict is not None:
            handle.content = _json(job.verdict)
        else:
            handle.content = _json({"running": True, "ok": False, "failed": [], "files": []})

    async def _run_refresh(self, handle: ControlHandle) -> None:
        paths = written_paths(handle)
        if self._refresh is None:
            verdict: dict[str, Any] = {"ok": False, "refreshed": [], "errors": ["refresh is not available"]}
        elif not paths:
            verdict = {"ok": True, "refreshed": [], "errors": []}
        else:
            verdict = await self._refresh(paths)
        handle.content = (json.dumps(verdict, indent=2) + "\n").encode()

    async def _run_copy(self, handle: ControlHandle) -> None:
        if self._copy is None:
            verdict: dict[str, Any] = {"ok": False, "fallback": True, "reason": "server-side copy is not available"}
        else:
            verdict = await self._copy(bytes(handle.written))
        handle.content = _json(verdict)

    @staticmethod
    def write(handle: ControlHandle, data: bytes) -> int:
        if handle.name not in WRITABLE_CONTROL_FILES:
            raise PermissionError(13, "read-only control file", handle.name)
        if len(handle.written) + len(data) > MAX_CONTROL_WRITE:
            raise OSError(27, f"too many paths for one {handle.name}", handle.name)
        handle.written.extend(data)
        return len(data)


# -- the detailed flush (gstore flush) ---------------------------------------------------------


@dataclass
class FlushRequest:
    """What a writer of ``.gstore/flush`` asked for."""

    paths: list[str] | None = None  # relative to the mount ("" is all of it); None: everything pending
    retry: bool = False  # parked uploads (refused for good) are tried again
    timeout: float | None = None  # seconds to wait at most; None: until durable or failed
    poll: float | None = None  # seconds one read waits at most (None: until the verdict)
    error: str | None = None  # the request could not be understood

    def error_verdict(self) -> dict[str, Any] | None:
        if self.error is None:
            return None
        return {"ok": False, "error": self.error, "usage": True, "failed": [], "files": []}


def parse_flush_request(handle: ControlHandle) -> FlushRequest:
    """A NUL byte and a JSON object (what ``gstore flush`` sends), or paths one per line."""
    raw = bytes(handle.written)
    if not raw.startswith(b"\0"):
        return FlushRequest(paths=written_paths(handle) or None)
    try:
        asked = json.loads(raw[1:].decode("utf-8", "surrogateescape"))
        if not isinstance(asked, dict):
            raise ValueError("not a JSON object")
        paths = asked.get("paths")
        if paths is not None and not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
            raise ValueError('"paths" must be a list of strings')
        timeout, poll = asked.get("timeout"), asked.get("poll")
        for key, value, low in (("timeout", timeout, 0.0), ("poll", poll, 0.01)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not low <= value < 1e9):
                raise ValueError(f'"{key}" must be a number of seconds')
    except ValueError as exc:
        return FlushRequest(error=f"malformed flush request: {exc}")
    cleaned = ["" if p.strip("/") in ("", ".") else p.strip("/") for p in paths or []]
    return FlushRequest(paths=cleaned or None, retry=bool(asked.get("retry")),
                        timeout=None if timeout is None else float(timeout),
                        poll=None if poll is None else float(poll))


class FlushJob:
    """One detailed flush, run for one open handle of ``.gstore/flush``."""

    def __init__(self, request: FlushRequest) -> None:
        self.request = request
        self.verdict: dict[str, Any] | None = None
        self.done = trio.Event()
        self.scope = trio.CancelScope()  # cancelled when the handle is closed

    async def run(self, report: Callable[[FlushRequest], Awaitable[dict[str, Any]]]) -> None:
        """Never raises (it may run as a system task): a failure is the verdict."""
        with self.scope:
            try:
                self.verdict = await report(self.request)
            except Exception as exc:  # noqa: BLE001 - reported to the reader, never raised
                self.verdict = {"ok": False, "error": f"the flush failed: {type(exc).__name__}: {exc}",
                                "failed": [], "files": []}
        if self.verdict is None:
            self.verdict = {"ok": False, "error": "the flush was stopped (its reader went away)",
                            "failed": [], "files": []}
        self.done.set()


def _json(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


async def flush_report(pending: Any, request: FlushRequest) -> dict[str, Any]:
    """Flush what ``request`` asks and say, file by file, what is not durable at its path.

    ``pending`` is the mount's :class:`~gstore.write.pending.PendingFiles` (None
    on a read-only mount). Each file that is not durable is listed once:
    ``parked`` (refused for good: kept locally, not retried until a flush with
    ``retry`` or a remount), ``failed`` (failed during this flush; the queue
    keeps retrying), ``timed out`` (still queued), or ``conflict`` (the backend
    copy changed since this mount read it; ours is durable, at ``saved_as``).
    """
    if pending is None:
        return _flush_verdict(request, [])
    chosen = [staged for staged in pending.pending()
              if request.paths is None or any(p == "" or staged.path == p or staged.path.startswith(p + "/")
                                               for p in request.paths)]
    before = {}
    for staged in chosen:
        record = pending.scheduler.attempts.get(staged.id)
        before[staged.id] = (staged.path, staged.generation, staged.expect, record.failures if record else 0)
    conflicts_before = pending.stats.conflicts
    started = time.time()
    queue = getattr(pending, "namespace", None)
    if queue is not None and len(queue):
        # Queued mkdir/rmdir/unlink/rename go first (uploads wait for them): replay them now.
        queue.retry_now()
        with trio.move_on_after(request.timeout if request.timeout is not None else float("inf")):
            await queue.wait_empty_or_failing()
    await pending.flush(chosen, timeout=request.timeout, retry_parked=request.retry)
    files: list[dict[str, Any]] = []
    maybe_conflicts: list[str] = []
    for staged in chosen:
        path, generation, expect, start_failures = before[staged.id]
        if pending.durable(staged, generation):
            # Uploaded, but a keep-both conflict leaves ``expect`` as it was (a success sets it
            # to the new ETag): a candidate, confirmed below by the conflict copy itself.
            if expect is not None and staged.expect == expect and not staged.unlinked and staged.path == path:
                maybe_conflicts.append(path)
            continue
        record = pending.scheduler.attempts.get(staged.id)
        if record is not None and record.permanent:
            files.append({"path": staged.path, "state": "parked", "parked": True, "error": record.last_error})
        elif record is not None and record.failures > start_failures:
            files.append({"path": staged.path, "state": "failed", "parked": False, "error": record.last_error})
        else:
            waited = "" if request.timeout is None else f" within {request.timeout:g}s"
            files.append({"path": staged.path, "state": "timed out", "parked": False,
                          "error": f"not uploaded{waited}; still queued"})
    if pending.stats.conflicts > conflicts_before:
        files += await _conflict_copies(pending.backend, maybe_conflicts, started,
                                        pending.stats.conflicts - conflicts_before)
    if queue is not None:
        files += _namespace_entries(queue, request)
    return _flush_verdict(request, files)


def _namespace_entries(queue: Any, request: FlushRequest) -> list[dict[str, Any]]:
    """Queued namespace changes under the flushed paths that are not in the backend (yet), and
    those the replay did not apply (a conflict) that no flush has reported."""
    def asked(path: str) -> bool:
        return request.paths is None or any(p == "" or path == p or path.startswith(p + "/") for p in request.paths)

    entries: list[dict[str, Any]] = []
    for change in queue.queued():
        if not asked(change.path):
            continue
        what = f"queued {change.describe()} not in the backend yet"
        if queue.last_error:
            entries.append({"path": change.path, "state": "failed", "parked": False,
                            "error": f"{what} ({queue.last_error})"})
        else:
            entries.append({"path": change.path, "state": "timed out", "parked": False, "error": what})
    for settled in queue.take_unreported(asked):
        state = "conflict" if settled.outcome == "conflict" else "failed"
        entries.append({"path": settled.change.path, "state": state, "parked": False, "saved_as": None,
                        "error": f"queued {settled.change.describe()} not applied: {settled.detail}"})
    return entries


def _flush_verdict(request: FlushRequest, files: list[dict[str, Any]]) -> dict[str, Any]:
    not_durable = [f for f in files if f["state"] != "conflict"]
    return {
        "ok": not files,
        "failed": [f"{f['path']}: {f['error']}" for f in not_durable],  # the plain form, one line each
        "paths": request.paths or "all",
        "retry": request.retry,
        "files": files,
        "parked": sum(f["state"] == "parked" for f in files),
        "timed_out": any(f["state"] == "timed out" for f in files),
        "conflicts": sum(f["state"] == "conflict" for f in files),
    }


async def _conflict_copies(backend: Any, paths: list[str], since: float, count: int) -> list[dict[str, Any]]:
    """Where this mount's versions went in the keep-both conflicts of this flush.

    The write-back queue counts conflicts but does not say where each copy went;
    the copy is ``NAME.conflict-YYYYmmddTHHMMSSZ`` next to the file, made during
    the flush, so the folder's listing shows it.
    """
    found: list[dict[str, Any]] = []
    for path in paths:
        folder, _, name = path.rpartition("/")
        saved_as, note = None, None
        try:
            listing = await backend.list_dir(folder)
        except OSError as exc:
            note = f"the conflict copy could not be listed: {exc}"
            listing = None
        best = since - 2.0  # the stamp has whole seconds
        for entry in (listing.entries if listing is not None else {}):
            stamp = entry[len(name) + len(".conflict-"):] if entry.startswith(name + ".conflict-") else ""
            try:
                when = calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ"))
            except ValueError:
                continue
            if when >= best:
                best, saved_as = when, f"{folder}/{entry}" if folder else entry
        if saved_as is not None or note is not None:
            found.append({"path": path, "state": "conflict", "parked": False, "saved_as": saved_as,
                          "error": note or "changed on the backend since this mount read it; this mount's "
                          f"version was saved as {saved_as}"})
    missing = min(count, len(paths)) - len(found)
    if missing > 0:
        found.append({"path": None, "state": "conflict", "parked": False, "saved_as": None,
                      "error": f"{missing} conflict(s) during this flush whose copy was not found; "
                      "the daemon log names them"})
    return found
