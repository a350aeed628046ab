"""Backends: the storage the mount shows, behind one small async protocol."""

from __future__ import annotations

from typing import Any

from gstore.backends.base import Backend, Listing, ObjectInfo


def make_backend(protocol: str, root: str, options: dict[str, Any], *, request_timeout: float | None) -> Backend:
    """Create the backend for a mount.

    Must run in the daemon process after it has forked: fsspec starts its IO
    thread when the first async filesystem is created, and that thread does
    not survive a fork.
    """
    import fsspec

    opts = dict(options)
    opts.setdefault("skip_instance_cache", True)
    if protocol in ("s3", "s3a"):
        from gstore.backends.s3 import S3Backend

        # gstore keeps its own bounded metadata cache; s3fs's would duplicate it unbounded.
        opts.setdefault("use_listings_cache", False)
        fs = fsspec.filesystem("s3", **opts)
        return S3Backend(fs, root, request_timeout=request_timeout)

    from gstore.backends.generic import FsspecBackend

    fs = fsspec.filesystem(protocol, **opts)
    return FsspecBackend(fs, protocol, root, request_timeout=request_timeout)


__all__ = ["Backend", "Listing", "ObjectInfo", "make_backend"]
