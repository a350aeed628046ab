"""Bounded, TTL-limited memory of what the backend said about paths.

Three caches, all from cachetools and all bounded:

* listings: a directory's children, weighted by entry count, so the bound is
  on entries rather than directories. A fresh listing answers every stat and
  lookup inside it, positive or negative, without a request: ``ls -l`` of a
  10,000-object prefix costs one paginated LIST and no HEAD.
* attributes: single stat results for paths looked up outside a fresh listing.
* negatives: paths the backend said do not exist, for a shorter TTL.

Only a definite "not found" is cached negatively; transient errors (timeouts,
5xx, throttling) propagate to the caller and leave no trace here. Concurrent
requests for the same path or directory share one backend call.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import cachetools
import trio

from gstore.backends.base import Backend, Listing, ObjectInfo
from gstore.vfs.inodes import parent_path
from gstore.vfs.mtimes import MtimeStore

log = logging.getLogger(__name__)
T = TypeVar("T")

ROOT_INFO = ObjectInfo(name="", is_dir=True)


class _SingleFlight:
    """At most one backend call per key at a time; later callers wait for its result."""

    def __init__(self) -> None:
        self._running: dict[object, tuple[trio.Event, list[object]]] = {}

    async def run(self, key: object, call: Callable[[], Awaitable[T]]) -> T:
        running = self._running.get(key)
        if running is not None:
            event, outcome = running
            await event.wait()
            if outcome and isinstance(outcome[0], BaseException):
                raise outcome[0]
            if outcome:
                return outcome[0]  # type: ignore[return-value]
            # The first caller was cancelled before finishing: try ourselves.
            return await self.run(key, call)
        event, outcome = trio.Event(), []
        self._running[key] = (event, outcome)
        try:
            result = await call()
            outcome.append(result)
            return result
        except trio.Cancelled:
            raise
        except Exception as exc:
            outcome.append(exc)
            raise
        finally:
            del self._running[key]
            event.set()


#: Distinct names looked up in one folder (missing every cache) after which it is listed.
LIST_AFTER_LOOKUPS = 4
#: ... provided it fits in this many listing pages (1,000 keys each on S3).
LIST_MAX_PAGES = 3


class MetadataCache:
    """The filesystem's view of backend metadata."""

    def __init__(
        self,
        backend: Backend,
        *,
        attr_ttl: float,
        dir_ttl: float,
        negative_ttl: float,
        max_entries: int,
        mtimes: MtimeStore | None = None,
    ) -> None:
        self._backend = backend
        # Times this host set (cp -p, touch): listings only carry the upload time.
        self.mtimes = mtimes or MtimeStore(None)
        self._listings: cachetools.TTLCache[str, Listing] = cachetools.TTLCache(
            maxsize=max(1, max_entries), ttl=max(dir_ttl, 0.001), getsizeof=lambda l: max(1, len(l.entries))
        )
        small = max(1, max_entries // 4)
        self._attrs: cachetools.TTLCache[str, ObjectInfo] = cachetools.TTLCache(
            maxsize=small, ttl=max(attr_ttl, 0.001)
        )
        self._negatives: cachetools.TTLCache[str, bool] = cachetools.TTLCache(
            maxsize=small, ttl=max(negative_ttl, 0.001)
        )
        self._enabled = {"attr": attr_ttl > 0, "dir": dir_ttl > 0, "neg": negative_ttl > 0}
        self._flight = _SingleFlight()
        self._reported: cachetools.LRUCache[str, bool] = cachetools.LRUCache(maxsize=10_000)
        # Distinct names looked up past the caches, per folder, within the listing TTL.
        self._folder_lookups: cachetools.TTLCache[str, set[str]] = cachetools.TTLCache(
            maxsize=10_000, ttl=max(dir_ttl, 0.001))
        self.stats = {"listings": 0, "stats": 0, "listing_hits": 0, "attr_hits": 0, "negative_hits": 0}

    # -- queries -----------------------------------------------------------------

    def cached(self, path: str) -> ObjectInfo | None:
        """What the caches know about ``path`` right now, without any request.

        Raises ``FileNotFoundError`` when a fresh answer says it does not exist.
        """
        if path == "":
            return ROOT_INFO
        info = self._attrs.get(path)
        if info is not None:
            self.stats["attr_hits"] += 1
            return info
        parent = parent_path(path)
        listing = self._listings.get(parent)
        if listing is not None:
            self.stats["listing_hits"] += 1
            name = path.rsplit("/", 1)[-1]
            found = listing.entries.get(name)
            if found is None:
                raise FileNotFoundError(errno.ENOENT, path)
            return found
        if path in self._negatives:
            self.stats["negative_hits"] += 1
            raise FileNotFoundError(errno.ENOENT, path)
        return None

    async def stat(self, path: str) -> ObjectInfo:
        info = self.cached(path)
        if info is not None:
            return info
        await self.expect_lookups(parent_path(path), (path,))
        info = self.cached(path)  # a listing fetched just now may answer (or raise FileNotFoundError)
        if info is not None:
            return info
        return await self._flight.run(("stat", path), lambda: self._fetch_stat(path))

    async def expect_lookups(self, folder: str, paths: Iterable[str]) -> None:
        """Lookups of ``paths`` in ``folder`` are coming (or came) past every cache.

        Once four different names of one folder have, within the listing TTL, the
        folder is listed once instead (bounded to a few pages: a folder of a million
        keys is not worth it for a few names). A program creating or probing many
        names there (cp -r, tar x, a build, a .concat of many parts) then costs no
        HEAD per name.
        """
        if not self._enabled["dir"] or folder in self._listings:
            return
        names = self._folder_lookups.get(folder)
        if names is None:
            names = self._folder_lookups[folder] = set()
        if len(names) >= LIST_AFTER_LOOKUPS:
            return  # listed already, or too big to list: one by one
        for path in paths:
            names.add(path)
            if len(names) >= LIST_AFTER_LOOKUPS:
                break
        else:
            return
        await self._flight.run(("list", folder), lambda: self._fetch_listing(folder, max_pages=LIST_MAX_PAGES))

    async def _fetch_stat(self, path: str) -> ObjectInfo:
        self.stats["stats"] += 1
        try:
            info = self.mtimes.apply(path, await self._backend.stat(path))
        except FileNotFoundError:
            if self._enabled["neg"]:
                self._negatives[path] = True
            raise
        self._negatives.pop(path, None)
        if self._enabled["attr"]:
            self._attrs[path] = info
        return info

    async def list_dir(self, path: str) -> Listing:
        listing = self._listings.get(path)
        if listing is not None:
            return listing
        return await self._flight.run(("list", path), lambda: self._fetch_listing(path))

    async def _fetch_listing(self, path: str, *, max_pages: int | None = None) -> Listing:
        self.stats["listings"] += 1
        found = await self._backend.list_dir(path, max_pages=max_pages)
        if found is None:
            return Listing()  # too big to be worth it: not cached, lookups go on one by one
        listing = found
        self.mtimes.apply_folder(path, listing.entries)
        for raw, reason in listing.skipped:
            if raw not in self._reported:
                self._reported[raw] = True
                log.warning("not shown: key %r: %s", raw, reason)
        if self._enabled["dir"]:
            try:
                self._listings[path] = listing
            except ValueError:
                log.info("listing of %r has %d entries, more than the metadata bound; not cached",
                         path, len(listing.entries))
        # Entries of a fresh listing supersede older single-path answers.
        prefix = f"{path}/" if path else ""
        for name in listing.entries:
            self._attrs.pop(prefix + name, None)
            self._negatives.pop(prefix + name, None)
        return listing

    # -- changes made through this mount -------------------------------------------

    def _parent_listing(self, path: str) -> tuple[Listing | None, str]:
        return self._listings.get(parent_path(path)), path.rsplit("/", 1)[-1]

    def remember(self, path: str, info: ObjectInfo) -> None:
        """This mount just created or changed ``path``: answer from ``info`` from now on."""
        self._negatives.pop(path, None)
        if self._enabled["attr"]:
            self._attrs[path] = info
        listing, name = self._parent_listing(path)
        if listing is not None:
            listing.entries[name] = info

    def remember_empty_dir(self, path: str) -> None:
        """This mount just created directory ``path`` where nothing existed: its
        listing is known (empty) without asking, so creating files in it costs
        no lookup request each."""
        if self._enabled["dir"]:
            self._listings[path] = Listing()

    def remember_missing(self, path: str) -> None:
        """This mount just removed ``path``."""
        self._attrs.pop(path, None)
        self._listings.pop(path, None)
        if self._enabled["neg"]:
            self._negatives[path] = True
        listing, name = self._parent_listing(path)
        if listing is not None:
            listing.entries.pop(name, None)

    def forget_path(self, path: str) -> None:
        """Drop what is known about ``path`` itself (its parent's listing is kept)."""
        self._attrs.pop(path, None)
        self._negatives.pop(path, None)
        self._listings.pop(path, None)

    def forget_tree(self, path: str) -> None:
        """Drop everything known about ``path`` and below (after a directory rename)."""
        prefix = path + "/"
        for cache in (self._attrs, self._negatives, self._listings):
            for key in [k for k in list(cache.keys()) if k == path or k.startswith(prefix)]:
                cache.pop(key, None)

    def clear(self) -> None:
        self._attrs.clear()
        self._negatives.clear()
        self._listings.clear()

    def entry_count(self) -> int:
        return int(self._listings.currsize) + len(self._attrs) + len(self._negatives)
