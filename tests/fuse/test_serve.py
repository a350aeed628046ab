"""``gstore serve``: real HTTP requests on 127.0.0.1 to a server we start ourselves.

The first part serves a local temporary folder (no FUSE needed); the tests
marked ``fuse`` serve a folder of a real gstore mount of the local S3 endpoint
and check that ETag and Content-Type come from its xattrs, that ranges work and
that ffprobe reads (and seeks in) a video over HTTP. Every server is a
``gstore serve`` subprocess stopped by PID at teardown, even when a test fails.
"""

from __future__ import annotations

import email.utils
import errno
import hashlib
import http.client
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gstore.serve import (
    UNSATISFIABLE,
    BindError,
    if_range_allows,
    parse_bind,
    parse_etags,
    parse_range,
    precondition,
    split_target,
)

MiB = 1024 * 1024


def require_program(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{name} is not installed (scripts/setup installs it): required in CI")
    pytest.skip(f"{name} is not installed")


# -- the server process ------------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen
    log_path: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if "gstore.serve.access" in line]

    def request(self, method: str, target: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection; the target is sent exactly as given."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.putrequest(method, target, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            conn.endheaders()
            response = conn.getresponse()
            body = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, body
        finally:
            conn.close()

    def get(self, target: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", target, {k.replace("_", "-"): v for k, v in headers.items()})

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


class ServerFactory:
    def __init__(self, tmp_path: Path) -> None:
        self._tmp = tmp_path
        self._servers: list[Server] = []

    def __call__(self, folder: Path, *args: str) -> Server:
        log_path = self._tmp / f"serve{len(self._servers)}.log"
        cmd = [sys.executable, "-c", "import sys; from gstore.cli import main; sys.exit(main())",
               "serve", str(folder), "--bind", "127.0.0.1:0", *args]
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        server = Server(process, log_path, 0)
        self._servers.append(server)
        deadline = time.monotonic() + 30
        while True:
            found = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)/", server.log())
            if found:
                server.port = int(found.group(1))
                return server
            if process.poll() is not None:
                pytest.fail(f"gstore serve exited with {process.returncode}:\n{server.log()}")
            if time.monotonic() > deadline:
                server.stop()
                pytest.fail(f"gstore serve did not start:\n{server.log()}")
            time.sleep(0.05)

    def cleanup(self) -> None:
        for server in self._servers:
            server.stop()
        for server in self._servers:
            if "Traceback" in server.log():
                pytest.fail(f"gstore serve logged an unexpected error:\n{server.log()[-5000:]}")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    (root / "sub").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "a.txt").write_bytes(b"hello world\n")
    (root / "data.json").write_bytes(b'{"a": 1}\n')
    (root / "blob.unknownext").write_bytes(b"\x00\x01\x02")
    (root / "big.bin").write_bytes(random.Random(7).randbytes(3 * MiB + 123))
    (root / "empty.txt").write_bytes(b"")
    (root / "sub" / "index.html").write_bytes(b"<b>sub index</b>\n")
    (root / "docs" / '<img src=x onerror=alert(1)>&".txt').write_bytes(b"x")
    (root / "docs" / "sp ace+plus%.txt").write_bytes(b"spaced")
    (root / "docs" / ".hidden").write_bytes(b"h")
    (root / ".env").write_bytes(b"SECRET=1\n")
    (root / ".gstore").mkdir()
    (root / ".gstore" / "status.json").write_bytes(b"{}")
    (root / "inside-link").symlink_to("a.txt")
    secret = tmp_path / "outside.txt"
    secret.write_bytes(b"outside the folder")
    (root / "outside-link").symlink_to(secret)
    (root / "outside-dir").symlink_to(tmp_path)
    os.mkfifo(root / "pipe")
    return root


# -- pure functions ----------------------------------------------------------------------------


def test_parse_bind():
    assert parse_bind("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_bind("0.0.0.0:0") == ("0.0.0.0", 0)
    assert parse_bind("[::1]:9000") == ("::1", 9000)
    assert parse_bind("8081") == ("127.0.0.1", 8081)
    assert parse_bind("localhost:80") == ("localhost", 80)
    for bad in ("", ":80", "host", "host:", "host:x", "host:70000", "::1:80", "[::1]80"):
        with pytest.raises(BindError):
            parse_bind(bad)


def test_parse_range():
    assert parse_range("bytes=0-9", 100) == [(0, 10)]
    assert parse_range("bytes=90-", 100) == [(90, 100)]
    assert parse_range("bytes=-10", 100) == [(90, 100)]
    assert parse_range("bytes=-1000", 100) == [(0, 100)]
    assert parse_range("bytes=95-1000", 100) == [(95, 100)]
    assert parse_range("bytes=0-0, 5-6,", 100) == [(0, 1), (5, 7)]
    assert parse_range("BYTES=1-2", 100) == [(1, 3)]
    assert parse_range("bytes=100-", 100) == UNSATISFIABLE
    assert parse_range("bytes=100-200, 300-", 100) == UNSATISFIABLE
    assert parse_range("bytes=-0", 100) == UNSATISFIABLE
    assert parse_range("bytes=0-", 0) == UNSATISFIABLE
    assert parse_range("bytes=100-, 5-5", 100) == [(5, 6)]  # one satisfiable range is enough
    for ignored in ("items=0-1", "bytes=5-1", "bytes=a-b", "bytes=1", "bytes=", "bytes=--1", "bytes=+1-2",
                    "bytes=\u0661-2", "0-1"):
        assert parse_range(ignored, 100) is None, ignored
    assert parse_range("bytes=" + "9" * 5000 + "-", 100) == UNSATISFIABLE  # no int() blow-up


def test_split_target():
    assert split_target("/") == ([], True)
    assert split_target("/a/b.txt?x=1#f") == (["a", "b.txt"], False)
    assert split_target("/a//b/") == (["a", "b"], True)
    assert split_target("/sp%20ace+x%25") == (["sp ace+x%"], False)
    assert split_target("/caf%C3%A9") == (["café"], False)
    assert split_target("/%FF") == ([os.fsdecode(b"\xff")], False)
    for refused in ("a.txt", "http://h/a", "/../x", "/a/../../x", "/%2e%2e/x", "/%2E%2E", "/.", "/a%2Fb",
                    "/a%2fb", "/a%00b", "*"):
        assert split_target(refused) is None, refused


def test_conditionals():
    etag, mtime = '"abc"', 1_700_000_000.5
    date = email.utils.formatdate(1_700_000_000, usegmt=True)
    later = email.utils.formatdate(1_700_000_100, usegmt=True)
    earlier = email.utils.formatdate(1_699_999_000, usegmt=True)
    assert parse_etags('"a", W/"b" ,"c"') == [(False, "a"), (True, "b"), (False, "c")]
    assert parse_etags(" * ") == "*"
    assert precondition({}, etag, mtime) is None
    assert precondition({"If-None-Match": '"abc"'}, etag, mtime) == 304
    assert precondition({"If-None-Match": 'W/"abc"'}, etag, mtime) == 304  # weak comparison
    assert precondition({"If-None-Match": '"x", "abc"'}, etag, mtime) == 304
    assert precondition({"If-None-Match": "*"}, etag, mtime) == 304
    assert precondition({"If-None-Match": '"x"'}, etag, mtime) is None
    assert precondition({"If-Modified-Since": date}, etag, mtime) == 304
    assert precondition({"If-Modified-Since": later}, etag, mtime) == 304
    assert precondition({"If-Modified-Since": earlier}, etag, mtime) is None
    assert precondition({"If-Modified-Since": "yesterday"}, etag, mtime) is None
    # If-None-Match wins over If-Modified-Since.
    assert precondition({"If-None-Match": '"x"', "If-Modified-Since": later}, etag, mtime) is None
    assert precondition({"If-Match": '"x"'}, etag, mtime) == 412
    assert precondition({"If-Match": 'W/"abc"'}, etag, mtime) == 412  # strong comparison
    assert precondition({"If-Match": '"abc"'}, etag, mtime) is None
    assert precondition({"If-Unmodified-Since": earlier}, etag, mtime) == 412
    assert precondition({"If-Unmodified-Since": later}, etag, mtime) is None
    assert if_range_allows(None, etag, mtime)
    assert if_range_allows('"abc"', etag, mtime)
    assert not if_range_allows('"x"', etag, mtime)
    assert not if_range_allows('W/"abc"', etag, mtime)
    assert if_range_allows(date, etag, mtime)
    assert not if_range_allows(earlier, etag, mtime)
    assert not if_range_allows("garbage", etag, mtime)


# -- a local folder ------------------------------------------------------------------------------


@pytest.mark.parametrize("sendfile", [True, False], ids=["auto-sendfile", "no-sendfile"])
def test_get_head_and_ranges(serve, site, sendfile):
    srv = serve(site, *([] if sendfile else ["--no-sendfile"]))
    status, headers, body = srv.get("/a.txt")
    assert status == 200 and body == b"hello world\n"
    st = (site / "a.txt").stat()
    assert headers["etag"] == f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
    assert headers["last-modified"] == email.utils.formatdate(st.st_mtime, usegmt=True)
    assert headers["accept-ranges"] == "bytes"
    assert headers["content-type"] == "text/plain"
    assert headers["content-length"] == "12"
    assert srv.get("/data.json")[1]["content-type"] == "application/json"
    assert srv.get("/blob.unknownext")[1]["content-type"] == "application/octet-stream"
    assert srv.get("/empty.txt")[::2] == (200, b"")

    status, head_headers, body = srv.request("HEAD", "/a.txt")
    assert status == 200 and body == b""
    assert head_headers["content-length"] == "12" and head_headers["etag"] == headers["etag"]

    status, headers, body = srv.get("/a.txt", Range="bytes=2-4")
    assert (status, body, headers["content-range"]) == (206, b"llo", "bytes 2-4/12")
    assert srv.get("/a.txt", Range="bytes=-3")[2] == b"ld\n"
    assert srv.get("/a.txt", Range="bytes=6-")[2] == b"world\n"
    status, headers, body = srv.get("/a.txt", Range="bytes=12-")
    assert (status, headers["content-range"]) == (416, "bytes */12")
    assert srv.get("/a.txt", Range="bytes=x-y")[::2] == (200, b"hello world\n")  # malformed: ignored
    assert srv.get("/empty.txt", Range="bytes=0-")[0] == 416
    status, headers, body = srv.request("HEAD", "/a.txt", {"Range": "bytes=0-3"})
    assert (status, headers["content-length"], body) == (206, "4", b"")

    # A big file, through several chunks, and ranges across chunk boundaries.
    data = (site / "big.bin").read_bytes()
    status, headers, body = srv.get("/big.bin")
    assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    for start, end in [(0, 0), (256 * 1024 - 5, 256 * 1024 + 5), (MiB + 1, 3 * MiB + 122), (len(data) - 1, len(data) - 1)]:
        status, headers, body = srv.get("/big.bin", Range=f"bytes={start}-{end}")
        assert status == 206 and body == data[start:end + 1], (start, end)
        assert headers["content-range"] == f"bytes {start}-{end}/{len(data)}"

    # Several ranges: multipart/byteranges.
    status, headers, body = srv.get("/big.bin", Range="bytes=0-9, 1000-1009, -5")
    assert status == 206
    boundary = re.fullmatch(r"multipart/byteranges; boundary=(\S+)", headers["content-type"]).group(1)
    assert int(headers["content-length"]) == len(body)
    parts = body.split(b"--" + boundary.encode())
    assert parts[0] == b"" and parts[-1] == b"--\r\n"
    expected = [(0, 9), (1000, 1009), (len(data) - 5, len(data) - 1)]
    for part, (start, end) in zip(parts[1:-1], expected, strict=True):
        head, _, payload = part.partition(b"\r\n\r\n")
        assert f"Content-Range: bytes {start}-{end}/{len(data)}".encode() in head
        assert payload.removesuffix(b"\r\n") == data[start:end + 1]
    # Overlapping ranges adding up to more than the file: the whole file instead.
    assert srv.get("/a.txt", Range="bytes=0-,0-")[::2] == (200, b"hello world\n")


@pytest.mark.parametrize("sendfile", [True, False], ids=["auto-sendfile", "no-sendfile"])
def test_a_file_that_shrinks_mid_response_cuts_the_connection(serve, tmp_path, sendfile):
    """Headers promised N bytes: when the file ends sooner, the client must see a short body, not a
    silently shorter file or the next response's bytes."""
    folder = tmp_path / "shrink"
    folder.mkdir()
    path = folder / "big.bin"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)  # sparse: cheap to make, far more than the socket buffers hold
    srv = serve(folder, *([] if sendfile else ["--no-sendfile"]))
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request("GET", "/big.bin")
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Length") == str(64 * MiB)
        assert len(response.read(1000)) == 1000
        os.truncate(path, MiB)
        with pytest.raises(http.client.IncompleteRead):
            response.read()
    finally:
        conn.close()
    deadline = time.monotonic() + 10
    while "changed size" not in srv.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "file changed size while it was sent; closing the connection" in srv.log()
    assert srv.get("/big.bin")[::2] == (200, bytes(MiB))  # and the server goes on


def test_conditional_requests(serve, site):
    srv = serve(site)
    _, headers, _ = srv.get("/a.txt")
    etag, modified = headers["etag"], headers["last-modified"]
    status, headers, body = srv.get("/a.txt", If_None_Match=etag)
    assert (status, body, headers["etag"]) == (304, b"", etag)
    assert srv.get("/a.txt", If_None_Match='"other"')[0] == 200
    assert srv.get("/a.txt", If_Modified_Since=modified)[0] == 304
    assert srv.get("/a.txt", If_Modified_Since="Thu, 01 Jan 1970 00:00:00 GMT")[0] == 200
    assert srv.get("/a.txt", If_Match='"other"')[0] == 412
    assert srv.get("/a.txt", If_Match=etag)[0] == 200
    assert srv.get("/a.txt", Range="bytes=0-1", If_Range=etag)[::2] == (206, b"he")
    assert srv.get("/a.txt", Range="bytes=0-1", If_Range='"stale"')[::2] == (200, b"hello world\n")
    assert srv.get("/a.txt", Range="bytes=0-1", If_Range=modified)[0] == 206
    assert srv.get("/a.txt", Range="bytes=0-1", If_Range="Thu, 01 Jan 1970 00:00:00 GMT")[0] == 200


def test_paths_outside_the_folder_are_404(serve, site):
    srv = serve(site)
    assert srv.get("/inside-link")[::2] == (200, b"hello world\n")
    for target in ["/outside-link", "/outside-dir/outside.txt", "/../outside.txt", "/sub/../../outside.txt",
                   "/%2e%2e/outside.txt", "/sub/%2E%2E/%2e%2e/outside.txt", "/sub%2F..%2F..%2Foutside.txt",
                   "/sub%2findex.html", "/a.txt%00", "/a.txt%00.html", "/.env", "/docs/.hidden", "/.gstore/status.json",
                   "/pipe", "/missing", "/a.txt/", "/docs", "/docs/", "/", "//etc/passwd", "/%2Fetc%2Fpasswd"]:
        status, _, body = srv.get(target)
        assert status == 404, target
        assert b"outside the folder" not in body and b"SECRET" not in body
    assert srv.request("POST", "/a.txt")[0] == 405
    assert srv.request("PUT", "/a.txt")[1]["allow"] == "GET, HEAD"
    # Directories: index.html is served; without a slash, a redirect to it.
    assert srv.get("/sub/")[::2] == (200, b"<b>sub index</b>\n")
    status, headers, _ = srv.get("/sub?q=1")
    assert (status, headers["location"]) == (301, "/sub/?q=1")
    status, headers, _ = srv.get("//sub")  # never a protocol-relative "//sub/": that would leave the site
    assert (status, headers["location"]) == (301, "/sub/")
    # Raw non-ASCII bytes in the request line: refused or served, never an error.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(b"GET /caf\xc3\xa9-\xff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.split(b"\r\n", 1)[0] in (b"HTTP/1.1 404 Not Found", b"HTTP/1.0 400 Bad Request"), reply[:200]


def test_dotfiles_option_never_serves_the_control_folder(serve, site):
    srv = serve(site, "--dotfiles")
    assert srv.get("/.env")[::2] == (200, b"SECRET=1\n")
    assert srv.get("/docs/.hidden")[0] == 200
    assert srv.get("/.gstore/status.json")[0] == 404
    assert srv.get("/.gstore/")[0] == 404


def test_listing_is_opt_in_and_escaped(serve, site):
    srv = serve(site, "--list")
    status, headers, body = srv.get("/docs/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    page = body.decode()
    assert "<img" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;&quot;.txt</a>" in page
    assert 'href="%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E%26%22.txt"' in page
    assert 'href="sp%20ace%2Bplus%25.txt"' in page
    assert ".hidden" not in page
    assert srv.get("/docs/sp%20ace%2Bplus%25.txt")[::2] == (200, b"spaced")
    status, headers, _ = srv.get("/docs")
    assert (status, headers["location"]) == (301, "/docs/")
    root_page = srv.get("/")[2].decode()
    assert ".env" not in root_page and ".gstore" not in root_page and 'href="sub/"' in root_page
    status, headers, body = srv.request("HEAD", "/docs/")
    assert status == 200 and body == b"" and int(headers["content-length"]) == len(page.encode())


def test_access_log_has_one_line_per_request(serve, site):
    srv = serve(site)
    srv.get("/a.txt", Range="bytes=0-1", User_Agent="test-agent/1")
    srv.get("/missing")
    srv.request("HEAD", "/a.txt")
    deadline = time.monotonic() + 10
    while len(srv.access_lines()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = srv.access_lines()
    assert len(lines) == 3, srv.log()
    assert re.search(r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /a\.txt HTTP/1\.1" 206 2 '
                     r'"bytes=0-1" "-" "test-agent/1" \d+\.\d{3}$', lines[0]), lines[0]
    assert '"GET /missing HTTP/1.1" 404 ' in lines[1]
    assert '"HEAD /a.txt HTTP/1.1" 200 0 ' in lines[2]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stops_cleanly_on_signals(serve, site, sig):
    srv = serve(site)
    assert srv.get("/a.txt")[0] == 200
    assert srv.stop(sig) == 0
    log = srv.log()
    assert "stopped" in log and "Traceback" not in log
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5).connect()


def test_user_xattrs_give_etag_and_content_type(serve, site):
    path = site / "typed.bin"
    path.write_bytes(b"typed")
    try:
        os.setxattr(path, "user.etag", b"0123abcd-2")
        os.setxattr(path, "user.mimetype", b"text/x-custom; charset=utf-8")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            pytest.skip(f"this file system has no user xattrs ({exc.strerror}); the fuse tests check them")
        raise
    (site / "bad.txt").write_bytes(b"bad")
    os.setxattr(site / "bad.txt", "user.mimetype", b"not a type\r\nX-Evil: 1")
    os.setxattr(site / "bad.txt", "user.etag", b'has"quote')
    srv = serve(site)
    status, headers, _ = srv.get("/typed.bin")
    assert (status, headers["etag"], headers["content-type"]) == (200, '"0123abcd-2"', "text/x-custom; charset=utf-8")
    assert srv.get("/typed.bin", If_None_Match='"0123abcd-2"')[0] == 304
    _, headers, _ = srv.get("/bad.txt")
    assert headers["content-type"] == "text/plain" and "x-evil" not in headers
    assert headers["etag"].startswith('"3-')


def test_curl_sees_the_same(serve, site):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    srv = serve(site)
    out = subprocess.run([curl, "-sS", "-r", "0-4", f"{srv.url}/a.txt"], capture_output=True, timeout=30, check=True)
    assert out.stdout == b"hello"
    out = subprocess.run([curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--path-as-is",
                          f"{srv.url}/../outside.txt"], capture_output=True, timeout=30, check=True)
    assert out.stdout == b"404"


def test_cli_refuses_bad_arguments(tmp_path):
    def gstore(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "import sys; from gstore.cli import main; sys.exit(main())",
                               *args], capture_output=True, text=True, timeout=60)

    out = gstore("serve", str(tmp_path / "missing"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    (tmp_path / "f").write_text("x")
    out = gstore("serve", str(tmp_path / "f"))
    assert out.returncode == 2 and "not a directory" in out.stderr
    out = gstore("serve", str(tmp_path), "--bind", "nope")
    assert out.returncode == 2 and "--bind" in out.stderr


# -- a gstore mount ------------------------------------------------------------------------------


@pytest.mark.fuse
def test_serving_a_mount_uses_its_xattrs_and_ranges(s3, mount, serve):
    data = random.Random(3).randbytes(2 * MiB + 7)
    put = s3.put("site/blob.xyz", data, ContentType="application/x-gstore-test")
    s3.put("site/page.html", b"<p>hi</p>")
    m = mount("test:")
    srv = serve(m.path / "site")
    status, headers, body = srv.get("/blob.xyz")
    assert status == 200 and body == data
    assert headers["etag"] == put["ETag"]  # the S3 ETag, through user.etag
    assert headers["content-type"] == "application/x-gstore-test"  # the object's Content-Type, through user.mimetype
    assert srv.get("/blob.xyz", If_None_Match=put["ETag"])[0] == 304
    status, headers, body = srv.get("/blob.xyz", Range="bytes=1048570-1048590")
    assert (status, body) == (206, data[1048570:1048591])
    assert headers["content-range"] == f"bytes 1048570-1048590/{len(data)}"
    assert srv.get("/blob.xyz", Range=f"bytes={len(data)}-")[0] == 416
    assert srv.get("/page.html")[1]["content-type"] == "text/html"
    # The mount's control folder is never served, even from the mount root with --dotfiles.
    root = serve(m.path, "--dotfiles")
    assert root.get("/.gstore/status.json")[0] == 404
    assert root.get("/site/blob.xyz", Range="bytes=0-3")[2] == data[:4]


@pytest.mark.fuse
def test_ffprobe_reads_and_seeks_a_video_over_http(s3, mount, serve, tmp_path):
    ffmpeg, ffprobe = require_program("ffmpeg"), require_program("ffprobe")
    video = tmp_path / "video.mp4"
    # No +faststart: the index (moov) is written after the media, so a reader must seek to it.
    subprocess.run([ffmpeg, "-v", "error", "-f", "lavfi", "-i", "testsrc=duration=2:size=160x120:rate=10",
                    "-c:v", "mpeg4", "-b:v", "4M", "-minrate", "4M", "-maxrate", "4M", "-bufsize", "1M",
                    str(video)], check=True, capture_output=True, timeout=120)
    data = video.read_bytes()
    put = s3.put("media/video.mp4", data, ContentType="video/mp4")
    m = mount("test:")
    srv = serve(m.path / "media")
    url = f"{srv.url}/video.mp4"
    out = subprocess.run([ffprobe, "-v", "error", "-show_entries", "format=duration:stream=codec_name,width,height",
                          "-of", "default=noprint_wrappers=1", url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "codec_name=mpeg4" in out.stdout and "width=160" in out.stdout and "height=120" in out.stdout
    assert float(re.search(r"duration=([\d.]+)", out.stdout).group(1)) == pytest.approx(2.0, abs=0.2)
    # Seek into the middle and decode a frame.
    frame = tmp_path / "frame.png"
    subprocess.run([ffmpeg, "-v", "error", "-ss", "1", "-i", url, "-frames:v", "1", str(frame)],
                   check=True, capture_output=True, timeout=120)
    assert frame.stat().st_size > 0
    deadline = time.monotonic() + 10
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = [line for line in srv.access_lines() if "GET /video.mp4 " in line]
        if any(re.search(r' 206 \d+ "bytes=[1-9]\d*-', line) for line in lines):
            break
        time.sleep(0.05)
    ranges = [re.search(r'"bytes=(\d+)-', line) for line in lines]
    assert any(r and int(r.group(1)) > 0 for r in ranges), "\n".join(lines)  # ffprobe seeked with Range
    _, headers, _ = srv.request("HEAD", "/video.mp4")
    assert headers["etag"] == put["ETag"] and headers["content-type"] == "video/mp4"


@pytest.mark.fuse
def test_fmp4_hls_through_concat_and_http(s3, mount, serve, tmp_path):
    """An fMP4 HLS playlist (EXT-X-MAP) joined by .concat plays in ffprobe, on the mount and over HTTP."""
    ffmpeg, ffprobe = require_program("ffmpeg"), require_program("ffprobe")
    hls = tmp_path / "hls"
    hls.mkdir()
    subprocess.run([ffmpeg, "-v", "error", "-f", "lavfi", "-i", "testsrc=duration=3:size=160x120:rate=10",
                    "-c:v", "mpeg4", "-g", "10", "-f", "hls", "-hls_segment_type", "fmp4", "-hls_time", "1",
                    "-hls_playlist_type", "vod", str(hls / "index.m3u8")], check=True, capture_output=True,
                   timeout=120)
    playlist = (hls / "index.m3u8").read_text()
    assert '#EXT-X-MAP:URI="init.mp4"' in playlist
    segments = [line for line in playlist.splitlines() if line and not line.startswith("#")]
    for path in hls.iterdir():
        s3.put(f"live/{path.name}", path.read_bytes())
    expected = b"".join((hls / name).read_bytes() for name in ["init.mp4", *segments])
    m = mount("test:")
    concat = m.path / "live" / ".concat" / "@index.m3u8"
    assert concat.read_bytes() == expected  # the init segment once, first
    out = subprocess.run([ffprobe, "-v", "error", "-count_frames", "-show_entries", "stream=nb_read_frames",
                          "-of", "csv=p=0", str(concat)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "30", out.stderr
    srv = serve(m.path / "live", "--dotfiles")
    status, _, body = srv.get("/.concat/@index.m3u8")
    assert status == 200 and body == expected
    out = subprocess.run([ffprobe, "-v", "error", "-show_entries", "stream=codec_name", "-of", "csv=p=0",
                          f"{srv.url}/.concat/@index.m3u8"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "mpeg4", out.stderr
