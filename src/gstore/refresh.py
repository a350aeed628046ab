"""``gstore refresh PATH...``: make mounts forget what they know about some paths.

A thin client of the ``.gstore/refresh`` control file (see
:mod:`gstore.vfs.refresh` for what is forgotten): the paths are grouped by
the gstore mount holding them, written to that mount's control file, and the
JSON verdict read back. Scripts without this command write the paths
themselves: ``printf '%s\\n' dir/a dir/b > MNT/.gstore/refresh``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from gstore.mounts import mount_of

DESCRIPTION = (
    "Drop what a gstore mount remembers about PATHs (attributes, folder listings, \"does not exist\" answers, "
    "the kernel's cached copies), so the next access sees the backend as it is now: for objects changed "
    "behind the mount's back. A folder is refreshed with everything below it; the mount point refreshes the "
    "whole mount. Pending writes are never dropped. PATHs need not exist. See docs/refresh.md."
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    parser = sub.add_parser("refresh", help="forget cached metadata of PATHs so the next access asks the backend",
                            description=DESCRIPTION)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files or folders on gstore mounts")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each refreshed path")
    return parser


def run(args: argparse.Namespace) -> int:
    return refresh(args.paths, verbose=args.verbose)


def refresh(paths: list[str], *, verbose: bool = False) -> int:
    """0: every path refreshed; 1: a mount refused some; 2: a path is on no gstore mount."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        found = mount_of(path)
        if found is None:
            print(f"gstore: {path} is not on a gstore mount", file=sys.stderr)
            return 2
        mountpoint, relative = found
        groups.setdefault(mountpoint, []).append(relative)
    code = 0
    for mountpoint, relatives in groups.items():
        try:
            verdict = request(mountpoint, relatives)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EACCES):
                print(f"gstore: {mountpoint}: this mount's daemon does not take refresh requests "
                      f"({exc.strerror}): remount it with this version of gstore", file=sys.stderr)
            else:
                hint = " (a dead mount: its daemon ended; fusermount3 -u it)" if exc.errno == errno.ENOTCONN else ""
                print(f"gstore: {mountpoint}: not a running gstore mount ({exc.strerror or exc}){hint}",
                      file=sys.stderr)
            code = max(code, 1)
            continue
        for error in verdict.get("errors", []):
            print(f"gstore: {mountpoint}: {error}", file=sys.stderr)
        if not verdict.get("ok"):
            code = max(code, 1)
        if verbose:
            for path in verdict.get("refreshed", []):
                print(os.path.join(mountpoint, path) if path != "." else mountpoint)
    return code


def request(mountpoint: str, relatives: list[str]) -> dict:
    """Write ``relatives`` to ``MOUNTPOINT/.gstore/refresh`` and return the verdict."""
    fd = os.open(os.path.join(mountpoint, ".gstore", "refresh"), os.O_RDWR)
    try:
        os.write(fd, ("\n".join(relatives) + "\n").encode("utf-8", "surrogateescape"))
        chunks, offset = [], 0
        while chunk := os.pread(fd, 65536, offset):
            chunks.append(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    return json.loads(b"".join(chunks) or b"{}")


__all__ = ["add_parser", "refresh", "request", "run"]
