"""Backends: the storage the mount shows, behind typed async protocols.

:class:`StorageBackend` (see :mod:`gstore.backends.base`) is what the mount
core receives; ``backend.capabilities`` says which optional features
(conditional writes, multipart, versions, ...) it has.
"""

from __future__ import annotations

from typing import Any

from gstore.backends.base import (
    Backend,
    Capabilities,
    ContentTypeBackend,
    HealthReporting,
    Listing,
    MultipartBackend,
    NotSupportedError,
    ObjectInfo,
    ReadingBackend,
    StorageBackend,
    UploadedPart,
    VersionsBackend,
    WritingBackend,
)
from gstore.backends.resilience import ResiliencePolicy, ResilientBackend

#: Seconds to open a connection to the storage (``--connect-timeout``).
DEFAULT_CONNECT_TIMEOUT = 5.0


def make_backend(
    protocol: str,
    root: str,
    options: dict[str, Any],
    *,
    request_timeout: float | None,
    retries: int | None = None,
    breaker_threshold: int | None = None,
    breaker_cooldown: float | None = None,
    connect_timeout: float | None = None,
    max_connections: int | None = None,
    resilient: bool = True,
) -> StorageBackend:
    """Create the backend for a mount, wrapped in retries and a circuit breaker.

    ``request_timeout`` bounds one operation (retries included); ``None``
    means 60 s. The library's own retries (s3fs, botocore) are turned down to
    a single attempt unless the options ask otherwise, so that the total time
    an operation may take is decided in one place (:mod:`.resilience`).
    ``connect_timeout`` (default 5 s, never more than ``request_timeout``)
    bounds opening a connection, apart from waiting for an answer: an endpoint
    that does not accept connections is known to be down in seconds.
    ``max_connections`` sizes the S3 client's connection pool (botocore keeps
    10 by default, fewer than the mount's limiters let through at once).

    Must run in the daemon process after it has forked: fsspec starts its IO
    thread when the first async filesystem is created, and that thread does
    not survive a fork.
    """
    import fsspec  # type: ignore[import-untyped]

    opts = dict(options)
    opts.setdefault("skip_instance_cache", True)
    if protocol in ("s3", "s3a"):
        from gstore.backends.s3 import S3Backend

        # gstore keeps its own bounded metadata cache; s3fs's would duplicate it unbounded.
        opts.setdefault("use_listings_cache", False)
        opts["config_kwargs"] = _s3_request_defaults(
            _s3_hashing_defaults(dict(opts.get("config_kwargs") or {})), max_connections)
        if resilient:
            # One attempt per call in s3fs and botocore: gstore retries (bounded) itself.
            config_kwargs = dict(opts.get("config_kwargs") or {})
            config_kwargs.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
            # botocore's socket read timeout (60 s) would cut a multipart complete or a
            # large copy the server is still working on; reads are bounded by gstore's
            # own per-request deadline (--request-timeout) instead.
            config_kwargs.setdefault("read_timeout", 600)
            # Opening a connection is quick or never (botocore waits 60 s by default).
            connect = DEFAULT_CONNECT_TIMEOUT if connect_timeout is None else connect_timeout
            if request_timeout is not None:
                connect = min(connect, request_timeout)
            config_kwargs.setdefault("connect_timeout", connect)
            opts["config_kwargs"] = config_kwargs
        fs = fsspec.filesystem("s3", **opts)
        if fs.session is None:
            # The session s3fs would make at its first request, made now so that its
            # clients parse LIST pages' timestamps quickly (gstore.backends.s3.parse_timestamp).
            from aiobotocore.session import AioSession  # type: ignore[import-untyped]

            from gstore.backends.s3 import use_fast_timestamps

            fs.session = AioSession(**fs.kwargs)
            use_fast_timestamps(fs.session)
        if resilient:
            fs.retries = 1  # s3fs's own retry loop (a class attribute, not an option)
        inner: StorageBackend = S3Backend(fs, root, request_timeout=request_timeout)
    else:
        from gstore.backends.generic import FsspecBackend

        fs = fsspec.filesystem(protocol, **opts)
        inner = FsspecBackend(fs, protocol, root, request_timeout=request_timeout)
    if not resilient:
        return inner
    return ResilientBackend(inner, resilience_policy(
        request_timeout, retries=retries, breaker_threshold=breaker_threshold, breaker_cooldown=breaker_cooldown,
    ))


def _s3_hashing_defaults(config_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Hash each uploaded byte once, not three times.

    gstore sends a Content-MD5 with every body it uploads (PutObject, UploadPart;
    see backends/s3.py), which S3 verifies and which is a signed header. By
    default botocore would also compute a CRC32 checksum of the body
    (``request_checksum_calculation="when_supported"``) and, over plain http,
    a SHA-256 of the body for the signature: two more passes over every byte,
    on the asyncio thread. Neither adds protection here: the signed Content-MD5
    already binds the body to the signature, exactly the condition under which
    botocore itself skips body signing over https. Operations whose checksum the
    service requires (DeleteObjects) still get one. A user's own settings win.
    """
    config_kwargs.setdefault("request_checksum_calculation", "when_required")
    s3_config = dict(config_kwargs.get("s3") or {})
    s3_config.setdefault("payload_signing_enabled", False)
    config_kwargs["s3"] = s3_config
    return config_kwargs


def _s3_request_defaults(config_kwargs: dict[str, Any], max_connections: int | None) -> dict[str, Any]:
    """Less work per request on the asyncio thread, where every upload's and read's
    request is built (a profile of 2,000 small uploads: that thread held the GIL 67% of
    the time, the trio side 29%).

    * ``parameter_validation=False``: gstore builds every request's parameters itself;
      botocore's check of them against the model was 4% of that thread.
    * ``user_agent``: ``gstore/<version>`` (the session adds ``botocore/<version>``), which
      also names the tool in the store's access logs. Without one, botocore rebuilds its
      long User-Agent from a dozen components on every request (5% of that thread); a
      given one is used as is.
    * ``max_pool_connections``: ``max_connections``, the mount's limiters' sum (botocore
      keeps 10, fewer than readahead alone lets through).

    A user's own settings win.
    """
    from gstore import __version__

    config_kwargs.setdefault("parameter_validation", False)
    config_kwargs.setdefault("user_agent", f"gstore/{__version__}")
    if max_connections is not None:
        config_kwargs.setdefault("max_pool_connections", max_connections)
    return config_kwargs


def resilience_policy(
    request_timeout: float | None,
    *,
    retries: int | None = None,
    breaker_threshold: int | None = None,
    breaker_cooldown: float | None = None,
) -> ResiliencePolicy:
    """The policy for the mount options; unset values get the documented defaults.

    The breaker's probe interval defaults to half the request timeout, between
    1 and 5 seconds: a backend that is back is noticed within that time.
    """
    deadline = 60.0 if request_timeout is None else float(request_timeout)
    defaults = ResiliencePolicy()
    return ResiliencePolicy(
        retries=defaults.retries if retries is None else retries,
        deadline=deadline,
        breaker_threshold=defaults.breaker_threshold if breaker_threshold is None else breaker_threshold,
        breaker_cooldown=(min(5.0, max(1.0, deadline / 2)) if breaker_cooldown is None else breaker_cooldown),
    )


__all__ = [
    "Backend",
    "Capabilities",
    "ContentTypeBackend",
    "HealthReporting",
    "Listing",
    "MultipartBackend",
    "NotSupportedError",
    "ObjectInfo",
    "ReadingBackend",
    "ResilientBackend",
    "StorageBackend",
    "UploadedPart",
    "VersionsBackend",
    "WritingBackend",
    "make_backend",
    "resilience_policy",
]
