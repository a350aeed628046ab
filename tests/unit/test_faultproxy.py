"""The fault-injecting proxy itself: each fault does what it says, and can be switched at runtime."""

from __future__ import annotations

import time

import pytest

from gstore.testing.faultproxy import FaultProxy


@pytest.fixture
def proxied(s3):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    proxy = FaultProxy(s3.endpoint).start()
    client = boto3.session.Session().client(
        "s3", endpoint_url=proxy.endpoint_url, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
        config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "total_max_attempts": 1},
                      connect_timeout=2, read_timeout=2),
    )
    s3.put("k", bytes(range(256)) * 1024)
    try:
        yield proxy, client
    finally:
        proxy.stop()


def get(client, **kw):  # type: ignore[no-untyped-def]
    return client.get_object(Bucket="test-bucket", Key="k", **kw)["Body"].read()


def test_passes_through_untouched(proxied) -> None:  # type: ignore[no-untyped-def]
    proxy, client = proxied
    assert get(client) == bytes(range(256)) * 1024
    assert get(client, Range="bytes=10-19") == bytes(range(10, 20))
    client.put_object(Bucket="test-bucket", Key="new", Body=b"x" * 1000)
    assert client.head_object(Bucket="test-bucket", Key="new")["ContentLength"] == 1000
    assert proxy.counts()["forwarded"] == 4


def test_status_reset_truncate_and_per_request(proxied) -> None:  # type: ignore[no-untyped-def]
    from botocore.exceptions import ClientError

    proxy, client = proxied
    proxy.inject("status", status=503, times=1)
    with pytest.raises(ClientError) as info:
        get(client)
    assert info.value.response["Error"]["Code"] == "SlowDown"
    proxy.inject("reset", times=1)
    with pytest.raises(Exception):  # noqa: B017 - botocore/urllib3 wrap the reset in several ways
        get(client)
    proxy.inject("truncate", times=1)
    with pytest.raises(Exception):  # noqa: B017 - IncompleteRead / ResponseStreamingError
        get(client)
    assert get(client) == bytes(range(256)) * 1024  # all three were one-shot
    proxy.inject("status", status=500, per_request=1, ranged_only=True)
    with pytest.raises(ClientError):
        get(client, Range="bytes=0-9")
    assert get(client, Range="bytes=0-9") == bytes(range(10))  # the retry of the same request passes
    with pytest.raises(ClientError):
        get(client, Range="bytes=10-19")  # a different request fails once again
    counts = proxy.counts()
    assert counts["status"] == 3 and counts["reset"] == 1 and counts["truncate"] == 1


def test_hang_latency_and_outage(proxied) -> None:  # type: ignore[no-untyped-def]
    proxy, client = proxied
    proxy.inject("hang", times=1)
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - ReadTimeoutError
        get(client)
    assert 1.5 < time.monotonic() - started < 10
    proxy.inject("latency", delay=0.3, times=1)
    started = time.monotonic()
    get(client)
    assert time.monotonic() - started >= 0.3
    proxy.outage(0.5)
    with pytest.raises(Exception):  # noqa: B017 - connection reset / closed
        get(client)
    time.sleep(0.6)
    assert get(client, Range="bytes=0-0") == b"\0"
    proxy.outage(30)
    proxy.clear()  # ends the outage at once
    assert get(client, Range="bytes=1-1") == b"\1"
    assert proxy.counts()["outage"] >= 1


def test_refuses_non_loopback() -> None:
    with pytest.raises(ValueError):
        FaultProxy("http://10.0.0.1:9000")
    with pytest.raises(ValueError):
        FaultProxy("http://127.0.0.1:9000", host="0.0.0.0")
