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


__all__ = ["gstore_mounts"]
