"""Group commit of journal records: batching, per-item errors, cancellation, real staging files."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import trio

from gstore.write.group_commit import GroupCommit
from gstore.write.staging import EXPECT_ABSENT, StagingArea


def test_overlapping_commits_share_batches_and_each_waits_for_its_own() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def commit_batch(items: Sequence[int]) -> list[BaseException | None]:
        if not batches:
            gate.wait(5)  # hold the first batch so the others pile up behind it
        batches.append(list(items))
        return [OSError(5, "bad") if item == 3 else None for item in items]

    commits: GroupCommit[int] = GroupCommit(commit_batch)
    outcome: dict[int, str] = {}

    async def one(item: int) -> None:
        try:
            await commits.commit(item)
            outcome[item] = "ok"
        except OSError:
            outcome[item] = "error"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 0)
            await trio.sleep(0.05)
            for item in range(1, 6):
                nursery.start_soon(one, item)
            await trio.sleep(0.05)
            assert not outcome  # nobody returns before its batch is committed
            gate.set()

    trio.run(main)
    # trio does not promise the order in which tasks started together run: compare as sets.
    assert [sorted(batch) for batch in batches] == [[0], [1, 2, 3, 4, 5]]
    assert outcome == {0: "ok", 1: "ok", 2: "ok", 3: "error", 4: "ok", 5: "ok"}
    assert commits.batches == 2 and commits.items == 6


def test_a_cancelled_waiter_never_loses_the_lead() -> None:
    gate = threading.Event()
    committed: list[int] = []

    def commit_batch(items: Sequence[int]) -> list[BaseException | None]:
        if not committed:
            gate.wait(5)
        committed.extend(items)
        return [None] * len(items)

    commits: GroupCommit[int] = GroupCommit(commit_batch)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commits.commit, 0)
            await trio.sleep(0.05)
            nursery.start_soon(commits.commit, 1)
            cancelled = trio.CancelScope()

            async def doomed() -> None:
                with cancelled:
                    await commits.commit(2)

            nursery.start_soon(doomed)
            await trio.sleep(0.05)
            cancelled.cancel()  # waiting behind the first batch: its entry goes
            await trio.sleep(0.05)
            gate.set()
            with trio.fail_after(5):
                await commits.commit(3)  # the lead passed on: this commits and returns

    trio.run(main)
    assert 2 not in committed and {0, 1, 3} <= set(committed)


def test_staging_commit_makes_records_durable_with_one_directory_sync(tmp_path: Path) -> None:
    staging = StagingArea(tmp_path / "staging")
    files = [staging.create(f"f{i}", base=None, expect=EXPECT_ABSENT, size=0) for i in range(4)]
    assert not list((tmp_path / "staging").glob("*.json"))  # creating writes no record
    synced: list[int] = []
    real_sync = staging._sync_dir  # noqa: SLF001 - counting directory fsyncs

    def counting_sync() -> None:
        synced.append(1)
        real_sync()

    staging._sync_dir = counting_sync  # type: ignore[method-assign]  # noqa: SLF001

    async def main() -> None:
        for i, staged in enumerate(files):
            StagingArea.write(staged, 0, f"data {i}".encode())
        async with trio.open_nursery() as nursery:
            for staged in files:
                nursery.start_soon(staging.commit, staged)

    trio.run(main)
    for staged in files:
        StagingArea.close_fd(staged)
    records = {json.loads(p.read_text())["path"] for p in (tmp_path / "staging").glob("*.json")}
    assert records == {"f0", "f1", "f2", "f3"}
    assert 1 <= len(synced) < len(files)  # batched: fewer directory fsyncs than files
    assert {s.path for s in staging.load()} == records
