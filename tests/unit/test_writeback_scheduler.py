"""The upload scheduler: sleeps until the next upload is due (on trio's clock), bounded, cancellable."""

from __future__ import annotations

import trio

from gstore.write.scheduler import UploadScheduler


def test_an_idle_scheduler_does_not_spin() -> None:
    async def main() -> int:
        async def upload(upload_id: str) -> None:
            raise AssertionError("nothing is due within the test")

        scheduler = UploadScheduler(upload, delay=60)
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.run)
            scheduler.schedule("later")  # due in 60 s
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        return scheduler.passes

    # trio's clock has a random offset from time.monotonic(); run a few times so a
    # mix-up of the two clocks shows whatever the offset.
    for _ in range(5):
        assert trio.run(main) <= 3


def test_due_uploads_run_once_each_and_at_most_n_at_once() -> None:
    async def main() -> tuple[list[str], int]:
        ran: list[str] = []
        running = 0
        most = 0

        async def upload(upload_id: str) -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await trio.sleep(0.01)
            ran.append(upload_id)
            running -= 1

        scheduler = UploadScheduler(upload, delay=0, concurrency=2)
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.run)
            for name in "abcde":
                scheduler.schedule(name, 0)
            while len(ran) < 5:
                await scheduler.changed().wait()
            nursery.cancel_scope.cancel()
        return ran, most

    ran, most = trio.run(main)
    assert sorted(ran) == list("abcde") and most == 2


def test_a_failure_backs_off_and_a_permanent_one_is_parked() -> None:
    async def main() -> tuple[bool, bool, bool]:
        async def upload(upload_id: str) -> None:
            pass

        scheduler = UploadScheduler(upload, delay=0)
        delay = scheduler.failed("a", "boom", permanent=False)
        parked = scheduler.failed("b", "denied", permanent=True)
        due_a = "a" in scheduler._due  # noqa: SLF001 - white box
        due_b = "b" in scheduler._due  # noqa: SLF001
        scheduler.retry_now(include_parked=True)
        return delay is not None and 0 < delay <= 60, parked is None and not due_b, due_a and scheduler.due_now("b")

    assert trio.run(main) == (True, True, True)
