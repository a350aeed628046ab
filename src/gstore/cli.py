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
    flush = sub.add_parser(
        "flush", help="upload everything pending (or PATHs) and wait until durable",
        description="Upload what is pending (everything, or PATHs) and wait until it is durable. One line "
        "per file that is not, its name quoted. Exit status: 0 all durable; 2 usage error or not a "
        "gstore mount; 3 --timeout reached; 4 uploads failed or parked (refused by the backend); "
        "5 conflicts (our version saved under a .conflict- name); 128+N stopped by signal N "
        "(Ctrl-C: 130). Several at once: 4, then 3, then 5.")
    flush.add_argument("mountpoint")
    flush.add_argument("paths", nargs="*", help="files or directories inside the mount (default: all)")
    flush.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                       help="give up after SECONDS, exit 3 (default: wait until durable or failed)")
    flush.add_argument("--retry", action="store_true",
                       help="try parked uploads (refused by the backend) again (default: report them)")
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
    from gstore import refresh as refresh_module

    refresh_module.add_parser(sub)
    from gstore import sync as sync_module

    sync_module.add_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "sync":
        return sync_module.run(args)
    if args.command == "refresh":
        return refresh_module.run(args)
    if args.command == "serve":
        from gstore import serve as serve_module

        return serve_module.run(args.folder, bind=args.bind, listing=args.list, dotfiles=args.dotfiles,
                                sendfile=False if args.no_sendfile else None, threads=args.threads,
                                log_level=args.log_level)

    if args.command == "status":
        return _status(args.mountpoints, as_json=args.json, timeout=args.timeout)
    if args.command == "flush":
        if args.timeout is not None and not 0 <= args.timeout < 1e9:
            parser.error("flush --timeout: expected a number of seconds, 0 or more")
        return _flush(args.mountpoint, args.paths, timeout=args.timeout, retry=args.retry)

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
        conn = st.get("connectivity") or {}
        if conn.get("state") == "offline":
            print(f"  OFFLINE   since {conn.get('since')}: {conn.get('serving')}")
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
                state = "PARKED " if entry.get("parked") else "FAILING"
                print(f"    {state} {json.dumps(entry['path'])}: {entry['error']} (attempt {entry['attempts']})")
        queue = st.get("namespace_queue") or {}
        if queue.get("queued") or queue.get("not_applied"):
            print(f"  queued    {queue['queued']} namespace change(s) waiting for the backend"
                  + (f" (last error: {queue['last_error']})" if queue.get("last_error") else ""))
            for change in queue.get("changes", [])[:20]:
                print(f"    {change['kind']} {json.dumps(change['path'])}")
            for change in queue.get("not_applied", [])[-5:]:
                print(f"    NOT APPLIED {change['kind']} {json.dumps(change['path'])}: {change['detail']}")
        for error in st["recent_errors"][-5:]:
            print(f"  error     {error['time']} {error['op']} {error['target']}: {error['errno']} {error['error']}")
    return code


FLUSH_TIMED_OUT, FLUSH_FAILED, FLUSH_CONFLICT = 3, 4, 5
FLUSH_POLL = 0.5  # seconds one read of .gstore/flush waits at most


class _FlushInterrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _flush(mountpoint: str, paths: list[str], *, timeout: float | None = None, retry: bool = False) -> int:
    import json
    import os
    import signal
    import time

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
    # A NUL, then JSON: any name (even with a newline) and the options, in one write. With
    # "poll", each read returns within that time ({"running": true} until the verdict):
    # never stuck in one long read, a signal or our own timeout is acted on within it.
    request = b"\0" + json.dumps({"paths": relative or None, "retry": retry, "timeout": timeout,
                                   "poll": FLUSH_POLL}).encode()

    def interrupted(signum: int, frame: object) -> None:
        raise _FlushInterrupted(signum)

    previous = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, interrupted)
    except ValueError:  # not the main thread: the default handling stays
        pass
    # The daemon gives up at --timeout by itself; a stuck daemon does not hold us much longer.
    give_up = None if timeout is None else time.monotonic() + timeout + 10
    try:
        try:
            fd = os.open(control, os.O_RDWR)
        except OSError as exc:
            print(f"gstore: {mountpoint}: not a running gstore mount ({exc.strerror})", file=sys.stderr)
            return 2
        try:
            os.write(fd, request)
            while True:
                chunks, offset = [], 0
                while chunk := os.pread(fd, 65536, offset):  # from the start, whatever was written
                    chunks.append(chunk)
                    offset += len(chunk)
                verdict = json.loads(b"".join(chunks) or b"{}")
                if not verdict.get("running"):
                    break
                if give_up is not None and time.monotonic() > give_up:
                    print(f"gstore: timed out: no verdict from the daemon of {mountpoint} within {timeout:g}s",
                          file=sys.stderr)
                    return FLUSH_TIMED_OUT
        finally:
            os.close(fd)  # an unfinished flush in the daemon stops waiting
    except _FlushInterrupted as stop:
        name = signal.Signals(stop.signum).name
        print(f"gstore: flush stopped by {name}; what is pending stays queued and is uploaded in the "
              "background (gstore status shows it)", file=sys.stderr)
        return 128 + stop.signum
    except OSError as exc:
        print(f"gstore: {mountpoint}: the flush failed: {exc}", file=sys.stderr)
        return FLUSH_FAILED
    except ValueError as exc:
        print(f"gstore: {mountpoint}: unreadable answer from the daemon ({exc})", file=sys.stderr)
        return FLUSH_FAILED
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    code, lines = flush_outcome(verdict)
    for line in lines:
        print(line, file=sys.stderr)
    return code


def _quote(name: str) -> str:
    """A name on one line, quoted like a JSON string (a newline in it cannot split the line;
    bytes that are not UTF-8 show as escapes)."""
    import json

    return json.dumps(name, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8")


def flush_outcome(verdict: dict) -> tuple[int, list[str]]:
    """The exit status and the lines to print for a flush verdict of the daemon."""
    if verdict.get("error"):  # the daemon could not run the flush: our request (2) or its failure (4)
        return (2 if verdict.get("usage") else FLUSH_FAILED), [f"gstore: {verdict['error']}"]
    files = verdict.get("files")
    if files is None:  # a daemon that answers with plain lines only
        failed = verdict.get("failed") or []
        return (0 if not failed else FLUSH_FAILED), [f"gstore: not durable: {line}" for line in failed]
    lines, states = [], set()
    for entry in files:
        state = entry.get("state")
        states.add(state)
        path = _quote(entry["path"]) if entry.get("path") is not None else "(unknown file)"
        error = " ".join(str(entry.get("error") or "").split())  # one line, whatever the backend said
        if state == "parked":
            lines.append(f"gstore: parked: {path}: {error} (refused by the backend; kept locally, not retried "
                         "until `gstore flush --retry` or a remount)")
        elif state == "failed":
            lines.append(f"gstore: failed: {path}: {error} (kept locally; retried in the background)")
        elif state == "timed out":
            lines.append(f"gstore: timed out: {path}: {error}")
        elif state == "conflict":
            saved = entry.get("saved_as")
            if saved:
                lines.append(f"gstore: conflict: {path}: changed on the backend since this mount read it; "
                             f"this mount's version was saved as {_quote(saved)}")
            else:
                lines.append(f"gstore: conflict: {path}: {error}")
        else:
            lines.append(f"gstore: not durable: {path}: {error}")
            states.add("failed")
    if states & {"parked", "failed"}:
        return FLUSH_FAILED, lines
    if "timed out" in states:
        return FLUSH_TIMED_OUT, lines
    if "conflict" in states:
        return FLUSH_CONFLICT, lines
    return 0, lines


if __name__ == "__main__":
    sys.exit(main())
