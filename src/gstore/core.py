"""The FUSE-free core of one mount, assembled: what the daemon serves and what tests drive.

The daemon and the core tests build the very same object graph through
:func:`build_core`, so a test under ``trio.run`` exercises the code a mounted
file system runs, minus the kernel. Nothing here knows about pyfuse3.

Lifetime::

    core = build_core(backend, state_dir, MountOptions(...))
    core.recover()                         # journal records left by a previous run
    async with trio.open_nursery() as nursery:
        await nursery.start(core.run)      # readahead and upload workers
        ... core.fs.lookup / create / write / fsync / release ...
        failures = await core.drain(timeout)  # what a clean stop does
        nursery.cancel_scope.cancel()
    core.close()
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import trio

from gstore.backends.base import Backend
from gstore.cache.blockstore import BlockStore
from gstore.cache.reader import BlockReader
from gstore.config import MountOptions
from gstore.vfs.filesystem import FileSystem
from gstore.vfs.metadata import MetadataCache
from gstore.vfs.mtimes import MtimeStore
from gstore.virtual import VirtualNames
from gstore.write.namespace_queue import NamespaceQueue
from gstore.write.pending import PendingFiles
from gstore.write.staging import StagingArea
from gstore.write.uploader import ConflictPolicy

log = logging.getLogger(__name__)


@dataclass
class MountCore:
    """Every long-lived piece of one mount (no FUSE types)."""

    fs: FileSystem
    backend: Backend
    metadata: MetadataCache
    reader: BlockReader
    store: BlockStore
    staging: StagingArea | None
    pending: PendingFiles | None

    @property
    def writeback(self) -> PendingFiles | None:
        """The write-back queue (the pending-files owner); None on a read-only mount."""
        return self.pending

    def recover(self) -> list[str]:
        """Take over files staged before the last stop; returns their paths."""
        return self.fs.recover()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The background workers (readahead, uploads) until cancelled."""
        async with trio.open_nursery() as nursery:
            self.reader.attach(nursery)
            if self.pending is not None:
                await nursery.start(self.pending.run)
            task_status.started()
            await trio.sleep_forever()

    async def drain(self, timeout: float | None = None) -> list[str]:
        """Upload everything pending and wait; returns what is still not durable."""
        if self.pending is None:
            return []
        return await self.pending.flush(timeout=timeout)

    def close(self) -> None:
        if self.staging is not None:
            self.staging.close()
        self.store.close()


def build_core(backend: Backend, state_dir: Path, options: MountOptions) -> MountCore:
    """Assemble one mount's core over ``backend``, keeping its state under ``state_dir``."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = BlockStore(state_dir / "blocks", options.cache_size)
    metadata = MetadataCache(
        backend,
        attr_ttl=options.attr_ttl,
        dir_ttl=options.dir_cache_ttl,
        negative_ttl=options.negative_ttl,
        max_entries=options.metadata_entries,
        mtimes=MtimeStore(state_dir / "mtimes.sqlite"),
    )
    reader = BlockReader(store, backend, block_size=options.block_size, readahead=options.readahead,
                         fetch_concurrency=options.fetch_concurrency)
    staging = None if options.read_only else StagingArea(state_dir / "staging")
    pending = None
    if staging is not None:
        pending = PendingFiles(backend, staging, reader, delay=options.write_back_delay,
                               policy=ConflictPolicy(options.conflict), reserve_space=store.reserve,
                               fsync_patience=options.request_timeout,
                               concurrency=options.upload_concurrency, part_concurrency=options.part_concurrency,
                               namespace=NamespaceQueue(backend, state_dir / "namespace-queue.json"))
    fs = FileSystem(backend, metadata, reader, attr_ttl=options.attr_ttl, pending=pending,
                    virtual_names=VirtualNames(options.concat_dir, options.diff_dir, options.versions_dir,
                                               options.zip_dir))
    return MountCore(fs=fs, backend=backend, metadata=metadata, reader=reader, store=store,
                     staging=staging, pending=pending)


__all__ = ["MountCore", "build_core"]
