"""The backend protocols: every backend implements all of them, declares its capabilities
honestly, refuses what it cannot do with ENOTSUP, and the retry layer forwards everything."""

from __future__ import annotations

import errno
import inspect
import io
import random
import uuid
from collections.abc import Callable, Coroutine, Iterator
from datetime import datetime
from typing import Any

import pytest
import trio
from typing_extensions import get_protocol_members

from gstore.backends import make_backend
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
    feed_sink,
)
from gstore.backends.generic import FsspecBackend
from gstore.backends.resilience import ResiliencePolicy, ResilientBackend
from gstore.backends.s3 import S3Backend
from gstore.errors import BackendError, classify
from gstore.virtual.versions import ObjectVersion

PROTOCOLS = (ReadingBackend, WritingBackend, MultipartBackend, VersionsBackend, ContentTypeBackend,
             HealthReporting)
MEMBERS = sorted(get_protocol_members(StorageBackend))
MiB = 1024 * 1024


def test_storage_backend_is_the_union_of_the_parts() -> None:
    parts: set[str] = set()
    for proto in PROTOCOLS:
        parts |= get_protocol_members(proto)
    assert set(MEMBERS) == parts
    assert Backend is StorageBackend  # the old name still works
    # The vocabulary the mount uses, named once (a new method must be added here on purpose).
    assert set(MEMBERS) == {
        "display", "cache_namespace", "capabilities", "cache_key", "probe", "stat", "head", "list_dir",
        "walk", "read_range", "read_range_into", "aclose",
        "put_bytes", "put_local_file", "delete", "copy", "copy_object", "make_dir", "remove_dir_marker",
        "min_copy_part", "part_size", "start_multipart", "upload_part", "copy_part", "complete_multipart",
        "abort_multipart",
        "list_versions", "set_content_type", "add_listener", "health", "key_bytes", "update_metadata", "head_folder",
    }


# -- the real backends ---------------------------------------------------------------


def memory_backend(resilient: bool = False) -> Any:
    return make_backend("memory", f"/gstore-test-{uuid.uuid4().hex[:8]}", {}, request_timeout=10,
                        resilient=resilient)


def file_backend(tmp_path: Any, resilient: bool = False) -> Any:
    return make_backend("file", str(tmp_path), {}, request_timeout=10, resilient=resilient)


@pytest.fixture
def bucket(s3_server: Any) -> Iterator[str]:
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    yield name


def s3_backend(server: Any, root: str, resilient: bool = False) -> Any:
    options = {"endpoint_url": server.endpoint_url, "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}
    return make_backend("s3", root, options, request_timeout=20, resilient=resilient)


def all_backends(tmp_path: Any, server: Any, bucket: str) -> dict[str, Any]:
    return {
        "memory": memory_backend(), "file": file_backend(tmp_path), "s3": s3_backend(server, bucket),
        "resilient-memory": memory_backend(True), "resilient-s3": s3_backend(server, bucket, True),
    }


def test_every_backend_implements_every_protocol(tmp_path: Any, s3_server: Any, bucket: str) -> None:
    backends = all_backends(tmp_path, s3_server, bucket)
    assert isinstance(backends["memory"], FsspecBackend) and isinstance(backends["s3"], S3Backend)
    for name, backend in backends.items():
        for proto in (StorageBackend, *PROTOCOLS):
            assert isinstance(backend, proto), (name, proto.__name__)
        for member in MEMBERS:
            assert hasattr(backend, member), (name, member)
            proto_attr = inspect.getattr_static(StorageBackend, member)
            if inspect.iscoroutinefunction(proto_attr):
                assert inspect.iscoroutinefunction(getattr(backend, member)), (name, member)
        assert isinstance(backend.capabilities, Capabilities)


def test_resilient_backend_defines_every_member_itself() -> None:
    # No __getattr__ forwarding: each member is on the class, async where the protocol is.
    assert "__getattr__" not in vars(ResilientBackend)
    for member in MEMBERS:
        proto_attr = inspect.getattr_static(StorageBackend, member)
        if member in ("display", "cache_namespace"):
            continue  # instance attributes, copied from the inner backend
        ours = inspect.getattr_static(ResilientBackend, member)
        assert ours is not None, member
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(proto_attr), member
        assert isinstance(ours, property) == isinstance(proto_attr, property), member


def test_capabilities_are_declared_honestly(tmp_path: Any, s3_server: Any, bucket: str) -> None:
    backends = all_backends(tmp_path, s3_server, bucket)
    local = Capabilities(local_file_upload=True)
    assert backends["memory"].capabilities == local
    assert backends["file"].capabilities == local
    assert backends["resilient-memory"].capabilities == local
    s3 = Capabilities(conditional_writes=True, server_copy=True, multipart=True, versions=True,
                      content_type=True, user_metadata=True, local_file_upload=False, max_key_bytes=1024)
    assert backends["s3"].capabilities == s3
    assert backends["resilient-s3"].capabilities == s3
    assert Capabilities.names() == ("conditional_writes", "server_copy", "multipart", "versions",
                                    "content_type", "user_metadata", "local_file_upload", "max_key_bytes")
    with pytest.raises(AttributeError):
        s3.multipart = False  # type: ignore[misc]  # frozen


INFO = ObjectInfo(name="f", is_dir=False, size=10, etag="abc")

UNSUPPORTED_ON_FSSPEC: dict[str, Callable[[Any], Coroutine[Any, Any, Any]]] = {
    "start_multipart": lambda b: b.start_multipart("f", content_type="text/plain"),
    "upload_part": lambda b: b.upload_part("f", "u", 1, b"x"),
    "copy_part": lambda b: b.copy_part("f", "u", 1, "g", INFO, 0, 10),
    "complete_multipart": lambda b: b.complete_multipart("f", "u", []),
    "abort_multipart": lambda b: b.abort_multipart("f", "u"),
    "list_versions": lambda b: b.list_versions("f"),
    "set_content_type": lambda b: b.set_content_type("f", "text/plain"),
    "update_metadata": lambda b: b.update_metadata("f", {"mode": "33188"}, content_type=None, if_match=None),
    "put_bytes if_match": lambda b: b.put_bytes("f", b"x", if_match="abc"),
    "put_bytes if_none_match": lambda b: b.put_bytes("f", b"x", if_none_match=True),
}


@pytest.mark.parametrize("kind", ["memory", "file", "resilient-memory", "resilient-file"])
def test_fsspec_refuses_what_it_cannot_do_with_enotsup(tmp_path: Any, kind: str) -> None:
    async def main() -> None:
        resilient = kind.startswith("resilient")
        backend = memory_backend(resilient) if "memory" in kind else file_backend(tmp_path, resilient)
        for what, call in UNSUPPORTED_ON_FSSPEC.items():
            with pytest.raises(NotSupportedError) as info:
                await call(backend)
            assert info.value.errno == errno.ENOTSUP, what
            assert isinstance(info.value, BackendError) and not info.value.transient
            assert "not support" in str(info.value) and backend.display in str(info.value), what
        with pytest.raises(FileNotFoundError):  # nothing was written by the refused puts
            await backend.stat("f")
        if resilient:
            assert backend.calls == 1 and backend.breaker.consecutive_failures == 0  # only the stat

    trio.run(main)


def test_s3_refuses_local_file_upload(tmp_path: Any, s3_server: Any, bucket: str) -> None:
    local = tmp_path / "x"
    local.write_bytes(b"x")

    async def main() -> None:
        for backend in (s3_backend(s3_server, bucket), s3_backend(s3_server, bucket, True)):
            with pytest.raises(NotSupportedError) as info:
                await backend.put_local_file("x", str(local))
            assert info.value.errno == errno.ENOTSUP and "local_file_upload" in str(info.value)
            await backend.aclose()

    trio.run(main)


def test_memory_backend_round_trip_through_the_retry_layer(tmp_path: Any) -> None:
    local = tmp_path / "big"
    local.write_bytes(b"L" * 1000)

    async def main() -> None:
        backend = memory_backend(resilient=True)
        await backend.make_dir("")
        info = await backend.put_bytes("a.txt", b"hello", content_type="text/plain", metadata={"mtime": "1"})
        assert info.size == 5 and not info.is_dir
        assert (await backend.head("a.txt")).size == 5
        assert await backend.head("missing") is None
        await backend.copy("a.txt", "b.txt", info)
        await backend.make_dir("d")
        assert (await backend.put_local_file("d/big", str(local))).size == 1000
        listing = await backend.list_dir("")
        assert isinstance(listing, Listing) and set(listing.entries) >= {"a.txt", "b.txt", "d"}
        walked = {i.name for i in await backend.walk("")}
        assert {"a.txt", "b.txt", "d", "d/big"} <= walked
        assert await backend.read_range("b.txt", 1, 4, await backend.stat("b.txt")) == b"ell"
        await backend.delete("a.txt")
        assert await backend.head("a.txt") is None
        assert backend.part_size(123) == 123 and backend.min_copy_part == 0
        assert backend.health()["state"] == "closed"
        assert backend.inner.health() is None  # no breaker below the retry layer
        backend.inner.add_listener(lambda state: None)  # accepted; never called
        await backend.aclose()

    trio.run(main)


def test_s3_backend_every_feature_round_trip(s3_server: Any, bucket: str) -> None:
    async def main() -> None:
        backend = s3_backend(s3_server, f"{bucket}/pre", resilient=True)
        await backend.probe()
        info = await backend.put_bytes("a.txt", b"hello", content_type="text/plain",
                                       metadata={"mtime": "12.5"}, if_none_match=True)
        for precondition in ({"if_none_match": True}, {"if_match": "0" * 32}):  # declared: honoured
            with pytest.raises(OSError) as refused:
                await backend.put_bytes("a.txt", b"other", **precondition)
            assert classify(refused.value)[0] == errno.ESTALE
        head = await backend.head("a.txt")
        assert head is not None and head.etag == info.etag and head.content_type == "text/plain"
        assert head.mtime == 12.5  # user metadata kept
        changed = await backend.set_content_type("a.txt", "text/markdown")
        assert changed.content_type == "text/markdown"
        versions = await backend.list_versions("a.txt")
        assert versions and isinstance(versions[0], ObjectVersion) and isinstance(versions[0].last_modified, datetime)
        # Multipart: a part copied on the server from an existing object, one sent from here.
        source = await backend.put_bytes("src", b"s" * (5 * MiB))
        upload_id = await backend.start_multipart("joined", content_type="application/x-test",
                                                  metadata={"mtime": "1"})
        parts = [await backend.upload_part("joined", upload_id, 2, b"tail"),
                 await backend.copy_part("joined", upload_id, 1, "src", source, 0, 5 * MiB)]
        assert all(isinstance(p, UploadedPart) for p in parts)
        await backend.complete_multipart("joined", upload_id, parts, if_none_match=True)
        joined = await backend.head("joined")
        assert joined is not None and joined.size == 5 * MiB + 4
        assert await backend.read_range("joined", 5 * MiB - 1, 5 * MiB + 4, joined) == b"stail"
        # An abandoned upload is dropped.
        dropped = await backend.start_multipart("dropped")
        await backend.abort_multipart("dropped", dropped)
        # Directories and copies.
        await backend.make_dir("d")
        await backend.copy("a.txt", "d/b.txt", changed)
        assert {i.name for i in await backend.walk("")} >= {"a.txt", "d/", "d/b.txt", "joined", "src"}
        await backend.remove_dir_marker("d")
        await backend.delete("d/b.txt")
        assert await backend.head("d/b.txt") is None
        assert backend.part_size(1) == 8 * MiB and backend.min_copy_part == 5 * MiB
        assert backend.cache_key("x").endswith(f"|{bucket}|pre/x")
        await backend.aclose()

    trio.run(main)


# -- the retry layer forwards everything ---------------------------------------------


class Recorder:
    """A backend with every feature that records what reaches it (or fails as told)."""

    display = "rec://"
    cache_namespace = "rec"
    capabilities = Capabilities(**{name: True for name in Capabilities.names()})
    min_copy_part = 7

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.fail_next: BaseException | None = None

    def _hit(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> Any:
        self.calls.append((name, args, kwargs))
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return result

    def cache_key(self, path: str) -> str:
        return self._hit("cache_key", (path,), {}, "rec|" + path)

    def key_bytes(self, path: str) -> int:
        return self._hit("key_bytes", (path,), {}, len(path))

    async def head_folder(self, path: str) -> ObjectInfo | None:
        return self._hit("head_folder", (path,), {}, None)

    def part_size(self, size: int) -> int:
        return self._hit("part_size", (size,), {}, 42)

    async def probe(self) -> None:
        self._hit("probe", (), {}, None)

    async def aclose(self) -> None:
        self._hit("aclose", (), {}, None)

    async def stat(self, path: str) -> ObjectInfo:
        return self._hit("stat", (path,), {}, INFO)

    async def head(self, path: str) -> ObjectInfo | None:
        return self._hit("head", (path,), {}, INFO)

    async def list_dir(self, path: str, *, max_pages: int | None = None) -> Listing | None:
        return self._hit("list_dir", (path,), {"max_pages": max_pages}, Listing())

    async def walk(self, path: str) -> list[ObjectInfo]:
        return self._hit("walk", (path,), {}, [INFO])

    async def read_range(self, path: str, start: int, end: int, expect: ObjectInfo) -> bytes:
        return self._hit("read_range", (path, start, end, expect), {}, b"x" * (end - start))

    async def read_range_into(self, path: str, start: int, end: int, expect: ObjectInfo, sink: Any) -> None:
        # The sink the retry layer passes on is its own counting wrapper: not recorded.
        feed_sink(sink, self._hit("read_range_into", (path, start, end, expect), {}, b"x" * (end - start)))

    async def put_bytes(self, path: str, data: bytes, **kwargs: Any) -> ObjectInfo:
        return self._hit("put_bytes", (path, data), kwargs, INFO)

    async def put_local_file(self, path: str, local_path: str) -> ObjectInfo:
        return self._hit("put_local_file", (path, local_path), {}, INFO)

    async def delete(self, path: str) -> None:
        self._hit("delete", (path,), {}, None)

    async def copy(self, source_path: str, target_path: str, source: ObjectInfo) -> None:
        self._hit("copy", (source_path, target_path, source), {}, None)

    async def copy_object(self, source_path: str, target_path: str, source: Any, **kwargs: Any) -> ObjectInfo:
        return self._hit("copy_object", (source_path, target_path, source), kwargs, INFO)

    async def make_dir(self, path: str, **kwargs: Any) -> None:
        self._hit("make_dir", (path,), kwargs, None)

    async def remove_dir_marker(self, path: str) -> None:
        self._hit("remove_dir_marker", (path,), {}, None)

    async def start_multipart(self, path: str, **kwargs: Any) -> str:
        return self._hit("start_multipart", (path,), kwargs, "upload-1")

    async def upload_part(self, *args: Any) -> UploadedPart:
        return self._hit("upload_part", args, {}, UploadedPart(args[2], '"e"'))

    async def copy_part(self, *args: Any) -> UploadedPart:
        return self._hit("copy_part", args, {}, UploadedPart(args[2], '"c"'))

    async def complete_multipart(self, path: str, upload_id: str, parts: Any, **kwargs: Any) -> None:
        self._hit("complete_multipart", (path, upload_id, parts), kwargs, None)

    async def abort_multipart(self, path: str, upload_id: str) -> None:
        self._hit("abort_multipart", (path, upload_id), {}, None)

    async def list_versions(self, path: str) -> list[ObjectVersion]:
        return self._hit("list_versions", (path,), {}, [])

    async def set_content_type(self, path: str, content_type: str) -> ObjectInfo:
        return self._hit("set_content_type", (path, content_type), {}, INFO)

    async def update_metadata(self, path: str, metadata: Any, **kwargs: Any) -> ObjectInfo:
        return self._hit("update_metadata", (path, metadata), kwargs, INFO)

    def add_listener(self, callback: Callable[[str], None]) -> None:
        raise AssertionError("the retry layer has its own listeners")

    def health(self) -> dict[str, Any] | None:
        raise AssertionError("the retry layer reports its own health")


PARTS = [UploadedPart(1, '"e"')]
# member -> (how to call it, the call the inner backend must see, how it is guarded)
# "retried": side-effect free, retried on transient failures; "once": one attempt, counted by
# the breaker; "direct": straight through, no breaker.
FORWARDED: dict[str, tuple[Callable[[Any], Any], tuple[Any, ...], dict[str, Any], str]] = {
    "cache_key": (lambda b: b.cache_key("p"), ("p",), {}, "direct"),
    "part_size": (lambda b: b.part_size(99), (99,), {}, "direct"),
    "probe": (lambda b: b.probe(), (), {}, "direct"),
    "aclose": (lambda b: b.aclose(), (), {}, "direct"),
    "stat": (lambda b: b.stat("p"), ("p",), {}, "retried"),
    "head": (lambda b: b.head("p"), ("p",), {}, "retried"),
    "list_dir": (lambda b: b.list_dir("p", max_pages=3), ("p",), {"max_pages": 3}, "retried"),
    "walk": (lambda b: b.walk("p"), ("p",), {}, "retried"),
    "read_range": (lambda b: b.read_range("p", 2, 5, INFO), ("p", 2, 5, INFO), {}, "retried"),
    "read_range_into": (lambda b: b.read_range_into("p", 2, 5, INFO, io.BytesIO()), ("p", 2, 5, INFO), {},
                        "retried"),
    "put_bytes": (
        lambda b: b.put_bytes("p", b"d", content_type="t/x", metadata={"m": "1"}, if_match="e1"),
        ("p", b"d"), {"content_type": "t/x", "metadata": {"m": "1"}, "if_match": "e1", "if_none_match": False},
        "once"),
    "put_local_file": (lambda b: b.put_local_file("p", "/l"), ("p", "/l"), {}, "once"),
    "delete": (lambda b: b.delete("p"), ("p",), {}, "once"),
    "copy": (lambda b: b.copy("p", "q", INFO), ("p", "q", INFO), {}, "once"),
    "copy_object": (lambda b: b.copy_object("p", "q", INFO, if_none_match=True), ("p", "q", INFO),
                    {"mtime": None, "if_match": None, "if_none_match": True}, "once"),
    "make_dir": (lambda b: b.make_dir("p"), ("p",), {}, "once"),
    "remove_dir_marker": (lambda b: b.remove_dir_marker("p"), ("p",), {}, "once"),
    "start_multipart": (lambda b: b.start_multipart("p", content_type="t/x"), ("p",),
                        {"content_type": "t/x", "metadata": None}, "once"),
    "upload_part": (lambda b: b.upload_part("p", "u", 1, b"d"), ("p", "u", 1, b"d"), {}, "once"),
    "copy_part": (lambda b: b.copy_part("p", "u", 1, "s", INFO, 0, 5), ("p", "u", 1, "s", INFO, 0, 5), {},
                  "once"),
    "complete_multipart": (lambda b: b.complete_multipart("p", "u", PARTS, if_none_match=True),
                           ("p", "u", PARTS), {"if_match": None, "if_none_match": True}, "once"),
    "abort_multipart": (lambda b: b.abort_multipart("p", "u"), ("p", "u"), {}, "once"),
    "list_versions": (lambda b: b.list_versions("p"), ("p",), {}, "once"),
    "set_content_type": (lambda b: b.set_content_type("p", "t/y"), ("p", "t/y"), {}, "once"),
    "key_bytes": (lambda b: b.key_bytes("p"), ("p",), {}, "direct"),
    "head_folder": (lambda b: b.head_folder("p"), ("p",), {}, "retried"),
    "update_metadata": (lambda b: b.update_metadata("p", {"m": "1"}, content_type=None, if_match="e"),
                        ("p", {"m": "1"}), {"content_type": None, "if_match": "e"}, "once"),
}
OWN = {"add_listener", "health"}  # the retry layer's own: its breaker
ATTRIBUTES = {"display", "cache_namespace", "capabilities", "min_copy_part"}


def resilient(inner: Recorder, **kw: Any) -> ResilientBackend:
    settings: dict[str, Any] = {"retries": 2, "deadline": 5.0, "base_delay": 0.001, "max_delay": 0.002,
                                "breaker_threshold": 50, **kw}
    policy = ResiliencePolicy(**settings)
    return ResilientBackend(inner, policy, rng=random.Random(1))  # Recorder is a full StorageBackend


def test_every_protocol_member_is_covered_here() -> None:
    assert set(MEMBERS) == set(FORWARDED) | OWN | ATTRIBUTES


def test_resilient_backend_forwards_every_method_with_its_arguments() -> None:
    async def main() -> None:
        inner = Recorder()
        backend = resilient(inner)
        for attribute in ATTRIBUTES:
            assert getattr(backend, attribute) == getattr(inner, attribute), attribute
        for name, (call, args, kwargs, _kind) in FORWARDED.items():
            inner.calls.clear()
            result = call(backend)
            if inspect.isawaitable(result):
                await result
            assert inner.calls == [(name, args, kwargs)], name
        assert backend.health()["state"] == "closed"
        seen: list[str] = []
        backend.add_listener(seen.append)
        backend.breaker.failure(BackendError(errno.EIO, "x", transient=True))
        assert seen == []  # one failure is below the threshold

    trio.run(main)


@pytest.mark.parametrize("name", sorted(n for n, v in FORWARDED.items() if v[3] != "direct"))
def test_which_calls_are_retried_is_unchanged(name: str) -> None:
    call, _args, _kwargs, kind = FORWARDED[name]

    async def main() -> None:
        inner = Recorder()
        backend = resilient(inner)
        inner.fail_next = BackendError(errno.EAGAIN, "503 SlowDown", transient=True)
        if kind == "retried":
            await call(backend)
            assert [c[0] for c in inner.calls] == [name, name]
            assert backend.retries == 1
        else:  # writes (and list_versions, set_content_type): one attempt, the caller decides
            with pytest.raises(BackendError):
                await call(backend)
            assert [c[0] for c in inner.calls] == [name]
            assert backend.retries == 0
        assert backend.breaker.consecutive_failures == (0 if kind == "retried" else 1)

    trio.run(main)


def test_an_open_circuit_stops_every_breaker_guarded_call() -> None:
    async def main() -> None:
        inner = Recorder()
        backend = resilient(inner, breaker_threshold=1, breaker_cooldown=60)
        backend.breaker.failure(BackendError(errno.EIO, "down", transient=True))
        for name, (call, _args, _kwargs, kind) in FORWARDED.items():
            if kind == "direct":
                continue
            with pytest.raises(BackendError) as info:
                await call(backend)
            assert info.value.errno == errno.EIO, name
        assert inner.calls == []

    trio.run(main)
