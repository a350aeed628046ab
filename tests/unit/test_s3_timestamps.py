"""LIST and HEAD timestamps: parsed fast, to the same datetimes botocore gives.

botocore's default parser (dateutil) was 30% of the daemon's CPU in a cold
``ls -l`` of 2,000 objects; gstore.backends.s3.parse_timestamp takes the ISO 8601
form S3 lists with through ``datetime.fromisoformat`` and hands every other
form to botocore's parser.
"""

from __future__ import annotations

from typing import Any

import pytest
from botocore.utils import parse_timestamp as botocore_parse_timestamp

from gstore.backends import make_backend
from gstore.backends.s3 import parse_timestamp

SAMPLES = [
    "2026-12-03T15:01:43.000Z",  # S3 ListObjectsV2
    "2026-12-03T15:01:43Z",
    "2026-12-03T15:01:43.123456Z",
    "2026-12-03T16:01:43.5+01:00",
    "2026-12-03T15:01:43",  # no zone: botocore's rule applies (not ours)
    "Thu, 03 Dec 2026 15:01:43 GMT",  # HTTP headers (HEAD's Last-Modified)
    "1796310103",  # epoch seconds
    "1796310103.25",
]


@pytest.mark.parametrize("value", SAMPLES)
def test_every_form_gives_what_botocore_gives(value: str) -> None:
    ours, theirs = parse_timestamp(value), botocore_parse_timestamp(value)
    assert ours == theirs and ours.utcoffset() == theirs.utcoffset()


def test_what_botocore_refuses_is_refused() -> None:
    with pytest.raises(ValueError):
        botocore_parse_timestamp("not a time")
    with pytest.raises(ValueError):
        parse_timestamp("not a time")


def test_the_s3_backend_session_parses_with_it(s3_server: Any) -> None:
    options = {"endpoint_url": s3_server.endpoint_url, "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}
    backend = make_backend("s3", "some-bucket", options, request_timeout=10, resilient=False)
    factory = backend._fs.session.get_component("response_parser_factory")
    assert factory.create_parser("rest-xml")._timestamp_parser is parse_timestamp
