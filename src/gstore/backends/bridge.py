"""Run asyncio coroutines (s3fs, aiobotocore) from trio tasks.

pyfuse3 runs every FUSE handler on trio; s3fs runs on asyncio, on the event
loop thread fsspec keeps for its async filesystems. A request is submitted to
that loop with ``asyncio.run_coroutine_threadsafe`` and, when it completes, the
waiting trio task is woken through ``TrioToken.run_sync_soon``. No thread is
parked per request and the number of requests in flight is not capped by
trio's worker-thread limit; the cost is two cross-thread wake-ups
(see docs/architecture.md for the measurements behind this choice).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
from collections.abc import Coroutine
from typing import Any, TypeVar

import trio

from gstore.errors import BackendError

T = TypeVar("T")


class AsyncioBridge:
    """Submit coroutines to one asyncio loop running in another thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, timeout: float | None = None) -> None:
        self._loop = loop
        self._timeout = timeout

    async def run(self, coro: Coroutine[Any, Any, T], *, timeout: float | None = None) -> T:
        """Await ``coro`` on the asyncio loop; cancel it there if this task is cancelled.

        A request that takes longer than the timeout is cancelled and fails
        with a transient ``ETIMEDOUT``, so a hanging backend never hangs the
        calling program forever.
        """
        limit = self._timeout if timeout is None else timeout
        token = trio.lowlevel.current_trio_token()
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        done = trio.Event()

        def wake(_: concurrent.futures.Future[T]) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        future.add_done_callback(wake)
        try:
            if limit is None:
                await done.wait()
            else:
                with trio.move_on_after(limit) as scope:
                    await done.wait()
                if scope.cancelled_caught:
                    future.cancel()
                    raise BackendError(
                        errno.ETIMEDOUT, f"backend request timed out after {limit:g}s", transient=True
                    )
        except BaseException:
            future.cancel()
            raise
        return future.result()
