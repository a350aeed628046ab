"""``gstore serve``: a small HTTP server for one folder, typically on a gstore mount.

The HTTP protocol itself (parsing, keep-alive, pipelining, timeouts) is
aiohttp's low-level server; this module only decides what to answer:

* ``GET`` and ``HEAD`` of regular files, with ``Range`` (one range: 206;
  several: ``multipart/byteranges``; none satisfiable: 416), ``If-Range``,
  ``If-None-Match`` / ``If-Modified-Since`` (304) and ``If-Match`` /
  ``If-Unmodified-Since`` (412).
* ``ETag`` from the ``user.etag`` xattr (the S3 ETag on a gstore mount), else
  ``"<size hex>-<mtime ns hex>"``; ``Content-Type`` from ``user.mimetype``,
  else a guess from the name; ``Last-Modified`` from the mtime.
* Directories: ``index.html`` when present; an HTML listing only with
  ``--list``; otherwise 404.
* Never anything outside the folder: the request path is decoded segment by
  segment, and a segment that decodes to ``.``/``..`` or contains ``/`` (``%2F``)
  or NUL is refused; the result is resolved with symlinks followed and must
  still be inside the folder, and so must the file the descriptor really
  opened (``/proc/self/fd``). Names starting with ``.`` are refused unless
  ``--dotfiles``; ``.gstore`` (a mount's control directory) always is.
* Blocking file system calls (open, stat, xattrs, reads) run in a bounded
  thread pool, so a slow FUSE read never stalls the event loop; bodies are
  streamed in chunks with ``os.pread`` (or ``sendfile`` for files on local
  disk file systems, where it cannot block on the network).
* One access log line per request on the ``gstore.serve.access`` logger.

See docs/serve.md.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import html
import io
import logging
import mimetypes
import os
import re
import secrets
import signal
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

log = logging.getLogger("gstore.serve")
access_log = logging.getLogger("gstore.serve.access")

DEFAULT_BIND = "127.0.0.1:8080"
#: Bytes read (and held) per step of a response body.
CHUNK_SIZE = 256 * 1024
#: More ranges than this in one request are ignored (the whole file is sent).
MAX_RANGES = 32
#: The control directory at the root of every gstore mount (status, flush): never served.
CONTROL_DIR = ".gstore"
INDEX_FILE = "index.html"
SERVER = "gstore"

#: File systems where sendfile reads from local storage (it runs in the event
#: loop, so it must never wait on a network). Anything else, FUSE included,
#: is read with pread in the thread pool.
LOCAL_FS_TYPES = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "jfs", "reiserfs",
    "tmpfs", "ramfs", "vfat", "exfat", "overlay",
})

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MIMETYPE_RE = re.compile(rf"{_TOKEN}/{_TOKEN}(\s*;[\x20-\x7e]*)?")
_ETAG_VALUE_RE = re.compile(r"[\x21\x23-\x7e]+")
_ETAG_LIST_RE = re.compile(r'\s*(W/)?"([^"]*)"\s*(?:,|$)')
_DIGITS_RE = re.compile(r"[0-9]+")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# Errnos that mean "there is nothing to serve here".
_NOT_FOUND = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL,
              errno.EISDIR, errno.ENXIO, errno.ENODEV}
_FORBIDDEN = {errno.EACCES, errno.EPERM, errno.EROFS}
# Errnos that mean "the storage below is not answering right now".
_UNAVAILABLE = {errno.ENOTCONN, errno.ETIMEDOUT, errno.EAGAIN, errno.EIO, errno.EBUSY,
                errno.ESTALE, errno.ECONNREFUSED, errno.EHOSTUNREACH}

_PCHAR = "!$&'()*+,;=:@-._~"  # what a path segment may hold unescaped (RFC 3986)
_SENT = "gstore.serve.sent"  # request key: body bytes written by the handler


@dataclass(frozen=True)
class ServeOptions:
    """What ``gstore serve`` was asked for."""

    folder: str
    host: str = "127.0.0.1"
    port: int = 8080
    listing: bool = False
    dotfiles: bool = False
    sendfile: bool | None = None  # None: for files on local disk file systems only
    threads: int = 16
    chunk_size: int = CHUNK_SIZE
    shutdown_timeout: float = 5.0


class BindError(ValueError):
    pass


def parse_bind(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``PORT`` (on 127.0.0.1) → (host, port)."""
    text = text.strip()
    if _DIGITS_RE.fullmatch(text):
        host, port_text = "127.0.0.1", text
    elif text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise BindError(f"expected [IPV6]:PORT, got {text!r}")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise BindError(f"expected HOST:PORT (e.g. {DEFAULT_BIND}), got {text!r}")
    if not _DIGITS_RE.fullmatch(port_text) or not 0 <= int(port_text) <= 65535:
        raise BindError(f"port must be a number from 0 to 65535, got {port_text!r}")
    return host, int(port_text)


# -- request parsing -------------------------------------------------------------------------


def split_target(target: str) -> tuple[list[str], bool] | None:
    """The decoded path segments of a request target and whether it ends in ``/``.

    None when the target must be refused: not an absolute path, or a segment
    that decodes to ``.``/``..`` or contains ``/`` (``%2F``) or NUL. Empty
    segments (``//``) are dropped. Names are bytes on Linux: a segment is
    percent-decoded to bytes and turned into a ``str`` as ``os.fsdecode`` does.
    """
    path = target.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        return None
    segments: list[str] = []
    for raw in path.split("/")[1:]:
        if raw == "":
            continue
        try:
            data = unquote_to_bytes(raw)
        except UnicodeError:  # raw non-ASCII bytes that are not UTF-8 (the parser keeps them as surrogates)
            return None
        if b"/" in data or b"\0" in data or data in (b".", b".."):
            return None
        segments.append(os.fsdecode(data))
    return segments, path.endswith("/")


def segments_allowed(segments: Sequence[str], *, dotfiles: bool) -> bool:
    for name in segments:
        if name == CONTROL_DIR or (name.startswith(".") and not dotfiles):
            return False
    return True


UNSATISFIABLE = "unsatisfiable"


def _number(text: str) -> int | None:
    if not _DIGITS_RE.fullmatch(text):
        return None
    return int(text) if len(text) <= 30 else 10**30


def parse_range(value: str, size: int) -> list[tuple[int, int]] | str | None:
    """The ``[start, end)`` byte ranges a ``Range`` header asks for, clipped to ``size``.

    None when the header is to be ignored (not ``bytes=``, or malformed: the
    whole file is then sent with 200, as RFC 9110 says); :data:`UNSATISFIABLE`
    when it is valid but no range overlaps the file (416).
    """
    unit, sep, spec = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    ranges: list[tuple[int, int]] = []
    seen = False
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        seen = True
        first, dash, last = item.partition("-")
        if not dash:
            return None
        first, last = first.strip(), last.strip()
        if first == "":
            length = _number(last)
            if length is None:
                return None
            start, end = max(0, size - length), size
        else:
            start_n = _number(first)
            if start_n is None:
                return None
            if last == "":
                end = size
            else:
                last_n = _number(last)
                if last_n is None or last_n < start_n:
                    return None
                end = min(last_n + 1, size)
            start = start_n
        if start < end:
            ranges.append((start, end))
    if not seen:
        return None
    return ranges or UNSATISFIABLE


def parse_etags(value: str) -> list[tuple[bool, str]] | str:
    """An ``If-Match``/``If-None-Match`` list as ``(weak, opaque tag)`` pairs, or ``"*"``."""
    if value.strip() == "*":
        return "*"
    tags = []
    pos = 0
    while pos < len(value):
        if value[pos:].strip() in ("", ","):
            break
        match = _ETAG_LIST_RE.match(value, pos)
        if match is None:
            break  # malformed rest: what was read so far counts
        tags.append((match.group(1) is not None, match.group(2)))
        pos = match.end()
    return tags


def parse_http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp()


def _etag_opaque(etag: str) -> str:
    return etag[3:-1] if etag.startswith("W/") else etag[1:-1]


def precondition(headers: Any, etag: str, mtime: float) -> int | None:
    """412 or 304 when the conditional headers say so (RFC 9110 section 13.2.2), else None."""
    opaque = _etag_opaque(etag)
    whole_seconds = int(mtime)
    if_match = headers.get("If-Match")
    if if_match is not None:
        tags = parse_etags(if_match)
        if not isinstance(tags, str) and not any(not weak and tag == opaque for weak, tag in tags):
            return 412
    else:
        since = parse_http_date(headers.get("If-Unmodified-Since"))
        if since is not None and whole_seconds > since:
            return 412
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        tags = parse_etags(if_none_match)
        if isinstance(tags, str) or any(tag == opaque for _, tag in tags):
            return 304
    else:
        since = parse_http_date(headers.get("If-Modified-Since"))
        if since is not None and whole_seconds <= since:
            return 304
    return None


def if_range_allows(value: str | None, etag: str, mtime: float) -> bool:
    """Whether a ``Range`` may be honoured under ``If-Range`` (strong comparison)."""
    if value is None:
        return True
    value = value.strip()
    if value.startswith("W/"):
        return False
    if value.startswith('"'):
        return not etag.startswith("W/") and value == etag
    when = parse_http_date(value)
    return when is not None and int(when) == int(mtime)


# -- the file system side (runs in the thread pool) -----------------------------------------


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _xattr(fd: int, name: str) -> str | None:
    try:
        value = os.getxattr(fd, name)
    except OSError:
        return None
    try:
        return value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None


def etag_for(fd: int, st: os.stat_result) -> str:
    """``"<user.etag>"`` when the file has that xattr, else ``"<size>-<mtime ns>"`` in hex."""
    value = _xattr(fd, "user.etag")
    if value:
        value = value.strip('"')
        if _ETAG_VALUE_RE.fullmatch(value):
            return f'"{value}"'
    return f'"{st.st_size:x}-{st.st_mtime_ns:x}"'


def content_type_for(fd: int, name: str) -> str:
    """``user.mimetype`` when it is a valid media type, else a guess from ``name``."""
    value = _xattr(fd, "user.mimetype")
    if value and _MIMETYPE_RE.fullmatch(value):
        return value
    guessed, encoding = mimetypes.guess_type(name, strict=False)
    if guessed and not encoding:
        return guessed
    return "application/octet-stream"


class FsTypes:
    """Which file system type a device number belongs to (from /proc/self/mountinfo)."""

    def __init__(self) -> None:
        self._types: dict[int, str] = {}
        self._read_at = 0.0

    def _refresh(self) -> None:
        types: dict[int, str] = {}
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    left, sep, right = line.partition(" - ")
                    fields = left.split()
                    if not sep or len(fields) < 3 or not right.split():
                        continue
                    major, _, minor = fields[2].partition(":")
                    if major.isdigit() and minor.isdigit():
                        types[os.makedev(int(major), int(minor))] = right.split()[0]
        except OSError:
            pass
        self._types = types
        self._read_at = time.monotonic()

    def fstype(self, dev: int) -> str | None:
        if dev not in self._types and time.monotonic() - self._read_at > 5:
            self._refresh()
        return self._types.get(dev)

    def local(self, dev: int) -> bool:
        return self.fstype(dev) in LOCAL_FS_TYPES


@dataclass
class Target:
    """What a request resolved to: an open file, a listing, or a redirect."""

    kind: str  # "file", "listing" or "redirect"
    fd: int = -1
    st: os.stat_result | None = None
    etag: str = ""
    content_type: str = ""
    sendfile: bool = False
    body: bytes = b""
    file: io.FileIO | None = field(default=None, repr=False)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


class Folder:
    """The served folder: resolves request paths to open files (blocking calls)."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.root = os.path.realpath(options.folder)
        self._fstypes = FsTypes()

    def _open_checked(self, segments: Sequence[str]) -> tuple[int, os.stat_result]:
        real = os.path.realpath(os.path.join(self.root, *segments))
        if not inside(self.root, real):
            raise Refused(404, "resolves outside the folder")
        mode = os.stat(real).st_mode
        if stat.S_ISDIR(mode):
            flags = os.O_RDONLY | os.O_DIRECTORY
        elif stat.S_ISREG(mode):
            flags = os.O_RDONLY | os.O_NOCTTY
        else:
            raise Refused(404, "not a regular file or directory")
        fd = os.open(real, flags | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if stat.S_IFMT(st.st_mode) != stat.S_IFMT(mode):
                raise Refused(404, "changed while it was opened")
            try:
                opened = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                opened = None  # no /proc: the realpath check above stands
            if opened is not None and opened.startswith("/") and not inside(self.root, opened):
                raise Refused(404, "resolves outside the folder")
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def open(self, segments: list[str], trailing_slash: bool) -> Target:
        """Resolve a request path (decoded segments). Raises Refused or OSError."""
        fd, st = self._open_checked(segments)
        if stat.S_ISREG(st.st_mode):
            if trailing_slash:
                os.close(fd)
                raise Refused(404, "a file, asked for as a directory")
            return self._file_target(fd, st, segments[-1] if segments else "")
        try:
            # A directory: its index.html, or a listing, or nothing.
            index: Target | None = None
            try:
                index_fd, index_st = self._open_checked([*segments, INDEX_FILE])
            except (OSError, Refused):
                pass
            else:
                if stat.S_ISREG(index_st.st_mode):
                    index = self._file_target(index_fd, index_st, INDEX_FILE)
                else:
                    os.close(index_fd)
            if index is None and not self.options.listing:
                raise Refused(404, "a directory (listings are off)")
            if not trailing_slash:
                if index is not None:
                    index.close()
                return Target("redirect")
            if index is not None:
                return index
            return Target("listing", body=self._listing(fd, segments))
        finally:
            os.close(fd)

    def _file_target(self, fd: int, st: os.stat_result, name: str) -> Target:
        try:
            use_sendfile = self.options.sendfile
            if use_sendfile is None:
                use_sendfile = self._fstypes.local(st.st_dev)
            target = Target(
                "file", fd=fd, st=st, etag=etag_for(fd, st), content_type=content_type_for(fd, name),
                sendfile=bool(use_sendfile),
            )
            if target.sendfile:
                target.file = io.FileIO(fd, "rb", closefd=False)
            return target
        except BaseException:
            os.close(fd)
            raise

    def _listing(self, fd: int, segments: Sequence[str]) -> bytes:
        rows = []
        with os.scandir(fd) as entries:
            for entry in entries:
                name = entry.name
                if not segments_allowed([name], dotfiles=self.options.dotfiles):
                    continue
                try:
                    is_dir = entry.is_dir()
                    info = entry.stat()
                except OSError:
                    continue
                if not (is_dir or stat.S_ISREG(info.st_mode)):
                    continue
                rows.append((not is_dir, name, is_dir, info.st_size, info.st_mtime))
        rows.sort(key=lambda r: (r[0], os.fsencode(r[1])))
        shown = "/" + "".join(_display(s) + "/" for s in segments)
        title = html.escape(f"Index of {shown}")
        lines = [
            "<!DOCTYPE html>",
            '<html><head><meta charset="utf-8">',
            f"<title>{title}</title></head>",
            f"<body><h1>{title}</h1>",
            "<table><tr><th>Name</th><th>Size</th><th>Modified (UTC)</th></tr>",
        ]
        if segments:
            lines.append('<tr><td><a href="../">../</a></td><td></td><td></td></tr>')
        for _, name, is_dir, size, mtime in rows:
            href = quote(os.fsencode(name), safe="") + ("/" if is_dir else "")
            label = html.escape(_display(name) + ("/" if is_dir else ""))
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(mtime))
            size_text = "-" if is_dir else str(size)
            lines.append(
                f'<tr><td><a href="{html.escape(href)}">{label}</a></td>'
                f"<td>{size_text}</td><td>{when}</td></tr>"
            )
        lines.append("</table></body></html>\n")
        return "\n".join(lines).encode("utf-8")


def _display(name: str) -> str:
    """A file name as text (undecodable bytes become U+FFFD)."""
    return os.fsencode(name).decode("utf-8", "replace")


# -- the HTTP side -----------------------------------------------------------------------------


def _plain(status: int, headers: dict[str, str] | None = None) -> web.Response:
    from http import HTTPStatus

    text = f"{status} {HTTPStatus(status).phrase}\n"
    return web.Response(status=status, text=text, content_type="text/plain",
                        headers={"Server": SERVER, **(headers or {})})


class _Truncated(Exception):
    pass


class FolderServer:
    """The request handler of one served folder."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.folder = Folder(options)
        self._pool = ThreadPoolExecutor(max_workers=max(1, options.threads),
                                        thread_name_prefix="gstore-serve")

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _plain(405, {"Allow": "GET, HEAD"})
        parsed = split_target(request.raw_path)
        if parsed is None or not segments_allowed(parsed[0], dotfiles=self.options.dotfiles):
            return _plain(404)
        segments, trailing = parsed
        try:
            target: Target = await self._blocking(self.folder.open, segments, trailing)
        except Refused as exc:
            log.debug("%s: %s", request.raw_path, exc.reason)
            return _plain(exc.status)
        except OSError as exc:
            return self._os_error(request, exc)
        try:
            if target.kind == "redirect":
                # Rebuilt from the checked segments: "//host" must not become a redirect off-site.
                _, query_sep, query = request.raw_path.split("#", 1)[0].partition("?")
                location = "".join("/" + quote(os.fsencode(s), safe=_PCHAR) for s in segments) + "/"
                return web.Response(status=301, headers={"Location": location + query_sep + query,
                                                         "Server": SERVER},
                                    text="301 Moved Permanently\n", content_type="text/plain")
            if target.kind == "listing":  # aiohttp sends no body to HEAD, but its Content-Length
                return web.Response(body=target.body, content_type="text/html", charset="utf-8",
                                    headers={"Server": SERVER})
            return await self._file(request, target)
        finally:
            target.close()

    def _os_error(self, request: web.BaseRequest, exc: OSError) -> web.Response:
        if exc.errno in _NOT_FOUND:
            return _plain(404)
        if exc.errno in _FORBIDDEN:
            return _plain(403)
        log.warning("%s %s: %s", request.method, request.raw_path, exc.strerror or exc)
        return _plain(503 if exc.errno in _UNAVAILABLE else 500)

    async def _file(self, request: web.BaseRequest, target: Target) -> web.StreamResponse:
        st = target.st
        assert st is not None
        size = st.st_size
        headers = {
            "Server": SERVER,
            "ETag": target.etag,
            "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
            "Accept-Ranges": "bytes",
        }
        verdict = precondition(request.headers, target.etag, st.st_mtime)
        if verdict == 304:
            return web.Response(status=304, headers=headers)
        if verdict == 412:
            return _plain(412)
        headers["X-Content-Type-Options"] = "nosniff"
        asked: list[tuple[int, int]] | str | None = None
        range_header = request.headers.get("Range")
        if range_header is not None and if_range_allows(request.headers.get("If-Range"), target.etag, st.st_mtime):
            asked = parse_range(range_header, size)
        if asked == UNSATISFIABLE:
            return _plain(416, {**headers, "Content-Range": f"bytes */{size}"})
        ranges = asked if isinstance(asked, list) else []
        if len(ranges) > MAX_RANGES or sum(e - s for s, e in ranges) > size:
            ranges = []  # many or overlapping ranges: the whole file costs less
        pieces: list[tuple[bytes, int, int]]  # (part header, start, end)
        if not ranges:
            status, pieces, trailer = 200, [(b"", 0, size)], b""
            headers["Content-Type"] = target.content_type
        elif len(ranges) == 1:
            (start, end), = ranges
            status, pieces, trailer = 206, [(b"", start, end)], b""
            headers["Content-Type"] = target.content_type
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        else:
            boundary = secrets.token_hex(16)
            status, trailer = 206, f"\r\n--{boundary}--\r\n".encode()
            pieces = []
            for index, (start, end) in enumerate(ranges):
                part_head = ("" if index == 0 else "\r\n") + (
                    f"--{boundary}\r\nContent-Type: {target.content_type}\r\n"
                    f"Content-Range: bytes {start}-{end - 1}/{size}\r\n\r\n")
                pieces.append((part_head.encode(), start, end))
            headers["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = sum(len(h) + e - s for h, s, e in pieces) + len(trailer)
        request[_SENT] = 0
        try:
            await response.prepare(request)
            if request.method == "HEAD":
                return response
            for head, start, end in pieces:
                if head:
                    await response.write(head)
                    request[_SENT] += len(head)
                await self._send(request, response, target, start, end)
            if trailer:
                await response.write(trailer)
                request[_SENT] += len(trailer)
        except ConnectionError:
            pass  # the client went away (ffmpeg does that on every seek)
        except (OSError, _Truncated) as exc:
            # Headers are out: the only honest signal left is to cut the connection
            # short of Content-Length.
            reason = "file changed size while it was sent" if isinstance(exc, _Truncated) else (exc.strerror or exc)
            log.warning("%s %s: %s; closing the connection", request.method, request.raw_path, reason)
            if request.transport is not None:
                request.transport.close()
        return response

    async def _send(self, request: web.BaseRequest, response: web.StreamResponse, target: Target,
                    start: int, end: int) -> None:
        if start >= end:
            return
        if target.sendfile and target.file is not None and request.transport is not None:
            loop = asyncio.get_running_loop()
            try:
                sent = await loop.sendfile(request.transport, target.file, start, end - start, fallback=False)
            except (NotImplementedError, asyncio.SendfileNotAvailableError):
                target.sendfile = False  # and below, the same with pread
            else:
                request[_SENT] += sent
                if sent != end - start:
                    raise _Truncated()
                return
        position = start
        chunk_size = self.options.chunk_size
        while position < end:
            data = await self._blocking(os.pread, target.fd, min(chunk_size, end - position), position)
            if not data:
                raise _Truncated()
            await response.write(data)
            position += len(data)
            request[_SENT] += len(data)


class AccessLogger(AbstractAccessLogger):
    """One line per request, the Common Log Format plus Range, Referer, User-Agent and seconds:

    ``127.0.0.1 - - [20/Nov/2026:10:00:00 +0000] "GET /v.mp4 HTTP/1.1" 206 4096 "bytes=0-4095" "-" "curl/8.5" 0.002``
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_taken: float) -> None:
        now = time.gmtime()
        when = f"{now.tm_mday:02d}/{_MONTHS[now.tm_mon - 1]}/{now.tm_year}:{time.strftime('%H:%M:%S', now)} +0000"
        sent = request.get(_SENT)  # streamed file bodies count what was really written
        if sent is None:
            empty = request.method == "HEAD" or response.status in (204, 304)
            sent = 0 if empty else (response.content_length or 0)
        version = f"{request.version.major}.{request.version.minor}"
        line = (f'{request.remote or "-"} - - [{when}] "{_quoted(request.method)} {_quoted(request.raw_path)} '
                f'HTTP/{version}" {response.status} {sent} "{_quoted(request.headers.get("Range", "-"))}" '
                f'"{_quoted(request.headers.get("Referer", "-"))}" '
                f'"{_quoted(request.headers.get("User-Agent", "-"))}" {time_taken:.3f}')
        self.logger.info("%s", line)


def _quoted(text: str) -> str:
    """Text for inside a quoted log field: quotes, backslashes and control characters escaped."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


# -- running -----------------------------------------------------------------------------------


class BadRequestFilter(logging.Filter):
    """A malformed request is the client's mistake, not a server error: aiohttp logs it at
    ERROR with a traceback; this makes it one INFO line (real handler errors stay as they are)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            message = " ".join(str(exc.message).split()) if exc.message else type(exc).__name__
            record.msg, record.args = "bad request (%d): %s", (exc.code, message[:300])
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _install_bad_request_filter() -> None:
    server_logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, BadRequestFilter) for f in server_logger.filters):
        server_logger.addFilter(BadRequestFilter())



def below_gstore_mount(folder: str, mounts: Sequence[str]) -> str | None:
    """The gstore mount point ``folder`` is strictly inside of, if any."""
    for mountpoint in mounts:
        real = os.path.realpath(mountpoint)
        if folder != real and inside(real, folder):
            return mountpoint
    return None


async def serve(options: ServeOptions, *, ready: Callable[[list[tuple[str, int]]], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then stop accepting, let requests in flight
    finish (up to ``shutdown_timeout`` seconds) and return."""
    _install_bad_request_filter()
    handler = FolderServer(options)
    server = web.Server(handler.handle, access_log_class=AccessLogger, access_log=access_log)
    runner = web.ServerRunner(server, shutdown_timeout=options.shutdown_timeout)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        site = web.TCPSite(runner, options.host, options.port, reuse_address=True)
        await site.start()
        addresses = [(str(a[0]), int(a[1])) for a in runner.addresses]
        for host, port in addresses:
            shown = f"[{host}]" if ":" in host else host
            log.info("serving %s on http://%s:%d/ (listings %s, dotfiles %s)", handler.folder.root, shown, port,
                     "on" if options.listing else "off", "on" if options.dotfiles else "off")
        if ready is not None:
            ready(addresses)
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping: no new connections; waiting up to %gs for requests in flight",
                 options.shutdown_timeout)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        handler.close()
    log.info("stopped")


def run(folder: str, *, bind: str = DEFAULT_BIND, listing: bool = False, dotfiles: bool = False,
        sendfile: bool | None = None, threads: int = 16, log_level: str = "INFO") -> int:
    """``gstore serve``: returns the exit code."""
    import sys

    from gstore.mounts import gstore_mounts
    from gstore.log import setup_logging

    try:
        host, port = parse_bind(bind)
    except BindError as exc:
        print(f"gstore serve: --bind: {exc}", file=sys.stderr)
        return 2
    if not os.path.isdir(folder):
        problem = "does not exist" if not os.path.lexists(folder) else "is not a directory"
        print(f"gstore serve: {folder} {problem}", file=sys.stderr)
        return 2
    if threads < 1:
        print("gstore serve: --threads must be at least 1", file=sys.stderr)
        return 2
    setup_logging(log_level)
    options = ServeOptions(folder=folder, host=host, port=port, listing=listing, dotfiles=dotfiles,
                           sendfile=sendfile, threads=threads)
    if dotfiles:
        try:
            mounts = gstore_mounts()
        except OSError:
            mounts = []
        mountpoint = below_gstore_mount(os.path.realpath(folder), mounts)
        if mountpoint is not None:
            log.warning("--dotfiles below the root of the gstore mount %s: its .concat, .diff and .versions "
                        "virtual files can read any file of that mount, not only of %s", mountpoint, folder)
    try:
        asyncio.run(serve(options))
    except OSError as exc:
        print(f"gstore serve: cannot listen on {bind}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a SIGINT before the handlers were in place
        return 130
    return 0


__all__ = [
    "DEFAULT_BIND", "ServeOptions", "FolderServer", "Folder", "AccessLogger", "parse_bind", "parse_range",
    "parse_etags", "precondition", "if_range_allows", "split_target", "serve", "run",
]
