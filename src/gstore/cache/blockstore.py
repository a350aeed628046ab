"""A bounded, persistent, on-disk store of fixed-size blocks of remote objects.

Each block is one file::

    root/<first 2 hex chars of key>/<key>.<index>.<crc32 as 8 hex digits>

The object key is an opaque hex digest chosen by the caller (a new version of a
remote object has a new key, so the store never deals with staleness). The
CRC32 in the name lets a restart rebuild the index with one directory scan and
no per-block sidecar: a block found at startup is *unverified* (its CRC is
checked on its first read, which reads the whole file) unless the trust marker
vouches for it (below). Blocks written by this process are trusted. Every
read, trusted or not, also checks that the file has exactly the length the
caller expects, which catches a block cut short by a power loss (no fsync is
done).

Trust across restarts: a put writes its temp file completely and only then
renames it into place, so from the rename on the kernel's page cache holds the
whole block until it is written back. Killing the daemon (kill -9, OOM) cannot
tear it; only a kernel crash or a power loss can lose or tear bytes that were
not written back, and that also changes the boot id
(``/proc/sys/kernel/random/boot_id``). ``root/trust.json`` (0600, replaced
atomically with a rename) is written at close() and records the boot id and
the names of the blocks still unverified. At startup a block is trusted if

* the marker's boot id is this boot's (so no crash since it was written),
* its name is not listed as unverified, and
* its ctime is not later than the marker's mtime: the file has not been
  written, renamed in or touched since the marker vouched for it. This keeps
  the marker from vouching for a block that appeared or changed after it was
  written (a copy dropped in, a block edited in place, a block a killed run
  wrote after the marker: those are checked, as before). Clocks only matter to
  this extra check, never to the boot-id argument.

Anything else (other boot, no marker, an unreadable or malformed one, no boot
id on this system) verifies every block found, as before. The marker needs no
fsync: its content only counts in the boot that wrote it, in which the page
cache is the truth; after a crash its boot id is stale whatever survived, and
a torn one does not parse. Nor does it need rewriting at startup: a marker
written earlier in this boot stays correct while blocks come and go, since a
block written since then is newer than the marker and is checked. A marker
that cannot be written is removed (best effort), so the next start verifies
everything. The marker's temp files (``.tmp.trust.*`` in the root) are only
ever written by close() of the one store using the directory, so the startup
cleanup removes any it finds (a crash in the middle of close()).

Concurrency: one lock guards the in-memory index *and every rename into or out
of a final block name*, so "the index holds (key, index) with crc C" and "the
file <key>.<index>.<C> exists" change together. Data I/O never runs under the
lock: a put writes its temp file first, and a removed block (evicted, replaced,
discarded, corrupt) is renamed under the lock to a ``.tmp.*`` name in its shard
and unlinked after the lock is released (freeing a large file's extents can
take a while). A reader opens the file outside the lock; if the block was
removed meanwhile the open fails with ENOENT (a miss) or the already-open fd
still reads the right bytes. A crash at any point leaves at most ``.tmp.*``
files behind, which the next startup deletes.

Open blocks: a cache hit must cost one ``pread`` and no open/fstat/close (four
syscalls instead of one are a third of a 4 KiB read's time on a VM), so the
store keeps the fds of the ``max_open`` most recently read blocks open
(:class:`_OpenBlock`). The table is guarded by the same lock as the index, and
an fd is only ever in the table while its block is in the index under the
same entry, and only for a *verified* entry (a read through the table skips the
CRC check): whatever takes a block out of the index (eviction, replacement,
discard, corruption) takes its fd out too, in the same critical section. A
reader pins the fd (``users``) under the lock and preads outside it; an fd
taken out of the table while pinned is closed by its last reader, so no
thread ever closes an fd another thread is reading (a reused fd number would
serve another file's bytes). Closing under the lock is cheap: a removed block
still has its ``.tmp.*`` name at that point, so the close frees no extents.
A hit through the table (:meth:`BlockStore.read_hit`, the FUSE cache-hit path)
preads under the lock instead of pinning, and moves nothing in the LRU orders:
it flags the fd (``hit``), and the block is moved to the recent end of the index
and the table when it reaches the head of either (a second chance) or at close().

Readahead: after a restart the block files are usually not in the page cache,
and a 4 KiB-at-a-time read of a cold file waits on the disk at every kernel
readahead window. So whenever a block's file is opened the kernel is asked to
read all of it in the background (``POSIX_FADV_WILLNEED``), and a sequential
reader also gets the *next* block of the object opened and advised: when a
read opens block N at its first byte, or is the first read of a block opened
that way, block N+1 is opened, advised and put into the fd table unpinned
(marked ``ahead``; an unverified block's fd is closed at once, its pages stay
cached). The disk then reads one block ahead of the reader. The table's rules
above apply unchanged: the fd goes in under the lock only if the entry is still
the one whose file was opened.

Only one :class:`BlockStore` may use a directory at a time (the daemon holds a
lock on its state directory).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"[0-9a-f]{16,128}")
_BLOCK_NAME_RE = re.compile(r"([0-9a-f]{16,128})\.(0|[1-9][0-9]*)\.([0-9a-f]{8})")
_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_TMP_PREFIX = ".tmp."
_MAX_INDEX = 2**63  # an offset // block_size always fits; keeps file names short
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_READ = os.O_RDONLY | _O_CLOEXEC | _O_NOFOLLOW
_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_NOFOLLOW

_DIR_MODE = 0o700
_FILE_MODE = 0o600

_MARKER_NAME = "trust.json"
_MARKER_TMP_PREFIX = _TMP_PREFIX + "trust."  # in the root, next to the marker
_MARKER_FORMAT = 1
_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_fadvise = getattr(os, "posix_fadvise", None)  # not on macOS
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", 0)

# Index value: (size, crc32, verified). A plain tuple keeps 100k entries small;
# a new tuple object is made whenever an entry changes, so "is" tells a reader
# whether the entry it looked up is still the current one.
_Entry = tuple[int, int, bool]
_Key = tuple[str, int]


@dataclass
class StoreStats:
    capacity: int
    used_bytes: int
    blocks: int
    hits: int
    misses: int
    puts: int
    evictions: int
    evicted_bytes: int
    corrupt: int


def _check_key(object_key: str) -> None:
    if type(object_key) is not str or _KEY_RE.fullmatch(object_key) is None:
        raise ValueError(f"invalid block store key: {object_key!r}")


def _check_index(index: int) -> None:
    if type(index) is not int or not 0 <= index < _MAX_INDEX:
        raise ValueError(f"invalid block index: {index!r}")


def _write_all(fd: int, data: memoryview) -> None:
    """Write all of ``data`` to ``fd`` (a module function so tests can fail it)."""
    while data:
        written = os.write(fd, data)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        data = data[written:]


def _pread_exact(fd: int, length: int, offset: int) -> bytes | None:
    """``length`` bytes at ``offset``, or None if the file ends before that."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            return None
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("block store: cannot remove %s: %s", path, exc)


def _tmp_name() -> str:
    return _TMP_PREFIX + os.urandom(8).hex()


def _block_name(object_key: str, index: int, crc: int) -> str:
    return f"{object_key}.{index}.{crc:08x}"


def _advise_willneed(fd: int) -> None:
    """Ask the kernel to read the whole file into the page cache, without waiting for it.

    Only a hint: an error (a filesystem without readahead, no fadvise) changes nothing.
    """
    if _fadvise is None:
        return
    try:
        _fadvise(fd, 0, 0, _WILLNEED)
    except OSError:
        pass


def current_boot_id() -> str | None:
    """This boot's id (Linux), or None where it cannot be read: then nothing is trusted."""
    try:
        with open(_BOOT_ID_PATH, "rb") as f:
            raw = f.read(256)
    except OSError:
        return None
    value = raw.decode("ascii", "replace").strip()
    return value or None


@dataclass(frozen=True)
class _Trust:
    """What a marker written in this boot vouches for (see "Trust across restarts")."""

    unverified: frozenset[str]  # block file names the marker's writer had not checked
    written_ns: int  # the marker's mtime: a block file changed (ctime) after it is not vouched for

    def vouches_for(self, name: str, ctime_ns: int) -> bool:
        return ctime_ns <= self.written_ns and name not in self.unverified


def _read_marker(path: str, boot_id: str | None) -> _Trust | None:
    """The trust of the marker at ``path`` if this boot wrote it, else None (verify everything)."""
    if boot_id is None:
        return None
    try:
        fd = os.open(path, _O_READ)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("block store: cannot open %s (%s); verifying every block", path, exc)
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            written_ns = os.fstat(f.fileno()).st_mtime_ns
            doc = json.loads(f.read())
        names = doc["unverified"]
        valid = (
            doc["format"] == _MARKER_FORMAT
            and type(doc["boot_id"]) is str
            and type(names) is list
            and all(type(name) is str for name in names)
        )
    except (OSError, ValueError, TypeError, KeyError) as exc:  # JSON errors are ValueErrors
        log.warning("block store: unreadable %s (%s); verifying every block", path, exc)
        return None
    if not valid:
        log.warning("block store: malformed %s; verifying every block", path)
        return None
    if doc["boot_id"] != boot_id:
        log.info("block store: %s was written in another boot; verifying every block", path)
        return None
    return _Trust(frozenset(names), written_ns)


def _write_marker_file(path: str, tmp: str, content: bytes) -> None:
    """Replace ``path`` with ``content`` via the 0600 temp file ``tmp`` (no fsync: see the
    module docstring). A module function so tests can fail it."""
    fd = os.open(tmp, _O_CREATE, _FILE_MODE)
    try:
        os.fchmod(fd, _FILE_MODE)  # exactly 0600 whatever the umask
        _write_all(fd, memoryview(content))
    finally:
        os.close(fd)
    os.replace(tmp, path)


class _OpenBlock:
    """An fd of a block file kept open for reads (see "Open blocks" above)."""

    __slots__ = ("fd", "size", "users", "doomed", "ahead", "hit")

    def __init__(self, fd: int, size: int, *, users: int = 1, ahead: bool = False) -> None:
        self.fd = fd
        self.size = size  # the block's length (its index entry's; the file's, checked at open)
        self.users = users  # readers between their pin and their release, under the store lock
        self.doomed = False  # out of the table: the last user closes it
        # Opened by readahead and not read yet: its first read reads the next block ahead.
        # Read and cleared under the store lock.
        self.ahead = ahead
        # Read by read_hit since the LRU orders last moved the block (under the store lock):
        # whoever clears it moves the block to the recent end of the index and the table
        # (_second_chance_locked), so a hit costs a flag instead of two moves.
        self.hit = False


class BlockStore:
    """Blocks of remote objects kept on local disk, least recently used evicted first."""

    def __init__(
        self, root: Path, capacity: int, *, max_open: int = 128,
        boot_id: Callable[[], str | None] | None = None,
    ) -> None:
        """``boot_id`` returns this boot's id (default :func:`current_boot_id`; tests fake it)."""
        if type(capacity) is not int or capacity <= 0:
            raise ValueError(f"block store capacity must be a positive int, not {capacity!r}")
        self._root = os.fspath(root)
        self._boot_id = (boot_id or current_boot_id)()
        self._capacity = capacity
        self._reserved = 0
        self._lock = threading.Lock()
        self._index: OrderedDict[_Key, _Entry] = OrderedDict()
        # Open fds of recently read blocks, LRU first; guarded by _lock, a subset of _index.
        self._open: OrderedDict[_Key, _OpenBlock] = OrderedDict()
        self._max_open = max(0, max_open)
        self._used = 0
        self._shards: set[str] = set()
        self._closed = False
        self._reordered = False  # a read hit changed the LRU order since startup
        self._hits = 0
        self._misses = 0
        self._puts = 0
        self._evictions = 0
        self._evicted_bytes = 0
        self._corrupt = 0
        self._prepare_root()
        self._load()

    # -- startup -------------------------------------------------------------------

    def _prepare_root(self) -> None:
        os.makedirs(self._root, mode=_DIR_MODE, exist_ok=True)
        st = os.stat(self._root)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", self._root)
        if stat.S_IMODE(st.st_mode) != _DIR_MODE:
            os.chmod(self._root, _DIR_MODE)

    def _load(self) -> None:
        """Rebuild the index from the file names: one scandir per shard, one lstat per block."""
        started = time.monotonic()
        trust = _read_marker(self._marker_path(), self._boot_id)
        # (mtime_ns, key, index, size, crc, trusted)
        found: list[tuple[int, str, int, int, int, bool]] = []
        keys: dict[str, str] = {}  # one str object per object key, shared by its blocks
        temps = 0
        with os.scandir(self._root) as top:
            for shard_entry in top:
                shard = shard_entry.name
                if shard.startswith(_MARKER_TMP_PREFIX):
                    # A close() cut short; nothing else writes these (one store per directory).
                    if shard_entry.is_file(follow_symlinks=False):
                        _unlink_quietly(shard_entry.path)
                        temps += 1
                    continue
                if _SHARD_RE.fullmatch(shard) is None:
                    continue
                if not shard_entry.is_dir(follow_symlinks=False):
                    continue
                self._shards.add(shard)
                try:
                    if stat.S_IMODE(shard_entry.stat(follow_symlinks=False).st_mode) != _DIR_MODE:
                        os.chmod(shard_entry.path, _DIR_MODE)
                except OSError as exc:
                    log.warning("block store: cannot fix the mode of %s: %s", shard_entry.path, exc)
                with os.scandir(shard_entry.path) as files:
                    for entry in files:
                        name = entry.name
                        if name.startswith(_TMP_PREFIX):
                            if entry.is_file(follow_symlinks=False):
                                _unlink_quietly(entry.path)
                                temps += 1
                            continue
                        match = _BLOCK_NAME_RE.fullmatch(name)
                        if match is None or not name.startswith(shard):
                            continue  # not ours (or unreachable): leave it alone
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        block = int(match[2])
                        if block >= _MAX_INDEX:
                            continue
                        key = keys.setdefault(match[1], match[1])
                        crc = int(match[3], 16)
                        trusted = trust is not None and trust.vouches_for(name, st.st_ctime_ns)
                        found.append((st.st_mtime_ns, key, block, st.st_size, crc, trusted))
        found.sort(key=lambda item: item[0])
        duplicates = 0
        index = self._index
        for _mtime, key, block, size, crc, trusted in found:
            k = (key, block)
            old = index.pop(k, None)
            if old is not None:
                # Two files for one block (only possible if something else copied files
                # in): keep the newer one.
                duplicates += 1
                self._used -= old[0]
                _unlink_quietly(self._path(key, block, old[1]))
            index[k] = (size, crc, trusted)
            self._used += size
        evicted = 0
        while self._used > self._capacity and index:
            (key, block), (size, crc, _verified) = index.popitem(last=False)
            self._used -= size
            self._evictions += 1
            self._evicted_bytes += size
            evicted += 1
            _unlink_quietly(self._path(key, block, crc))
        log.info(
            "block store %s: %d blocks (%d trusted), %d bytes of %d; removed %d temp files, "
            "%d duplicates; evicted %d blocks to fit (%.2fs)",
            self._root,
            len(index),
            sum(1 for entry in index.values() if entry[2]),
            self._used,
            self._capacity,
            temps,
            duplicates,
            evicted,
            time.monotonic() - started,
        )

    # -- trust marker --------------------------------------------------------------

    def _marker_path(self) -> str:
        return f"{self._root}/{_MARKER_NAME}"

    def _write_marker(self, unverified: list[str]) -> None:
        """Record this boot's id and the blocks still unverified, for a restart in this boot.

        Called by close() after its last change to a block file (renames, mtimes),
        so the marker is newer than every block it vouches for. A failure removes
        the old marker: the next start then verifies every block.
        """
        if self._boot_id is None:
            return
        doc = {"format": _MARKER_FORMAT, "boot_id": self._boot_id, "unverified": sorted(unverified)}
        content = json.dumps(doc, separators=(",", ":")).encode()
        tmp = f"{self._root}/{_MARKER_TMP_PREFIX}{os.urandom(8).hex()}"
        try:
            _write_marker_file(self._marker_path(), tmp, content)
        except OSError as exc:
            log.warning("block store: cannot write %s (%s); the next start verifies every block",
                        self._marker_path(), exc)
            _unlink_quietly(tmp)
            _unlink_quietly(self._marker_path())

    # -- paths ---------------------------------------------------------------------

    def _path(self, object_key: str, index: int, crc: int) -> str:
        return f"{self._root}/{object_key[:2]}/{_block_name(object_key, index, crc)}"

    def _shard_dir(self, shard: str, *, recreate: bool = False) -> str:
        path = f"{self._root}/{shard}"
        if recreate or shard not in self._shards:
            try:
                os.mkdir(path, _DIR_MODE)
            except FileExistsError:
                pass
            else:
                os.chmod(path, _DIR_MODE)  # the umask may have taken bits away
            self._shards.add(shard)
        return path

    # -- reads ---------------------------------------------------------------------

    def contains(self, object_key: str, index: int) -> bool:
        """Whether the block is in the index (no I/O; the file may still turn out bad)."""
        _check_key(object_key)
        _check_index(index)
        return (object_key, index) in self._index

    def read(
        self, object_key: str, index: int, offset: int, length: int, expected_len: int,
        *, count_miss: bool = True, verify: bool = True,
    ) -> bytes | None:
        """Bytes ``[offset, offset + length)`` of a block (clipped to it), or None on a miss.

        A block whose file is not ``expected_len`` bytes long, or (for an unverified
        block found at startup, on its first read) whose content does not match the
        CRC in its name, is deleted and counted as corrupt. ``count_miss=False``: a
        caller that will ask again on its slow path takes a plain miss (block not in
        the index) uncounted, so the hit ratio counts each read once.
        ``verify=False``: an unverified block is not checked here (that reads the
        whole block) but answered None, uncounted, so a caller on the event loop can
        ask again with ``verify=True`` from a worker thread (``contains`` tells this
        case from a plain miss).
        """
        if offset < 0 or length < 0:
            raise ValueError(f"invalid block range: offset={offset} length={length}")
        k = (object_key, index)
        handle: _OpenBlock | None = None
        ahead = False
        with self._lock:
            entry = self._index.get(k)
            if entry is None:
                # Checked on a miss only: put() checked every key the index holds, and
                # the regex is a sixth of a cache hit's time in Python.
                _check_key(object_key)
                _check_index(index)
                if count_miss:
                    self._misses += 1
                return None
            if entry[0] != expected_len:
                del self._index[k]
                self._drop_open_locked(k)
                self._used -= entry[0]
                self._corrupt += 1
                self._misses += 1
                trash = self._to_trash_locked(object_key, index, entry[1])
            else:
                handle = self._open.get(k)
                if handle is None and not verify and not entry[2]:
                    return None  # the caller checks it where the whole-block read stalls nobody
                self._index.move_to_end(k)
                self._hits += 1  # taken back by _failed_read if the file lets us down
                self._reordered = True
                trash = None
                if handle is not None:
                    self._open.move_to_end(k)
                    handle.users += 1
                    ahead, handle.ahead = handle.ahead, False
        if entry[0] != expected_len:
            if trash is not None:
                _unlink_quietly(trash)
            return None

        size = entry[0]
        start = min(offset, size)
        end = min(size, offset + length)
        data: bytes | None
        if handle is None:
            # Entering a block at its first byte: most likely a sequential reader.
            opened = self._open_block(k, entry, read_ahead=offset == 0)
            if opened is None:
                return None
            handle, whole = opened
            if whole is not None:  # just verified: the range is already in memory
                self._unpin(handle)
                return whole if (start == 0 and end == size) else whole[start:end]
        try:
            data = _pread_exact(handle.fd, end - start, start) if end > start else b""
        except OSError as exc:
            log.warning("block store: cannot read block %d of %s: %s", index, object_key, exc)
            data = None
        finally:
            self._unpin(handle)
        if data is None:
            self._failed_read(k, entry, corrupt=True, drop=True)
        elif ahead:  # the reader reached a block read ahead for it: stay one block ahead
            self._read_ahead(object_key, index + 1)
        return data

    def read_hit(
        self, object_key: str, index: int, offset: int, length: int, expected_len: int,
    ) -> bytes | None:
        """``length`` bytes at ``offset`` of a block whose fd is open, or None: ask :meth:`read`.

        The cache-hit fast path (a cached 4 KiB read spends most of its Python time
        here): one lock round trip around a dict lookup and the ``pread``, and no
        other call. It serves only what needs none of read()'s
        checks: a block in the open-fd table (verified; its length checked when it
        was opened) of the length the caller expects, already read once (the first
        read of an ``ahead`` fd starts the next block's readahead, which read()
        does), and a range inside the block (``offset + length <= expected_len``,
        the caller clips). Anything else, a short or failed pread included, is None
        with nothing counted, and read() meets the same case again and handles it
        (logs, drops a bad block). The hit moves nothing in the LRU orders: it flags
        the fd, and the block gets its move when it reaches the head of either order
        (a second chance, as in CLOCK) or at close(), whichever comes first.

        The ``pread`` runs under the lock, the one read that does: an fd in the
        table is only ever closed under the lock after it left the table
        (``_drop_open_locked``), or by the last reader of one that already left it
        (``_unpin``), so no pin is needed; one lock round trip instead of two (pin,
        unpin) is a tenth of a hit's Python time. What the lock then waits for is
        one request's bytes (at most 1 MiB) of a block file the kernel was told to
        keep cached (``POSIX_FADV_WILLNEED`` at open): a memory copy. Another thread
        that wants the lock meanwhile (a put, a verification) waits that long; the
        trio thread, the only one that calls this, is in the pread anyway.
        """
        k = (object_key, index)
        lock = self._lock
        lock.acquire()  # acquire/release rather than ``with``: a third of the cost here
        try:
            handle = self._open.get(k)
            if handle is None or handle.ahead or handle.size != expected_len:
                return None
            data = os.pread(handle.fd, length, offset)
            if len(data) != length:
                return None
            handle.hit = True  # the LRU move, deferred (_second_chance_locked)
            self._hits += 1
            return data
        except OSError:
            return None
        finally:
            lock.release()

    def _open_block(
        self, k: _Key, entry: _Entry, *, read_ahead: bool,
    ) -> tuple[_OpenBlock, bytes | None] | None:
        """Open a block's file, check it, and keep the fd if the block is still current.

        Returns the pinned fd, plus the whole block when it was read to verify
        its CRC (a block found at startup, on its first read); None on a miss.
        The kernel is told to read the whole file in the background, and with
        ``read_ahead`` the next block of the object too, before this read waits on
        the disk for its own bytes.
        """
        size, crc, verified = entry
        try:
            fd = os.open(self._path(k[0], k[1], crc), _O_READ)
        except FileNotFoundError:
            self._failed_read(k, entry, corrupt=False, drop=True)
            return None
        except OSError as exc:  # EMFILE and the like: not the block's fault
            log.warning("block store: cannot open block %d of %s: %s", k[1], k[0], exc)
            self._failed_read(k, entry, corrupt=False, drop=False)
            return None
        _advise_willneed(fd)
        if read_ahead:
            self._read_ahead(k[0], k[1] + 1)
        whole: bytes | None = None
        try:
            good = os.fstat(fd).st_size == size
            if good and not verified:
                whole = _pread_exact(fd, size, 0) if size else b""
                good = whole is not None and zlib.crc32(whole) == crc
        except OSError as exc:
            log.warning("block store: cannot read block %d of %s: %s", k[1], k[0], exc)
            good = False
        if not good:
            os.close(fd)
            self._failed_read(k, entry, corrupt=True, drop=True)
            return None
        handle = _OpenBlock(fd, size)
        with self._lock:
            current = self._index.get(k) is entry  # not replaced, evicted or verified by another reader
            if current and not verified:
                self._index[k] = (size, crc, True)
            if current and not self._closed and k not in self._open and self._max_open:
                # Still the very block whose file we opened: keep the fd.
                self._open[k] = handle
                self._trim_open_locked(k)
            else:
                handle.doomed = True  # read once, then closed by _unpin
        return handle, whole

    def _read_ahead(self, object_key: str, index: int) -> None:
        """Have the kernel read block ``index`` into the page cache before it is asked for.

        The file is opened and advised outside the lock. A verified block's fd
        then goes into the table unpinned and marked ``ahead``, under the lock and
        only if the entry is still the one whose file was opened (the table's
        rule); an unverified block's fd is closed at once (the table only holds
        verified blocks), its pages stay cached for the check. Never an error:
        whatever goes wrong here, the block's own read meets and handles it.
        """
        if index >= _MAX_INDEX or self._max_open < 2:
            return  # (one fd slot: the read-ahead fd would push out the block being read)
        k = (object_key, index)
        with self._lock:
            entry = self._index.get(k)
            if entry is None or k in self._open or self._closed:
                return
        try:
            fd = os.open(self._path(object_key, index, entry[1]), _O_READ)
        except OSError:
            return
        _advise_willneed(fd)
        if not self._keep_ahead(k, entry, fd):
            os.close(fd)  # nobody else ever saw it

    def _keep_ahead(self, k: _Key, entry: _Entry, fd: int) -> bool:
        """Put a read-ahead fd into the table if its block is verified and still current."""
        size, _crc, verified = entry
        if not verified:
            return False
        try:
            if os.fstat(fd).st_size != size:
                return False  # the block's own read finds it corrupt and drops it
        except OSError:
            return False
        with self._lock:
            if self._closed or k in self._open or self._index.get(k) is not entry:
                return False
            self._open[k] = _OpenBlock(fd, size, users=0, ahead=True)
            self._trim_open_locked(k)
        return True

    def _unpin(self, handle: _OpenBlock) -> None:
        with self._lock:
            handle.users -= 1
            close = handle.doomed and handle.users == 0
        if close:
            os.close(handle.fd)

    def _second_chance_locked(self, k: _Key, handle: _OpenBlock | None) -> bool:
        """At the LRU head of the index or the table (under the lock): if read_hit read the
        block since it last moved, move it to the recent end of both now and say so (keep it)."""
        if handle is None or not handle.hit:
            return False
        handle.hit = False
        self._index.move_to_end(k)
        self._open.move_to_end(k)
        self._reordered = True
        return True

    def _trim_open_locked(self, added: _Key) -> None:
        """Close the least recently read fds beyond ``max_open`` (under the lock).

        ``added``, the fd just put in, is the most recent: it stays even when every
        other one has its second chance first (they all move behind it).
        """
        table = self._open
        while len(table) > self._max_open:
            k = next(iter(table))
            if k == added:
                table.move_to_end(k)
            elif not self._second_chance_locked(k, table[k]):
                self._drop_open_locked(k)

    def _drop_open_locked(self, k: _Key) -> None:
        """Take a block's fd out of the table (the block leaves the index); under the lock."""
        handle = self._open.pop(k, None)
        if handle is not None:
            handle.doomed = True
            if handle.users == 0:
                os.close(handle.fd)

    def _failed_read(self, k: _Key, entry: _Entry, *, corrupt: bool, drop: bool) -> None:
        trash = None
        with self._lock:
            self._hits -= 1
            self._misses += 1
            # Only act if nobody replaced or removed the block since we looked it up:
            # otherwise the file under that name may be a newer, good one.
            if drop and self._index.get(k) is entry:
                del self._index[k]
                self._drop_open_locked(k)
                self._used -= entry[0]
                if corrupt:
                    self._corrupt += 1
                    trash = self._to_trash_locked(k[0], k[1], entry[1])
        if trash is not None:
            _unlink_quietly(trash)

    # -- writes --------------------------------------------------------------------

    def put(self, object_key: str, index: int, data: bytes | memoryview) -> None:
        """Store a block (replacing any previous one), then evict LRU blocks to fit."""
        _check_key(object_key)
        _check_index(index)
        view = memoryview(data).cast("B")
        size = view.nbytes
        if size > self._capacity:
            raise ValueError(f"block of {size} bytes exceeds the store capacity {self._capacity}")
        if self._closed:
            return
        crc = zlib.crc32(view)
        shard = object_key[:2]
        try:
            tmp = self._write_temp(shard, view)
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            evicted, freed = self._make_room(max(size, 1))
            if not evicted:
                raise
            log.warning("block store: %s; evicted %d blocks and retrying", exc, evicted)
            for path in freed:
                _unlink_quietly(path)
            tmp = self._write_temp(shard, view)

        self._install(object_key, index, tmp, size, crc)

    def _write_temp(self, shard: str, view: memoryview) -> str:
        """Write ``view`` to a new 0600 temp file in the shard; return its path."""
        directory = self._shard_dir(shard)
        for _attempt in range(8):
            tmp = f"{directory}/{_tmp_name()}"
            try:
                fd = os.open(tmp, _O_CREATE, _FILE_MODE)
            except FileExistsError:
                continue
            except FileNotFoundError:  # the shard was removed under us
                directory = self._shard_dir(shard, recreate=True)
                continue
            try:
                os.fchmod(fd, _FILE_MODE)  # exactly 0600 whatever the umask
                _write_all(fd, view)
            except BaseException:
                os.close(fd)
                _unlink_quietly(tmp)
                raise
            try:
                os.close(fd)
            except BaseException:
                _unlink_quietly(tmp)
                raise
            return tmp
        raise OSError(errno.EEXIST, "cannot create a temp file", directory)

    # -- blocks written by the caller (streamed fetches) ---------------------------
    # A fetch streamed from the network writes each block into a temp file of the
    # store as the bytes arrive, and hands the file over once complete: no copy of
    # the block in memory. The temp name keeps a crash from leaving anything but a
    # ``.tmp.*`` file (deleted at startup); only put_temp gives it a block's name.

    def new_temp(self, object_key: str) -> tuple[int, str]:
        """An fd open for writing on a new 0600 temp file in the block's shard, and its path.

        The caller writes the block, closes the fd and calls :meth:`put_temp`, or
        unlinks the path (a fetch that failed part way).
        """
        _check_key(object_key)
        directory = self._shard_dir(object_key[:2])
        for _attempt in range(8):
            tmp = f"{directory}/{_tmp_name()}"
            try:
                fd = os.open(tmp, _O_CREATE, _FILE_MODE)
            except FileExistsError:
                continue
            except FileNotFoundError:  # the shard was removed under us
                directory = self._shard_dir(object_key[:2], recreate=True)
                continue
            try:
                os.fchmod(fd, _FILE_MODE)  # exactly 0600 whatever the umask
            except BaseException:
                os.close(fd)
                _unlink_quietly(tmp)
                raise
            return fd, tmp
        raise OSError(errno.EEXIST, "cannot create a temp file", directory)

    def put_temp(self, object_key: str, index: int, tmp: str, size: int, crc: int) -> bool:
        """Make the closed temp file ``tmp`` (from :meth:`new_temp`) the block, as put() would.

        ``size`` and ``crc`` are what the caller wrote. The file's length is checked
        first: a block is never stored shorter or longer than the caller meant.
        Returns False (the file removed) when the store is closed; raises (the file
        removed) when it cannot be kept.
        """
        _check_key(object_key)
        _check_index(index)
        try:
            if size > self._capacity:
                raise ValueError(f"block of {size} bytes exceeds the store capacity {self._capacity}")
            actual = os.stat(tmp).st_size
            if actual != size:
                raise OSError(errno.EIO, f"temp block is {actual} bytes, not {size}", tmp)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return self._install(object_key, index, tmp, size, crc)

    def _install(self, object_key: str, index: int, tmp: str, size: int, crc: int) -> bool:
        """Rename a complete temp file to the block's name and index it (put()'s last step)."""
        final = self._path(object_key, index, crc)
        k = (object_key, index)
        trash: list[str] = []
        failure: OSError | None = None
        installed = False
        with self._lock:
            if self._closed:
                trash.append(tmp)
            else:
                old = self._index.pop(k, None)
                if old is not None:
                    self._drop_open_locked(k)
                    self._used -= old[0]
                    moved = self._to_trash_locked(object_key, index, old[1])
                    if moved is not None:
                        trash.append(moved)
                # Make room first, so that usage() (read without the lock) never
                # sees more than the capacity, even for an instant.
                self._evict_locked(max(0, self._capacity - self._reserved - size), trash)
                try:
                    os.replace(tmp, final)
                except OSError as exc:
                    failure = exc
                    trash.append(tmp)
                else:
                    self._index[k] = (size, crc, True)
                    self._used += size
                    self._puts += 1
                    installed = True
        for path in trash:
            _unlink_quietly(path)
        if failure is not None:
            raise failure
        return installed

    def _to_trash_locked(self, object_key: str, index: int, crc: int) -> str | None:
        """Move a block file off its name (under the lock); the caller unlinks the result."""
        path = self._path(object_key, index, crc)
        trash = f"{self._root}/{object_key[:2]}/{_tmp_name()}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("block store: cannot move %s aside (%s); removing it in place", path, exc)
            _unlink_quietly(path)
            return None
        return trash

    def _evict_locked(self, limit: int, trash: list[str]) -> None:
        """Evict LRU blocks until at most ``limit`` bytes are used; moved files go to ``trash``."""
        index = self._index
        while self._used > limit and index:
            k = next(iter(index))
            if self._second_chance_locked(k, self._open.get(k)):
                continue
            (key, block), (size, crc, _verified) = index.popitem(last=False)
            self._drop_open_locked((key, block))
            self._used -= size
            self._evictions += 1
            self._evicted_bytes += size
            moved = self._to_trash_locked(key, block, crc)
            if moved is not None:
                trash.append(moved)

    def _make_room(self, needed: int) -> tuple[int, list[str]]:
        """Evict LRU blocks holding at least ``needed`` bytes (the disk is full).

        Returns how many blocks were evicted and the files to unlink.
        """
        trash: list[str] = []
        freed = 0
        count = 0
        with self._lock:
            index = self._index
            while index and (freed < needed or count == 0):
                k = next(iter(index))
                if self._second_chance_locked(k, self._open.get(k)):
                    continue
                count += 1
                (key, block), (size, crc, _verified) = index.popitem(last=False)
                self._drop_open_locked((key, block))
                self._used -= size
                self._evictions += 1
                self._evicted_bytes += size
                freed += size
                moved = self._to_trash_locked(key, block, crc)
                if moved is not None:
                    trash.append(moved)
        return count, trash

    def reserve(self, nbytes: int) -> None:
        """Set aside ``nbytes`` of the capacity for data that must not be evicted.

        Staged (not yet uploaded) files count toward ``--cache-size``: the
        write-back layer reports their size here and cached blocks are evicted
        to keep the total within the capacity. Dirty data itself is never evicted.
        """
        trash: list[str] = []
        with self._lock:
            self._reserved = max(0, nbytes)
            self._evict_locked(max(0, self._capacity - self._reserved), trash)
        for path in trash:
            _unlink_quietly(path)

    def discard_object(self, object_key: str) -> None:
        """Remove every block of an object (a scan of the index: meant to be rare)."""
        _check_key(object_key)
        trash: list[str] = []
        with self._lock:
            index = self._index
            for k in [k for k in index if k[0] == object_key]:
                size, crc, _verified = index.pop(k)
                self._drop_open_locked(k)
                self._used -= size
                moved = self._to_trash_locked(object_key, k[1], crc)
                if moved is not None:
                    trash.append(moved)
        for path in trash:
            _unlink_quietly(path)

    # -- bookkeeping ---------------------------------------------------------------

    def usage(self) -> int:
        return self._used

    @property
    def capacity(self) -> int:
        return self._capacity

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                capacity=self._capacity,
                used_bytes=self._used,
                blocks=len(self._index),
                hits=self._hits,
                misses=self._misses,
                puts=self._puts,
                evictions=self._evictions,
                evicted_bytes=self._evicted_bytes,
                corrupt=self._corrupt,
            )

    def close(self) -> None:
        """Stop using the store; later reads miss and later puts are dropped.

        If read hits changed the LRU order, the order is written back as file
        mtimes (oldest first) so the next startup evicts the right blocks. Then
        the trust marker records which blocks are still unverified, so a restart
        in this boot does not read every block to check it.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True  # no put renames a block into place after this
            for k, handle in list(self._open.items()):  # the hits read_hit only flagged
                self._second_chance_locked(k, handle)
            order = list(self._index.items()) if self._reordered else []
            unverified = [_block_name(key, block, crc)
                          for (key, block), (_size, crc, ok) in self._index.items() if not ok]
            for k in list(self._open):
                self._drop_open_locked(k)
            self._index.clear()
            self._used = 0
        if order:
            step = 1000  # 1 µs apart: distinct on any filesystem with sub-second times
            base = time.time_ns() - step * len(order)
            for i, ((key, block), (_size, crc, _verified)) in enumerate(order):
                stamp = base + i * step
                try:
                    os.utime(self._path(key, block, crc), ns=(stamp, stamp))
                except OSError:
                    pass
        self._write_marker(unverified)  # last: newer than every change made to a block file

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
