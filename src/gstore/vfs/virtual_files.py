"""The hidden virtual files of every directory, wired to the mount's data.

``.concat``, ``.diff``, ``.versions`` and ``.zip``.

:mod:`gstore.virtual` parses names and computes layouts and diffs without any
I/O; this module gives them data: sizes come from the metadata cache and the
staging overlay (so pending writes count), bytes come through the block cache
(so a ``.concat`` read fetches only the blocks it touches, and twice nothing),
and versions come from the backend's version listing.

Everything is resolved again after the attribute TTL (a lookup or getattr
recomputes the layout from fresh part sizes), and pinned while open: an open
``.concat`` keeps reading the part versions it opened, like an open file.

A ``.zip`` lists its folder recursively (one listing per folder, through the
metadata cache) to know its layout and size; member CRC-32s are computed by
streaming members through the block cache when a read first needs them (see
:mod:`gstore.virtual.zipview`) and remembered per object version.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_module
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import cachetools
import trio

from gstore.backends.base import ObjectInfo
from gstore.cache.reader import ReadStream
from gstore.vfs.inodes import parent_path
from gstore.virtual import (
    DIFF_SIZE_LIMIT,
    ConcatLayout,
    ConcatManifestRef,
    ConcatRef,
    DiffRef,
    VersionRef,
    VersionsDirRef,
    VersionTable,
    VirtualDirRef,
    VirtualNames,
    VirtualRef,
    ZipLayout,
    ZipMember,
    ZipReader,
    ZipRef,
    check_diff_sizes,
    parse_virtual_path,
    read_concat,
    resolve_manifest,
    unified_diff_bytes,
)
from gstore.vfs.control import CONTROL_DIR
from gstore.virtual.names import MANIFEST_MAX_BYTES
from gstore.virtual.zipview import crc32_of
from gstore.write.staging import StagedFile

if TYPE_CHECKING:
    from gstore.vfs.content import MountContent

log = logging.getLogger(__name__)

#: Diff outputs kept in memory, in bytes (a diff is computed once per pair of versions).
DIFF_CACHE_BYTES = 64 * 1024 * 1024
#: Member CRC-32s remembered, per object version (a .zip computes each once).
ZIP_CRC_ENTRIES = 200_000
#: Most files in one .zip view (E2BIG beyond): each costs memory while the view is open.
ZIP_MAX_FILES = 1_000_000
#: Folders listed at once while a .zip view walks its tree.
ZIP_LIST_CONCURRENCY = 16
#: Members whose CRC-32 is computed at once when the central directory is first read.
ZIP_CRC_CONCURRENCY = 8


def _err(code: int, what: str) -> OSError:
    return OSError(code, os.strerror(code), what)


@dataclass(slots=True)
class Source:
    """One file a virtual file is made of, pinned to the version seen at resolution."""

    path: str  # as named (may be a version path), for messages
    read_path: str  # the mount path whose object holds the bytes
    info: ObjectInfo
    staged: StagedFile | None = None
    stream: ReadStream | None = field(default=None, repr=False)

    @property
    def cache_identity(self) -> str | None:
        """Names these bytes for caches, or None when they may still change (pending writes)."""
        return None if self.staged is not None else f"{self.read_path}\0{self.info.identity}"


class VirtualReader:
    """An open virtual file: reads at any offset, from pinned sources."""

    def __init__(self, size: int, read: Callable[[int, int], Awaitable[bytes]]) -> None:
        self.size = size
        self._read = read

    async def read(self, offset: int, size: int) -> bytes:
        if offset >= self.size or size <= 0:
            return b""
        return await self._read(offset, min(size, self.size - offset))


class VirtualFiles:
    """``D/.concat/...``, ``D/.diff/...``, ``D/.versions/...`` and ``D/.zip/...`` of one mount."""

    def __init__(self, content: MountContent, names: VirtualNames, *, ttl: float,
                 diff_limit: int = DIFF_SIZE_LIMIT) -> None:
        self._content = content
        self.names = names
        self._diff_limit = diff_limit
        self._versions: cachetools.TTLCache[str, VersionTable] = cachetools.TTLCache(
            maxsize=4096, ttl=max(ttl, 0.001))
        self._diffs: cachetools.LRUCache[tuple[str, str, str, str], bytes] = cachetools.LRUCache(
            maxsize=DIFF_CACHE_BYTES, getsizeof=lambda data: max(1, len(data)))
        self._shadow_logged: set[str] = set()
        self._zip_crcs: cachetools.LRUCache[str, int] = cachetools.LRUCache(maxsize=ZIP_CRC_ENTRIES)
        self.zip_crcs_computed = 0  # members streamed for a CRC-32 (for tests and status)

    # -- names ---------------------------------------------------------------------------

    def is_virtual_name(self, name: str) -> bool:
        return self.names.role_of(name) is not None

    def parse(self, path: str) -> VirtualRef | None:
        """The virtual reference ``path`` names, or None for an ordinary path."""
        return parse_virtual_path(path, self.names)

    def hide_shadowed(self, directory: str, entries: dict[str, ObjectInfo]) -> None:
        """Real objects named like an enabled virtual directory are hidden: the virtual one wins."""
        for name in self.names.enabled().values():
            if name in entries:
                del entries[name]
                where = f"{directory}/{name}" if directory else name
                if where not in self._shadow_logged and len(self._shadow_logged) < 1000:
                    self._shadow_logged.add(where)
                    log.warning("%s exists on the backend but is hidden by gstore's virtual %s directory; "
                                "mount with -o %s_dir=off (or another name) to see it", where, name,
                                self.names.role_of(name))

    def forget(self, path: str) -> None:
        """Drop the version lists of ``path`` and below (``""``: all); CRCs and diffs are
        per object version and stay valid."""
        prefix = path + "/"
        for target in [t for t in list(self._versions.keys()) if not path or t == path or t.startswith(prefix)]:
            self._versions.pop(target, None)

    # -- attributes ----------------------------------------------------------------------

    async def stat(self, ref: VirtualRef) -> ObjectInfo:
        name = ref.path.rsplit("/", 1)[-1]
        if isinstance(ref, VirtualDirRef):
            return ObjectInfo(name=name, is_dir=True, mtime=self._content.mounted_at)
        if isinstance(ref, VersionsDirRef):
            table = await self.versions(ref.target)
            newest = table.newest
            if newest is None:
                raise _err(errno.ENOENT, f"{ref.path}: no versions of {ref.target}")
            return ObjectInfo(name=name, is_dir=True, mtime=_epoch(newest.version.last_modified))
        if isinstance(ref, VersionRef):
            info = (await self.source(ref.path)).info
            return ObjectInfo(name, False, *_file_fields(info))
        reader, mtime = await self._open_file(ref)
        return ObjectInfo(name=name, is_dir=False, size=reader.size, mtime=mtime)

    async def list_dir(self, ref: VirtualRef) -> dict[str, ObjectInfo]:
        """Children of a virtual directory: versions are listed, concatenations and diffs never."""
        if isinstance(ref, VersionsDirRef):
            table = await self.versions(ref.target)
            return {entry.name: _version_info(entry.name, entry.version) for entry in table.entries}
        if isinstance(ref, VirtualDirRef):
            return {}
        raise _err(errno.ENOTDIR, ref.path)

    # -- sources -------------------------------------------------------------------------

    async def versions(self, target: str) -> VersionTable:
        table = self._versions.get(target)
        if table is not None:
            return table
        backend = self._content.backend
        found = await backend.list_versions(target) if backend.capabilities.versions else None
        table = VersionTable(found or ())
        self._versions[target] = table
        return table

    async def source(self, path: str) -> Source:
        """The file (or version) ``path`` names, with the version it is now."""
        ref = self.parse(path)
        if ref is None:
            staged = self._content.staged(path)
            if staged is not None:
                return Source(path, path, staged.info(), staged)
            info = await self._content.metadata.stat(path)
            if info.is_dir:
                raise _err(errno.EISDIR, path)
            return Source(path, path, info)
        if isinstance(ref, VersionRef):
            entry = (await self.versions(ref.target)).resolve(ref.version)
            return Source(path, ref.target, _version_info(entry.name, entry.version))
        raise _err(errno.EINVAL, f"{path}: only files and versions can be parts of a virtual file")

    async def _sources(self, paths: list[str] | tuple[str, ...]) -> list[Source]:
        """Sources of many parts; the metadata cache is told first, so a folder
        holding many of them is listed once rather than asked one HEAD per part."""
        per_folder: dict[str, list[str]] = {}
        for path in paths:
            if self.parse(path) is None:
                per_folder.setdefault(parent_path(path), []).append(path)
        for folder, names in per_folder.items():
            await self._content.metadata.expect_lookups(folder, names)
        return [await self.source(p) for p in paths]

    async def read_source(self, source: Source, offset: int, size: int) -> bytes:
        if source.staged is not None:
            return await self._content.read_staged(source.staged, offset, size)
        if source.stream is None:
            source.stream = self._content.open_stream(source.read_path, source.info)
        return await self._content.read_stream(source.stream, offset, size)

    async def read_whole(self, source: Source, limit: int) -> bytes:
        if source.info.size > limit:
            raise _err(errno.EFBIG, f"{source.path} is larger than {limit} bytes")
        data = await self.read_source(source, 0, source.info.size)
        if len(data) != source.info.size:
            raise _err(errno.ESTALE, f"{source.path} changed while it was read")
        return data

    # -- files ---------------------------------------------------------------------------

    async def open(self, ref: VirtualRef) -> VirtualReader:
        if isinstance(ref, (VirtualDirRef, VersionsDirRef)):
            raise _err(errno.EISDIR, ref.path)
        reader, _ = await self._open_file(ref)
        return reader

    async def _open_file(self, ref: VirtualRef) -> tuple[VirtualReader, float]:
        if isinstance(ref, VersionRef):
            source = await self.source(ref.path)
            return VirtualReader(source.info.size, lambda o, n: self.read_source(source, o, n)), source.info.mtime
        if isinstance(ref, ConcatRef):
            return await self._concat(await self._sources(ref.parts))
        if isinstance(ref, ConcatManifestRef):
            manifest = await self.source(ref.manifest)
            text = await self.read_whole(manifest, MANIFEST_MAX_BYTES)
            paths = resolve_manifest(ref.base_dir, text, self.names)
            return await self._concat(await self._sources(paths))
        if isinstance(ref, DiffRef):
            return await self._diff(ref)
        if isinstance(ref, ZipRef):
            return await self._zip(ref)
        raise _err(errno.EISDIR, ref.path)

    async def _concat(self, sources: list[Source]) -> tuple[VirtualReader, float]:
        layout = ConcatLayout([(s.path, s.info.size) for s in sources])

        async def read_part(index: int, offset: int, length: int) -> bytes:
            return await self.read_source(sources[index], offset, length)

        async def read(offset: int, size: int) -> bytes:
            return await read_concat(layout, offset, size, read_part)

        mtime = max((s.info.mtime for s in sources), default=self._content.mounted_at)
        return VirtualReader(layout.total_size, read), mtime

    async def _diff(self, ref: DiffRef) -> tuple[VirtualReader, float]:
        a, b = await self.source(ref.a), await self.source(ref.b)
        check_diff_sizes(a.info.size, b.info.size, limit=self._diff_limit)
        key = None
        if a.cache_identity is not None and b.cache_identity is not None:
            key = (ref.a_label, ref.b_label, a.cache_identity, b.cache_identity)
        output = self._diffs.get(key) if key is not None else None
        if output is None:
            data_a = await self.read_whole(a, self._diff_limit)
            data_b = await self.read_whole(b, self._diff_limit)
            try:
                output = await trio.to_thread.run_sync(lambda: unified_diff_bytes(
                    data_a, data_b, ref.a_label, ref.b_label, limit=self._diff_limit,
                    a_mtime=_when(a.info.mtime), b_mtime=_when(b.info.mtime)))
            except OSError as exc:
                log.warning("%s: %s", ref.path, exc.strerror or exc)
                raise
            if key is not None:
                self._diffs[key] = output
        result = output

        async def read(offset: int, size: int) -> bytes:
            return result[offset:offset + size]

        return VirtualReader(len(result), read), max(a.info.mtime, b.info.mtime)


    # -- .zip -----------------------------------------------------------------------------

    async def _zip(self, ref: ZipRef) -> tuple[VirtualReader, float]:
        files = await self._tree_files(ref.folder, ref.path)
        sources = [source for _, source in files]
        layout = ZipLayout([ZipMember(name, s.info.size, s.info.mtime, _member_mode(s.info)) for name, s in files])
        crcs = _ZipCrcs(self, sources)

        async def read_member(index: int, offset: int, length: int) -> bytes:
            return await self.read_source(sources[index], offset, length)

        reader = ZipReader(layout, read_member, crcs.get, crcs.all)
        mtime = max((s.info.mtime for s in sources), default=self._content.mounted_at)
        return VirtualReader(layout.total_size, reader.read), mtime

    async def _tree_files(self, folder: str, what: str) -> list[tuple[str, Source]]:
        """The regular files under ``folder``, recursively: (name relative to it, source),
        depth first in name order, as ``ls -R`` shows them (pending files included,
        virtual directories and ``.gstore`` not)."""
        if folder:
            info = await self._content.stat_path(folder)
            if not info.is_dir:
                raise _err(errno.ENOTDIR, f"{what}: {folder} is not a folder")
        listings: dict[str, dict[str, ObjectInfo]] = {}
        limiter = trio.CapacityLimiter(ZIP_LIST_CONCURRENCY)
        count = 0

        async def list_one(directory: str) -> None:
            async with limiter:
                entries = dict(await self._content.list_dir(directory))
            self.hide_shadowed(directory, entries)
            if directory == "":
                entries.pop(CONTROL_DIR, None)
            listings[directory] = entries

        level = [folder]
        while level:
            async with trio.open_nursery() as nursery:
                for directory in level:
                    nursery.start_soon(list_one, directory)
            below = []
            for directory in level:
                for name, info in listings[directory].items():
                    if info.is_dir:
                        below.append(f"{directory}/{name}" if directory else name)
                    else:
                        count += 1
            if count > ZIP_MAX_FILES:
                raise _err(errno.E2BIG, f"{what}: more than {ZIP_MAX_FILES} files under {folder or 'the mount root'}")
            level = below

        found: list[tuple[str, Source]] = []

        def collect(directory: str, prefix: str) -> None:
            for name, info in sorted(listings[directory].items()):
                path = f"{directory}/{name}" if directory else name
                if info.is_dir:
                    collect(path, f"{prefix}{name}/")
                elif info.mode is None or stat_module.S_ISREG(info.mode):
                    staged = self._content.staged(path)
                    source = Source(path, path, staged.info(), staged) if staged is not None else Source(path, path, info)
                    found.append((prefix + name, source))

        collect(folder, "")
        return found

    def _zip_crc_known(self, source: Source) -> int | None:
        key = source.cache_identity
        return None if key is None else self._zip_crcs.get(key)

    async def _zip_crc_compute(self, source: Source) -> int:
        async def update(data: bytes, crc: int) -> int:
            if len(data) > 1024 * 1024:
                return await trio.to_thread.run_sync(zlib.crc32, data, crc)
            return zlib.crc32(data, crc)

        crc = await crc32_of(lambda o, n: self.read_source(source, o, n), source.info.size, update=update)
        self.zip_crcs_computed += 1
        key = source.cache_identity
        if key is not None:
            self._zip_crcs[key] = crc
        return crc


class _ZipCrcs:
    """The CRC-32s of one open .zip view's members: remembered, computed once each."""

    def __init__(self, files: VirtualFiles, sources: list[Source]) -> None:
        self._files = files
        self._sources = sources
        self._crcs: list[int | None] = [None] * len(sources)
        self._running: dict[int, trio.Event] = {}

    async def get(self, index: int) -> int:
        while True:
            crc = self._crcs[index]
            if crc is not None:
                return crc
            crc = self._files._zip_crc_known(self._sources[index])
            if crc is not None:
                self._crcs[index] = crc
                return crc
            running = self._running.get(index)
            if running is None:
                break
            await running.wait()  # another read of this view is computing it
        done = self._running[index] = trio.Event()
        try:
            crc = await self._files._zip_crc_compute(self._sources[index])
            self._crcs[index] = crc
            return crc
        finally:
            del self._running[index]
            done.set()

    async def all(self) -> list[int]:
        missing = iter([i for i, crc in enumerate(self._crcs) if crc is None])

        async def worker() -> None:
            for index in missing:
                await self.get(index)

        async with trio.open_nursery() as nursery:
            for _ in range(ZIP_CRC_CONCURRENCY):
                nursery.start_soon(worker)
        return [crc for crc in self._crcs if crc is not None]


def _member_mode(info: ObjectInfo) -> int:
    return info.mode & 0o7777 if info.mode is not None else 0o644


def _file_fields(info: ObjectInfo) -> tuple[Any, ...]:
    return info.size, info.mtime, info.etag, info.version_id, info.content_type


def _epoch(when: datetime) -> float:
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _when(mtime: float) -> datetime:
    return datetime.fromtimestamp(mtime or 0, tz=timezone.utc)


def _version_info(name: str, version: Any) -> ObjectInfo:
    return ObjectInfo(name=name, is_dir=False, size=version.size, mtime=_epoch(version.last_modified),
                      etag=version.etag, version_id=version.vid)
