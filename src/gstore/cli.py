"""Command-line entry points: ``gstore-mount`` and ``gstore``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gstore import __version__
from gstore.config import ConfigError, build_mount_request, find_config, load_config
from gstore.mounts import gstore_mounts


def mount_main(argv: Sequence[str] | None = None) -> int:
    """``gstore-mount [options] SPEC MOUNTPOINT``."""
    args = list(sys.argv[1:] if argv is None else argv)
    _help_or_version(args)
    _prepare_mountpoint(args)
    try:
        request = build_mount_request(args)
    except ConfigError as exc:
        print(f"gstore-mount: {exc}", file=sys.stderr)
        return 2
    _warn_if_not_empty(request.mountpoint)
    from gstore import daemon

    return daemon.run(request)


def _help_or_version(args: list[str]) -> None:
    """``--help`` and ``--version``: print once and exit 0 (SystemExit), before anything else runs.

    The parser is the one that validates the real command line, plus ``--version``;
    any other mistake is left for :func:`build_mount_request` to report.
    """
    from gstore.config import build_arg_parser

    parser = build_arg_parser()
    parser.add_argument("--version", action="version", version=f"gstore-mount {__version__}",
                        help="print the version and exit")
    try:
        parser.parse_intermixed_args(args)
    except ConfigError:
        pass


def _warn_if_not_empty(mountpoint: object) -> None:
    """Mounting on a folder that has files hides them (FUSE allows it): say so, once, on stderr."""
    import os

    path = os.fspath(mountpoint)  # type: ignore[call-overload]
    try:
        if os.path.ismount(path):
            print(f"gstore-mount: warning: {path} is already a mount point; the new mount hides it "
                  "until it is unmounted", file=sys.stderr)
            return
        with os.scandir(path) as entries:
            first = next(entries, None)
    except OSError:
        return  # the daemon reports a mount point it cannot use
    if first is not None:
        print(f"gstore-mount: warning: {path} is not empty; its files (such as {first.name!r}) are hidden "
              "while the mount is active and come back after unmounting", file=sys.stderr)


def _prepare_mountpoint(args: list[str]) -> None:
    """Before validation: create a derived mount point, and clear a dead gstore mount left on it.

    A daemon that was killed (or crashed) leaves its mount behind, answering
    ENOTCONN; without this, a restart (systemd's Restart=on-failure, a reboot
    of the service) would fail on it. Only a mount that /proc/mounts shows as
    gstore's own is touched, and only when it is dead.
    """
    import errno
    import os
    import subprocess

    import contextlib
    import io

    from gstore.config import planned_mountpoint

    # planned_mountpoint parses the command line too: whatever argparse prints
    # there (help, usage) is printed once, by build_mount_request, not twice.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        planned = planned_mountpoint(args)
    if planned is None:
        return  # build_mount_request reports the problem
    path, derived = planned
    try:
        os.stat(path)
    except FileNotFoundError:
        if derived:
            try:
                os.makedirs(path, mode=0o755, exist_ok=True)
            except OSError as exc:
                print(f"gstore-mount: cannot create the mount point {path}: {exc.strerror}", file=sys.stderr)
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN or str(path) not in gstore_mounts():
            return
        print(f"gstore-mount: {path} is a dead gstore mount (its daemon ended without unmounting); "
              "unmounting it", file=sys.stderr)
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)


def main(argv: Sequence[str] | None = None) -> int:
    """``gstore SUBCOMMAND``: management commands."""
    parser = argparse.ArgumentParser(prog="gstore", description="Manage gstore mounts.")
    parser.add_argument("--version", action="version", version=f"gstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate the configuration file and list its mounts")
    check.add_argument("--config", help="configuration file (default: the usual lookup order)")
    status = sub.add_parser("status", help="show cache, read and upload state of running mounts")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.add_argument("mountpoints", nargs="*", metavar="MOUNTPOINT",
                        help="mount points (default: every gstore mount in /proc/mounts)")
    status.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="give up on a mount that does not answer within SECONDS (default: 10)")
    flush = sub.add_parser("flush", help="upload everything pending (or PATHs) and wait until durable")
    flush.add_argument("mountpoint")
    flush.add_argument("paths", nargs="*", help="files or directories inside the mount (default: all)")
    serve = sub.add_parser(
        "serve", help="serve a folder (typically a gstore mount) over HTTP: GET/HEAD with ranges and ETags",
        description="Serve the files of a folder over HTTP (GET and HEAD, Range, conditional requests). "
        "ETag and Content-Type come from the user.etag and user.mimetype xattrs of a gstore mount. "
        "One access log line per request on stderr; SIGINT/SIGTERM stop it cleanly. See docs/serve.md.")
    serve.add_argument("folder", metavar="MOUNTPOINT|PATH", help="the folder to serve")
    serve.add_argument("--bind", default="127.0.0.1:8080", metavar="HOST:PORT",
                       help="address to listen on: HOST:PORT, [IPV6]:PORT or PORT; port 0 picks a free one "
                       "(default: 127.0.0.1:8080)")
    serve.add_argument("--list", action="store_true",
                       help="answer a directory without index.html with an HTML listing (default: 404)")
    serve.add_argument("--dotfiles", action="store_true",
                       help="serve names starting with '.' (.concat/..., .versions/...); .gstore never "
                       "(default: 404)")
    serve.add_argument("--no-sendfile", action="store_true",
                       help="never use sendfile, even for files on local disks (default: sendfile for local "
                       "disk file systems, threaded pread for FUSE and others)")
    serve.add_argument("--threads", type=int, default=16, metavar="N",
                       help="threads for blocking file system calls (default: 16)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       type=str.upper, help="INFO logs one line per request (default: INFO)")
    args = parser.parse_args(argv)

    if args.command == "serve":
        from gstore import serve as serve_module

        return serve_module.run(args.folder, bind=args.bind, listing=args.list, dotfiles=args.dotfiles,
                                sendfile=False if args.no_sendfile else None, threads=args.threads,
                                log_level=args.log_level)

    if args.command == "status":
        return _status(args.mountpoints, as_json=args.json, timeout=args.timeout)
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


def _read_status(mountpoint: str, timeout: float) -> dict:
    """The mount's .gstore/status.json; OSError if unreadable, TimeoutError if it does not answer."""
    import json
    import os
    import threading

    outcome: list = []

    def read() -> None:
        try:
            with open(os.path.join(mountpoint, ".gstore", "status.json"), encoding="utf-8") as f:
                outcome.append(json.load(f))
        except (OSError, ValueError) as exc:
            outcome.append(exc)

    worker = threading.Thread(target=read, daemon=True)  # a hung mount must not hang `gstore status`
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise TimeoutError(f"no answer within {timeout:g}s (daemon stuck or stopped?)")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _status(mountpoints: list[str], *, as_json: bool, timeout: float = 10.0) -> int:
    import json

    targets = mountpoints or gstore_mounts()
    if not targets:
        print("no gstore mounts are running")
        return 0
    results, code = {}, 0
    for mountpoint in targets:
        try:
            results[mountpoint] = _read_status(mountpoint, timeout)
        except TimeoutError as exc:
            print(f"gstore: {mountpoint}: {exc}", file=sys.stderr)
            code = 1
        except OSError as exc:
            hint = " (a dead mount: its daemon ended; fusermount3 -u it)" if exc.errno == 107 else ""
            print(f"gstore: {mountpoint}: not a running gstore mount ({exc.strerror}){hint}", file=sys.stderr)
            code = 1
        except ValueError as exc:
            print(f"gstore: {mountpoint}: unreadable status ({exc})", file=sys.stderr)
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
        if st.get("config") or st.get("log"):
            print(f"  config    {st.get('config') or '(none)'}; log {st.get('log') or 'stderr'}"
                  f"{'; per-request debug on' if st.get('debug_requests') else ''}")
        print(f"  cache     {cache['used'] / 2**20:,.1f} of {cache['capacity'] / 2**20:,.0f} MiB in {cache['blocks']} blocks,"
              f" hit ratio {ratio}, {cache['evictions']} evictions  ({cache['dir']})")
        print(f"  reads     {reads['bytes_fetched'] / 2**20:,.1f} MiB fetched in {reads['fetches']} requests"
              f" ({reads['prefetches']} prefetches), {reads['hit_bytes'] / 2**20:,.1f} MiB served from cache")
        health = st.get("backend_health")
        if health:
            print(f"  backend   {health['state']}, {health['retries']} retries, {health['failed_operations']} failed,"
                  f" breaker opened {health['times_opened']}x"
                  + (f"; last error: {health['last_error']}" if health.get("last_error") else ""))
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

    for path in (mountpoint, *paths):
        # A name that does not exist has nothing to flush (a deletion is never pending:
        # unlink deletes in the backend at once): a typo must not pass for "durable".
        try:
            os.lstat(path)
        except FileNotFoundError:
            print(f"gstore: {path}: no such file or directory", file=sys.stderr)
            return 2
        except OSError as exc:
            if path == mountpoint:
                continue  # ENOTCONN and the like: reported below, with a hint
            print(f"gstore: {path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
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
