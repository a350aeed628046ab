"""A lookup on S3 sends its HEAD and its folder probe (a one-key LIST) at once.

Driven through ``S3Backend.stat`` with the request layer replaced by a script
whose HEAD does not answer until the LIST was sent: a lookup that sent them one
after the other would never finish (``fail_after``), so "at once" is observed,
not timed. The answers' meaning is the same as before: an object wins, a
prefix or a marker makes a folder, nothing is ENOENT; errors come through as
the OSError of the request that mattered.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
import trio

from gstore.backends.s3 import S3Backend


class Script:
    """Stands in for ``S3Backend._call``: HEAD waits until the LIST went out."""

    def __init__(self, *, head: Any = None, listing: Any = None, marker_head: Any = None) -> None:
        self.head, self.listing, self.marker_head = head, listing or {}, marker_head
        self.list_sent = trio.Event()
        self.calls: list[tuple[str, str]] = []
        self.cancelled: list[str] = []

    async def __call__(self, method: str, **kwargs: Any) -> Any:
        target = kwargs.get("Key") or kwargs.get("Prefix")
        self.calls.append((method, target))
        try:
            if method == "list_objects_v2":
                self.list_sent.set()
                await trio.sleep(0.01)  # answered after the HEAD: the HEAD's outcome decides
                return self._answer(self.listing)
            if target.endswith("/"):
                return self._answer(self.marker_head)
            with trio.fail_after(5):
                await self.list_sent.wait()
            return self._answer(self.head)
        except trio.Cancelled:
            self.cancelled.append(method)
            raise

    @staticmethod
    def _answer(value: Any) -> Any:
        if isinstance(value, BaseException):
            raise value
        if value is None:
            raise FileNotFoundError(errno.ENOENT, "404")
        return value


def backend_with(script: Script) -> S3Backend:
    backend = S3Backend.__new__(S3Backend)
    backend.bucket, backend.prefix = "bucket", "pre"
    backend._call = script  # type: ignore[method-assign]
    return backend


def run_stat(backend: S3Backend, path: str) -> Any:
    async def bounded() -> Any:
        with trio.fail_after(10):
            return await backend.stat(path)

    return trio.run(bounded)


HEAD = {"ContentLength": 5, "ETag": '"0123456789abcdef0123456789abcdef"', "LastModified": 0, "Metadata": {}}


def test_a_file_is_answered_by_its_head_with_the_probe_sent_alongside() -> None:
    script = Script(head=HEAD, listing=OSError(errno.EIO, "list failed"))
    info = run_stat(backend_with(script), "a/f.txt")
    assert not info.is_dir and info.size == 5
    assert sorted(script.calls) == [("head_object", "pre/a/f.txt"), ("list_objects_v2", "pre/a/f.txt/")]


def test_a_prefix_without_an_object_is_a_folder_in_one_round_trip() -> None:
    script = Script(head=None, listing={"KeyCount": 1, "CommonPrefixes": [{"Prefix": "pre/d/x/"}]})
    info = run_stat(backend_with(script), "d")
    assert info.is_dir


def test_a_marker_object_gives_the_folder_its_attributes() -> None:
    marker = {**HEAD, "ContentLength": 0, "Metadata": {"mode": str(0o40750)}}
    script = Script(head=None, listing={"KeyCount": 1, "Contents": [{"Key": "pre/d/"}]}, marker_head=marker)
    info = run_stat(backend_with(script), "d")
    assert info.is_dir and info.mode is not None and info.mode & 0o777 == 0o750
    assert ("head_object", "pre/d/") in script.calls


def test_nothing_at_all_is_enoent() -> None:
    with pytest.raises(FileNotFoundError):
        run_stat(backend_with(Script(head=None, listing={"KeyCount": 0})), "missing")


def test_a_failed_head_is_the_error_and_cancels_the_probe() -> None:
    script = Script(head=PermissionError(errno.EACCES, "denied"))

    async def slow_list(method: str, **kwargs: Any) -> Any:
        if method == "list_objects_v2":
            script.list_sent.set()
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                script.cancelled.append(method)
                raise
        return await Script.__call__(script, method, **kwargs)

    backend = backend_with(script)
    backend._call = slow_list  # type: ignore[method-assign]
    with pytest.raises(PermissionError):
        run_stat(backend, "f")
    assert script.cancelled == ["list_objects_v2"]


def test_a_failed_probe_matters_when_there_is_no_object() -> None:
    script = Script(head=None, listing=ConnectionResetError(errno.ECONNRESET, "reset"))
    with pytest.raises(ConnectionResetError):
        run_stat(backend_with(script), "d")
