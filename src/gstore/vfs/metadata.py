"""Bounded, TTL-limited memory of what the backend said about paths.

Three caches, all from cachetools and all bounded:

* listings: a directory's children, weighted by entry count, so the bound is
  on entries rather than directories. A fresh listing answers every stat and
  lookup inside it, positive or negative, without a request: ``ls -l`` of a
  10,000-object prefix costs one paginated LIST and no HEAD.
* attributes: single stat results for paths looked up outside a fresh listing.
* negatives: paths the backend said do not exist, for a shorter TTL.

Only a definite "not found" is cached negatively. Concurrent requests for the
same path or directory share one backend call, and the backend calls of one
``stat`` or ``list_dir`` share one ``--request-timeout``
(:func:`~gstore.backends.resilience.request_scope`).

**Stale if unreachable.** Listings and attributes that expire are not
forgotten: they move to a bounded *last known* store (LRU, the same bound as
the listings). When the backend cannot answer (circuit open, connection
refused, timeouts, 5xx: any *transient* failure), ``stat`` and ``list_dir``
answer from the newest of what was last known about the path or its folder,
however old; a name missing from its folder's last known listing is "not
found", so a new file can be created in a known folder while offline. With no
last known answer the failure propagates (EIO). As soon as the backend answers
again, the normal TTLs apply: the last known store is only read when a
request failed. Changes made through this mount update it like the fresh caches.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import cachetools
import trio

from gstore.backends.base import Backend, Listing, ObjectInfo
from gstore.backends.resilience import request_scope
from gstore.errors import is_transient
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
        # Folders made by this mount, listed as empty without asking, until a deadline.
        self._young_dirs: cachetools.LRUCache[str, float] = cachetools.LRUCache(maxsize=10_000)
        self._young_ttl = negative_ttl
        self._reported: cachetools.LRUCache[str, bool] = cachetools.LRUCache(maxsize=10_000)
        # Distinct names looked up past the caches, per folder, within the listing TTL.
        self._folder_lookups: cachetools.TTLCache[str, set[str]] = cachetools.TTLCache(
            maxsize=10_000, ttl=max(dir_ttl, 0.001))
        # The last known answers, however old, for when the backend cannot answer:
        # (wall time it was learnt, listing or attributes). Bounded like the fresh caches.
        self._known_listings: cachetools.LRUCache[str, tuple[float, Listing]] = cachetools.LRUCache(
            maxsize=max(1, max_entries), getsizeof=lambda item: max(1, len(item[1].entries)))
        self._known_attrs: cachetools.LRUCache[str, tuple[float, ObjectInfo]] = cachetools.LRUCache(maxsize=small)
        self.stats = {"listings": 0, "stats": 0, "listing_hits": 0, "attr_hits": 0, "negative_hits": 0,
                      "stale_answers": 0, "unanswered": 0}

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
        self._expire_young(parent)
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
        with request_scope():
            try:
                await self._expect_lookups(parent_path(path), (path,))
                info = self.cached(path)  # a listing fetched just now may answer (or raise FileNotFoundError)
                if info is not None:
                    return info
                return await self._flight.run(("stat", path), lambda: self._fetch_stat(path))
            except OSError as exc:
                if not is_transient(exc):
                    raise  # a definite answer (not found, denied...)
                try:
                    known = self.last_known(path)
                except FileNotFoundError:  # not in its folder's last listing
                    self.stats["stale_answers"] += 1
                    raise
                if known is None:
                    self.stats["unanswered"] += 1
                    raise
                self.stats["stale_answers"] += 1
                log.debug("stat %s: backend unavailable (%s); answering from the last known state", path, exc)
                return known

    def last_known(self, path: str) -> ObjectInfo | None:
        """What was last known about ``path``, however old (None: nothing).

        The newer of the path's own attributes and its folder's listing wins;
        a name absent from a newer listing raises ``FileNotFoundError``.
        """
        if path == "":
            return ROOT_INFO
        attr = self._known_attrs.get(path)
        listed = self._known_listings.get(parent_path(path))
        if listed is not None and (attr is None or listed[0] >= attr[0]):
            found = listed[1].entries.get(path.rsplit("/", 1)[-1])
            if found is None:
                raise FileNotFoundError(errno.ENOENT, path)
            return found
        return attr[1] if attr is not None else None

    async def expect_lookups(self, folder: str, paths: Iterable[str]) -> None:
        """Lookups of ``paths`` in ``folder`` are coming (or came) past every cache.

        A backend that cannot answer now is no reason to fail: the lookups
        themselves will report (or answer from the last known state).
        """
        with request_scope():
            await self._expect_lookups(folder, paths)

    async def _expect_lookups(self, folder: str, paths: Iterable[str]) -> None:
        """See :meth:`expect_lookups`.

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
        try:
            await self._flight.run(("list", folder), lambda: self._fetch_listing(folder, max_pages=LIST_MAX_PAGES))
        except OSError as exc:
            if not is_transient(exc):
                raise
            log.debug("listing %r for coming lookups failed: %s", folder, exc)

    async def _fetch_stat(self, path: str) -> ObjectInfo:
        self.stats["stats"] += 1
        try:
            info = self.mtimes.apply(path, await self._backend.stat(path))
            if info.detailed and info.etag and not info.is_dir:
                # What the HEAD said about its attributes, for listings of this version later.
                self.mtimes.set(path, info.etag, info.mtime, info)
        except FileNotFoundError:
            if self._enabled["neg"]:
                self._negatives[path] = True
            raise
        self._negatives.pop(path, None)
        if self._enabled["attr"]:
            self._attrs[path] = info
        self._known_attrs[path] = (time.time(), info)
        return info

    async def list_dir(self, path: str) -> Listing:
        self._expire_young(path)
        listing = self._listings.get(path)
        if listing is not None:
            return listing
        with request_scope():
            try:
                return await self._flight.run(("list", path), lambda: self._fetch_listing(path))
            except OSError as exc:
                if not is_transient(exc):
                    raise
                known = self._known_listings.get(path)
                if known is None:
                    self.stats["unanswered"] += 1
                    raise
                self.stats["stale_answers"] += 1
                log.debug("list %s: backend unavailable (%s); answering from the last known listing", path, exc)
                return known[1]

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
        self._keep_listing(path, listing)
        # Entries of a fresh listing supersede older single-path answers.
        prefix = f"{path}/" if path else ""
        for name in listing.entries:
            self._attrs.pop(prefix + name, None)
            self._negatives.pop(prefix + name, None)
        return listing

    # -- changes made through this mount -------------------------------------------

    def _keep_listing(self, path: str, listing: Listing) -> None:
        try:
            self._known_listings[path] = (time.time(), listing)
        except ValueError:  # larger than the whole bound: an older one would be wrong
            self._known_listings.pop(path, None)

    def _parent_listings(self, path: str) -> tuple[list[Listing], str]:
        """The fresh and the last known listing of ``path``'s folder (each once), and its name."""
        parent = parent_path(path)
        found = [self._listings.get(parent)]
        known = self._known_listings.get(parent)
        if known is not None and known[1] is not found[0]:
            found.append(known[1])
        return [listing for listing in found if listing is not None], path.rsplit("/", 1)[-1]

    def remember(self, path: str, info: ObjectInfo) -> None:
        """This mount just created or changed ``path``: answer from ``info`` from now on."""
        self._negatives.pop(path, None)
        if self._enabled["attr"]:
            self._attrs[path] = info
        self._known_attrs[path] = (time.time(), info)
        listings, name = self._parent_listings(path)
        for listing in listings:
            listing.entries[name] = info

    def remember_empty_dir(self, path: str) -> None:
        """This mount just created directory ``path`` where nothing existed: its
        listing is known (empty) without asking, so creating files in it costs
        no lookup request each."""
        listing = Listing()
        if self._enabled["dir"]:
            self._listings[path] = listing
            # Only briefly: others may put objects in it (the negative TTL, not the listing TTL).
            self._young_dirs[path] = time.monotonic() + self._young_ttl
        self._keep_listing(path, listing)

    def _expire_young(self, path: str) -> None:
        """Drop the assumed-empty listing of a folder made here once it is older than the negative TTL."""
        until = self._young_dirs.get(path)
        if until is not None and time.monotonic() >= until:
            del self._young_dirs[path]
            self._listings.pop(path, None)

    def remember_missing(self, path: str) -> None:
        """This mount just removed ``path``."""
        self._attrs.pop(path, None)
        self._listings.pop(path, None)
        self._known_attrs.pop(path, None)
        self._known_listings.pop(path, None)
        if self._enabled["neg"]:
            self._negatives[path] = True
        listings, name = self._parent_listings(path)
        for listing in listings:
            listing.entries.pop(name, None)

    def forget_path(self, path: str) -> None:
        """Drop what is known about ``path`` itself (its parent's listing is kept)."""
        for cache in (self._attrs, self._negatives, self._listings, self._known_attrs, self._known_listings):
            cache.pop(path, None)

    def expire(self, path: str) -> None:
        """The next listing of folder ``path`` asks the backend; what was last known stays,
        the answer while the backend cannot be reached."""
        self._listings.pop(path, None)
        self._young_dirs.pop(path, None)

    def forget_tree(self, path: str) -> None:
        """Drop everything known about ``path`` and below (after a directory rename)."""
        prefix = path + "/"
        for cache in (self._attrs, self._negatives, self._listings, self._known_attrs, self._known_listings):
            for key in [k for k in list(cache.keys()) if k == path or k.startswith(prefix)]:
                cache.pop(key, None)

    def clear(self) -> None:
        """Forget the fresh answers: the next access asks the backend. What was last
        known stays, for when the backend cannot answer (see the module docstring)."""
        self._attrs.clear()
        self._negatives.clear()
        self._listings.clear()

    def entry_count(self) -> int:
        return int(self._listings.currsize) + len(self._attrs) + len(self._negatives)

    def last_known_count(self) -> int:
        """Entries in the last known store (listing entries + attributes)."""
        return int(self._known_listings.currsize) + len(self._known_attrs)
