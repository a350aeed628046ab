"""The one table that turns backend and cache failures into errnos.

Every layer below the FUSE adapter raises ordinary Python exceptions (mostly
``OSError`` subclasses, as fsspec does). Only the adapter converts them, through
:func:`to_errno`, so the mapping lives in exactly one place and can be tested
without a kernel.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl

import trio


class BackendError(OSError):
    """A backend request failed; ``errno`` says how the caller should see it.

    ``transient`` marks failures worth retrying (timeouts, 5xx, throttling,
    dropped connections). A transient failure is never reported as ENOENT and
    never cached as a negative entry.
    """

    def __init__(self, err: int, message: str, *, transient: bool = False) -> None:
        super().__init__(err, message)
        self.transient = transient


class StaleObjectError(BackendError):
    """The object changed on the backend while a handle had it open."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ESTALE, message)


# HTTP status → (errno, transient). Only statuses with a clear meaning are listed;
# everything else is EIO.
_HTTP_STATUS_ERRNO: dict[int, tuple[int, bool]] = {
    400: (errno.EINVAL, False),
    401: (errno.EACCES, False),
    403: (errno.EACCES, False),
    404: (errno.ENOENT, False),
    405: (errno.EPERM, False),
    407: (errno.EACCES, False),
    408: (errno.ETIMEDOUT, True),
    409: (errno.EBUSY, True),
    410: (errno.ENOENT, False),
    411: (errno.EINVAL, False),
    412: (errno.ESTALE, False),
    413: (errno.EFBIG, False),
    414: (errno.ENAMETOOLONG, False),
    416: (errno.EINVAL, False),
    429: (errno.EAGAIN, True),
    500: (errno.EIO, True),
    502: (errno.EIO, True),
    503: (errno.EAGAIN, True),
    504: (errno.ETIMEDOUT, True),
}

# S3 error codes that say more than their HTTP status. The non-transient ones are
# answers retrying will not change (the write-back queue parks such an upload and
# reports it; docs/reliability.md); the transient ones are worth another attempt.
_S3_CODE_ERRNO: dict[str, tuple[int, bool]] = {
    # not there
    "NoSuchKey": (errno.ENOENT, False),
    "NoSuchBucket": (errno.ENOENT, False),
    "NoSuchVersion": (errno.ENOENT, False),
    # not allowed: credentials, policies, account, archived objects
    "AccessDenied": (errno.EACCES, False),
    "AllAccessDisabled": (errno.EACCES, False),
    "AccountProblem": (errno.EACCES, False),
    "InvalidAccessKeyId": (errno.EACCES, False),
    "InvalidObjectState": (errno.EACCES, False),
    "InvalidPayer": (errno.EACCES, False),
    "InvalidSecurity": (errno.EACCES, False),
    "InvalidToken": (errno.EACCES, False),
    "NotSignedUp": (errno.EACCES, False),
    "RequestTimeTooSkewed": (errno.EACCES, False),
    "SignatureDoesNotMatch": (errno.EACCES, False),
    "ExpiredToken": (errno.EACCES, False),
    "TokenRefreshRequired": (errno.EACCES, False),
    "MethodNotAllowed": (errno.EPERM, False),
    # refused as invalid: the same request will be refused again
    "AuthorizationHeaderMalformed": (errno.EINVAL, False),
    "EntityTooSmall": (errno.EINVAL, False),
    "IllegalLocationConstraintException": (errno.EINVAL, False),
    "InvalidArgument": (errno.EINVAL, False),
    "InvalidBucketName": (errno.EINVAL, False),
    "InvalidDigest": (errno.EINVAL, False),
    "InvalidPartOrder": (errno.EINVAL, False),
    "InvalidRequest": (errno.EINVAL, False),
    "InvalidStorageClass": (errno.EINVAL, False),
    "InvalidURI": (errno.EINVAL, False),
    "MalformedXML": (errno.EINVAL, False),
    "MetadataTooLarge": (errno.EINVAL, False),
    "MissingContentLength": (errno.EINVAL, False),
    "PermanentRedirect": (errno.EINVAL, False),  # wrong region or endpoint: a configuration error
    "KeyTooLongError": (errno.ENAMETOOLONG, False),
    "EntityTooLarge": (errno.EFBIG, False),
    "NotImplemented": (errno.ENOTSUP, False),
    "PreconditionFailed": (errno.ESTALE, False),
    # worth another attempt
    "SlowDown": (errno.EAGAIN, True),
    "Throttling": (errno.EAGAIN, True),
    "ThrottlingException": (errno.EAGAIN, True),
    "TooManyRequests": (errno.EAGAIN, True),
    "RequestLimitExceeded": (errno.EAGAIN, True),
    "RequestTimeout": (errno.ETIMEDOUT, True),
    "InternalError": (errno.EIO, True),
    "ServiceUnavailable": (errno.EAGAIN, True),
    "OperationAborted": (errno.EBUSY, True),
    "ConditionalRequestConflict": (errno.EBUSY, True),
    "BadDigest": (errno.EIO, True),  # the body was damaged on the way: send it again
    "IncompleteBody": (errno.EIO, True),
    "XAmzContentSHA256Mismatch": (errno.EIO, True),
    "NoSuchUpload": (errno.EIO, True),  # a multipart upload aborted meanwhile: a new one works
    "InvalidPart": (errno.EIO, True),
}

_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.EAGAIN,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
    }
)


def classify(exc: BaseException, _depth: int = 0) -> tuple[int, bool]:
    """Return ``(errno, transient)`` for any exception a backend call raised."""
    if _depth > 8:  # a cause chain that long (or a cycle) says nothing more
        return errno.EIO, False
    if isinstance(exc, BackendError):
        return exc.errno or errno.EIO, exc.transient
    code, status = _botocore_details(exc)
    if code is None and status is None and exc.__cause__ is not None:
        # A library translation (s3fs turns S3 codes into FileNotFoundError, PermissionError,
        # OSError(EINVAL)...) loses what the code said: the code decides when it is known.
        cause_code, _ = _botocore_details(exc.__cause__)
        if cause_code in _S3_CODE_ERRNO:
            return _S3_CODE_ERRNO[cause_code]
    if code in _S3_CODE_ERRNO:
        return _S3_CODE_ERRNO[code]
    if status in _HTTP_STATUS_ERRNO:
        return _HTTP_STATUS_ERRNO[status]
    if status is not None and status >= 500:
        return errno.EIO, True
    if status is not None and 400 <= status < 500:
        return errno.EINVAL, False  # any other refusal: the same request is refused again
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, trio.TooSlowError, socket.timeout)):
        return errno.ETIMEDOUT, True
    # A backend that cannot be reached is an I/O error to the program reading a file.
    if isinstance(exc, (ConnectionError, ssl.SSLError)):
        return errno.EIO, True
    if _is_aiohttp_transport_error(exc):
        return errno.EIO, True
    if isinstance(exc, FileNotFoundError):
        return errno.ENOENT, False
    if isinstance(exc, PermissionError):
        return errno.EACCES, False
    if isinstance(exc, OSError) and exc.errno:
        # fsspec wraps botocore errors in OSError subclasses and keeps the cause.
        if exc.__cause__ is not None:
            inner = classify(exc.__cause__, _depth + 1)
            if inner != (errno.EIO, False):
                return inner
        return exc.errno, exc.errno in _TRANSIENT_ERRNOS
    if exc.__cause__ is not None:
        return classify(exc.__cause__, _depth + 1)
    return errno.EIO, False


def as_backend_error(exc: BaseException, what: str) -> OSError:
    """Wrap any library exception as an ``OSError`` the upper layers understand.

    ``OSError`` subclasses pass through unchanged; anything else (botocore,
    aiohttp) becomes a :class:`BackendError` with the original on ``__cause__``.
    """
    if isinstance(exc, OSError):
        return exc
    code, transient = classify(exc)
    error = BackendError(code, f"{what}: {type(exc).__name__}: {exc}", transient=transient)
    error.__cause__ = exc
    return error


def to_errno(exc: BaseException) -> int:
    """The errno a FUSE caller should see for ``exc``."""
    return classify(exc)[0]


def is_transient(exc: BaseException) -> bool:
    return classify(exc)[1]


def _botocore_details(exc: BaseException) -> tuple[str | None, int | None]:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None
    error = response.get("Error") or {}
    meta = response.get("ResponseMetadata") or {}
    status = meta.get("HTTPStatusCode")
    return error.get("Code"), int(status) if status else None


def _is_aiohttp_transport_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    name = type(exc).__name__
    if module.startswith("aiohttp") and ("Connect" in name or "Payload" in name or "Disconnect" in name):
        return True
    return module.startswith("botocore") and (
        "Connect" in name or "ReadTimeout" in name or "EndpointConnection" in name
    )
