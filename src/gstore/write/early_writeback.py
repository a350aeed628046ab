"""Start the disk writes of a large staged file while it is still being written.

A close of a staged file over ``INLINE_LIMIT`` fsyncs its data before it returns
(:mod:`gstore.write.staging`): the file survives a power loss from then on. For a
large file written in one go (``cp``, ``dd``, an export), that fsync then writes
everything at once: 0.15-0.45 s of a 256 MiB close on this project's test VM,
a fifth of the time from the first write to the close returning, while the
disk had been idle: the kernel's own writeback starts only after
``dirty_expire_centisecs`` (30 s).

So each time a program appending to a staged file completes a step of
``STEP`` bytes, this asks the kernel to start writing that step to disk
(``sync_file_range(SYNC_FILE_RANGE_WRITE)``: start, do not wait) in a worker
thread: the call can block for tens of milliseconds when the device queue is
full, which the trio thread must never do. By the close most of the file is on
disk and its fsync waits for the last step only. Nothing about durability
changes: this is a hint; the close's fsync is what makes the bytes durable, and
a hint that fails (file gone, unsupported platform) is ignored.

Only appends trigger it (a write starting at the file's current end): a
program rewriting pages in place (SQLite, an editor) would otherwise get disk
writes it may well overwrite a moment later.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: Bytes appended between two starts of writeback (one request to the disk each).
STEP = 32 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux), or None where there is none: then only the fsync writes."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def steps_completed(before: int, offset: int, end: int) -> tuple[int, int] | None:
    """The range of whole steps an append of ``[offset, end)`` to a file of ``before`` bytes
    completed, or None (not an append, or no step boundary crossed)."""
    if offset != before or before // STEP == end // STEP:
        return None
    return (before // STEP) * STEP, (end // STEP) * STEP


class EarlyWriteback:
    """The queue of ranges to start writing, and the worker thread that starts them.

    Concurrency: :meth:`appended` runs on the trio thread (a deque append under a
    lock, no system call); the worker thread takes ranges and opens the data file
    by path with a descriptor of its own (the trio thread's shared descriptor may
    be closed at any time). ``_lock`` guards ``_queue``, ``_running`` and ``_closed``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[Path, int, int]] = collections.deque()
        self._running = False
        self._closed = False
        self.started = 0  # ranges handed to the kernel (tests, status)

    def appended(self, data_path: Path, before: int, offset: int, end: int) -> None:
        """A write of ``[offset, end)`` to a staged file of ``before`` bytes landed (trio thread)."""
        completed = steps_completed(before, offset, end)
        if completed is None or _sync_file_range is None:
            return
        start, stop = completed
        with self._lock:
            if self._closed:
                return
            self._queue.append((data_path, start, stop - start))
            if self._running:
                return  # the running thread takes it before it stops
            self._running = True
        threading.Thread(target=self._run, name="gstore early writeback", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue or self._closed:
                    self._queue.clear()
                    self._running = False
                    return
                data_path, start, length = self._queue.popleft()
            self._start_writeback(data_path, start, length)

    def _start_writeback(self, data_path: Path, start: int, length: int) -> None:
        assert _sync_file_range is not None
        try:
            fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # removed meanwhile (uploaded, unlinked): nothing to write
        try:
            if _sync_file_range(fd, start, length, _SYNC_FILE_RANGE_WRITE) != 0:
                log.debug("sync_file_range of %s failed: %s", data_path, os.strerror(ctypes.get_errno()))
            else:
                self.started += 1
        finally:
            os.close(fd)

    def busy(self) -> bool:
        with self._lock:
            return self._running

    def close(self) -> None:
        """Drop what is queued (hints only) and start nothing more; the thread ends after
        the call it is in (StagingArea.close waits for it through :meth:`busy`)."""
        with self._lock:
            self._closed = True
            self._queue.clear()


__all__ = ["EarlyWriteback", "STEP", "steps_completed"]
