"""Failures that cannot succeed: S3 refusals map to errnos the write-back queue parks;
failures worth another attempt stay transient."""

from __future__ import annotations

import errno

import pytest
from botocore.exceptions import ClientError
from s3fs.errors import translate_boto_error

from gstore.errors import classify
from gstore.write.pending import _PERMANENT_ERRNOS


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} says no"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


PARKED = [
    ("NoSuchBucket", 404, errno.ENOENT),
    ("AccessDenied", 403, errno.EACCES),
    ("AllAccessDisabled", 403, errno.EACCES),
    ("AccountProblem", 403, errno.EACCES),
    ("InvalidObjectState", 403, errno.EACCES),
    ("RequestTimeTooSkewed", 403, errno.EACCES),
    ("MethodNotAllowed", 405, errno.EPERM),
    ("InvalidArgument", 400, errno.EINVAL),
    ("InvalidRequest", 400, errno.EINVAL),
    ("InvalidBucketName", 400, errno.EINVAL),
    ("InvalidStorageClass", 400, errno.EINVAL),
    ("MetadataTooLarge", 400, errno.EINVAL),
    ("MissingContentLength", 411, errno.EINVAL),
    ("PermanentRedirect", 301, errno.EINVAL),
    ("KeyTooLongError", 400, errno.ENAMETOOLONG),
    ("EntityTooLarge", 400, errno.EFBIG),
    ("NotImplemented", 501, errno.ENOTSUP),
    ("SomethingNewAndRefused", 400, errno.EINVAL),  # any other 4xx: refused again if sent again
    ("413", 413, errno.EFBIG),
]

RETRIED = [
    ("SlowDown", 503),
    ("ServiceUnavailable", 503),
    ("InternalError", 500),
    ("RequestTimeout", 400),
    ("OperationAborted", 409),
    ("BadDigest", 400),
    ("IncompleteBody", 400),
    ("NoSuchUpload", 404),  # the multipart upload was aborted meanwhile: a new one works
    ("Throttling", 400),
    ("408", 408),
]


@pytest.mark.parametrize(("code", "status", "expected"), PARKED)
def test_refusals_are_permanent_and_parked(code: str, status: int, expected: int) -> None:
    raw = client_error(code, status)
    translated = translate_boto_error(raw)  # what s3fs raises (the ClientError is its cause)
    for exc in (raw, translated):
        assert classify(exc) == (expected, False), (code, type(exc))
        assert classify(exc)[0] in _PERMANENT_ERRNOS  # pending.py parks these uploads


@pytest.mark.parametrize(("code", "status"), RETRIED)
def test_failures_worth_another_attempt_stay_transient(code: str, status: int) -> None:
    raw = client_error(code, status)
    for exc in (raw, translate_boto_error(raw)):
        assert classify(exc)[1] is True, (code, type(exc), classify(exc))
