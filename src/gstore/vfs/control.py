"""The ``.gstore`` control directory at the root of every mount.

Scripts and the ``gstore`` command talk to a running daemon through plain
files, so no socket, port or extra permission model is needed: whoever can use
the mount can ask it.

* ``.gstore/status.json``: a JSON snapshot of the mount (cache, reads,
  uploads, recent errors), generated when it is opened.
* ``.gstore/flush``: reading it uploads everything pending and blocks until it
  is durable; the content is a JSON verdict (``{"ok": true, "failed": []}``).
  Writing paths to it first (one per line, relative to the mount) limits the
  flush to those paths.

``.gstore`` is never listed by readdir and shadows a backend object of that
name at the root of the mount (docs/semantics.md).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

CONTROL_DIR = ".gstore"
STATUS_FILE = "status.json"
FLUSH_FILE = "flush"
CONTROL_FILES = (STATUS_FILE, FLUSH_FILE)


def control_path(name: str | None = None) -> str:
    """The inode-table path of the control directory or one of its files."""
    return CONTROL_DIR if name is None else f"{CONTROL_DIR}/{name}"


def is_control_path(path: str) -> bool:
    return path == CONTROL_DIR or path.startswith(CONTROL_DIR + "/")


@dataclass
class ControlHandle:
    name: str
    content: bytes | None = None
    written: bytearray = field(default_factory=bytearray)


class ControlFiles:
    """Produces the bytes of the control files."""

    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        flush: Callable[[list[str] | None], Awaitable[list[str]]],
    ) -> None:
        self._status = status
        self._flush = flush

    async def read(self, handle: ControlHandle, offset: int, size: int) -> bytes:
        if handle.content is None:
            if handle.name == STATUS_FILE:
                handle.content = (json.dumps(self._status(), indent=2, sort_keys=True) + "\n").encode()
            else:
                text = handle.written.decode("utf-8", "replace")
                paths = [line.strip().strip("/") for line in text.splitlines() if line.strip()]
                paths = ["" if p == "." else p for p in paths]  # "." is the whole mount
                failed = await self._flush(paths or None)
                verdict = {"ok": not failed, "failed": failed, "paths": paths or "all"}
                handle.content = (json.dumps(verdict, indent=2) + "\n").encode()
        return handle.content[offset : offset + size]

    @staticmethod
    def write(handle: ControlHandle, data: bytes) -> int:
        if handle.name != FLUSH_FILE:
            raise PermissionError(13, "read-only control file", handle.name)
        if len(handle.written) + len(data) > 1 << 20:
            raise OSError(27, "too many paths for one flush", handle.name)
        handle.written.extend(data)
        return len(data)
