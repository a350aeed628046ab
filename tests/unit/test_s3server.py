"""gstore.testing.s3server: moto's S3 behind our middleware, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gstore.testing.s3server import RequestRecord, RequestStats, S3TestServer

SRC = Path(__file__).resolve().parents[2] / "src"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server() -> Iterator[S3TestServer]:
    pytest.importorskip("moto")
    with S3TestServer() as srv:
        yield srv


@pytest.fixture
def s3(server: S3TestServer):
    return server.client()


@pytest.fixture
def bucket(s3) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def control(server: S3TestServer, method: str, path: str) -> tuple[int, object]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def error_of(excinfo) -> tuple[str, int]:
    response = excinfo.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


# --------------------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "192.168.0.1", "example.com", "::", ""])
def test_refuses_non_loopback_hosts(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        S3TestServer(host=host)


def test_accepts_loopback_spellings() -> None:
    S3TestServer(host="127.0.0.1")
    S3TestServer(host="127.5.6.7")
    S3TestServer(host="localhost")
    S3TestServer(host="::1")


def test_starts_on_free_port(server: S3TestServer) -> None:
    assert server.port > 0
    assert server.endpoint_url == f"http://127.0.0.1:{server.port}"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass
    with S3TestServer() as other:
        assert other.port not in (0, server.port)
        assert other.client().list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert not other.running
    with pytest.raises(RuntimeError):
        other.endpoint_url  # noqa: B018


def test_importing_module_does_not_import_moto() -> None:
    code = (
        "import sys, gstore.testing.s3server; "
        "print(any(m.split('.')[0] in ('moto', 'boto3', 'werkzeug') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    assert out.stdout.strip() == "False"


def test_tcp_nodelay_on_accepted_connections(server: S3TestServer) -> None:
    handler_cls = server._server.RequestHandlerClass
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, addr = listener.accept()
    try:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        handler = handler_cls.__new__(handler_cls)
        handler.request, handler.client_address, handler.server = accepted, addr, server._server
        handler.setup()
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for sock in (accepted, client, listener):
            sock.close()


# --------------------------------------------------------------------------- range fast path


def test_ranged_gets_match_source(server: S3TestServer, s3, bucket: str) -> None:
    data = os.urandom(3 * MiB + 12345)
    size = len(data)
    put = s3.put_object(Bucket=bucket, Key="dir/obj ü+1.bin", Body=data,
                        ContentType="application/x-test", Metadata={"colour": "blue"})
    head = s3.head_object(Bucket=bucket, Key="dir/obj ü+1.bin")
    cases = {
        "bytes=0-0": (0, 0),
        "bytes=100-4195": (100, 4195),
        f"bytes={size - 5000}-": (size - 5000, size - 1),
        "bytes=-7000": (size - 7000, size - 1),
        f"bytes={size - 10}-{size + 1000}": (size - 10, size - 1),
        f"bytes=-{size + 5}": (0, size - 1),
        f"bytes=1048570-{2 * MiB + 3}": (1048570, 2 * MiB + 3),
    }
    hits = server.stats.fast_path_hits
    for rng, (first, last) in cases.items():
        got = s3.get_object(Bucket=bucket, Key="dir/obj ü+1.bin", Range=rng)
        body = got["Body"].read()
        assert body == data[first : last + 1], rng
        assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
        assert got["ContentRange"] == f"bytes {first}-{last}/{size}"
        assert got["ContentLength"] == last - first + 1
        assert got["ETag"] == put["ETag"] == head["ETag"]
        assert got["ETag"].startswith('"') and got["ETag"].endswith('"')
        assert got["LastModified"] == head["LastModified"]
        assert got["ContentType"] == "application/x-test"
        assert got["AcceptRanges"] == "bytes"
        assert got["Metadata"] == {"colour": "blue"}
        assert "VersionId" not in got  # unversioned bucket
        if (first, last) == (0, size - 1):  # whole object: the stored checksum comes along
            assert got["ChecksumCRC32"] == put["ChecksumCRC32"]
        else:
            assert "ChecksumCRC32" not in got
    assert server.stats.fast_path_hits == hits + len(cases)
    raw = s3.get_object(Bucket=bucket, Key="dir/obj ü+1.bin", Range="bytes=0-9")
    assert raw["ResponseMetadata"]["HTTPHeaders"]["last-modified"].endswith(" GMT")


def test_unsatisfiable_ranges_are_416(server: S3TestServer, s3, bucket: str) -> None:
    from botocore.exceptions import ClientError

    s3.put_object(Bucket=bucket, Key="k", Body=b"0123456789")
    for rng in ("bytes=10-", "bytes=50-60", "bytes=-0"):
        with pytest.raises(ClientError) as excinfo:
            s3.get_object(Bucket=bucket, Key="k", Range=rng)
        assert error_of(excinfo) == ("InvalidRange", 416)
        err = excinfo.value.response["Error"]
        assert err["ActualObjectSize"] == "10" and err["RangeRequested"] == rng
    records = [r for r in server.stats.records() if r.bucket == bucket and r.op == "GET"]
    assert [(r.status, r.fast_path) for r in records] == [(416, True)] * 3


def test_fast_path_does_not_read_whole_object(
    server: S3TestServer, s3, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto.s3.models import FakeKey

    data = os.urandom(64 * MiB)
    s3.put_object(Bucket=bucket, Key="big", Body=data)

    whole_reads = []
    original = FakeKey.value

    def counting_value(key):  # FakeKey.value is moto's "read the entire object" accessor
        whole_reads.append(key.name)
        return original.fget(key)

    monkeypatch.setattr(FakeKey, "value", property(counting_value, original.fset))
    hits = server.stats.fast_path_hits

    got = s3.get_object(Bucket=bucket, Key="big", Range="bytes=40000000-40004095")["Body"].read()
    assert got == data[40000000:40004096]
    assert whole_reads == []
    assert server.stats.fast_path_hits == hits + 1
    assert server.stats.records()[-1].fast_path

    # A query parameter we do not handle (a response header override) goes to moto,
    # which reads the whole object to serve the same 4 KiB: the counter above is honest.
    got = s3.get_object(Bucket=bucket, Key="big", Range="bytes=40000000-40004095",
                        ResponseContentType="text/plain")
    assert got["Body"].read() == data[40000000:40004096]
    assert got["ContentType"] == "text/plain"
    assert whole_reads == ["big"]
    assert server.stats.fast_path_hits == hits + 1
    assert not server.stats.records()[-1].fast_path


def test_concurrent_ranged_gets(server: S3TestServer, bucket: str) -> None:
    import random
    from concurrent.futures import ThreadPoolExecutor

    client = server.client()
    objects = {"small": os.urandom(300_000), "large": os.urandom(8 * MiB)}  # in memory / temp file
    for name, data in objects.items():
        client.put_object(Bucket=bucket, Key=name, Body=data)

    def worker(seed: int) -> int:
        rnd = random.Random(seed)
        s3 = server.client()
        for _ in range(12):
            name = rnd.choice(sorted(objects))
            data = objects[name]
            first = rnd.randrange(len(data))
            last = min(len(data) - 1, first + rnd.randrange(1, 256 * 1024))
            got = s3.get_object(Bucket=bucket, Key=name, Range=f"bytes={first}-{last}")
            assert got["Body"].read() == data[first : last + 1]
        return 12

    hits = server.stats.fast_path_hits
    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(worker, range(8))) == 96
    assert server.stats.fast_path_hits == hits + 96


def test_if_match(server: S3TestServer, s3, bucket: str) -> None:
    from botocore.exceptions import ClientError

    data = os.urandom(100_000)
    etag = s3.put_object(Bucket=bucket, Key="k", Body=data)["ETag"]
    with pytest.raises(ClientError) as excinfo:
        s3.get_object(Bucket=bucket, Key="k", Range="bytes=0-99", IfMatch=f'"{"ab" * 16}"')
    assert error_of(excinfo) == ("PreconditionFailed", 412)
    assert server.stats.records()[-1].fast_path
    with pytest.raises(ClientError) as excinfo:  # If-Match is evaluated before the range
        s3.get_object(Bucket=bucket, Key="k", Range="bytes=999999-", IfMatch=f'"{"0" * 32}"')
    assert error_of(excinfo) == ("PreconditionFailed", 412)
    for tag in (etag, etag.strip('"')):
        got = s3.get_object(Bucket=bucket, Key="k", Range="bytes=10-99", IfMatch=tag)
        assert got["Body"].read() == data[10:100]


def test_versioned_bucket_ranges(server: S3TestServer, s3, bucket: str) -> None:
    from botocore.exceptions import ClientError

    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    old, new = os.urandom(200_000), os.urandom(150_000)
    v1 = s3.put_object(Bucket=bucket, Key="k", Body=old)
    v2 = s3.put_object(Bucket=bucket, Key="k", Body=new)
    assert v1["VersionId"] != v2["VersionId"]
    hits = server.stats.fast_path_hits

    got = s3.get_object(Bucket=bucket, Key="k", Range="bytes=1000-1999", VersionId=v1["VersionId"])
    assert got["Body"].read() == old[1000:2000]
    assert got["VersionId"] == v1["VersionId"]
    assert got["ETag"] == v1["ETag"]
    assert got["ContentRange"] == f"bytes 1000-1999/{len(old)}"

    got = s3.get_object(Bucket=bucket, Key="k", Range="bytes=-10")
    assert got["Body"].read() == new[-10:]
    assert got["VersionId"] == v2["VersionId"]
    assert got["ETag"] == v2["ETag"]
    assert server.stats.fast_path_hits == hits + 2

    with pytest.raises(ClientError) as excinfo:  # unknown version: moto answers
        s3.get_object(Bucket=bucket, Key="k", Range="bytes=0-9", VersionId="no-such-version")
    assert error_of(excinfo)[1] in (400, 404)
    assert server.stats.fast_path_hits == hits + 2


def test_missing_key_falls_through(server: S3TestServer, s3, bucket: str) -> None:
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as excinfo:
        s3.get_object(Bucket=bucket, Key="absent", Range="bytes=0-9")
    assert error_of(excinfo) == ("NoSuchKey", 404)
    with pytest.raises(ClientError) as excinfo:
        s3.get_object(Bucket="no-such-bucket-here", Key="absent", Range="bytes=0-9")
    assert error_of(excinfo) == ("NoSuchBucket", 404)
    assert not any(r.fast_path for r in server.stats.records()[-2:])


# --------------------------------------------------------------------------- accounting and control


def test_stats_counts_and_bytes(server: S3TestServer, s3, bucket: str) -> None:
    body = os.urandom(300_000)
    server.stats.reset()
    s3.put_object(Bucket=bucket, Key="obj", Body=body)
    a = s3.get_object(Bucket=bucket, Key="obj", Range="bytes=0-999")["Body"].read()
    b = s3.get_object(Bucket=bucket, Key="obj", Range="bytes=-4096")["Body"].read()
    s3.head_object(Bucket=bucket, Key="obj")
    s3.list_objects_v2(Bucket=bucket)

    snap = server.stats.snapshot()
    records = server.stats.records()
    listing = records[-1]
    expected = {"GET": 2, "HEAD": 1, "LIST": 1, "PUT": 1, "COPY": 0, "POST": 0, "DELETE": 0,
                "OTHER": 0, "total": 5}
    assert {k: snap[k] for k in expected} == expected
    assert [(r.method, r.op, r.bucket, r.key, r.range, r.status) for r in records] == [
        ("PUT", "PUT", bucket, "obj", None, 200),
        ("GET", "GET", bucket, "obj", "bytes=0-999", 206),
        ("GET", "GET", bucket, "obj", "bytes=-4096", 206),
        ("HEAD", "HEAD", bucket, "obj", None, 200),
        ("GET", "LIST", bucket, None, None, 200),
    ]
    assert [r.bytes_sent for r in records[1:3]] == [len(a), len(b)] == [1000, 4096]
    assert listing.bytes_sent > 0
    assert snap["bytes_sent"] == len(a) + len(b) + listing.bytes_sent
    assert snap["bytes_received"] == len(body)
    assert all(isinstance(r, RequestRecord) for r in records)

    # The HTTP view of the same counters; control requests are not counted.
    status, payload = control(server, "GET", "/_gstore/stats")
    assert status == 200
    assert payload == {**snap, "fast_path": server.stats.fast_path_hits}
    assert payload["fast_path"] == 2
    status, log = control(server, "GET", "/_gstore/requests")
    assert status == 200 and [r["op"] for r in log] == ["PUT", "GET", "GET", "HEAD", "LIST"]
    assert server.stats.snapshot() == snap

    status, _ = control(server, "POST", "/_gstore/stats/reset")
    assert status == 200
    zero = server.stats.snapshot()
    assert set(zero) == {"GET", "HEAD", "LIST", "PUT", "COPY", "POST", "DELETE", "OTHER",
                         "bytes_sent", "bytes_received", "total"}
    assert all(v == 0 for v in zero.values())
    assert server.stats.records() == []
    assert control(server, "GET", "/_gstore/stats/reset")[0] == 405
    assert control(server, "GET", "/_gstore/nope")[0] == 404


def test_other_operations_are_classified(server: S3TestServer, s3, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="a", Body=b"x" * 10)
    server.stats.reset()
    s3.copy_object(Bucket=bucket, Key="b", CopySource={"Bucket": bucket, "Key": "a"})
    s3.get_object(Bucket=bucket, Key="b")  # plain GET, served by moto
    s3.list_buckets()
    s3.list_object_versions(Bucket=bucket)
    s3.get_bucket_versioning(Bucket=bucket)
    s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "a"}]})
    s3.delete_object(Bucket=bucket, Key="b")
    s3.head_bucket(Bucket=bucket)
    assert [r.op for r in server.stats.records()] == [
        "COPY", "GET", "LIST", "LIST", "OTHER", "POST", "DELETE", "HEAD",
    ]


def test_reset_endpoint_and_method(server: S3TestServer, s3, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"data")
    status, payload = control(server, "POST", "/_gstore/reset")
    assert status == 200 and payload == {"status": "ok"}
    assert server.stats.snapshot()["total"] == 0
    assert s3.list_buckets()["Buckets"] == []
    assert server.stats.snapshot()["LIST"] == 1

    s3.create_bucket(Bucket=bucket)
    server.reset()
    assert s3.list_buckets()["Buckets"] == []
    assert server.stats.snapshot()["total"] == 1


def test_multipart_upload_through_wrapper(server: S3TestServer, s3, bucket: str) -> None:
    part1, part2 = os.urandom(5 * MiB), os.urandom(MiB + 7)
    data = part1 + part2
    server.stats.reset()
    upload = s3.create_multipart_upload(Bucket=bucket, Key="mp")
    etags = [
        s3.upload_part(Bucket=bucket, Key="mp", UploadId=upload["UploadId"], PartNumber=n,
                       Body=body)["ETag"]
        for n, body in ((1, part1), (2, part2))
    ]
    done = s3.complete_multipart_upload(
        Bucket=bucket, Key="mp", UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in zip((1, 2), etags)]},
    )
    assert done["ETag"].endswith('-2"')
    snap = server.stats.snapshot()
    assert (snap["POST"], snap["PUT"], snap["total"]) == (2, 2, 4)
    assert snap["bytes_received"] >= len(data)

    got = s3.get_object(Bucket=bucket, Key="mp", Range=f"bytes={5 * MiB - 100}-{5 * MiB + 99}")
    assert got["Body"].read() == data[5 * MiB - 100 : 5 * MiB + 100]
    assert got["ETag"] == done["ETag"]
    assert server.stats.records()[-1].fast_path
    assert s3.get_object(Bucket=bucket, Key="mp")["Body"].read() == data

    # UploadPartCopy counts as COPY.
    up2 = s3.create_multipart_upload(Bucket=bucket, Key="mp2")
    s3.upload_part_copy(Bucket=bucket, Key="mp2", UploadId=up2["UploadId"], PartNumber=1,
                        CopySource={"Bucket": bucket, "Key": "mp"}, CopySourceRange="bytes=0-1023")
    s3.abort_multipart_upload(Bucket=bucket, Key="mp2", UploadId=up2["UploadId"])
    assert [r.op for r in server.stats.records()[-3:]] == ["POST", "COPY", "DELETE"]


# --------------------------------------------------------------------------- emulated network


def test_latency_and_bandwidth(bucket: str, s3) -> None:
    data = os.urandom(256 * 1024)
    s3.put_object(Bucket=bucket, Key="k", Body=data)  # servers in one process share moto state
    with S3TestServer(latency=0.1) as slow:
        client = slow.client()
        start = time.monotonic()
        got = client.get_object(Bucket=bucket, Key="k", Range="bytes=0-9")["Body"].read()
        assert got == data[:10]
        assert time.monotonic() - start >= 0.1
        assert slow.stats.snapshot()["GET"] == 1
    with S3TestServer(bandwidth=1 * MiB) as narrow:
        client = narrow.client()
        start = time.monotonic()
        assert client.get_object(Bucket=bucket, Key="k", Range="bytes=0-")["Body"].read() == data
        assert time.monotonic() - start >= 0.2  # 256 KiB at 1 MiB/s
        start = time.monotonic()
        got = client.get_object(Bucket=bucket, Key="k", Range="bytes=0-1023")["Body"].read()
        assert got == data[:1024]
        assert time.monotonic() - start < 0.2


def test_stats_object_standalone() -> None:
    stats = RequestStats()
    rec = RequestRecord("GET", "GET", "b", "k", "bytes=0-1", 0, 0)
    gen = stats._begin(rec)
    stats._sent(gen, rec, 2)
    stats.reset()
    stats._sent(gen, rec, 5)  # a request from before reset() does not leak into the new counters
    assert stats.snapshot()["bytes_sent"] == 0 and stats.snapshot()["total"] == 0


# --------------------------------------------------------------------------- CLI


def test_cli_subprocess(tmp_path: Path) -> None:
    pytest.importorskip("moto")
    port_file = tmp_path / "endpoint"
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gstore.testing.s3server", "--port-file", str(port_file),
         "--min-part-size", "1024"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "server did not write its port file"
            time.sleep(0.05)
        url = port_file.read_text().strip()
        assert url.startswith("http://127.0.0.1:")
        assert proc.stdout.readline().strip() == url

        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing",
                              config=Config(s3={"addressing_style": "path"}))
        client.create_bucket(Bucket="cli-bucket")
        client.put_object(Bucket="cli-bucket", Key="k", Body=b"hello world")
        got = client.get_object(Bucket="cli-bucket", Key="k", Range="bytes=6-")
        assert got["Body"].read() == b"world"
        # --min-part-size reached moto before its first import: 2 KiB parts are accepted.
        up = client.create_multipart_upload(Bucket="cli-bucket", Key="mp")
        parts = []
        for n, body in ((1, b"a" * 2048), (2, b"b" * 10)):
            part = client.upload_part(Bucket="cli-bucket", Key="mp", PartNumber=n,
                                      UploadId=up["UploadId"], Body=body)
            parts.append({"PartNumber": n, "ETag": part["ETag"]})
        client.complete_multipart_upload(Bucket="cli-bucket", Key="mp", UploadId=up["UploadId"],
                                         MultipartUpload={"Parts": parts})
        got = client.get_object(Bucket="cli-bucket", Key="mp", Range="bytes=2040-")
        assert got["Body"].read() == b"a" * 8 + b"b" * 10
        port = int(url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/_gstore/stats")
        stats = json.loads(conn.getresponse().read())
        conn.close()
        assert (stats["PUT"], stats["GET"], stats["POST"], stats["fast_path"]) == (4, 2, 2, 2)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_the_keep_alive_server_answers_several_requests_on_one_connection() -> None:
    """keep_alive=True (the benchmark's endpoint): the same S3, served by cheroot, with the
    connection left open between requests as S3 leaves it; the default closes it."""
    pytest.importorskip("moto")
    pytest.importorskip("cheroot")
    for keep_alive in (True, False):
        with S3TestServer(keep_alive=keep_alive) as srv:
            s3 = srv.client()
            name = f"keep-alive-{uuid.uuid4().hex[:8]}"
            s3.create_bucket(Bucket=name)
            s3.put_object(Bucket=name, Key="k", Body=b"kept")
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
            try:
                answers = []
                for _ in range(3):
                    conn.request("GET", "/_gstore/stats")
                    resp = conn.getresponse()
                    resp.read()
                    answers.append((resp.status, resp.will_close))
            except (ConnectionError, http.client.HTTPException):
                answers.append(("closed", True))
            finally:
                conn.close()
            if keep_alive:
                assert answers == [(200, False)] * 3
            else:
                assert answers[0] == (200, True)
            assert s3.get_object(Bucket=name, Key="k")["Body"].read() == b"kept"
            assert s3.get_object(Bucket=name, Key="k", Range="bytes=1-2")["Body"].read() == b"ep"
            big = os.urandom(3 * MiB + 5)  # sent in 1 MiB pieces by the keep-alive server
            s3.put_object(Bucket=name, Key="big", Body=big)
            assert s3.get_object(Bucket=name, Key="big")["Body"].read() == big
            ranged = s3.get_object(Bucket=name, Key="big", Range=f"bytes=7-{2 * MiB + 9}")["Body"].read()
            assert ranged == big[7:2 * MiB + 10]
