"""Group commit of journal records: files closed at about the same moment share one trip to disk.

Making a close durable costs a thread hop and, per file, an fsync of its data,
a record written and fsynced, a rename, and an fsync of the staging directory.
When many files close at once (``cp -r``, ``tar x``, a build), the hops and the
directory fsyncs are what dominate. Here every close that arrives while a commit
is running joins the next batch: one worker-thread call writes all of its
records and fsyncs the directory once, then every waiter of that batch returns.
A close still returns only once *its own* record is durable.

Protocol (all on the trio thread; tasks interleave at every ``await``):

* ``_waiting`` holds the entries not yet taken by a batch; ``_leading`` is True
  while one task (the *leader*) is committing a batch.
* A caller appends its entry. With no leader it leads at once; otherwise it
  waits on its entry's event, which is set either when its batch is done
  (``entry.done``) or when it is handed the lead (not done: it leads next).
* The leader takes *all* of ``_waiting`` as its batch (no await between taking
  and clearing), commits it in a worker thread (shielded from cancellation:
  the outcome belongs to the whole batch), marks every entry done, and hands the lead to the
  oldest entry still waiting, or clears ``_leading``. A task never commits
  batches other than the one holding its own entry, so a close is never held
  up by closes that arrived after it.
* A waiter cancelled before its batch was taken removes its entry; one
  cancelled after being handed the lead passes it on: the lead is never lost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

T = TypeVar("T")

#: Commits a batch in a worker thread; returns one error (or None) per item, in order.
BatchCommit = Callable[[Sequence[T]], list[BaseException | None]]


@dataclass(eq=False)
class _Entry(Generic[T]):
    item: T
    wake: trio.Event = field(default_factory=trio.Event)
    done: bool = False
    error: BaseException | None = None


class GroupCommit(Generic[T]):
    """Batches ``commit(item)`` calls that overlap in time into one ``commit_batch`` call."""

    def __init__(self, commit_batch: BatchCommit[T]) -> None:
        self._commit_batch = commit_batch
        self._waiting: list[_Entry[T]] = []
        self._leading = False
        self.batches = 0  # worker-thread commits run (status, tests)
        self.items = 0  # items committed in them

    @property
    def busy(self) -> bool:
        """A batch is being committed (or handed on): a caller may bypass the queue only when not."""
        return self._leading

    async def commit(self, item: T) -> None:
        """Return once ``item`` is committed; raise what committing it raised."""
        entry: _Entry[T] = _Entry(item)
        self._waiting.append(entry)
        if self._leading:
            try:
                await entry.wake.wait()
            except BaseException:
                self._abandon(entry)
                raise
            if entry.done:
                if entry.error is not None:
                    raise entry.error
                return
            # Handed the lead: our entry is still in _waiting, taken by the batch below.
        self._leading = True
        await self._lead()
        if entry.error is not None:
            raise entry.error

    async def _lead(self) -> None:
        batch, self._waiting = self._waiting, []
        try:
            # Shielded: the thread runs to its end anyway, and its outcome belongs to every
            # waiter of the batch, not only to this (maybe cancelled) leader.
            with trio.CancelScope(shield=True):
                errors = await trio.to_thread.run_sync(self._commit_batch, [e.item for e in batch])
        except Exception as exc:  # noqa: BLE001 - the batch itself failed: every item reports it
            errors = [exc] * len(batch)
        self._finish(batch, errors)

    def _finish(self, batch: list[_Entry[T]], errors: list[BaseException | None]) -> None:
        self.batches += 1
        self.items += len(batch)
        for entry, error in zip(batch, errors, strict=True):
            entry.done, entry.error = True, error
            entry.wake.set()
        self._pass_lead()

    def _pass_lead(self) -> None:
        if self._waiting:
            self._waiting[0].wake.set()  # not done: it leads the next batch
        else:
            self._leading = False

    def _abandon(self, entry: _Entry[T]) -> None:
        """A waiter was cancelled: drop its entry, or pass on the lead it was just handed."""
        if entry.done:
            return
        if entry in self._waiting:
            self._waiting.remove(entry)
            if entry.wake.is_set():  # handed the lead, cancelled before taking it
                self._pass_lead()


__all__ = ["GroupCommit"]
