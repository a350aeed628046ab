"""Which gstore mounts this machine has (from /proc/mounts), for the commands that act on them."""

from __future__ import annotations

import re


def _unescape_mount_field(text: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def gstore_mounts() -> list[str]:
    """Mount points of the gstore mounts in /proc/mounts (of this mount namespace)."""
    found = []
    with open("/proc/mounts", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3 and fields[2] in ("fuse.gstore", "fuse.gstore-mount"):
                found.append(_unescape_mount_field(fields[1]))
    return found


def mount_of(path: str, mounts: list[str] | None = None) -> tuple[str, str] | None:
    """``(mount point, path relative to it)`` of the gstore mount holding ``path``
    (``"."`` for the mount point itself), or None when no gstore mount does.

    The path need not exist (a name the mount believes missing can still be
    refreshed). It is matched as given (made absolute), then with symlinks
    resolved; nested mounts: the innermost wins.
    """
    import os

    candidates = gstore_mounts() if mounts is None else mounts
    for form in (os.path.abspath(path), os.path.realpath(path)):
        best = None
        for mountpoint in candidates:
            root = mountpoint.rstrip("/") or "/"
            if form == root or form.startswith(root.rstrip("/") + "/"):
                if best is None or len(root) > len(best):
                    best = root
        if best is not None:
            return best, os.path.relpath(form, best)
    return None


__all__ = ["gstore_mounts", "mount_of"]
