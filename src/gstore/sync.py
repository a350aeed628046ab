"""``gstore sync SRC DST``: make a folder tree the same as another, for gstore mounts and local disks.

Either side is a folder on a gstore mount or a local folder (or a single
file). The work is what rsync's ``-r`` would do for regular files, with the
comparisons a mount answers cheaply:

* which files need a copy is decided per file by ``--skip-if``: by default
  the quick check (same size and same modification time, to the second, as
  rsync's default), or ``exists``, ``size``, ``md5`` (same size and the same
  MD5: the ``user.md5`` xattr on a mount, which is answered from the ETag or
  a remembered digest without reading the object; hashlib on a local disk),
  or ``newer`` (only when the source is newer);
* a copy goes to a temporary name in the destination folder and is renamed
  over the target once complete (a failed copy never leaves a half file, and
  on a mount never uploads one); permissions and modification time follow the
  source where the destination keeps them;
* ``--delete`` removes what the destination has and the source does not
  (never when the source could not be read completely);
* ``--jobs N`` copies and compares N files at once;
* when the destination is on a gstore mount, the sync ends with a flush of the
  destination folder (``MNT/.gstore/flush``), so exit status 0 means every
  copied file is durable in the backend.

Copies between two folders of the same mount are server-side copies: the
sync asks the daemon through ``MNT/.gstore/copy`` and the storage copies the
object (S3 CopyObject), so no byte passes through this host, the copy keeps
the source's attributes, and it never replaces a destination that changed
since it was looked at. A source (or destination) with local changes not
uploaded yet, or a backend without server-side copies, gets an ordinary copy
through the mount instead (``--no-server-copy`` always does that). The
summary says how many files went server-side (docs/sync.md).

Exit status: 0 when everything was copied (and is durable), 1 when anything
failed (a copy, a delete, reading the source, the final flush), 2 for a usage
error.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import secrets
import stat
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from gstore.mounts import gstore_mounts, mount_of

SKIP_MODES = ("exists", "size", "md5", "newer")
_CHUNK = 1024 * 1024
_MD5_XATTR = "user.md5"

DESCRIPTION = (
    "Make DST the same as SRC: copy the files that differ, optionally delete the files DST has and SRC "
    "does not. Either side is a folder (or a file) on a gstore mount or on a local disk; folders are "
    "copied recursively, like rsync -r SRC/ DST/ (the contents of SRC go into DST). Files differ by the "
    "quick check unless --skip-if says otherwise: a different size or modification time (to the second, "
    "as rsync's default). Only regular files are copied (symbolic links and devices are reported and "
    "left out). When DST is on a gstore mount, the sync ends with a flush of DST: exit status 0 means "
    "durable in the backend. See docs/sync.md."
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    parser = sub.add_parser("sync", help="copy what differs from SRC to DST (mounts or local folders), like rsync -r",
                            description=DESCRIPTION)
    parser.add_argument("src", metavar="SRC", help="source folder or file")
    parser.add_argument("dst", metavar="DST", help="destination folder (created if missing) or file")
    parser.add_argument("--skip-if", choices=SKIP_MODES, default=None, metavar="TEST",
                        help="when a file that exists on both sides is left alone: exists (whatever its "
                        "content), size (same size), md5 (same size and MD5; free on mounts from the "
                        "user.md5 xattr), newer (DST is not older than SRC). Default: same size and same "
                        "modification time (rsync's quick check)")
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="print what would be copied and deleted, change nothing")
    parser.add_argument("--delete", action="store_true",
                        help="delete files and folders in DST that SRC does not have (skipped when SRC could "
                        "not be read completely)")
    parser.add_argument("-j", "--jobs", type=_positive, default=4, metavar="N",
                        help="files compared and copied at once (default: 4)")
    parser.add_argument("--no-server-copy", dest="server_copy", action="store_false",
                        help="between two folders of one mount, copy through the mount (read and upload) "
                        "instead of asking the storage to copy")
    parser.add_argument("-q", "--quiet", action="store_true", help="no summary, only errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each file copied or deleted")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError(f"expected 1 to 256, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    return sync(args.src, args.dst, skip_if=args.skip_if, dry_run=args.dry_run, delete=args.delete,
                jobs=args.jobs, quiet=args.quiet, verbose=args.verbose, server_copy=args.server_copy)


# -- the trees ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """A regular file of one side: path relative to the side's root, and what stat said."""

    rel: str
    size: int
    mtime_ns: int
    atime_ns: int
    mode: int


@dataclass
class Tree:
    """What one side holds: regular files, folders, everything else (links, devices), unreadable places."""

    files: dict[str, Entry] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    others: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


def scan(root: str) -> Tree:
    """Everything under ``root`` (not following symbolic links); a missing root is an empty tree."""
    tree = Tree()

    def visit(folder: str, prefix: str) -> None:
        try:
            with os.scandir(folder) as entries:
                found = list(entries)
        except FileNotFoundError:
            if prefix:
                tree.errors.append(f"{folder}: vanished while it was read")
            return
        except OSError as exc:
            tree.errors.append(f"{folder}: {exc.strerror or exc}")
            return
        for entry in found:
            rel = prefix + entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                tree.errors.append(f"{entry.path}: {exc.strerror or exc}")
                continue
            if stat.S_ISDIR(st.st_mode):
                tree.dirs.add(rel)
                visit(entry.path, rel + "/")
            elif stat.S_ISREG(st.st_mode):
                tree.files[rel] = Entry(rel, st.st_size, st.st_mtime_ns, st.st_atime_ns, st.st_mode)
            else:
                tree.others.add(rel)

    visit(root, "")
    return tree


class Side:
    """One end of a sync: a root folder, and the gstore mount holding it (None: a local disk)."""

    def __init__(self, root: str, mounts: list[str]) -> None:
        self.root = root
        found = mount_of(root, mounts)
        self.mount = found[0] if found else None
        self.mount_rel = found[1] if found else None

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def mount_path(self, rel: str) -> str:
        """``rel`` relative to the mount's root (only for a side on a mount)."""
        assert self.mount_rel is not None
        return "/".join(p for p in (self.mount_rel, rel) if p not in ("", "."))

    def md5(self, rel: str) -> str:
        path = self.path(rel)
        if self.mount is not None:
            try:
                return os.getxattr(path, _MD5_XATTR).decode("ascii")
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.ENODATA, errno.ENOSYS):
                    raise  # --no-xattrs mounts answer ENOSYS/ENOTSUP: hash the bytes then
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "md5").hexdigest()

    def describe(self) -> str:
        return f"gstore mount {self.mount}" if self.mount else "local disk"


# -- decisions and copies -----------------------------------------------------------------------------


def _seconds(ns: int) -> int:
    return ns // 1_000_000_000


def needs_copy(src: Side, dst: Side, source: Entry, target: Entry | None, skip_if: str | None) -> bool:
    """Whether ``source`` must be copied over ``target`` (None: missing) under the ``--skip-if`` rule."""
    if target is None:
        return True
    if skip_if == "exists":
        return False
    if skip_if == "size":
        return source.size != target.size
    if skip_if == "newer":
        return _seconds(source.mtime_ns) > _seconds(target.mtime_ns)
    if skip_if == "md5":
        if source.size != target.size:
            return True
        return src.md5(source.rel) != dst.md5(target.rel)
    return source.size != target.size or _seconds(source.mtime_ns) != _seconds(target.mtime_ns)


@dataclass
class Totals:
    checked: int = 0
    copied: int = 0
    skipped: int = 0
    deleted: int = 0
    failed: int = 0
    bytes_copied: int = 0
    server_side: int = 0  # of ``copied``: copied by the storage (no byte through this host)
    bytes_server_side: int = 0
    to_check: int = 0
    failures: list[str] = field(default_factory=list)
    notes: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fail(self, message: str) -> None:
        with self.lock:
            self.failed += 1
            self.failures.append(message)
        print(f"gstore sync: {message}", file=sys.stderr)


def copy_file(source_path: str, target_path: str, entry: Entry, totals: Totals) -> int:
    """Copy through a temporary name next to the target; returns the bytes copied."""
    folder, name = os.path.split(target_path)
    temp_name = f".{name}.gstore-sync-{secrets.token_hex(4)}"
    if len(temp_name.encode("utf-8", "surrogateescape")) > 255:
        temp_name = f".gstore-sync-{secrets.token_hex(8)}"
    temp = os.path.join(folder, temp_name)
    copied = 0
    try:
        with open(source_path, "rb") as fin, open(temp, "xb") as fout:
            while chunk := fin.read(_CHUNK):
                fout.write(chunk)
                copied += len(chunk)
        try:
            os.chmod(temp, stat.S_IMODE(entry.mode))
        except OSError as exc:
            with totals.lock:
                totals.notes.add(f"permissions not kept on the destination ({exc.strerror})")
        try:
            os.utime(temp, ns=(entry.atime_ns, entry.mtime_ns))
        except OSError as exc:
            with totals.lock:
                totals.notes.add(f"modification times not kept on the destination ({exc.strerror})")
        os.replace(temp, target_path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    return copied


# -- progress -------------------------------------------------------------------------------------------


class Progress:
    """One line on stderr, rewritten a few times a second, only when stderr is a terminal."""

    def __init__(self, totals: Totals, enabled: bool) -> None:
        self._totals = totals
        self._enabled = enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._width = 0

    def __enter__(self) -> Progress:
        if self._enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            t = self._totals
            line = (f"gstore sync: {t.checked}/{t.to_check} checked, {t.copied} copied ({_size(t.bytes_copied)}), "
                    f"{t.deleted} deleted, {t.failed} failed")
            self._width = max(self._width, len(line))
            sys.stderr.write("\r" + line.ljust(self._width))
            sys.stderr.flush()


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


# -- the whole sync -----------------------------------------------------------------------------------------


def sync(src: str, dst: str, *, skip_if: str | None = None, dry_run: bool = False, delete: bool = False,
         jobs: int = 4, quiet: bool = False, verbose: bool = False, server_copy: bool = True,
         progress: bool | None = None, out: Callable[[str], None] | None = None) -> int:
    """Run one sync; returns the exit status (0, 1 or 2). ``out`` prints a line of the report."""
    say = out or (lambda line: print(line, flush=True))
    if skip_if is not None and skip_if not in SKIP_MODES:
        print(f"gstore sync: --skip-if must be one of {', '.join(SKIP_MODES)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    src_abs, dst_abs = os.path.abspath(src), os.path.abspath(dst)
    try:
        src_stat = os.stat(src_abs)
    except OSError as exc:
        print(f"gstore sync: {src}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    single = not stat.S_ISDIR(src_stat.st_mode)
    if single and not stat.S_ISREG(src_stat.st_mode):
        print(f"gstore sync: {src}: not a regular file or folder", file=sys.stderr)
        return 2
    if single:
        # One file: DST is the target file, or the folder to put it in.
        name = os.path.basename(src_abs)
        target = os.path.join(dst_abs, name) if os.path.isdir(dst_abs) else dst_abs
        src_root, dst_root = os.path.dirname(src_abs), os.path.dirname(target)
        delete = False
    else:
        src_real, dst_real = os.path.realpath(src_abs), os.path.realpath(dst_abs)
        if src_real == dst_real or dst_real.startswith(src_real.rstrip("/") + "/") \
                or src_real.startswith(dst_real.rstrip("/") + "/"):
            print(f"gstore sync: {src} and {dst} overlap: one is inside the other", file=sys.stderr)
            return 2
        src_root, dst_root = src_abs, dst_abs
        if os.path.exists(dst_abs) and not os.path.isdir(dst_abs):
            print(f"gstore sync: {dst}: not a folder", file=sys.stderr)
            return 2

    mounts = gstore_mounts()
    source, dest = Side(src_root, mounts), Side(dst_root, mounts)
    totals = Totals()
    renamed: dict[str, str] = {}  # one file copied under another name: its name on each side
    if single:
        target_name = os.path.basename(target)
        renamed[name] = target_name
        src_tree, dst_tree = Tree(files={name: _entry(name, src_stat)}), Tree()
        try:
            target_stat = os.stat(target)
        except FileNotFoundError:
            pass
        except OSError as exc:
            print(f"gstore sync: {dst}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        else:
            if not stat.S_ISREG(target_stat.st_mode):
                print(f"gstore sync: {dst}: not a regular file", file=sys.stderr)
                return 2
            dst_tree.files[target_name] = _entry(target_name, target_stat)
        if not dry_run:
            try:
                os.makedirs(dst_root, exist_ok=True)
            except OSError as exc:
                print(f"gstore sync: {dst}: {exc.strerror or exc}", file=sys.stderr)
                return 1
    else:
        src_tree, dst_tree = scan(src_root), scan(dst_root)
    for error in src_tree.errors:
        totals.fail(f"cannot read {error}")
    for error in dst_tree.errors:
        totals.fail(f"cannot read {error}")
    ignored = sorted(src_tree.others)
    for rel in ignored[:20]:
        print(f"gstore sync: skipping {source.path(rel)}: not a regular file", file=sys.stderr)
    if len(ignored) > 20:
        print(f"gstore sync: skipping {len(ignored) - 20} more files that are not regular files", file=sys.stderr)

    # Folders first: each copy then finds its folder (an S3 mount creates a marker for each).
    if not dry_run and not single:
        missing_dirs = sorted(d for d in src_tree.dirs if d not in dst_tree.dirs)
        try:
            os.makedirs(dst_root, exist_ok=True)
        except OSError as exc:
            print(f"gstore sync: {dst}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        for rel in missing_dirs:
            if rel in dst_tree.files or rel in dst_tree.others:
                if not delete:
                    totals.fail(f"{dest.path(rel)}: a file is in the way of the folder")
                    continue
                try:
                    os.unlink(dest.path(rel))
                    dst_tree.files.pop(rel, None)
                    dst_tree.others.discard(rel)
                except OSError as exc:
                    totals.fail(f"cannot delete {dest.path(rel)}: {exc.strerror or exc}")
                    continue
            try:
                os.makedirs(dest.path(rel), exist_ok=True)
            except OSError as exc:
                totals.fail(f"cannot create {dest.path(rel)}: {exc.strerror or exc}")

    items = sorted(src_tree.files.values(), key=lambda e: e.rel)
    totals.to_check = len(items)
    on_server = ServerCopies(dest) if server_copy and source.mount is not None and source.mount == dest.mount \
        else None

    def one(entry: Entry) -> None:
        target_rel = renamed.get(entry.rel, entry.rel)
        target_entry = dst_tree.files.get(target_rel)
        try:
            if target_rel in dst_tree.dirs:
                raise IsADirectoryError(errno.EISDIR, "a folder is in the way of the file")
            copy = needs_copy(source, dest, entry, target_entry, skip_if)
            server_side = False
            if copy and not dry_run:
                if on_server is not None:
                    server_side = on_server.copy(source.mount_path(entry.rel), dest.mount_path(target_rel),
                                                 target_entry is None)
                copied = entry.size if server_side else \
                    copy_file(source.path(entry.rel), dest.path(target_rel), entry, totals)
            else:
                copied = entry.size if copy else 0
        except OSError as exc:
            totals.fail(f"{source.path(entry.rel)} -> {dest.path(target_rel)}: {exc.strerror or exc}")
            with totals.lock:
                totals.checked += 1
            return
        with totals.lock:
            totals.checked += 1
            if copy:
                totals.copied += 1
                totals.bytes_copied += copied
                if server_side:
                    totals.server_side += 1
                    totals.bytes_server_side += copied
            else:
                totals.skipped += 1
        if copy and (verbose or dry_run):
            how = ", server-side" if server_side else ""
            say(f"{'would copy' if dry_run else 'copied'} {target_rel} ({_size(entry.size)}{how})")

    show_progress = sys.stderr.isatty() if progress is None else progress
    with Progress(totals, show_progress and not quiet):
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="gstore-sync") as pool:
            for _ in pool.map(one, items):
                pass

        if delete:
            if src_tree.errors:
                msg = "not deleting anything: the source could not be read completely"
                print(f"gstore sync: {msg}", file=sys.stderr)
                totals.notes.add(msg)
            else:
                _delete_extraneous(dest, src_tree, dst_tree, totals, dry_run=dry_run, verbose=verbose, say=say)

    durable = None
    if dest.mount is not None and not dry_run:
        durable = _flush(dest, totals)

    if not quiet:
        elapsed = time.monotonic() - started
        verb = "would copy" if dry_run else "copied"
        on_storage = (f"; {totals.server_side} server-side, {_size(totals.bytes_server_side)} not through this host"
                      if totals.server_side else "")
        say(f"gstore sync: {totals.checked} files checked: {totals.copied} {verb} ({_size(totals.bytes_copied)}"
            f"{on_storage}), "
            f"{totals.skipped} up to date, {totals.deleted} {'would be ' if dry_run else ''}deleted, "
            f"{totals.failed} failed; {elapsed:.1f} s"
            + (f"; {len(ignored)} not regular files left out" if ignored else "")
            + ("" if durable is None else "; destination durable" if durable else "; destination NOT durable"))
        for note in sorted(totals.notes):
            say(f"gstore sync: note: {note}")
    return 1 if totals.failed else 0


def _entry(rel: str, st: os.stat_result) -> Entry:
    return Entry(rel, st.st_size, st.st_mtime_ns, st.st_atime_ns, st.st_mode)


def _delete_extraneous(dest: Side, src_tree: Tree, dst_tree: Tree, totals: Totals, *, dry_run: bool,
                       verbose: bool, say: Callable[[str], None]) -> None:
    """Remove what DST has and SRC does not: files and links first, then folders, deepest first."""
    extra_dirs = sorted((d for d in dst_tree.dirs if d not in src_tree.dirs), key=lambda d: (-d.count("/"), d))
    extra_files = sorted(r for r in set(dst_tree.files) | dst_tree.others if r not in src_tree.files)
    for rel in extra_files:
        if rel in src_tree.dirs:
            continue  # replaced by a folder above (or failed there)
        if not dry_run:
            try:
                os.unlink(dest.path(rel))
            except FileNotFoundError:
                pass
            except OSError as exc:
                totals.fail(f"cannot delete {dest.path(rel)}: {exc.strerror or exc}")
                continue
        totals.deleted += 1
        if verbose or dry_run:
            say(f"{'would delete' if dry_run else 'deleted'} {rel}")
    for rel in extra_dirs:
        if not dry_run:
            try:
                os.rmdir(dest.path(rel))
            except FileNotFoundError:
                pass
            except OSError as exc:
                totals.fail(f"cannot delete folder {dest.path(rel)}: {exc.strerror or exc}")
                continue
        totals.deleted += 1
        if verbose or dry_run:
            say(f"{'would delete' if dry_run else 'deleted'} {rel}/")


class ServerCopies:
    """Copies inside one mount, made by the storage: one request to ``MNT/.gstore/copy`` per file.

    Shared by the worker threads; ``available`` only ever goes from True to False
    (a daemon without the control file), so a stale read costs one failed open.
    """

    def __init__(self, side: Side) -> None:
        assert side.mount is not None
        self._control = os.path.join(side.mount, ".gstore", "copy")
        self.available = True

    def copy(self, source: str, target: str, target_missing: bool) -> bool:
        """True when the storage copied ``source`` to ``target`` (mount-relative paths); False when
        the caller must copy through the mount (pending local changes, no server-side copy);
        OSError when the copy failed, or the target changed since it was looked at."""
        if not self.available:
            return False
        request = f"{source}\0{target}" + ("\0absent" if target_missing else "")
        try:
            fd = os.open(self._control, os.O_RDWR)
        except FileNotFoundError:
            self.available = False  # a daemon from before .gstore/copy
            return False
        try:
            os.write(fd, request.encode("utf-8", "surrogateescape"))
            chunks, offset = [], 0
            while chunk := os.pread(fd, 65536, offset):
                chunks.append(chunk)
                offset += len(chunk)
        finally:
            os.close(fd)
        verdict = json.loads(b"".join(chunks) or b"{}")
        if verdict.get("ok"):
            return True
        if verdict.get("fallback"):
            return False
        code = int(verdict.get("errno") or errno.EIO)
        raise OSError(code, verdict.get("error") or os.strerror(code))


def _flush(dest: Side, totals: Totals) -> bool:
    """Upload what is pending under the destination and wait (``.gstore/flush``); True when durable."""
    assert dest.mount is not None
    rel = dest.mount_rel if dest.mount_rel not in (None, "") else "."
    control = os.path.join(dest.mount, ".gstore", "flush")
    try:
        fd = os.open(control, os.O_RDWR)
    except OSError as exc:
        totals.fail(f"cannot flush {dest.mount}: {exc.strerror or exc}")
        return False
    try:
        os.write(fd, (rel + "\n").encode("utf-8", "surrogateescape"))
        chunks, offset = [], 0
        while chunk := os.pread(fd, 65536, offset):
            chunks.append(chunk)
            offset += len(chunk)
    except OSError as exc:
        totals.fail(f"cannot flush {dest.mount}: {exc.strerror or exc}")
        return False
    finally:
        os.close(fd)
    verdict = json.loads(b"".join(chunks) or b"{}")
    for failure in verdict.get("failed", []):
        totals.fail(f"not durable: {failure}")
    return bool(verdict.get("ok"))


__all__ = ["SKIP_MODES", "Entry", "Side", "Tree", "add_parser", "needs_copy", "run", "scan", "sync"]
