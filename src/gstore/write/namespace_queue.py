"""Namespace changes made while the backend could not be reached: journaled, shown, replayed in order.

An ``rm``, ``mkdir`` or ``rmdir`` during an outage should behave as on a local
disk: it succeeds, every later lookup and listing on this host reflects it, and
the backend gets it once it answers again; a crash or restart in between loses
nothing. This module is the one owner of those queued changes:

* :meth:`NamespaceQueue.enqueue` appends a change and makes the journal durable
  (written to a temporary file, fsynced, renamed over the journal, folder
  fsynced) before the caller replies to the program;
* :meth:`NamespaceQueue.effect` and :meth:`NamespaceQueue.overlay` say what the
  queued changes do to a path or a folder's listing (the content layer lays
  them over the backend's answers, under the pending files);
* :meth:`NamespaceQueue.run` replays the changes one at a time, oldest first,
  each with a check that the backend still has what this mount saw (the same
  idea as an upload's conditional write): a removal of an object someone else
  changed meanwhile, or of a folder someone else put files into, is not applied
  and is reported as a conflict; their data stays.

Ordering with uploads: a pending file's upload waits until the queue is empty
(:meth:`wait_empty`), so "rm a; create a" during an outage reaches the backend
as a delete followed by the new object, never the other way round. While the
queue is non-empty every new namespace change is queued too (not applied
directly), for the same reason.

Concurrency rules: everything runs on the trio thread. ``_changes`` is changed
only by :meth:`enqueue` (append) and by the replay task (pop of the first
change, after it was applied); both then rewrite the journal. The replay task
re-reads ``_changes[0]`` after every await because ``enqueue`` may append
meanwhile (it never removes or reorders). Journal writes are serialised by
``_journal_lock`` so the file on disk always holds a prefix-consistent list.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

from gstore.backends.base import ObjectInfo, StorageBackend
from gstore.errors import classify

log = logging.getLogger(__name__)

ChangeKind = Literal["delete", "make_dir", "remove_dir"]
Outcome = Literal["applied", "conflict", "failed"]

#: Replay retry delays after a transient failure (doubling, capped); a breaker that
#: closes wakes the replay at once.
FIRST_RETRY = 1.0
MAX_RETRY = 30.0


@dataclass
class QueuedChange:
    """One namespace change the backend does not have yet."""

    kind: ChangeKind
    path: str
    #: delete: the ETag of the object this mount removed (None: remove whatever is there,
    #: as an online unlink does when the backend gives no ETag).
    etag: str | None = None
    #: delete, where the backend gives no ETag: the removed version's size and mtime.
    size: int | None = None
    mtime: float | None = None
    #: make_dir: the folder marker's metadata (its POSIX attributes).
    metadata: dict[str, str] | None = None
    queued_at: float = field(default_factory=time.time)
    seq: int = 0

    def describe(self) -> str:
        return {"delete": "removal", "make_dir": "mkdir", "remove_dir": "rmdir"}[self.kind]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QueuedChange:
        kind = data["kind"]
        if kind not in ("delete", "make_dir", "remove_dir"):
            raise ValueError(f"unknown change kind {kind!r}")
        return cls(kind=kind, path=str(data["path"]), etag=data.get("etag"), size=data.get("size"),
                   mtime=data.get("mtime"), metadata=data.get("metadata"),
                   queued_at=float(data.get("queued_at") or 0.0), seq=int(data.get("seq") or 0))


@dataclass
class Settled:
    """What became of one queued change (for status and flush reports)."""

    change: QueuedChange
    outcome: Outcome
    detail: str
    at: float = field(default_factory=time.time)


class NamespaceQueue:
    """The ordered, crash-safe queue of namespace changes for one mount."""

    def __init__(self, backend: StorageBackend, journal: Path) -> None:
        self.backend = backend
        self.journal = journal
        self._changes: list[QueuedChange] = []
        self._next_seq = 1
        self._journal_lock = trio.Lock()
        self._work = trio.Event()
        self._emptied = trio.Event()
        self._emptied.set()
        self._online = trio.Event()
        self._progress = trio.Event()  # set (and replaced) at each replay outcome
        self._listeners: list[Callable[[Settled], None]] = []
        #: The last settled changes that were not applied as asked (conflicts, refusals).
        self.problems: list[Settled] = []
        self._unreported: list[Settled] = []  # not yet told to a `gstore flush`
        self.applied = 0
        self.last_error: str | None = None
        backend.add_listener(self._backend_state)

    # -- queries (no await) ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._changes)

    def queued(self) -> list[QueuedChange]:
        return list(self._changes)

    def effect(self, path: str) -> Literal["absent", "dir"] | None:
        """What the queued changes make of ``path`` (the last one on it wins); None: nothing."""
        for change in reversed(self._changes):
            if change.path == path:
                return "dir" if change.kind == "make_dir" else "absent"
        return None

    def overlay(self, folder: str, entries: dict[str, ObjectInfo]) -> dict[str, ObjectInfo]:
        """A listing of ``folder`` with the queued changes applied (a new dict when anything changes)."""
        if not self._changes:
            return entries
        prefix = f"{folder}/" if folder else ""
        shown: dict[str, ObjectInfo] | None = None
        for change in self._changes:
            if not change.path.startswith(prefix):
                continue
            name = change.path[len(prefix):]
            if not name or "/" in name:
                continue
            shown = dict(entries) if shown is None else shown
            if change.kind == "make_dir":
                if name not in shown or not shown[name].is_dir:
                    shown[name] = ObjectInfo(name=name, is_dir=True, mtime=change.queued_at)
            else:
                shown.pop(name, None)
        return entries if shown is None else shown

    def take_unreported(self, wanted: Callable[[str], bool]) -> list[Settled]:
        """The changes not applied as asked that no flush has reported yet, under ``wanted`` paths."""
        taken = [p for p in self._unreported if wanted(p.change.path)]
        self._unreported = [p for p in self._unreported if not wanted(p.change.path)]
        return taken

    def on_settled(self, callback: Callable[[Settled], None]) -> None:
        self._listeners.append(callback)

    # -- changes ------------------------------------------------------------------------------------

    async def enqueue(self, change: QueuedChange) -> None:
        """Queue ``change`` and make it durable on local disk before returning."""
        change.seq = self._next_seq
        self._next_seq += 1
        self._changes.append(change)
        self._emptied = trio.Event() if self._emptied.is_set() else self._emptied
        try:
            await self._write_journal()
        except BaseException:
            self._changes.remove(change)
            if not self._changes:
                self._emptied.set()
            raise
        log.info("backend unavailable or earlier changes still queued: %s of %s queued (%d waiting)",
                 change.describe(), change.path, len(self._changes))
        self._work.set()

    async def wait_empty(self) -> None:
        """Until every change queued so far (and later) has been settled."""
        while self._changes:
            await self._emptied.wait()

    async def wait_empty_or_failing(self) -> None:
        """Until the queue is empty, or its replay fails (the backend cannot be reached):
        waiting longer would only hide that from the caller."""
        while self._changes and self.last_error is None:
            await self._progress.wait()

    def retry_now(self) -> None:
        """Replay at once (a flush asks), not after the current back-off."""
        if self._changes:
            self.last_error = None
            self._online.set()

    def _moved(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    # -- replay ----------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Replay queued changes, oldest first, until cancelled."""
        task_status.started()
        delay = FIRST_RETRY
        while True:
            if not self._changes:
                self._work = trio.Event()
                await self._work.wait()
                continue
            change = self._changes[0]
            try:
                outcome, detail = await self._apply(change)
            except OSError as exc:
                code, transient = classify(exc)
                if transient:
                    self.last_error = str(exc) or type(exc).__name__
                    self._moved()
                    log.debug("replay of queued %s of %s: %s; again in %.0fs", change.describe(), change.path,
                              exc, delay)
                    self._online = trio.Event()
                    with trio.move_on_after(delay):
                        await self._online.wait()
                    delay = min(MAX_RETRY, delay * 2)
                    continue
                outcome, detail = "failed", str(exc) or type(exc).__name__
            delay = FIRST_RETRY
            self.last_error = None
            await self._settle(change, outcome, detail)

    async def _apply(self, change: QueuedChange) -> tuple[Outcome, str]:
        """One change against the backend, after checking it still applies."""
        if change.kind == "delete":
            current = await self.backend.head(change.path)
            if current is None or current.is_dir:
                return "applied", "already gone"
            if change.etag is not None and current.etag != change.etag:
                return "conflict", (f"changed on the backend since this mount removed it (ETag {current.etag}, "
                                    f"removed {change.etag}); their version was kept")
            if change.etag is None and change.size is not None and (
                    current.size != change.size or abs((current.mtime or 0.0) - (change.mtime or 0.0)) > 1e-3):
                return "conflict", ("changed on the backend since this mount removed it (size or time differ); "
                                    "their version was kept")
            await self.backend.delete(change.path)
            return "applied", "removed"
        if change.kind == "make_dir":
            current = await self.backend.head(change.path)
            if current is not None and not current.is_dir:
                return "conflict", "a file of that name was created on the backend meanwhile; no folder made"
            await self.backend.make_dir(change.path, metadata=change.metadata)
            return "applied", "folder made"
        listing = await self.backend.list_dir(change.path)
        if listing is not None and listing.entries:
            return "conflict", (f"{len(listing.entries)} entries were put in it on the backend meanwhile; "
                                "the folder was kept")
        await self.backend.remove_dir_marker(change.path)
        return "applied", "folder removed"

    async def _settle(self, change: QueuedChange, outcome: Outcome, detail: str) -> None:
        if self._changes and self._changes[0] is change:
            self._changes.pop(0)
        await self._write_journal()
        settled = Settled(change, outcome, detail)
        if outcome == "applied":
            self.applied += 1
            log.info("queued %s of %s applied (%s)", change.describe(), change.path, detail)
        else:
            self.problems = (self.problems + [settled])[-100:]
            self._unreported = (self._unreported + [settled])[-1000:]
            log.warning("queued %s of %s not applied: %s", change.describe(), change.path, detail)
        for callback in self._listeners:
            callback(settled)
        if not self._changes:
            self._emptied.set()
        self._moved()

    def _backend_state(self, state: str) -> None:
        if state == "closed":
            self._online.set()

    # -- journal -------------------------------------------------------------------------------

    async def _write_journal(self) -> None:
        records = [c.to_json() for c in self._changes]
        async with self._journal_lock:
            await trio.to_thread.run_sync(_write_atomically, self.journal, records)

    def recover(self) -> list[QueuedChange]:
        """Take over the changes queued before the last stop (in their order)."""
        try:
            raw = self.journal.read_text()
        except FileNotFoundError:
            return []
        try:
            records = json.loads(raw)["changes"]
            changes = [QueuedChange.from_json(r) for r in records]
        except (ValueError, KeyError, TypeError) as exc:
            kept = self.journal.with_suffix(f".unreadable-{int(time.time())}")
            self.journal.rename(kept)
            log.error("namespace journal %s is unreadable (%s); kept as %s, its changes are NOT replayed",
                      self.journal, exc, kept)
            return []
        self._changes = changes
        self._next_seq = max((c.seq for c in changes), default=0) + 1
        if changes:
            self._emptied = trio.Event()
            self._work.set()
            log.warning("%d namespace change(s) queued before the last stop; replaying them: %s", len(changes),
                        ", ".join(f"{c.describe()} {c.path}" for c in changes[:10]))
        return changes

    def snapshot(self) -> dict[str, Any]:
        """For ``gstore status`` and ``.gstore/status.json``."""
        return {
            "queued": len(self._changes),
            "oldest": self._changes[0].queued_at if self._changes else None,
            "changes": [{"kind": c.kind, "path": c.path} for c in self._changes[:20]],
            "applied": self.applied,
            "last_error": self.last_error,
            "not_applied": [{"kind": s.change.kind, "path": s.change.path, "outcome": s.outcome,
                             "detail": s.detail} for s in self.problems[-20:]],
        }


def _write_atomically(journal: Path, records: list[dict[str, Any]]) -> None:
    """Replace the journal in one step: a crash leaves the old list or the new one."""
    if not records:
        try:
            journal.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(journal.parent)
        return
    tmp = journal.with_name(journal.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(json.dumps({"version": 1, "changes": records}).encode())
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, journal)
    _fsync_dir(journal.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["NamespaceQueue", "QueuedChange", "Settled"]
