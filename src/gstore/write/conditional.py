"""Whether the backend refuses ``If-None-Match: *`` on an existing key: found out once per mount.

A new file's upload needs to know that no other writer created the key
meanwhile. Where the store checks ``If-None-Match: *`` atomically (AWS S3 since
2024, MinIO, moto), the conditional PUT *is* that check and the HEAD before it
is a wasted request (half of the requests of many small files). A store that
declares conditional writes but ignores the header would then overwrite another
writer's object silently, so the declaration is not trusted: the first new
file's upload probes the real backend once, and only a definite 412 turns the
HEAD off for this mount.

The probe (three requests, once): PUT an empty scratch object at
``.gstore/write-probe-<random>`` under the mount root (``.gstore`` is the
mount's control directory, so no gstore mount lists it), PUT it again with
``If-None-Match: *`` expecting "precondition failed", DELETE it. Any other
outcome keeps the HEAD: a second PUT that succeeds (the store ignored the
header) for the rest of the mount; an error (network, permissions) until the
next upload asks again.

Concurrency (trio thread): uploads of new files call :meth:`CreateCheck.atomic`
at once; the first runs the probe under ``_lock``, the others wait for its
answer instead of probing too.
"""

from __future__ import annotations

import errno
import logging
import secrets
import time

import trio

from gstore.backends.base import StorageBackend
from gstore.errors import classify

log = logging.getLogger(__name__)

PROBE_DIR = ".gstore"  # the control directory: hidden from every gstore mount's listings


class CreateCheck:
    """Answers "does a PUT with If-None-Match: * fail on an existing key here?" (see module docstring)."""

    def __init__(self, backend: StorageBackend) -> None:
        self._backend = backend
        self._answer: bool | None = None  # None: not known yet (never asked, or the probe failed)
        self._lock = trio.Lock()
        self.probes = 0  # how often the probe ran (tests check that it is once)

    @property
    def known(self) -> bool | None:
        return self._answer

    async def atomic(self) -> bool:
        """True when the conditional PUT alone detects an existing object on this backend."""
        if self._answer is not None:
            return self._answer
        if not self._backend.capabilities.conditional_writes:
            self._answer = False
            return False
        async with self._lock:
            if self._answer is None:
                self._answer = await self._probe()
        return bool(self._answer)

    async def _probe(self) -> bool | None:
        backend = self._backend
        path = f"{PROBE_DIR}/write-probe-{secrets.token_hex(8)}"
        self.probes += 1
        await self._remove_leftovers()
        # Everything from the first PUT on is inside the try: a PUT cancelled (a rename or an
        # unlink cancels the upload that probes) may still have landed, and the scratch object
        # must not stay in the bucket. One that failed most likely did not (the backend is
        # unwell: a DELETE now would fail too); should it have, a later probe sweeps it up.
        maybe_there = True
        try:
            try:
                await backend.put_bytes(path, b"")
            except OSError as exc:
                maybe_there = False
                log.info("could not probe conditional writes on %s (%s); new files are checked with a HEAD "
                         "before their upload", backend.display, exc)
                return None
            try:
                await backend.put_bytes(path, b"", if_none_match=True)
            except OSError as exc:
                if classify(exc)[0] == errno.ESTALE:
                    log.info("%s refuses If-None-Match: * on an existing key: new files go up with no "
                             "HEAD before their PUT", backend.display)
                    return True
                log.info("could not probe conditional writes on %s (%s); new files are checked with a "
                         "HEAD before their upload", backend.display, exc)
                return None
            log.warning("%s accepted a PUT with If-None-Match: * over an existing key: it ignores the "
                        "condition, so every new file is checked with a HEAD before its upload (a narrow "
                        "race with other writers remains)", backend.display)
            return False
        finally:
            if maybe_there:
                await self._delete_probe(path)

    async def _delete_probe(self, path: str) -> None:
        backend = self._backend
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            try:
                await backend.delete(path)
            except OSError as exc:
                log.warning("could not delete the write probe %s on %s: %s", path, backend.display, exc)

    async def _remove_leftovers(self) -> None:
        """Probes of a mount killed mid-probe (kill -9 between the PUT and the DELETE) stay in the
        bucket: removed here once they are old enough not to be another mount's probe running now."""
        backend = self._backend
        try:
            listing = await backend.list_dir(PROBE_DIR)
        except OSError:
            return
        if listing is None:
            return
        now = time.time()
        for name, info in listing.entries.items():
            if name.startswith("write-probe-") and not info.is_dir and now - (info.mtime or now) > LEFTOVER_AGE:
                try:
                    await backend.delete(f"{PROBE_DIR}/{name}")
                    log.info("removed %s/%s, left by an earlier write probe", PROBE_DIR, name)
                except OSError as exc:
                    log.debug("could not remove the old write probe %s: %s", name, exc)


#: A probe object older than this is a leftover, not another mount's probe in progress.
LEFTOVER_AGE = 600.0

__all__ = ["CreateCheck", "PROBE_DIR"]
