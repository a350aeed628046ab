"""Run one mount: daemonize, wire the layers together, serve until unmounted.

Order matters. The process forks *before* any fsspec filesystem exists (the
IO thread fsspec starts for async filesystems does not survive a fork) and
before trio runs. The parent then waits on a pipe and exits only when the
child reports the mount live (the mountpoint answered a stat through our own
FUSE loop) or reports why it failed, so ``gstore-mount`` returning 0 means the
mount can be used.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import hashlib
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from gstore import __version__, systemd
from gstore.config import MountRequest
from gstore.log import (
    RequestTracer,
    redactor,
    secret_values,
    setup_logging,
    stderr_is_journal,
    traced_backend_call,
)

if TYPE_CHECKING:  # imported late at run time: nothing that starts fsspec before the fork
    from gstore.backends.base import StorageBackend
    from gstore.cache.blockstore import BlockStore
    from gstore.vfs.filesystem import FileSystem
    from gstore.write.pending import PendingFiles

log = logging.getLogger("gstore.daemon")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class StartupError(Exception):
    """The mount could not start; the message is shown to the user as is."""


class Startup:
    """Tells whoever started us how the start went (parent process, systemd)."""

    def __init__(self, pipe_fd: int | None) -> None:
        self._fd = pipe_fd

    def _send(self, text: str) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, text.encode("utf-8", "replace"))
        finally:
            os.close(self._fd)
            self._fd = None

    def ready(self, message: str) -> None:
        self._send("OK " + message)
        systemd.notify(f"READY=1\nSTATUS={message}\nMAINPID={os.getpid()}")

    def failed(self, message: str) -> None:
        self._send("ERR " + message)
        systemd.notify(f"STATUS=Failed: {message}")


class _KernelCache:
    """``gstore refresh``: makes the kernel forget directory entries and inode attributes.

    pyfuse3's invalidation calls block in the kernel until related requests (a
    lookup in that folder, say) are answered, and those are answered on the trio
    thread: so they run in a worker thread, never on the trio thread.
    """

    async def invalidate(self, entries: list[tuple[int, str]], inodes: list[tuple[int, bool]]) -> None:
        import pyfuse3

        def work() -> None:
            for parent, name in entries:
                try:
                    pyfuse3.invalidate_entry(parent, name.encode("utf-8", "surrogateescape"))
                except OSError as exc:  # ENOENT: the kernel holds no such entry
                    if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                        log.warning("could not invalidate the kernel entry %r of inode %d: %s", name, parent, exc)
            for ino, attributes_only in inodes:
                try:
                    pyfuse3.invalidate_inode(ino, attributes_only)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        log.warning("could not invalidate kernel caches of inode %d: %s", ino, exc)

        await trio.to_thread.run_sync(work)


def state_dir_for(request: MountRequest) -> Path:
    """Per-mount directory under the cache dir: two mounts never share an index."""
    backend = request.backend
    digest = hashlib.sha256(f"{backend.protocol}\0{backend.root}\0{backend.display()}".encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", backend.name)[:40] or "mount"
    return request.options.cache_dir / f"{safe}-{digest}"


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)


def _lock_state_dir(state_dir: Path) -> int:
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StartupError(f"cache directory {state_dir} is in use by another gstore-mount (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _daemonize() -> int | None:
    """Fork. In the parent, wait for the child's verdict and exit. In the child, return the pipe."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.setsid()
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        return write_fd
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    verdict = b"".join(chunks).decode("utf-8", "replace")
    if verdict.startswith("OK "):
        os._exit(EXIT_OK)
    if verdict.startswith("ERR "):
        print(f"gstore-mount: {verdict[4:]}", file=sys.stderr)
    else:
        _, status = os.waitpid(pid, 0)
        print(f"gstore-mount: the daemon exited before the mount was ready (status {status})", file=sys.stderr)
    os._exit(EXIT_FAILURE)


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _return_freed_buffers_to_the_os() -> None:
    """Keep the daemon's RSS near what it actually holds.

    Uploads and block fetches allocate buffers of megabytes from several threads.
    glibc raises its mmap threshold after the first such buffer is freed, after
    which they come from per-thread heaps that rarely shrink: RSS then grows to
    the high-water mark of every thread. A fixed threshold of 1 MiB keeps every
    large buffer in its own mapping, given back to the OS when freed.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 1024 * 1024)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def log_file_of(request: MountRequest, state_dir: Path) -> Path | None:
    """Where the daemon writes its log file (None: stderr only)."""
    if request.options.log_file is None and not request.options.foreground:
        return state_dir / "gstore-mount.log"
    return request.options.log_file


def run(request: MountRequest) -> int:
    """Mount and serve; returns the process exit code."""
    options = request.options
    state_dir = state_dir_for(request)
    log_file = log_file_of(request, state_dir)
    redactor.add(secret_values(request.backend.options))
    mountpoint = str(request.mountpoint)
    if os.path.ismount(mountpoint):
        print(f"gstore-mount: {mountpoint} is already a mount point", file=sys.stderr)
        return EXIT_FAILURE
    try:
        _private_dir(options.cache_dir)
        _private_dir(state_dir)
    except OSError as exc:
        print(f"gstore-mount: cannot use cache directory {options.cache_dir}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE

    pipe_fd = None if options.foreground else _daemonize()
    _return_freed_buffers_to_the_os()
    startup = Startup(pipe_fd)
    setup_logging(
        options.log_level, log_file, stderr=True, stderr_level=None if options.foreground else "WARNING"
    )
    try:
        lock_fd = _lock_state_dir(state_dir)
    except StartupError as exc:
        log.error("%s", exc)
        startup.failed(str(exc))
        return EXIT_FAILURE
    try:
        return trio.run(_serve, request, state_dir, startup)
    except StartupError as exc:
        log.error("%s", exc)
        startup.failed(str(exc))
        return EXIT_FAILURE
    except BaseException as exc:
        log.exception("gstore-mount stopped on an unexpected error")
        startup.failed(redactor.redact(f"unexpected error: {exc}"))
        return EXIT_FAILURE
    finally:
        os.close(lock_fd)


async def _serve(request: MountRequest, state_dir: Path, startup: Startup) -> int:
    import pyfuse3

    from gstore.backends import make_backend
    from gstore.core import build_core
    from gstore.fuse_ops import Operations, mount_options

    options = request.options
    spec = request.backend
    log.info("gstore %s starting: %s on %s", __version__, spec.display(), request.mountpoint)
    log.info(
        "cache %s (%d bytes, blocks of %d), readahead %d, ttl attr %gs dir %gs negative %gs%s",
        state_dir, options.cache_size, options.block_size, options.readahead, options.attr_ttl,
        options.dir_cache_ttl, options.negative_ttl, ", read-only" if options.read_only else "",
    )
    if spec.source == "<built-in>" and spec.protocol == "file":
        Path(spec.root).mkdir(parents=True, exist_ok=True)  # the built-in local folder
    try:
        backend = make_backend(
            spec.protocol, spec.root, dict(spec.options), request_timeout=options.request_timeout,
            retries=options.retries, breaker_threshold=options.breaker_threshold,
            breaker_cooldown=options.breaker_cooldown, connect_timeout=options.connect_timeout,
            max_connections=options.backend_connections,
        )
    except (ImportError, ValueError, TypeError) as exc:
        raise StartupError(f"cannot create the {spec.protocol!r} backend: {redactor.redact(str(exc))}") from exc
    try:
        await backend.probe()
    except OSError as exc:
        raise StartupError(redactor.redact(str(exc.strerror or exc))) from exc

    core = build_core(backend, state_dir, options)
    fs, store, reader, metadata, writeback = core.fs, core.store, core.reader, core.metadata, core.writeback
    if writeback is not None:
        core.recover()
    from gstore.fuse_ops import RECENT_ERRORS
    from gstore.status import build_status
    from gstore.vfs.control import ControlFiles, flush_report
    from gstore.vfs.refresh import Refresher
    from gstore.vfs.server_copy import ServerCopier

    started = time.time()
    log_target = str(log_file_of(request, state_dir) or ("journal" if stderr_is_journal() else "stderr"))
    fs.control = ControlFiles(
        status=lambda: {
            **build_status(request=request, state_dir=state_dir, fs=fs, store=store, reader=reader,
                           metadata=metadata, writeback=writeback, started=started,
                           recent_errors=RECENT_ERRORS),
            "log": log_target, "debug_requests": tracer.enabled,
        },
        flush=fs.flush_paths,
        flush_report=lambda flush_request: flush_report(writeback, flush_request),
        refresh=(refresher := Refresher(fs, _KernelCache())),
        copy=ServerCopier(fs, refresher),
    )
    ops = Operations(
        fs,
        uid=options.uid,
        gid=options.gid,
        umask=options.umask,
        attr_ttl=options.attr_ttl,
        entry_ttl=options.dir_cache_ttl,
        negative_ttl=options.negative_ttl,
        block_size=options.block_size,
        xattrs=options.xattrs,
    )
    tracer = RequestTracer()
    _watch_requests(tracer, ops, fs, backend)
    tracer.set(bool(getattr(options, "debug_requests", False)))
    fsname = options.fsname or f"gstore:{spec.name}"
    fuse_options = mount_options(
        fsname=fsname,
        read_only=options.read_only,
        allow_other=options.allow_other,
        default_permissions=options.default_permissions,
    )
    try:
        pyfuse3.init(ops, str(request.mountpoint), fuse_options)
    except RuntimeError as exc:
        raise StartupError(f"cannot mount on {request.mountpoint}: {exc}") from exc

    stopping = _Stopping()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(core.run)
            nursery.start_soon(_handle_signals, stopping, writeback, options.drain_timeout, tracer)
            nursery.start_soon(_announce_ready, request, startup, not options.foreground, spec.display())
            interval = systemd.watchdog_interval()
            if interval:
                nursery.start_soon(_watchdog, interval)
            if systemd.enabled():
                nursery.start_soon(_report_status, stopping, writeback, store, f"{spec.display()} on {request.mountpoint}")
            # Everything built so far (modules, botocore's service model, the block index) lives
            # as long as the mount: out of the cyclic collector's way, so a full collection does
            # not walk it in the middle of serving reads.
            gc.freeze()
            await pyfuse3.main(min_tasks=4, max_tasks=128)
            stopping.begin("unmounted")
            if writeback is not None and writeback.pending():
                # Unmounted from outside (umount, fusermount3 -u): the queue still drains.
                await _drain(writeback, options.drain_timeout, stopping)
            nursery.cancel_scope.cancel()
    finally:
        stopping.begin("stopping")
        log.info("unmounting %s%s", request.mountpoint, f" ({stopping.reason})" if stopping.reason else "")
        try:
            pyfuse3.close(unmount=True)
        except Exception:  # noqa: BLE001 - already stopping
            log.exception("unmount failed")
        with trio.move_on_after(5):
            await backend.aclose()
        if writeback is not None:
            writeback.staging.close()
        store.close()
    log.info("stopped")
    return EXIT_OK


class _Stopping:
    """Where the stop stands: told to systemd once (STOPPING=1), read by the status reporter."""

    def __init__(self) -> None:
        self.reason = ""
        self.stopping = False
        self.drain_deadline: float | None = None  # trio.current_time() at which the drain gives up
        self.status_changed = trio.Event()

    def begin(self, reason: str) -> None:
        if not self.stopping:
            self.stopping = True
            self.reason = self.reason or reason
            systemd.notify("STOPPING=1")
            self.status_changed.set()


async def _handle_signals(stopping: _Stopping, writeback: PendingFiles | None, drain_timeout: float,
                          tracer: RequestTracer | None = None) -> None:
    import pyfuse3

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP ignored (nothing to reload)")
                continue
            if signum == signal.SIGUSR1:
                if tracer is not None:
                    tracer.toggle()
                continue
            stopping.reason = signal.Signals(signum).name
            log.info("%s received: stopping", stopping.reason)
            stopping.begin(stopping.reason)
            if writeback is not None and writeback.pending():
                # Drain while still mounted, so programs are not stuck on a dead mount meanwhile.
                await _drain(writeback, drain_timeout, stopping)
            pyfuse3.terminate()
            return


# Time allowed after the drain for unmounting and closing, when asking systemd for more time.
_STOP_MARGIN = 30.0


async def _drain(writeback: PendingFiles, timeout: float, stopping: _Stopping | None = None) -> None:
    pending = writeback.pending()
    log.info("uploading %d pending file(s) before stopping (at most %gs)", len(pending), timeout)
    systemd.notify(f"STATUS=Draining {len(pending)} pending upload(s) (at most {timeout:g}s)\n"
                   f"EXTEND_TIMEOUT_USEC={int((timeout + _STOP_MARGIN) * 1e6)}")
    if stopping is not None:
        stopping.drain_deadline = trio.current_time() + timeout
        stopping.status_changed.set()
    try:
        failures = await writeback.flush(timeout=timeout)
    finally:
        if stopping is not None:
            stopping.drain_deadline = None
        # Closes whose records still wait for their fsync (gstore.write.staging): on disk before
        # the stop, which may be followed by a power-off.
        if not await trio.to_thread.run_sync(writeback.staging.wait_records_synced):
            log.warning("staging records not all fsynced at stop; they stay in the page cache")
    if failures:
        log.warning("%d upload(s) not done at stop; kept in the journal for the next start: %s",
                    len(failures), "; ".join(failures[:20]))
        systemd.notify(f"STATUS=Stopping: {len(failures)} upload(s) not done, kept for the next start")
    else:
        log.info("all pending uploads are durable")
        systemd.notify("STATUS=Stopping: all pending uploads are durable")


def _status_line(where: str, writeback: PendingFiles | None, store: BlockStore) -> str:
    stats = store.stats()
    text = f"Mounted {where}; cache {stats.used_bytes / 2**20:,.0f} of {stats.capacity / 2**20:,.0f} MiB"
    if writeback is not None:
        pending = writeback.pending()
        failing = sum(1 for staged in pending if staged.last_error)
        text += f"; {len(pending)} pending upload(s)" + (f", {failing} failing" if failing else "")
    return text


async def _report_status(stopping: _Stopping, writeback: PendingFiles | None, store: BlockStore, where: str,
                         interval: float = 10.0) -> None:
    """Keep systemd's STATUS= current: every ``interval`` while mounted, every second while draining."""
    last = ""
    while True:
        if stopping.drain_deadline is not None:
            left = writeback.pending() if writeback is not None else []
            remaining = max(0.0, stopping.drain_deadline - trio.current_time())
            text = (f"STATUS=Draining: {len(left)} pending upload(s) left, giving up in {remaining:.0f}s\n"
                    f"EXTEND_TIMEOUT_USEC={int((remaining + _STOP_MARGIN) * 1e6)}")
            wait = 1.0
        elif stopping.stopping:
            text, wait = "", 1.0
        else:
            text, wait = "STATUS=" + _status_line(where, writeback, store), interval
        if text and text != last:
            systemd.notify(text)
            last = text
        stopping.status_changed = trio.Event()
        with trio.move_on_after(wait):
            await stopping.status_changed.wait()


def _watch_requests(tracer: RequestTracer, ops: object, fs: FileSystem, backend: StorageBackend) -> None:
    """Register the kernel handlers of ``ops`` and the request methods of the backend with ``tracer``."""
    import inspect

    import pyfuse3

    handlers = [name for name, value in vars(pyfuse3.Operations).items()
                if not name.startswith("_") and inspect.iscoroutinefunction(value)
                and getattr(type(ops), name, None) is not value]

    def describe_fh(fh: object) -> str:
        handle = getattr(fs, "_handles", {}).get(fh)  # noqa: SLF001 - read-only, for the log
        inode = getattr(handle, "inode", None)
        return f"fh={fh} {getattr(inode, 'path', '?')!r}" if inode is not None else f"fh={fh}"

    def describe_ino(ino: object) -> str:
        inode = fs.inodes.get(ino) if isinstance(ino, int) else None
        return f"ino={ino} {inode.path!r}" if inode is not None else f"ino={ino}"

    def describe(name: str, value: object) -> str | None:
        if name in ("ctx", "token", "attr", "fields"):
            return None
        if name == "fh":
            return describe_fh(value)
        if "inode" in name and name != "inode_list":
            return describe_ino(value)
        if isinstance(value, bytes) and name in ("name", "name_old", "name_new", "target"):
            return f"{name}={value.decode('utf-8', 'replace')!r}"
        if isinstance(value, (bytes, bytearray, memoryview)):
            return f"{name}=<{len(value)} bytes>"
        if isinstance(value, (list, tuple)):
            return f"{name}=<{len(value)}>"
        return f"{name}={value!r}"

    def result_text(result: object) -> str:
        if isinstance(result, (bytes, bytearray, memoryview)):
            return f"{len(result)} bytes"
        if isinstance(result, pyfuse3.EntryAttributes):
            return f"ino={result.st_ino} size={result.st_size}"
        if isinstance(result, pyfuse3.FileInfo):
            return f"fh={result.fh}"
        if isinstance(result, tuple) and result and isinstance(result[0], pyfuse3.FileInfo):
            return f"fh={result[0].fh} ino={result[1].st_ino}"
        return "ok" if result is None else repr(result)[:100]

    from gstore.log import requests_log

    def make_handler(name: str, method: Callable[..., object]) -> Callable[..., object]:
        params = [p for p in inspect.signature(getattr(pyfuse3.Operations, name)).parameters if p != "self"]

        async def handler(*args: object) -> object:
            shown = " ".join(filter(None, (describe(n, v) for n, v in zip(params, args, strict=False))))
            start = time.monotonic()
            try:
                result = await method(*args)  # type: ignore[misc]
            except pyfuse3.FUSEError as exc:
                requests_log.debug("fuse %s %s -> %s in %.2f ms", name, shown,
                                   errno.errorcode.get(exc.errno, exc.errno), 1000 * (time.monotonic() - start))
                raise
            requests_log.debug("fuse %s %s -> %s in %.2f ms", name, shown, result_text(result),
                               1000 * (time.monotonic() - start))
            return result

        return handler

    tracer.watch(ops, handlers, make_handler)
    from gstore.backends.resilience import ResilientBackend

    # The real backend under the retry layer: one line per attempt.
    target = backend.inner if isinstance(backend, ResilientBackend) else backend
    methods = [name for name in dir(type(target)) if not name.startswith("_")
               and inspect.iscoroutinefunction(getattr(type(target), name, None))]
    tracer.watch(target, methods, traced_backend_call)


async def _announce_ready(request: MountRequest, startup: Startup, detach: bool, display: str) -> None:
    """Report success only once the kernel routes requests to us and we answer them."""
    mountpoint = str(request.mountpoint)
    # Both calls stat the mount point, which only this process's FUSE loop can
    # answer: they must run in a worker thread, never on the trio thread.
    dev = await trio.to_thread.run_sync(_wait_answering, mountpoint, abandon_on_cancel=True)
    await trio.to_thread.run_sync(_raise_kernel_readahead, dev, KERNEL_READAHEAD_KIB, abandon_on_cancel=True)
    message = f"mounted {display} on {mountpoint}"
    log.info("%s", message)
    startup.ready(message)
    if detach:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
        _detach_stdio()


# The kernel splits sequential reads into requests of its readahead size (128 KiB
# by default for FUSE). 1 MiB requests cut the per-request cost of a sequential
# read by four; random reads are not affected (the kernel detects them).
KERNEL_READAHEAD_KIB = 1024


def _raise_kernel_readahead(dev: int, kib: int) -> None:
    """Set the mount's backing-device readahead (needs root; silently skipped otherwise)."""
    try:
        path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        if int(path.read_text()) < kib:
            path.write_text(f"{kib}\n")
            log.debug("kernel readahead of device %d:%d set to %d KiB", os.major(dev), os.minor(dev), kib)
    except (OSError, ValueError) as exc:
        log.debug("kernel readahead left as is: %s", exc)


def _wait_answering(mountpoint: str, stat: Callable[[str], os.stat_result] = os.stat) -> int:
    """Block until the mount point is served by a FUSE filesystem; returns its st_dev."""
    parent_dev = os.stat(os.path.dirname(mountpoint.rstrip("/")) or "/").st_dev
    while True:
        try:
            dev = stat(mountpoint).st_dev
            if dev != parent_dev:
                return dev
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.ENOENT):
                raise
        time.sleep(0.01)


async def _watchdog(interval: float) -> None:
    while True:
        systemd.notify("WATCHDOG=1")
        await trio.sleep(interval)
