"""How one staged file goes up: conflict check, part plan, local fill, send, verify.

An :class:`Uploader` is given a staged file and the generation to upload and
returns an :class:`UploadResult`; it changes no state of the file itself
(bytes missing locally are made local through the ``ensure_local`` callable of
the owner, :class:`gstore.write.pending.PendingFiles`). Decisions:

* single PUT up to ``SINGLE_PUT_LIMIT``; above, multipart with server-side
  copies of untouched parts of the base version (UploadPartCopy);
* a conditional write (If-Match the ETag this mount's changes apply to, or
  If-None-Match ``*`` for a new file) after a HEAD that checks the same, for
  stores that ignore the conditions. A new file that fits one PUT skips the
  HEAD where the store was probed to refuse If-None-Match ``*`` on an existing
  key (:mod:`gstore.write.conditional`): its PUT is the check, and only a 412
  brings the HEAD (and the conflict policy) in;
* a remote change since the base is a conflict, resolved by the policy;
* the result is verified (ETag = MD5 for single PUTs, size by HEAD after
  multipart) before anyone may drop the local copy.

Memory: a body larger than ``INLINE_READ_LIMIT`` is never held whole. It is
hashed in one pass over the staging file (a worker thread) and handed to the
backend as a :class:`~gstore.backends.filebody.FileRegion`, which the backend
reads in small chunks while it sends, with the MD5 of the hashing pass as
Content-MD5: a request in flight costs a few hundred KiB whatever the part size
(a whole-part ``bytes`` cost about twice the part in RSS, with the HTTP stack's
copy). Should the file change between the pass and the send, the server refuses
the body (or, where it ignores Content-MD5, the ETag check below fails): bytes
nobody hashed are never confirmed.

Concurrency: many uploads run at once (the scheduler bounds how many files);
their multipart parts share one mount-wide limiter of ``part_concurrency``
parts in flight. Reading and hashing run in a worker thread, never on the trio
thread: even a small file's open, pread and close there would each give up the
GIL, and getting it back waits for whichever thread took it (the HTTP stack
sending other uploads), stalling every request of the mount meanwhile. A small
file's body usually needs no read at all: the commit of its close kept it
(:meth:`~gstore.write.staging.StagingArea.take_body`). Parts are hashed ahead
of their slots (up to as many as there are slots, in parallel threads; a hashed
part holds no bytes), so a freed slot sends at once; the whole object's MD5
(for ``user.md5``: a multipart ETag is none) is computed in one more worker
thread beside them.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

import trio

from gstore.backends import objectmeta
from gstore.backends.base import ObjectInfo, StorageBackend, UploadedPart
from gstore.backends.filebody import FileRegion, md5_of_file
from gstore.errors import BackendError
from gstore.errors import classify
from gstore.virtual.content_type import guess_mimetype
from gstore.write.conditional import CreateCheck
from gstore.write.staging import EXPECT_ABSENT, StagedFile, StagingArea

log = logging.getLogger(__name__)

SINGLE_PUT_LIMIT = 8 * 1024 * 1024
#: Files up to this size are read whole (in a worker thread) for their PUT; larger ones are
#: streamed from the staging file (see the module docstring).
INLINE_READ_LIMIT = 64 * 1024
#: Uploads of at least this size get a log line of their own at INFO (smaller: DEBUG).
LOGGED_UPLOAD_SIZE = 64 * 1024 * 1024
#: Parts of multipart uploads in flight mount-wide (boto3's upload_file uses 10 threads).
DEFAULT_PART_CONCURRENCY = 8


class ConflictPolicy(str, Enum):
    OVERWRITE = "overwrite"  # ours wins
    KEEP_BOTH = "keep-both"  # ours goes to NAME.conflict-TIMESTAMP, theirs stays
    FAIL = "fail"  # ours stays staged and the upload is reported failed


class ConflictError(BackendError):
    def __init__(self, message: str) -> None:
        super().__init__(errno.EEXIST, message, transient=False)


def conflict_name(path: str, when: float | None = None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when or time.time()))
    return f"{path}.conflict-{stamp}"


def content_type_for(path: str) -> str:
    """The Content-Type an upload gets when nobody set one: the same guess as ``user.mimetype``."""
    return guess_mimetype(path.rsplit("/", 1)[-1], None)


@dataclass
class UploadResult:
    target: str  # where our bytes went: the path, or a conflict name
    info: ObjectInfo  # the object now at ``target``
    md5: str | None  # of the bytes sent, when known
    theirs: ObjectInfo | None  # the other writer's object left at the path (keep-both)
    sent: int
    copied: int


class Uploader:
    """Sends staged files to the backend (see the module docstring)."""

    def __init__(
        self,
        backend: StorageBackend,
        staging: StagingArea,
        *,
        ensure_local: Callable[[StagedFile, int, int], Awaitable[None]],
        policy: ConflictPolicy,
        part_concurrency: int = DEFAULT_PART_CONCURRENCY,
    ) -> None:
        self.backend = backend
        self.staging = staging
        self._ensure_local = ensure_local
        self.policy = policy
        self._part_limiter = trio.CapacityLimiter(max(1, part_concurrency))
        self.create_check = CreateCheck(backend)
        self.heads_skipped = 0  # new files sent without a HEAD first (status, tests)

    async def upload(self, staged: StagedFile, generation: int,
                     sending: Callable[[], None] = lambda: None) -> UploadResult:
        """Upload ``generation`` of ``staged``; ``sending()`` is called just before the first
        request that may create or change an object (after the conflict check)."""
        return await self._upload(staged, generation, sending)

    async def _upload(self, staged: StagedFile, generation: int, sending: Callable[[], None]) -> UploadResult:
        path = staged.path
        single_put = staged.complete and staged.size <= SINGLE_PUT_LIMIT
        optimistic = (staged.expect == EXPECT_ABSENT and single_put and not self._attributes_only(staged, path)
                      and await self.create_check.atomic())
        if optimistic:
            # The PUT's If-None-Match: * is the check (see the module docstring).
            target, if_match, if_none_match, theirs = path, None, True, None
            self.heads_skipped += 1
        else:
            target, if_match, if_none_match, theirs = await self._resolve_conflict(staged)
        if not self.backend.capabilities.conditional_writes:
            # The HEAD in _resolve_conflict is then the only check (a narrow race remains).
            if_match, if_none_match = None, False
        content_type = staged.content_type or content_type_for(target)
        metadata = objectmeta.encode(staged.posix_meta(), writer=staged.id)
        size = staged.size
        if self._attributes_only(staged, target):
            sending()
            return await self._update_attributes(staged, target, metadata, content_type)
        copy_parts, local_parts = self._plan(staged, size)
        for start, end in local_parts:
            await self._ensure_local(staged, start, end)
        start_time = time.monotonic()
        sending()
        md5: str | None
        if not copy_parts and size > SINGLE_PUT_LIMIT and not self.backend.capabilities.multipart:
            # No multipart here (file://, memory://): the backend copies the staging file itself.
            info = await self.backend.put_local_file(target, str(staged.data_path))
            md5 = None
        elif not copy_parts and size <= SINGLE_PUT_LIMIT:
            body: bytes | FileRegion
            if size <= INLINE_READ_LIMIT:
                kept = self.staging.take_body(staged, generation)  # read by the close's commit
                if kept is None:
                    kept = await trio.to_thread.run_sync(self._read_hashed, staged, 0, size)
                body, md5 = kept
            else:
                body = await trio.to_thread.run_sync(FileRegion.hashed, str(staged.data_path), 0, size)
                md5 = body.md5_hex
            try:
                info = await self.backend.put_bytes(target, body, content_type=content_type, metadata=metadata,
                                                    if_match=if_match, if_none_match=if_none_match)
            except OSError as exc:
                if not (optimistic and classify(exc)[0] == errno.ESTALE):
                    raise
                # Something is at the path after all: decide as if the HEAD had found it.
                log.info("%s: the backend already has an object there; checking it", path)
                target, if_match, if_none_match, theirs = await self._resolve_conflict(staged)
                content_type = staged.content_type or content_type_for(target)
                info = await self.backend.put_bytes(target, body, content_type=content_type, metadata=metadata,
                                                    if_match=if_match, if_none_match=if_none_match)
            if info.etag and "-" not in info.etag and info.etag != md5:
                raise BackendError(errno.EIO, f"upload of {target}: ETag {info.etag} is not the MD5 {md5} "
                                   "of what was sent", transient=True)
        else:
            info, md5 = await self._multipart(staged, target, size, copy_parts, content_type, metadata,
                                              if_match, if_none_match)
        copied = sum(e - s for s, e in copy_parts)
        # One line per file only for large ones at INFO; the rest are summed up every
        # UPLOAD_SUMMARY_INTERVAL (PendingFiles.run): a line per file of 1,000 small files
        # was 2.6% of the daemon's Python time for them, and a journal hard to read.
        log.log(logging.INFO if size >= LOGGED_UPLOAD_SIZE else logging.DEBUG,
                "uploaded %s (%d bytes%s) in %.2fs", target, size,
                f", {copied} copied server-side" if copy_parts else "", time.monotonic() - start_time)
        if target != path:
            log.warning("conflict: %s changed on the backend since it was read here; this mount's version "
                        "was uploaded as %s", path, target)
        return UploadResult(target=target, info=info, md5=md5, theirs=theirs, sent=size - copied, copied=copied)

    @staticmethod
    def _read_hashed(staged: StagedFile, start: int, length: int) -> tuple[bytes, str]:
        """Bytes of the staging file and their MD5 (in a worker thread, or inline when small)."""
        data = StagingArea.read_local(staged, start, length)
        return data, hashlib.md5(data).hexdigest()

    def _attributes_only(self, staged: StagedFile, target: str) -> bool:
        """Nothing but attributes changed: the object's bytes need not move.

        ``dirty`` is relative to ``base``; that says nothing about the backend once this
        file has been uploaded since it was staged (a complete file keeps its first base):
        only while the backend is known to hold the base itself (``expect``) may it stay.
        """
        base = staged.base
        return (base is not None and target == staged.path and staged.base_path == staged.path
                and base.etag is not None and staged.expect == f"etag:{base.etag}"
                and not staged.dirty and staged.size == base.size and base.size <= 5 * 1024**3)

    async def _update_attributes(self, staged: StagedFile, target: str, metadata: dict[str, str],
                                 content_type: str) -> UploadResult:
        base = staged.base
        assert base is not None
        if not self.backend.capabilities.user_metadata:
            # Nowhere to keep them (file://, memory://): this mount's attribute store has them.
            return UploadResult(target=target, info=base, md5=None, theirs=None, sent=0, copied=0)
        info = await self.backend.update_metadata(target, metadata, content_type=content_type,
                                                  if_match=base.etag)
        log.info("updated the attributes of %s", target)
        return UploadResult(target=target, info=info, md5=None, theirs=None, sent=0, copied=0)

    async def _resolve_conflict(self, staged: StagedFile) -> tuple[str, str | None, bool, ObjectInfo | None]:
        """Where to upload, with which precondition (If-Match ETag, If-None-Match *)."""
        expect = staged.expect
        if expect is None:
            return staged.path, None, False, None
        current = await self.backend.head(staged.path)
        expected_etag = expect[5:] if expect.startswith("etag:") else None
        unchanged = (current is None) if expect == EXPECT_ABSENT else (current is not None and current.etag == expected_etag)
        if unchanged:
            return staged.path, expected_etag, expect == EXPECT_ABSENT, None
        if current is not None and current.writer == staged.id:
            # An earlier generation of this very file landed but its answer was lost (a
            # reset, a cancel, kill -9 before the journal knew), and the file changed since:
            # the object is ours, written by this staged file (objectmeta.WRITER).
            log.info("%s: the backend has an earlier upload of this file whose answer was lost; "
                     "not a conflict", staged.path)
            return staged.path, current.etag, False, None
        if current is not None and await self._is_our_own(staged, current):
            # An earlier attempt landed but its answer was lost (reset, timeout, kill -9
            # before the journal was cleared): the object *is* ours, not a conflict.
            log.info("%s: the backend already has exactly these bytes (an earlier upload whose answer "
                     "was lost); not a conflict", staged.path)
            return staged.path, current.etag, False, None
        if self.policy is ConflictPolicy.OVERWRITE:
            log.warning("conflict on %s: the backend copy changed since it was read here; overwriting it "
                        "(policy overwrite)", staged.path)
            return staged.path, None, False, None
        if self.policy is ConflictPolicy.FAIL:
            raise ConflictError(f"{staged.path} changed on the backend since it was read here")
        return conflict_name(staged.path), None, True, current

    async def _is_our_own(self, staged: StagedFile, current: ObjectInfo) -> bool:
        """Whether the remote object has exactly the staged bytes.

        By its single-part ETag where that is the MD5 (S3). Where it is not (a local
        folder, other fsspec backends, S3 with SSE-KMS), the object's bytes are read and
        compared, up to ``SINGLE_PUT_LIMIT``: this runs only when an upload finds the
        path taken, and a crash between an upload and the removal of its journal record
        (the record goes in a worker thread after the backend's answer) must not turn our
        own object into a conflict copy.
        """
        etag = current.etag or ""
        if current.size != staged.size or staged.size > SINGLE_PUT_LIMIT:
            return False
        if not staged.complete:
            return False  # parts of it were never fetched: it cannot be compared here
        data = await trio.to_thread.run_sync(self.staging.read_local, staged, 0, staged.size)
        if len(etag) == 32 and "-" not in etag and hashlib.md5(data).hexdigest() == etag.lower():
            return True
        # Not the MD5, or an ETag that is no MD5 although it looks like one (SSE-KMS).
        if staged.size == 0:
            return True
        try:
            theirs = await self.backend.read_range(staged.path, 0, staged.size, current)
        except OSError as exc:
            log.info("%s: could not read the object there to compare it (%s)", staged.path, exc)
            return False
        return theirs == data

    def _plan(self, staged: StagedFile, size: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Split the file into parts copied server-side from the base, and parts sent from here."""
        base = staged.base
        if (
            base is None
            or staged.complete
            or not (self.backend.capabilities.server_copy and self.backend.capabilities.multipart)
            or size < 2 * self.backend.min_copy_part
        ):
            return [], [(0, size)] if size else []
        part = self.backend.part_size(size)
        copy_parts: list[tuple[int, int]] = []
        local_parts: list[tuple[int, int]] = []
        for start in range(0, size, part):
            end = min(size, start + part)
            copyable = (
                end <= base.size
                and end - start >= self.backend.min_copy_part
                and not staged.dirty.overlaps(start, end)
            )
            (copy_parts if copyable else local_parts).append((start, end))
        if not copy_parts:
            return [], [(0, size)]
        return copy_parts, local_parts

    async def _multipart(
        self, staged: StagedFile, target: str, size: int, copy_parts: list[tuple[int, int]],
        content_type: str, metadata: dict[str, str], if_match: str | None, if_none_match: bool,
    ) -> tuple[ObjectInfo, str | None]:
        backend = self.backend
        part = backend.part_size(size)
        ranges = [(start, min(size, start + part)) for start in range(0, size, part)]
        copy_set = set(copy_parts)
        upload_id = await backend.start_multipart(target, content_type=content_type, metadata=metadata)
        results: list[UploadedPart] = []
        # Read in a pass of its own, at other moments than the parts: it is the MD5 of what was
        # sent only if no write came in between, which is what the digest's users check (it
        # counts for the generation given to ``upload``; any write bumps the file's).
        whole = None if copy_parts else _WholeObjectMd5(str(staged.data_path), size)
        try:
            async with trio.open_nursery() as nursery:
                if whole is not None:
                    nursery.start_soon(whole.compute)
                # Parts are hashed ahead of their slot (at most as many as there are slots, and
                # a hashed part holds no bytes): a freed slot sends at once instead of first
                # waiting for 8 MiB to be hashed.
                ahead = trio.Semaphore(int(self._part_limiter.total_tokens))
                for number, (start, end) in enumerate(ranges, start=1):
                    if (start, end) in copy_set:
                        # A slot per part, whoever holds it: the limiter is mount-wide, so part
                        # numbers (the same in every upload) cannot name its borrowers.
                        slot = object()
                        await self._part_limiter.acquire_on_behalf_of(slot)
                        nursery.start_soon(self._copy_part, staged, target, upload_id, number, start, end,
                                           results, slot)
                        continue
                    await ahead.acquire()
                    nursery.start_soon(self._send_part, str(staged.data_path), target, upload_id, number,
                                       start, end, results, ahead)
            await backend.complete_multipart(target, upload_id, results, if_match=if_match,
                                             if_none_match=if_none_match)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                try:
                    await backend.abort_multipart(target, upload_id)
                except Exception:  # noqa: BLE001 - the original error matters more
                    log.warning("could not abort multipart upload %s of %s", upload_id, target)
            raise
        finally:
            if whole is not None:
                whole.stop.set()
        info = await backend.head(target)
        if info is None or info.size != size:
            raise BackendError(errno.EIO, f"upload of {target}: the backend reports "
                               f"{'no object' if info is None else f'{info.size} bytes'}, expected {size}",
                               transient=True)
        return info, whole.digest if whole is not None else None

    async def _send_part(self, data_path: str, target: str, upload_id: str, number: int, start: int, end: int,
                         results: list[UploadedPart], ahead: trio.Semaphore) -> None:
        """Hash one part, then send it in a mount-wide slot; ``ahead`` is released once the
        part holds its slot (or failed), letting the next part be hashed meanwhile."""
        slot = object()
        try:
            # The part's own MD5 (its Content-MD5), from one pass over its bytes in a worker
            # thread (parts waiting for a slot hash in parallel); the sender then streams them.
            region = await trio.to_thread.run_sync(FileRegion.hashed, data_path, start, end - start)
            await self._part_limiter.acquire_on_behalf_of(slot)
        finally:
            ahead.release()
        try:
            results.append(await self.backend.upload_part(target, upload_id, number, region))
        finally:
            self._part_limiter.release_on_behalf_of(slot)

    async def _copy_part(self, staged: StagedFile, target: str, upload_id: str, number: int,
                         start: int, end: int, results: list[UploadedPart], slot: object) -> None:
        try:
            assert staged.base is not None and staged.base_path is not None
            results.append(await self.backend.copy_part(target, upload_id, number, staged.base_path,
                                                        staged.base, start, end))
        finally:
            self._part_limiter.release_on_behalf_of(slot)


class _WholeObjectMd5:
    """The MD5 of a whole staged file, computed in a worker thread of its own beside the parts.

    It answers ``user.md5`` of the uploaded object at once (a multipart ETag is no
    MD5). Fed from the parts' own pass it was the upload's limit (two digests per
    byte in one thread; see ``md5_of_file``). A cancelled upload abandons the
    thread and sets ``stop``, which the thread sees within one chunk.
    """

    def __init__(self, path: str, size: int) -> None:
        self._path = path
        self._size = size
        self.stop = threading.Event()
        self.digest: str | None = None

    async def compute(self) -> None:
        self.digest = await trio.to_thread.run_sync(
            md5_of_file, self._path, self._size, self.stop, abandon_on_cancel=True)


__all__ = ["ConflictError", "ConflictPolicy", "DEFAULT_PART_CONCURRENCY", "SINGLE_PUT_LIMIT", "UploadResult", "Uploader", "conflict_name", "content_type_for"]
