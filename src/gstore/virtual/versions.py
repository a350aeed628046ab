"""Entries of ``D/.versions/NAME/``: one read-only file per version of ``D/NAME``.

Names
    Each version is listed as ``<UTC time>_<id hash>``, e.g.
    ``20261121T101502.123Z_3fa2b1c9``:

    * ``<UTC time>`` is the version's LastModified in UTC as
      ``YYYYMMDDTHHMMSS.mmmZ`` (millisecond precision, truncated; S3 has no
      finer one), so names sort in time order with plain ``ls`` / ``sort``.
    * ``<id hash>`` is the first 8 hex digits of the SHA-256 of the version id
      (``null`` for an object written while versioning was off). It keeps names
      unique when several versions share a timestamp, is stable (a name never
      changes as versions are added or removed) and is always a valid file name
      whatever characters the store uses in version ids. Only if two versions
      of one object have the same millisecond *and* the same 8 digits (odds
      about 1 in 4 billion) do both get 16 digits (then the full 64).

    Versions with equal timestamps list in hash order; the aliases below use
    the store's true order.

Aliases
    ``-1`` is the newest version, ``-2`` the one before it, ... ``-N`` the
    oldest (Python's negative indexing over the versions from oldest to newest;
    so ``-2`` is "the one before the newest", like the storage library's
    ``version=-2``). Aliases can be opened but are **not listed** (a listing
    holding every version twice would double ``du`` and ``cp -r``). ``-0``,
    ``-01``, positive numbers and aliases past the oldest do not exist.
    "Newest" is by LastModified; among equal timestamps the version flagged
    IsLatest comes first, then the order the versions were given in (S3's
    ListObjectVersions lists a key's versions newest first).

    A version can also be opened by its raw version id (``.versions/f/<id>``)
    when the id is a valid file name; this is not listed either. Lookup order:
    listed name, then alias, then raw id.

Delete markers
    Delete markers have no content: they are neither listed nor counted by the
    aliases. ``-1`` is the newest version that has content, even when the
    object is currently deleted (which is how a deleted file is recovered);
    the directory of an object with no such version is empty, and the caller
    should report ``D/.versions/NAME`` as ENOENT (:attr:`VersionTable.entries`
    is empty).
"""

from __future__ import annotations

import errno
import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

_ALIAS_RE = re.compile(r"-([1-9][0-9]*)")
_HASH_LENGTHS = (8, 16, 64)


class VersionNotFoundError(OSError):
    """No version of that name (ENOENT)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOENT, message)


@dataclass(frozen=True, slots=True)
class ObjectVersion:
    """One entry of a version listing (S3 ListObjectVersions)."""

    version_id: str | None  # None or "null": written while versioning was off
    last_modified: datetime  # naive = UTC
    size: int
    etag: str | None = None
    is_latest: bool = False
    is_delete_marker: bool = False

    @property
    def vid(self) -> str:
        return self.version_id if self.version_id else "null"


@dataclass(frozen=True, slots=True)
class VersionEntry:
    """A version as the ``.versions`` directory shows it."""

    name: str  # the listed name
    age: int  # 1 for the newest, 2 for the one before...
    version: ObjectVersion

    @property
    def alias(self) -> str:
        return f"-{self.age}"


def _utc(when: datetime) -> datetime:
    if when.tzinfo is None:
        return when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc)


def format_version_time(when: datetime) -> str:
    """``YYYYMMDDTHHMMSS.mmmZ`` in UTC (a naive datetime is taken as UTC)."""
    u = _utc(when)
    return (
        f"{u.year:04d}{u.month:02d}{u.day:02d}T{u.hour:02d}{u.minute:02d}{u.second:02d}"
        f".{u.microsecond // 1000:03d}Z"
    )


def version_hash(version_id: str | None, length: int = 8) -> str:
    vid = version_id if version_id else "null"
    return hashlib.sha256(vid.encode("utf-8", "surrogateescape")).hexdigest()[:length]


def version_name(version: ObjectVersion, hash_length: int = 8) -> str:
    """The listed name of ``version`` (before any collision lengthening)."""
    stamp = format_version_time(version.last_modified)
    return f"{stamp}_{version_hash(version.version_id, hash_length)}"


def parse_alias(name: str) -> int | None:
    """N for an alias ``-N`` (N >= 1, no leading zeros), else None."""
    match = _ALIAS_RE.fullmatch(name)
    return int(match.group(1)) if match else None


class VersionTable:
    """The versions of one object, named and ordered.

    ``versions`` may come in any order and may include delete markers (dropped)
    and repeats of a version id (the first is kept).
    """

    def __init__(self, versions: Iterable[ObjectVersion]) -> None:
        seen: set[str] = set()
        kept: list[tuple[int, ObjectVersion]] = []
        for index, version in enumerate(versions):
            if version.is_delete_marker or version.vid in seen:
                continue
            seen.add(version.vid)
            kept.append((index, version))
        # Newest first: by time, then IsLatest, then given order.
        kept.sort(
            key=lambda item: (_utc(item[1].last_modified), item[1].is_latest, -item[0]),
            reverse=True,
        )
        newest_first = [version for _, version in kept]

        names: dict[str, str] = {}  # vid -> name
        groups: dict[str, list[str]] = {}
        for version in newest_first:
            groups.setdefault(format_version_time(version.last_modified), []).append(version.vid)
        for stamp, vids in groups.items():
            lengths = dict.fromkeys(vids, 0)  # index into _HASH_LENGTHS
            while True:
                candidate = {
                    vid: f"{stamp}_{version_hash(vid, _HASH_LENGTHS[lengths[vid]])}" for vid in vids
                }
                counts: dict[str, int] = {}
                for name in candidate.values():
                    counts[name] = counts.get(name, 0) + 1
                colliding = [
                    vid
                    for vid in vids
                    if counts[candidate[vid]] > 1 and lengths[vid] + 1 < len(_HASH_LENGTHS)
                ]
                if not colliding:
                    break
                for vid in colliding:
                    lengths[vid] += 1
            names.update(candidate)

        self._entries = tuple(
            VersionEntry(names[version.vid], age, version)
            for age, version in enumerate(newest_first, 1)
        )
        self._by_name = {entry.name: entry for entry in self._entries}
        self._by_vid = {entry.version.vid: entry for entry in self._entries}

    @property
    def entries(self) -> tuple[VersionEntry, ...]:
        """All versions with content, newest first (``entries[k]`` is alias ``-(k+1)``)."""
        return self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[VersionEntry]:
        return iter(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    @property
    def newest(self) -> VersionEntry | None:
        return self._entries[0] if self._entries else None

    def names(self) -> list[str]:
        """The directory listing: listed names, sorted (time order)."""
        return sorted(self._by_name)

    def resolve(self, name: str) -> VersionEntry:
        """The version a listed name, alias (``-1``...) or raw version id
        designates; :class:`VersionNotFoundError` (ENOENT) if none."""
        entry = self._by_name.get(name)
        if entry is not None:
            return entry
        age = parse_alias(name)
        if age is not None:
            if age <= len(self._entries):
                return self._entries[age - 1]
            raise VersionNotFoundError(f"no version {name}: {len(self._entries)} version(s) only")
        entry = self._by_vid.get(name)
        if entry is not None:
            return entry
        raise VersionNotFoundError(f"no version named {name!r}")
