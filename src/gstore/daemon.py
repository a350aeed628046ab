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
import hashlib
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio

from gstore import __version__, systemd
from gstore.config import MountRequest
from gstore.log import redactor, secret_values, setup_logging

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


def run(request: MountRequest) -> int:
    """Mount and serve; returns the process exit code."""
    options = request.options
    state_dir = state_dir_for(request)
    log_file = options.log_file
    if not options.foreground and log_file is None:
        log_file = state_dir / "gstore-mount.log"
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
    from gstore.cache.blockstore import BlockStore
    from gstore.cache.reader import BlockReader
    from gstore.fuse_ops import Operations, mount_options
    from gstore.vfs.filesystem import FileSystem
    from gstore.vfs.metadata import MetadataCache
    from gstore.write.staging import StagingArea
    from gstore.write.writeback import ConflictPolicy, WriteBack

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
        backend = make_backend(spec.protocol, spec.root, dict(spec.options), request_timeout=options.request_timeout)
    except (ImportError, ValueError, TypeError) as exc:
        raise StartupError(f"cannot create the {spec.protocol!r} backend: {redactor.redact(str(exc))}") from exc
    try:
        await backend.probe()
    except OSError as exc:
        raise StartupError(redactor.redact(str(exc.strerror or exc))) from exc

    store = BlockStore(state_dir / "blocks", options.cache_size)
    metadata = MetadataCache(
        backend,
        attr_ttl=options.attr_ttl,
        dir_ttl=options.dir_cache_ttl,
        negative_ttl=options.negative_ttl,
        max_entries=options.metadata_entries,
    )
    reader = BlockReader(
        store,
        backend,
        block_size=options.block_size,
        readahead=options.readahead,
        fetch_concurrency=options.fetch_concurrency,
    )
    writeback = staging = None
    if not options.read_only:
        staging = StagingArea(state_dir / "staging")
    fs = FileSystem(backend, metadata, reader, attr_ttl=options.attr_ttl, staging=staging,
                    reserve_space=store.reserve)
    if staging is not None:
        writeback = WriteBack(
            backend, staging, read_base=fs.read_base, on_uploaded=fs.uploaded,
            delay=options.write_back_delay, conflict_policy=ConflictPolicy(options.conflict),
        )
        fs.writeback = writeback
        recovered = staging.load()
        for staged in recovered:
            writeback.adopt(staged)
            writeback.schedule(staged, 0)
            fs._account(staged.size)  # noqa: SLF001 - startup accounting
        if recovered:
            log.warning("%d file(s) written before the last stop were not uploaded yet; uploading them now: %s",
                        len(recovered), ", ".join(s.path for s in recovered[:10]) + (" ..." if len(recovered) > 10 else ""))
        orphans = staging.orphans({s.id for s in recovered})
        for orphan in orphans:
            log.warning("staging file %s has no journal record (a crash while it was being created); "
                        "left in place", orphan)
    from gstore.fuse_ops import RECENT_ERRORS
    from gstore.status import build_status
    from gstore.vfs.control import ControlFiles

    started = time.time()
    fs.control = ControlFiles(
        status=lambda: build_status(request=request, state_dir=state_dir, fs=fs, store=store, reader=reader,
                                    metadata=metadata, writeback=writeback, started=started,
                                    recent_errors=RECENT_ERRORS),
        flush=fs.flush_paths,
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
    )
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
            reader.attach(nursery)
            if writeback is not None:
                await nursery.start(writeback.run)
            nursery.start_soon(_handle_signals, stopping, writeback, options.drain_timeout)
            nursery.start_soon(_announce_ready, request, startup, not options.foreground, spec.display())
            interval = systemd.watchdog_interval()
            if interval:
                nursery.start_soon(_watchdog, interval)
            await pyfuse3.main(min_tasks=4, max_tasks=128)
            if writeback is not None and writeback.pending():
                # Unmounted from outside (umount, fusermount3 -u): the queue still drains.
                await _drain(writeback, options.drain_timeout)
            nursery.cancel_scope.cancel()
    finally:
        systemd.notify("STOPPING=1")
        log.info("unmounting %s%s", request.mountpoint, f" ({stopping.reason})" if stopping.reason else "")
        try:
            pyfuse3.close(unmount=True)
        except Exception:  # noqa: BLE001 - already stopping
            log.exception("unmount failed")
        with trio.move_on_after(5):
            await backend.aclose()
        store.close()
    log.info("stopped")
    return EXIT_OK


class _Stopping:
    reason: str = ""


async def _handle_signals(stopping: _Stopping, writeback: object, drain_timeout: float) -> None:
    import pyfuse3

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP ignored (nothing to reload)")
                continue
            stopping.reason = signal.Signals(signum).name
            log.info("%s received: stopping", stopping.reason)
            systemd.notify("STOPPING=1")
            if writeback is not None and writeback.pending():  # type: ignore[attr-defined]
                # Drain while still mounted, so programs are not stuck on a dead mount meanwhile.
                await _drain(writeback, drain_timeout)
            pyfuse3.terminate()
            return


async def _drain(writeback: object, timeout: float) -> None:
    pending = writeback.pending()  # type: ignore[attr-defined]
    log.info("uploading %d pending file(s) before stopping (at most %gs)", len(pending), timeout)
    systemd.notify(f"STATUS=Draining {len(pending)} pending upload(s)")
    failures = await writeback.flush(timeout=timeout)  # type: ignore[attr-defined]
    if failures:
        log.warning("%d upload(s) not done at stop; kept in the journal for the next start: %s",
                    len(failures), "; ".join(failures[:20]))
    else:
        log.info("all pending uploads are durable")


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
