"""Command-line entry points: ``gstore-mount`` and ``gstore``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gstore import __version__
from gstore.config import ConfigError, build_mount_request, find_config, load_config


def mount_main(argv: Sequence[str] | None = None) -> int:
    """``gstore-mount [options] SPEC MOUNTPOINT``."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        request = build_mount_request(args)
    except ConfigError as exc:
        print(f"gstore-mount: {exc}", file=sys.stderr)
        return 2
    from gstore import daemon

    return daemon.run(request)


def main(argv: Sequence[str] | None = None) -> int:
    """``gstore SUBCOMMAND``: management commands."""
    parser = argparse.ArgumentParser(prog="gstore", description="Manage gstore mounts.")
    parser.add_argument("--version", action="version", version=f"gstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate the configuration file and list its mounts")
    check.add_argument("--config", help="configuration file (default: the usual lookup order)")
    status = sub.add_parser("status", help="show cache, read and upload state of running mounts")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.add_argument("mountpoints", nargs="*", help="mount points (default: every gstore mount)")
    flush = sub.add_parser("flush", help="upload everything pending (or PATHs) and wait until durable")
    flush.add_argument("mountpoint")
    flush.add_argument("paths", nargs="*", help="files or directories inside the mount (default: all)")
    args = parser.parse_args(argv)

    if args.command == "status":
        return _status(args.mountpoints, as_json=args.json)
    if args.command == "flush":
        return _flush(args.mountpoint, args.paths)

    if args.command == "check-config":
        try:
            path = find_config(args.config)
            if path is None:
                print("no configuration file found; built-in mounts: local:, memory:")
                return 0
            mounts = load_config(path)
        except ConfigError as exc:
            print(f"gstore: {exc}", file=sys.stderr)
            return 2
        print(f"{path}: OK, {len(mounts)} mount(s)")
        for name, entry in sorted(mounts.items()):
            print(f"  {name}: {entry.get('protocol', '?')}://{entry.get('root', '')}")
        return 0
    return 2


def gstore_mounts() -> list[str]:
    """Mount points of the running gstore mounts (from /proc/mounts)."""
    found = []
    with open("/proc/mounts", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "fuse.gstore":
                found.append(fields[1].replace("\\040", " "))
    return found


def _status(mountpoints: list[str], *, as_json: bool) -> int:
    import json
    import os

    targets = mountpoints or gstore_mounts()
    if not targets:
        print("no gstore mounts are running")
        return 0
    results, code = {}, 0
    for mountpoint in targets:
        try:
            with open(os.path.join(mountpoint, ".gstore", "status.json"), encoding="utf-8") as f:
                results[mountpoint] = json.load(f)
        except OSError as exc:
            print(f"gstore: {mountpoint}: not a running gstore mount ({exc.strerror})", file=sys.stderr)
            code = 1
    if as_json:
        print(json.dumps(results if len(targets) > 1 or not mountpoints else next(iter(results.values()), {}),
                         indent=2))
        return code
    for mountpoint, st in results.items():
        cache, reads, uploads = st["cache"], st["reads"], st["uploads"]
        ratio = "n/a" if cache["hit_ratio"] is None else f"{100 * cache['hit_ratio']:.1f}%"
        print(f"{mountpoint}: {st['backend']} (mount {st['mount']}, pid {st['pid']}, up {st['uptime_s']:.0f}s"
              f"{', read-only' if st['read_only'] else ''})")
        print(f"  cache     {cache['used'] / 2**20:,.1f} of {cache['capacity'] / 2**20:,.0f} MiB in {cache['blocks']} blocks,"
              f" hit ratio {ratio}, {cache['evictions']} evictions  ({cache['dir']})")
        print(f"  reads     {reads['bytes_fetched'] / 2**20:,.1f} MiB fetched in {reads['fetches']} requests"
              f" ({reads['prefetches']} prefetches), {reads['hit_bytes'] / 2**20:,.1f} MiB served from cache")
        if uploads.get("enabled"):
            print(f"  uploads   {uploads['pending']} pending, {uploads['failing']} failing, {uploads['uploaded']} done"
                  f" ({uploads['bytes_uploaded'] / 2**20:,.1f} MiB sent, "
                  f"{uploads['bytes_copied_server_side'] / 2**20:,.1f} MiB copied server-side)")
            for entry in uploads["pending_paths"][:20]:
                print(f"    pending {entry['path']} ({entry['size']} bytes)")
            for entry in uploads["failed_paths"][:20]:
                print(f"    FAILING {entry['path']}: {entry['error']} (attempt {entry['attempts']})")
        for error in st["recent_errors"][-5:]:
            print(f"  error     {error['time']} {error['op']} {error['target']}: {error['errno']} {error['error']}")
    return code


def _flush(mountpoint: str, paths: list[str]) -> int:
    import json
    import os

    root = os.path.realpath(mountpoint)
    relative = []
    for path in paths:
        full = os.path.realpath(path if os.path.isabs(path) else os.path.join(os.getcwd(), path))
        if full != root and not full.startswith(root + os.sep):
            print(f"gstore: {path} is not inside {mountpoint}", file=sys.stderr)
            return 2
        relative.append(os.path.relpath(full, root) if full != root else "")
    control = os.path.join(root, ".gstore", "flush")
    try:
        fd = os.open(control, os.O_RDWR if relative else os.O_RDONLY)
    except OSError as exc:
        print(f"gstore: {mountpoint}: not a running gstore mount ({exc.strerror})", file=sys.stderr)
        return 2
    try:
        if relative:
            os.write(fd, ("\n".join(p or "." for p in relative) + "\n").encode())
        chunks, offset = [], 0
        while chunk := os.pread(fd, 65536, offset):  # from the start, whatever was written
            chunks.append(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    verdict = json.loads(b"".join(chunks) or b"{}")
    if verdict.get("ok"):
        return 0
    for failure in verdict.get("failed", []):
        print(f"gstore: not durable: {failure}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
