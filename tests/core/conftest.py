"""The core test layer: the FUSE-free core of a mount, driven under trio in-process.

Every test here builds the very object graph the daemon serves
(:func:`gstore.core.build_core`) over a *local directory* backend
(``make_backend("file", ...)``: retries, circuit breaker and all), or with
``backend="s3"`` over a fresh bucket of a local S3 server (moto on 127.0.0.1,
started once per session), and talks to it through
:class:`tests.core.kernel.Kernel`, which issues the requests a kernel would for
``open``/``pwrite``/``close``/``rename``/... . No FUSE, no subprocess of ours.

``async def`` tests in this directory are run under :func:`trio.run` by the
``pytest_pyfunc_call`` hook below (no pytest-trio needed).

The harness (:func:`open_core`)::

    async with open_core(tmp_path) as h:      # build, recover, start the workers
        k = h.kernel                          # os-like calls over h.fs
        fd = await k.open("a", os.O_WRONLY | os.O_CREAT)
        ...
        await h.crash()                       # like kill -9: no drain, fresh core, recover
        await h.restart()                     # clean stop (drain) and a fresh core
        assert h.backend_files() == {...}     # what the backend directory holds

Each core's background workers (``core.run``) run in a cancel scope of their
own inside the harness's nursery, together with the releases the Kernel sends
without waiting (as the kernel does); :meth:`CoreHarness.crash` cancels that
scope (no drain, no further journal writes) and builds a new core over the same
``state_dir`` and backend, which recovers the journal. An exception escaping
the workers is recorded in ``worker_errors`` (and fails the block at its end).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from gstore.backends import make_backend
from gstore.config import MountOptions
from gstore.core import MountCore, build_core

from .kernel import Kernel

log = logging.getLogger("tests.core")

#: A hang guard (not a speed assertion): no core test should come anywhere near it.
TEST_DEADLINE = 240.0


# --------------------------------------------------------------------------- async tests under trio


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests of this directory with ``trio.run``."""
    func = pyfuncitem.obj
    if not inspect.iscoroutinefunction(func):
        return None
    names = pyfuncitem._fixtureinfo.argnames  # noqa: SLF001 - what pytest itself passes
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}

    async def main() -> None:
        with trio.fail_after(TEST_DEADLINE):
            await func(**kwargs)

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        # A failed assertion inside a nursery (the harness has one) arrives wrapped: show it plainly.
        leaf = _single_leaf(group)
        if leaf is None:
            raise
        raise leaf.with_traceback(leaf.__traceback__) from None
    return True


def _single_leaf(group: BaseExceptionGroup) -> BaseException | None:
    if len(group.exceptions) != 1:
        return None
    inner = group.exceptions[0]
    return _single_leaf(inner) if isinstance(inner, BaseExceptionGroup) else inner


# --------------------------------------------------------------------------- building cores


def default_options(cache_dir: Path, **overrides: Any) -> MountOptions:
    """Mount options for core tests: small blocks, a short write-back delay, the default cache TTLs."""
    values: dict[str, Any] = dict(
        cache_dir=cache_dir,
        cache_size=64 * 1024 * 1024,
        block_size=4096,          # small blocks: reads cross block boundaries all the time
        readahead=16 * 1024,
        write_back_delay=0.05,
        # The caches keep the mount's defaults (attr 60 s, listings 60 s, negatives 5 s): every
        # change in these tests goes through the mount, so no cache may ever show a stale answer.
        request_timeout=10.0,
        retries=2,
    )
    values.update(overrides)
    return MountOptions(**values)


def local_backend(root: Path) -> Any:
    """The ``file`` backend over ``root``, wrapped in retries and the circuit breaker as mounted."""
    return make_backend("file", str(root), {}, request_timeout=10)


# --------------------------------------------------------------------------- an S3 backend on 127.0.0.1 (optional)

_S3_SERVER: Any = None


def s3_server() -> Any:
    """One S3TestServer (moto, on 127.0.0.1) for the whole session, started on first use."""
    global _S3_SERVER
    if _S3_SERVER is None:
        from gstore.testing.s3server import S3TestServer

        server = S3TestServer(host="127.0.0.1", port=0)
        server.start()
        _S3_SERVER = server
    return _S3_SERVER


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    global _S3_SERVER
    if _S3_SERVER is not None:
        _S3_SERVER.stop()
        _S3_SERVER = None


class S3Bucket:
    """A fresh bucket on the session's S3 server; the "backend directory" of an S3 core."""

    def __init__(self) -> None:
        self.server = s3_server()
        self.client = self.server.client()
        self.name = f"core-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=self.name)

    def backend(self) -> Any:
        options = {"endpoint_url": self.server.endpoint_url, "key": "testing", "secret": "testing",
                   "client_kwargs": {"region_name": "us-east-1"}}
        return make_backend("s3", self.name, options, request_timeout=10)

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def keys(self) -> list[str]:
        out: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def files(self) -> dict[str, bytes]:
        """Every object and its bytes. An object deleted between the LIST and its GET (the
        mount's own write probe, which deletes its scratch key at once) is left out, as a
        LIST a moment later would."""
        out: dict[str, bytes] = {}
        for key in self.keys():
            if key.endswith("/"):
                continue
            try:
                out[key] = self.client.get_object(Bucket=self.name, Key=key)["Body"].read()
            except self.client.exceptions.NoSuchKey:
                continue
        return out

    def dirs(self) -> set[str]:
        out: set[str] = set()
        for key in self.keys():
            parts = key.rstrip("/").split("/")
            upto = len(parts) if key.endswith("/") else len(parts) - 1
            out.update("/".join(parts[:i]) for i in range(1, upto + 1))
        return out


@dataclass
class CoreHarness:
    """One mount's core over a backend directory, across simulated restarts.

    ``root`` is the backend directory, ``state_dir`` the mount's state (block
    cache, staging journal, mtimes). Each :meth:`crash` / :meth:`restart` builds
    a fresh core over the same two, like a new daemon process would.
    """

    root: Path
    state_dir: Path
    options: MountOptions
    backend_factory: Callable[[], Any]
    nursery: trio.Nursery
    core: MountCore = field(init=False)
    kernel: Kernel = field(init=False)
    dcache: bool = False  # whether the Kernel keeps a dentry cache (see kernel.py)
    bucket: S3Bucket | None = None  # the backend is this S3 bucket (else the directory ``root``)
    generation: int = 0  # how many cores were built so far
    recovered: list[str] = field(default_factory=list)  # what the last recover() took over
    kernels: list[Kernel] = field(default_factory=list)  # one per core built
    #: Exceptions that escaped ``core.run`` (the background workers died: in the daemon, the mount would).
    worker_errors: list[str] = field(default_factory=list)
    _scope: trio.CancelScope | None = None
    _stopped: trio.Event | None = None

    def release_errors(self) -> list[str]:
        """Errors of background releases, over every core so far (none is ever expected)."""
        return [e for k in self.kernels for e in k.release_errors]

    @property
    def fs(self) -> Any:
        return self.core.fs

    @property
    def staging_dir(self) -> Path:
        return self.state_dir / "staging"

    async def start(self) -> None:
        """Build a core over ``root``/``state_dir``, adopt what a previous run staged, start its workers."""
        self.core = build_core(self.backend_factory(), self.state_dir, self.options)
        self.generation += 1
        self.recovered = self.core.recover()
        self._stopped = trio.Event()
        self._scope, requests = await self.nursery.start(self._serve, self.core, self._stopped)
        # Requests the kernel does not wait for (releases) run beside the workers: a crash kills them too.
        self.kernel = Kernel(self.core.fs, requests, dcache=self.dcache)
        self.kernels.append(self.kernel)

    async def _serve(self, core: MountCore, stopped: trio.Event, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(core.run)
                    task_status.started((scope, nursery))
                    started = True
        except Exception as exc:  # noqa: BLE001 - a crashed worker is a finding: recorded, checked by the tests
            if not started:
                raise
            self.worker_errors.append(describe_exception(exc))
            log.error("the core's workers crashed: %s", self.worker_errors[-1])
        finally:
            stopped.set()

    async def stop(self) -> None:
        """Stop the workers (cancelled, as at a kill) and close the core; nothing is drained."""
        if self._scope is None:
            return
        self._scope.cancel()
        assert self._stopped is not None
        await self._stopped.wait()
        self._scope = None
        self.core.close()

    async def drain(self, timeout: float = 30.0) -> list[str]:
        """Upload everything pending; the failures (empty when all is durable).

        Returns at once with the crash if the workers die meanwhile (nothing would upload)."""
        failures: list[str] = []
        stopped = self._stopped
        assert stopped is not None

        async def drain(scope: trio.CancelScope) -> None:
            failures.extend(await self.core.drain(timeout))
            scope.cancel()

        async def watch(scope: trio.CancelScope) -> None:
            await stopped.wait()
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, nursery.cancel_scope)
            nursery.start_soon(watch, nursery.cancel_scope)
        if self.worker_errors:
            return failures + [f"the workers crashed: {e}" for e in self.worker_errors]
        return failures

    async def crash(self) -> MountCore:
        """kill -9: the workers die where they are, nothing is drained; a new core recovers the journal."""
        await self.stop()
        await self.start()
        return self.core

    async def restart(self, timeout: float = 30.0) -> list[str]:
        """A clean stop (drain, as on SIGTERM) and a new core; returns the drain's failures.

        Like an unmount, it first waits for the releases still in flight."""
        await self.kernel.released()
        failures = await self.drain(timeout)
        await self.stop()
        await self.start()
        return failures

    # -- looking at the outside world ------------------------------------------------------

    def backend_files(self) -> dict[str, bytes]:
        """Every file (object) in the backend, by relative path."""
        return self.bucket.files() if self.bucket is not None else tree_files(self.root)

    def backend_dirs(self) -> set[str]:
        """Every folder of the backend (for S3: every key prefix and directory marker)."""
        return self.bucket.dirs() if self.bucket is not None else tree_dirs(self.root)

    def backend_mkdir(self, path: str) -> None:
        """Create a folder in the backend behind the core's back (before the first step)."""
        if self.bucket is not None:
            self.bucket.put(path.rstrip("/") + "/", b"")
        else:
            (self.root / path).mkdir(parents=True, exist_ok=True)

    def staging_entries(self) -> list[str]:
        return sorted(p.name for p in self.staging_dir.iterdir()) if self.staging_dir.exists() else []

    def journal_without_data(self) -> list[str]:
        """Journal records (``<id>.json``) whose data file (``<id>.data``) is missing."""
        if not self.staging_dir.exists():
            return []
        return sorted(p.name for p in self.staging_dir.glob("*.json") if not p.with_suffix(".data").exists())


def describe_exception(exc: BaseException) -> str:
    """``Type: message (at file:line func < ...)`` for the innermost exception, gstore frames only."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/gstore/" in f.filename]
    where = " < ".join(f"{f.filename.rsplit('/gstore/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(exc).__name__}: {exc}" + (f" (at {where})" if where else "")


def tree_files(root: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = Path(dirpath) / name
            out[full.relative_to(root).as_posix()] = full.read_bytes()
    return out


def tree_dirs(root: Path) -> set[str]:
    out: set[str] = set()
    for dirpath, dirs, _files in os.walk(root):
        for name in dirs:
            out.add((Path(dirpath) / name).relative_to(root).as_posix())
    return out


@asynccontextmanager
async def open_core(
    tmp_path: Path,
    *,
    wrap_backend: Callable[[Any], Any] | None = None,
    seed_files: dict[str, bytes] | None = None,
    name: str = "core",
    dcache: bool = False,
    backend: str = "file",
    strict: bool = True,
    **options: Any,
) -> AsyncIterator[CoreHarness]:
    """A started core over ``tmp_path/<name>/backend``; cancelled and closed on exit (never drained).

    ``seed_files`` are written into the backend directory before the first
    core starts (objects that "already exist remotely"). ``wrap_backend`` wraps
    every backend the harness builds (e.g. a proxy that slows ``head``).
    ``dcache`` makes the Kernel keep a dentry cache (see kernel.py). ``backend="s3"`` puts
    the core on a fresh bucket of a local S3 server (moto, 127.0.0.1) instead of a directory:
    ETags, conditional writes, server-side copies and multipart uploads come into play.
    ``strict`` (default) fails the block at its end if a background release failed or the
    workers crashed. ``options`` override :func:`default_options`.
    """
    base = tmp_path / name
    root = base / "backend"
    state_dir = base / "state"
    root.mkdir(parents=True)
    bucket = S3Bucket() if backend == "s3" else None
    if backend not in ("file", "s3"):
        raise ValueError(f"unknown backend kind {backend!r}")
    for rel, data in (seed_files or {}).items():
        if bucket is not None:
            bucket.put(rel, data)
            continue
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    opts = default_options(base / "cache", **options)

    def factory() -> Any:
        made = bucket.backend() if bucket is not None else local_backend(root)
        return wrap_backend(made) if wrap_backend is not None else made

    async with trio.open_nursery() as nursery:
        harness = CoreHarness(root=root, state_dir=state_dir, options=opts, backend_factory=factory,
                              nursery=nursery, dcache=dcache, bucket=bucket)
        await harness.start()
        try:
            yield harness
            if not strict:
                return
            await harness.kernel.released()
            errors = harness.release_errors()
            assert not errors, f"release (sent in the background at close) failed: {errors}"
            assert not harness.worker_errors, f"the core's background workers crashed: {harness.worker_errors}"
        finally:
            with trio.CancelScope(shield=True):
                await harness.stop()
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- a backend that is slow to answer


class SlowMetadataBackend:
    """A proxy over a backend whose ``head``/``stat`` take ``delay`` seconds (trio.sleep) first.

    Everything else goes straight to the wrapped backend. ``calls`` counts the
    slowed calls, so a test can see the delay was really in the way.
    """

    def __init__(self, inner: Any, delay: float, *, methods: tuple[str, ...] = ("head", "stat")) -> None:
        self._inner = inner
        self.delay = delay
        self.methods = methods
        self.calls: dict[str, int] = {}
        self.display = inner.display
        self.cache_namespace = inner.cache_namespace

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in self.methods or not callable(attr):
            return attr

        @functools.wraps(attr)
        async def slowed(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            await trio.sleep(self.delay)
            return await attr(*args, **kwargs)

        return slowed


@pytest.fixture
def core_factory(tmp_path: Path) -> Callable[..., Any]:
    """``core_factory(**kw)`` is ``open_core(tmp_path, **kw)`` (for tests that prefer a fixture)."""
    return functools.partial(open_core, tmp_path)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The step count of each model run, for the CI log."""
    import sys

    module = sys.modules.get(f"{__package__}.test_model") if __package__ else None
    runs = getattr(module, "MODEL_RUNS", None)
    if runs:
        terminalreporter.write_sep("-", "core model runs")
        for line in runs:
            terminalreporter.write_line(line)
