"""The write-back scheduler sleeps until the next upload is due, on trio's clock."""

from __future__ import annotations

from pathlib import Path

import trio

from gstore.write.staging import StagingArea
from gstore.write.writeback import WriteBack


class NoBackend:
    """Has nothing: any backend call fails the test (nothing may be uploaded here)."""


def test_an_idle_scheduler_does_not_spin(tmp_path: Path) -> None:
    staging = StagingArea(tmp_path / "staging")

    async def main() -> int:
        writeback = WriteBack(NoBackend(), staging, read_base=None, on_uploaded=lambda s, i: None,  # type: ignore[arg-type]
                              delay=60)
        async with trio.open_nursery() as nursery:
            await nursery.start(writeback.run)
            staged = staging.create("later.txt", base=None, expect=None, size=0)
            writeback.adopt(staged)
            writeback.schedule(staged)  # due in 60 s
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        return writeback.scheduler_passes

    # trio's clock has a random offset from time.monotonic(); run a few times so a
    # mix-up of the two clocks shows whatever the offset.
    for _ in range(5):
        assert trio.run(main) <= 3
