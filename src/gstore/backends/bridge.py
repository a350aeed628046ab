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
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

import trio

from gstore.errors import BackendError

T = TypeVar("T")


log = logging.getLogger(__name__)


def _quiet_lost_body_writes(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """aiohttp writes a streamed request body (an upload read from its staging file) in a task
    of its own; when the connection drops, the request fails (and is retried or reported by
    its caller) and that task's "connection reset" is never retrieved. asyncio would log it
    as an ERROR with a traceback; it is one line of DEBUG here. Everything else as usual."""
    exc = context.get("exception")
    if "never retrieved" in str(context.get("message", "")) and isinstance(exc, (ConnectionError, OSError)):
        log.debug("a request body's writer ended with the connection: %s", exc)
        return
    loop.default_exception_handler(context)


class AsyncioBridge:
    """Submit coroutines to one asyncio loop running in another thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, timeout: float | None = None) -> None:
        self._loop = loop
        self._timeout = timeout
        if loop.get_exception_handler() is None:
            loop.call_soon_threadsafe(loop.set_exception_handler, _quiet_lost_body_writes)

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
