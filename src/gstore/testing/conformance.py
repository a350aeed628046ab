"""Standard file-system conformance suites (fsx, pjdfstest) against a real gstore mount.

Used by ``scripts/conformance`` (``python -m gstore.testing.conformance``) and by
``tests/fuse/test_conformance.py``.

The suites were written by other projects and are not part of gstore: their sources
live beside the repository (``REPO/../shared/conformance``, or wherever
``$GSTORE_CONFORMANCE_SRC`` points), and they are built into a cache directory outside
the repository (default ``~/.cache/gstore-conformance``).

* fsx: the 8-run matrix (s1..s8), each run on a new file of one gstore mount, then
  16 persistence checks: the checksum of every final file read through the mount must
  equal the object in the bucket after unmounting (pending uploads drain), and what a
  fresh mount with an empty cache reads.
* pjdfstest: every ``.t`` file (or the ones asked for) run from a fresh directory on a
  mount with ``allow_other``; each file's TAP output is parsed and scored.

Everything that touches the mount (the suites' programs, checksums, mkdir) runs in a
child process of our own with a timeout, so a hung mount cannot stall the harness;
a child that times out is killed through the process group we created for it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KiB = 1024
MiB = 1024 * KiB

ENV_SOURCES = "GSTORE_CONFORMANCE_SRC"

# name, fsx flags, what it stresses (the matrix of shared/conformance/README.md)
FSX_MATRIX: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("s1", ("-N", "2000", "-S", "1"), "all ops incl. mmap, 256 KiB file"),
    ("s2", ("-N", "2000", "-S", "2"), "same, other seed"),
    ("s3", ("-N", "2000", "-S", "3", "-R", "-W"), "no mmap"),
    ("s4", ("-N", "1000", "-S", "4", "-c", "8"), "close + reopen with probability 1/8"),
    ("s5", ("-N", "1000", "-S", "5", "-c", "8", "-R", "-W"), "same without mmap"),
    ("s6", ("-N", "1000", "-S", "6", "-f"), "fsync + cache invalidation after I/O"),
    ("s7", ("-N", "300", "-S", "7", "-l", "16777216", "-o", "1048576"), "16 MiB file, ops up to 1 MiB"),
    ("s8", ("-N", "200", "-S", "8", "-l", "16777216", "-o", "1048576", "-c", "5"), "same with close + reopen"),
)

FSX_CFLAGS = ("-O2", "-D_GNU_SOURCE", "-DFALLOCATE", "-DHAVE_COPY_FILE_RANGE", "-include", "getopt.h")

DEFAULT_FSX_TIMEOUT = 900.0  # seconds per fsx run
DEFAULT_PJD_TIMEOUT = 300.0  # seconds per pjdfstest .t file
DEFAULT_MOUNT_TIMEOUT = 30.0  # seconds for a mount to appear
DEFAULT_DRAIN_TIMEOUT = 300.0  # seconds gstore-mount may drain uploads at unmount
DEFAULT_IO_TIMEOUT = 300.0  # seconds for one checksum / mkdir through the mount

Progress = Callable[[str], None]


class ConformanceError(Exception):
    """Setup failed (sources missing, build failed, mount failed): no score."""


class SourcesMissing(ConformanceError):
    pass


class BuildError(ConformanceError):
    pass


class MountError(ConformanceError):
    pass


def _quiet(_: str) -> None:
    pass


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


# --------------------------------------------------------------------------- locations


def repo_root() -> Path:
    """The repository this module was imported from (src/gstore/testing/conformance.py)."""
    return Path(__file__).resolve().parents[3]


def default_sources() -> Path:
    return repo_root().parent / "shared" / "conformance"


def locate_sources(explicit: str | os.PathLike[str] | None = None, need: Sequence[str] = ("fsx", "pjdfstest")) -> Path:
    """The shared/conformance folder: ``explicit``, else $GSTORE_CONFORMANCE_SRC, else
    REPO/../shared/conformance. Raises SourcesMissing unless the suites in ``need`` are there."""
    if explicit:
        where, why = Path(explicit), "given explicitly"
    elif os.environ.get(ENV_SOURCES):
        where, why = Path(os.environ[ENV_SOURCES]), f"${ENV_SOURCES}"
    else:
        where, why = default_sources(), "REPO/../shared/conformance"
    markers = {"fsx": Path("fsx") / "fsx.c", "pjdfstest": Path("pjdfstest") / "configure.ac"}
    missing = [str(where / markers[name]) for name in need if not (where / markers[name]).is_file()]
    if missing:
        raise SourcesMissing(
            f"conformance sources not found ({why}: {where}); missing {', '.join(missing)}. "
            f"Put a copy of shared/conformance beside the repository or set {ENV_SOURCES}."
        )
    return where.resolve()


def default_build_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gstore-conformance"


def _check_build_dir(build_dir: Path) -> None:
    root = repo_root()
    resolved = build_dir.resolve()
    if resolved == root or root in resolved.parents:
        raise ConformanceError(f"build dir {build_dir} is inside the repository: build the suites outside it")


def _fingerprint(root: Path, extra: Iterable[str] = ()) -> str:
    digest = hashlib.sha256()
    for item in extra:
        digest.update(item.encode() + b"\0")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _run_build_step(cmd: Sequence[str], cwd: Path, log: Path, timeout: float) -> None:
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        except FileNotFoundError as exc:
            raise BuildError(f"{cmd[0]} is not installed ({exc}); run scripts/setup") from None
        except subprocess.TimeoutExpired:
            raise BuildError(f"{' '.join(cmd)} took more than {timeout:.0f}s (log: {log})") from None
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed with status {proc.returncode} in {cwd}:\n"
                         f"{_tail(log.read_text(errors='replace'), 30)}")


def build_fsx(sources: Path, build_dir: Path, progress: Progress = _quiet) -> Path:
    """Compile fsx (one C file) into ``build_dir``; reused while the sources are unchanged."""
    _check_build_dir(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    src = sources / "fsx"
    binary, stamp = build_dir / "fsx", build_dir / "fsx.stamp"
    fingerprint = _fingerprint(src, FSX_CFLAGS)
    if binary.is_file() and stamp.is_file() and stamp.read_text().strip() == fingerprint:
        return binary
    progress(f"building fsx into {binary}")
    tmp = build_dir / f".fsx.{os.getpid()}"
    log = build_dir / "fsx-build.log"
    log.write_text("")
    try:
        _run_build_step(["gcc", *FSX_CFLAGS, "-I", str(src), str(src / "fsx.c"), "-o", str(tmp)], build_dir, log, 300)
        os.replace(tmp, binary)  # atomic: a concurrent build of the same sources is harmless
    finally:
        tmp.unlink(missing_ok=True)
    stamp.write_text(fingerprint + "\n")
    return binary


def build_pjdfstest(sources: Path, build_dir: Path, progress: Progress = _quiet) -> Path:
    """Copy pjdfstest into ``build_dir`` and build it with autotools; returns the built tree
    (binary ``pjdfstest`` and the ``tests`` folder side by side, as its scripts expect)."""
    _check_build_dir(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    src = sources / "pjdfstest"
    target = build_dir / "pjdfstest"
    stamp = target / ".gstore-conformance-stamp"
    fingerprint = _fingerprint(src)
    if (target / "pjdfstest").is_file() and stamp.is_file() and stamp.read_text().strip() == fingerprint:
        return target
    progress(f"building pjdfstest into {target} (autoreconf, configure, make)")
    tmp = build_dir / f".pjdfstest.{os.getpid()}"
    log = build_dir / "pjdfstest-build.log"
    log.write_text("")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp, symlinks=True)
        for path in [tmp, *tmp.rglob("*")]:  # the shared copy is read-only; autotools writes beside it
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o200)
        _run_build_step(["autoreconf", "-ifs"], tmp, log, 600)
        _run_build_step(["./configure"], tmp, log, 600)
        _run_build_step(["make", "-j2"], tmp, log, 600)
        if not (tmp / "pjdfstest").is_file():
            raise BuildError(f"make did not produce {tmp / 'pjdfstest'}")
        (tmp / stamp.name).write_text(fingerprint + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- child processes


@dataclass
class ChildResult:
    returncode: int | None
    output: str
    timed_out: bool
    duration: float


def run_child(cmd: Sequence[str], *, timeout: float, cwd: str | os.PathLike[str] | None = None,
              env: dict[str, str] | None = None, stdin: int | None = subprocess.DEVNULL) -> ChildResult:
    """Run ``cmd`` in a new process group of its own; on timeout, SIGKILL that group
    (only our child and what it started) and return what it printed so far."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # stuck in the kernel (a dead FUSE request): give up on it
            out = b""
    except BaseException:
        _kill_group(proc)
        raise
    return ChildResult(proc.returncode, out.decode(errors="replace"), timed_out, time.monotonic() - started)


def _kill_group(proc: subprocess.Popen) -> None:
    # The group's id is our child's pid (start_new_session=True): it holds our child and its
    # descendants only.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


_HASH_SCRIPT = r"""
import hashlib, os, sys
try:
    fd = os.open(sys.argv[1], os.O_RDONLY)
except OSError as exc:
    sys.exit(f"open: {exc.strerror} ({exc.errno})")
try:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # ask gstore, not the kernel's page cache
except OSError:
    pass
h, n = hashlib.sha256(), 0
while True:
    try:
        chunk = os.read(fd, 1 << 20)
    except OSError as exc:
        sys.exit(f"read at offset {n}: {exc.strerror} ({exc.errno})")
    if not chunk:
        break
    h.update(chunk)
    n += len(chunk)
print(h.hexdigest(), n)
"""


def checksum_via_mount(path: Path, timeout: float = DEFAULT_IO_TIMEOUT) -> tuple[str, int]:
    """(sha256, size) of a file read through the mount, in a child process with a timeout."""
    res = run_child([sys.executable, "-c", _HASH_SCRIPT, str(path)], timeout=timeout)
    if res.timed_out:
        raise OSError(f"{path.name}: reading it took more than {timeout:.0f}s (killed)")
    if res.returncode != 0:
        raise OSError(f"{path.name}: {_tail(res.output, 1)}")
    digest, size = res.output.split()[-2:]
    return digest, int(size)


def mkdir_via_mount(path: Path, timeout: float = DEFAULT_IO_TIMEOUT) -> None:
    res = run_child(["mkdir", "-p", "--", str(path)], timeout=timeout)
    if res.timed_out or res.returncode != 0:
        raise OSError(f"mkdir {path} failed: {'timed out' if res.timed_out else _tail(res.output, 3)}")


# --------------------------------------------------------------------------- S3 and mounts


def write_mount_config(path: Path, endpoint: str, bucket: str, name: str = "conformance") -> Path:
    """A config file for ``bucket`` of ``endpoint``; private (0600), as gstore wants files
    holding credentials, even the local endpoint's fake ones."""
    text = (
        f'[mounts.{name}]\nprotocol = "s3"\nroot = "{bucket}"\n'
        f'[mounts.{name}.options]\nendpoint_url = "{endpoint}"\n'
        'key = "testing-key-id"\nsecret = "testing-secret-value"\n'
        'client_kwargs = { region_name = "us-east-1" }\n'
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
    return path


def daemon_env() -> dict[str, str]:
    """The environment of the daemon: no AWS profile, no metadata service, no proxy for 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_PROFILE", "AWS_ENDPOINT_URL"))}
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    no_proxy = ",".join(x for x in (env.get("NO_PROXY", ""), "127.0.0.1,localhost") if x)
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    return env


class GstoreMount:
    """One ``gstore-mount -f`` subprocess that we start and stop ourselves (by PID)."""

    def __init__(self, endpoint: str, bucket: str, work: Path, name: str, *, args: Sequence[str] = (),
                 log_level: str = "INFO", cache_dir: Path | None = None,
                 drain_timeout: float = DEFAULT_DRAIN_TIMEOUT) -> None:
        self.endpoint, self.bucket, self.name = endpoint, bucket, name
        self.path = work / f"mnt-{name}"
        self.cache_dir = cache_dir or work / f"cache-{name}"
        self.log_path = work / f"daemon-{name}.log"
        self.config_path = work / f"mounts-{name}.toml"
        self.args = list(args)
        self.log_level = log_level
        self.drain_timeout = drain_timeout
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.stop_duration: float | None = None
        self.killed = False

    def command(self) -> list[str]:
        return [sys.executable, "-c", "import sys; from gstore.cli import mount_main; sys.exit(mount_main())",
                "-f", "--config", str(self.config_path), "--cache-dir", str(self.cache_dir),
                "--log-level", self.log_level, "--drain-timeout", f"{self.drain_timeout:g}",
                *self.args, "conformance:", str(self.path)]

    def start(self, wait: float = DEFAULT_MOUNT_TIMEOUT) -> GstoreMount:
        self.path.mkdir(parents=True, exist_ok=True)
        write_mount_config(self.config_path, self.endpoint, self.bucket)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=daemon_env(), start_new_session=True)
        deadline = time.monotonic() + wait
        while not os.path.ismount(self.path):
            if self.process.poll() is not None:
                raise MountError(f"gstore-mount exited with {self.process.returncode} before mounting:\n"
                                 f"{_tail(self.log(), 30)}")
            if time.monotonic() > deadline:
                self.stop()
                raise MountError(f"the mount did not appear within {wait:.0f}s:\n{_tail(self.log(), 30)}")
            time.sleep(0.05)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and os.path.ismount(self.path)

    def stop(self) -> int | None:
        """SIGTERM (pending uploads drain), wait, SIGKILL if it outlives the drain, and make
        sure nothing stays mounted. Returns the daemon's exit status."""
        proc = self.process
        if proc is None:
            return None
        started = time.monotonic()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.drain_timeout + 60)
            except subprocess.TimeoutExpired:
                self.killed = True
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False, capture_output=True, timeout=60)
        if self.stop_duration is None:
            self.stop_duration = time.monotonic() - started
        self.returncode = proc.returncode
        return self.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_errors(self, context: int = 15) -> list[str]:
        """Tracebacks and 'failed unexpectedly' lines of the daemon's log (each with what follows)."""
        lines = self.log().splitlines()
        found: list[str] = []
        i = 0
        while i < len(lines):
            if "Traceback" in lines[i] or "failed unexpectedly" in lines[i]:
                found.append("\n".join(lines[max(0, i - 1): i + context]))
                i += context
            else:
                i += 1
        return found

    def __enter__(self) -> GstoreMount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalEndpoint:
    """The project's local S3 endpoint (moto) on 127.0.0.1, any free port."""

    def __init__(self) -> None:
        from gstore.testing.s3server import S3TestServer

        self.server = S3TestServer(host="127.0.0.1", port=0)
        self.client: Any = None

    def __enter__(self) -> LocalEndpoint:
        self.server.start()
        self.client = self.server.client()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    @property
    def url(self) -> str:
        return self.server.endpoint_url

    def bucket(self, name: str) -> str:
        self.client.create_bucket(Bucket=name)
        return name


def bucket_checksum(client: Any, bucket: str, key: str) -> tuple[str, int] | None:
    """(sha256, size) of an object, or None when there is no such object."""
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
    except Exception as exc:  # botocore's ClientError (NoSuchKey), without importing botocore here
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        if code in ("NoSuchKey", "404"):
            return None
        raise
    h, n = hashlib.sha256(), 0
    while chunk := body.read(MiB):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


# --------------------------------------------------------------------------- fsx


@dataclass
class FsxRun:
    name: str
    flags: list[str]
    file: str
    passed: bool = False
    returncode: int | None = None
    timed_out: bool = False
    duration: float = 0.0
    operations: int | None = None  # operations done (the failing one included)
    first_failure: str | None = None
    failure_detail: list[str] = field(default_factory=list)
    failed_operation: str | None = None  # the last entry of fsx's operation log
    unsupported: list[str] = field(default_factory=list)  # switched off: the file system said EOPNOTSUPP
    other_disabled: list[str] = field(default_factory=list)  # switched off for another reason
    output_tail: str = ""
    log_file: str | None = None

    def summary(self) -> str:
        if self.passed:
            return "ok"
        where = f" at op {self.operations}" if self.operations else ""
        op = f" ({self.failed_operation})" if self.failed_operation else ""
        return f"{self.first_failure or 'failed'}{where}{op}"


@dataclass
class PersistenceCheck:
    file: str
    against: str  # "bucket" or "fresh mount"
    passed: bool
    expected: str | None  # sha256 through the first mount
    got: str | None
    detail: str
    # For a failed run: does what was found equal fsx's own model of the file at its failure
    # (the .fsxgood file it saves)? None: no model (the run passed) or nothing found.
    matches_fsx_model: bool | None = None


_UNSUPPORTED_RE = re.compile(r"does not support (?:fallocate mode )?(.+?),? disabling!?")
_FAILURE_RE = re.compile(
    r"^(READ BAD DATA|Size error|short |do\w+|check_\w+|writefileimage|save_buffer"
    r"|main: (?:error|short|lseek|ftruncate))"
)
_LOG_ENTRY_RE = re.compile(r"^(\d+)\(\s*\d+ mod 256\): (.*)$")


def parse_fsx_output(text: str) -> dict[str, Any]:
    """What fsx switched off, its first failure and the operation it failed at."""
    lines = text.splitlines()
    unsupported, other = [], []
    for line in lines:
        if "disabling" not in line:
            continue
        m = _UNSUPPORTED_RE.search(line)
        if m:
            what = m.group(1).strip()
            if "fallocate mode" in line:
                what = "fallocate" if what == "0" else f"fallocate {what}"
            unsupported.append(what)
        else:
            other.append(line.removeprefix("main: ").strip())
    dump = next((i for i, line in enumerate(lines) if line.startswith("LOG DUMP (")), None)
    before = lines if dump is None else lines[:dump]
    start = next((i for i, line in enumerate(before) if _FAILURE_RE.match(line)), None)
    if start is None and dump is not None:
        start = max(0, dump - 1)
    detail = before[start: start + 8] if start is not None else []
    operations = None
    if dump is not None:
        m = re.match(r"LOG DUMP \((\d+) total operations\)", lines[dump])
        operations = int(m.group(1)) if m else None
    entries: list[str] = []
    for line in lines[dump or 0:]:
        if (m := _LOG_ENTRY_RE.match(line)):
            entries.append(re.sub(r"\s+", " ", m.group(2).strip()))
        elif entries and line.startswith("\t") and line.strip():  # e.g. "\t\tCLOSE/OPEN" after an op
            entries[-1] += f", then {line.strip()}"
    return {
        "unsupported": unsupported,
        "other_disabled": other,
        "first_failure": detail[0].strip() if detail else None,
        "failure_detail": detail,
        "operations": operations,
        "failed_operation": entries[-1] if dump is not None and entries else None,
    }


def fsx_compiled_out(fsx: Path) -> list[str]:
    """Operations left out of this fsx build: fsx compiles clone, dedupe and exchange range
    only when the headers define their ioctls, and then says so when the file system refuses
    them; a build without them skips them silently, so look for that message in the binary."""
    try:
        binary = fsx.read_bytes()
    except OSError:
        return []
    return [name for name in ("clone range", "dedupe range", "exchange range")
            if f"does not support {name}".encode() not in binary]


def run_fsx(fsx: Path, target: Path, name: str, flags: Sequence[str], log_dir: Path,
            timeout: float = DEFAULT_FSX_TIMEOUT) -> FsxRun:
    """One fsx run on ``target`` (created new); its .fsxlog/.fsxgood files go to ``log_dir``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    run = FsxRun(name=name, flags=list(flags), file=target.name)
    res = run_child([str(fsx), *flags, "-P", str(log_dir), str(target)], timeout=timeout, cwd=log_dir)
    run.returncode, run.timed_out, run.duration = res.returncode, res.timed_out, res.duration
    parsed = parse_fsx_output(res.output)
    run.unsupported, run.other_disabled = parsed["unsupported"], parsed["other_disabled"]
    run.passed = res.returncode == 0 and not res.timed_out and "operations completed A-OK" in res.output
    if not run.passed:
        run.operations = parsed["operations"]
        run.failed_operation = parsed["failed_operation"]
        run.failure_detail = parsed["failure_detail"]
        if res.timed_out:
            run.first_failure = f"timed out after {timeout:.0f}s (killed)"
        else:
            run.first_failure = parsed["first_failure"] or f"exit status {res.returncode}"
            if run.first_failure.startswith("docloseopen: drop_caches") and os.getuid() != 0:
                run.first_failure += " (fsx -c writes /proc/sys/vm/drop_caches: run as root)"
    run.output_tail = _tail(res.output, 40)
    (log_dir / f"{target.name}.out").write_text(res.output)
    run.log_file = str(log_dir / f"{target.name}.out")
    return run


@dataclass
class FsxSuiteResult:
    runs: list[FsxRun] = field(default_factory=list)
    persistence: list[PersistenceCheck] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    other_disabled: list[str] = field(default_factory=list)
    compiled_out: list[str] = field(default_factory=list)  # operations this fsx build cannot do at all
    daemon_errors: list[str] = field(default_factory=list)
    daemon_exit: dict[str, int | None] = field(default_factory=dict)
    setup_error: str | None = None
    durations: dict[str, float] = field(default_factory=dict)
    work_dir: str = ""

    @property
    def passed(self) -> bool:
        return (self.setup_error is None and bool(self.runs) and all(r.passed for r in self.runs)
                and len(self.persistence) == 2 * len(self.runs) and all(c.passed for c in self.persistence))

    def failed_run_details(self) -> list[str]:
        """For each failed run, what fsx printed last (its operation log): for failure messages,
        beside format_fsx()'s table."""
        return [f"fsx {r.name} ({' '.join(r.flags)}) FAILED: {r.summary()}\n"
                f"  tail of its output ({r.log_file}):\n{_indent(r.output_tail)}"
                for r in self.runs if not r.passed]


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def fsx_suite(fsx: Path, endpoint: str, bucket: str, client: Any, work: Path, *,
              runs: Sequence[tuple[str, Sequence[str], str]] = FSX_MATRIX, mount_args: Sequence[str] = (),
              timeout: float = DEFAULT_FSX_TIMEOUT, io_timeout: float = DEFAULT_IO_TIMEOUT,
              mount_timeout: float = DEFAULT_MOUNT_TIMEOUT, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
              log_level: str = "INFO", progress: Progress = _quiet) -> FsxSuiteResult:
    """The fsx matrix on one mount of ``bucket``, then the persistence checks: every final
    file read through that mount == the object after unmounting == a fresh mount's read."""
    result = FsxSuiteResult(work_dir=str(work), compiled_out=fsx_compiled_out(fsx))
    work.mkdir(parents=True, exist_ok=True)
    log_dir = work / "fsx-logs"
    names = [f"fsx-{name}.bin" for name, _, _ in runs]
    through_mount: dict[str, tuple[str, int] | str] = {}  # file -> (sha256, size) or an error
    started = time.monotonic()
    mounts: list[GstoreMount] = []
    try:
        m = GstoreMount(endpoint, bucket, work, "fsx", args=mount_args, log_level=log_level,
                        drain_timeout=drain_timeout)
        mounts.append(m)
        m.start(wait=mount_timeout)
        for (name, flags, _), fname in zip(runs, names):
            if not m.alive():
                run = FsxRun(name=name, flags=list(flags), file=fname, first_failure="not run: the mount is gone")
            else:
                run = run_fsx(fsx, m.path / fname, name, flags, log_dir, timeout)
            result.runs.append(run)
            progress(f"fsx {name:<3} {'ok  ' if run.passed else 'FAIL'} {run.duration:6.1f}s  {run.summary()}")
        for fname in names:
            try:
                through_mount[fname] = checksum_via_mount(m.path / fname, io_timeout)
            except OSError as exc:
                through_mount[fname] = str(exc)
        models = {r.file: _local_checksum(log_dir / f"{r.file}.fsxgood") for r in result.runs if not r.passed}
        result.durations["runs"] = time.monotonic() - started
        t0 = time.monotonic()
        result.daemon_exit["first mount"] = m.stop()
        result.durations["unmount (drain)"] = time.monotonic() - t0
        if m.killed:
            result.daemon_errors.append(f"the first mount did not exit within {drain_timeout + 60:.0f}s of SIGTERM")

        for fname in names:
            expected = through_mount[fname]
            try:
                got = bucket_checksum(client, bucket, fname)
            except Exception as exc:
                result.persistence.append(PersistenceCheck(fname, "bucket", False, _sha(expected), None,
                                                           f"cannot read the object: {exc}"))
                continue
            result.persistence.append(_with_model(_compare(fname, "bucket", expected, got, "no object in the bucket"),
                                                  models.get(fname)))

        t0 = time.monotonic()
        fresh = GstoreMount(endpoint, bucket, work, "fsx-fresh", args=mount_args, log_level=log_level,
                            cache_dir=work / "cache-fsx-fresh", drain_timeout=drain_timeout)
        mounts.append(fresh)
        fresh.start(wait=mount_timeout)
        for fname in names:
            try:
                got2: tuple[str, int] | None = checksum_via_mount(fresh.path / fname, io_timeout)
                error = ""
            except OSError as exc:
                got2, error = None, str(exc)
            result.persistence.append(_with_model(_compare(fname, "fresh mount", expected=through_mount[fname],
                                                           got=got2, missing=error or "unreadable"),
                                                  models.get(fname)))
        result.daemon_exit["fresh mount"] = fresh.stop()
        result.durations["fresh mount checks"] = time.monotonic() - t0
    except (ConformanceError, OSError) as exc:
        result.setup_error = str(exc)
    finally:
        for mnt in mounts:
            mnt.stop()
            result.daemon_errors.extend(mnt.log_errors())
        result.durations["total"] = time.monotonic() - started
    for run in result.runs:
        result.unsupported += [u for u in run.unsupported if u not in result.unsupported]
        result.other_disabled += [u for u in run.other_disabled if u not in result.other_disabled]
    return result


def _local_checksum(path: Path) -> tuple[str, int] | None:
    """(sha256, size) of a local file; None if it is missing or empty (fsx leaves its
    .fsxgood empty unless the run failed)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return (hashlib.sha256(data).hexdigest(), len(data)) if data else None


def _with_model(check: PersistenceCheck, model: tuple[str, int] | None) -> PersistenceCheck:
    if model is not None and check.got is not None:
        check.matches_fsx_model = check.got == model[0]
        check.detail += ("; it equals fsx's model at the failure (.fsxgood)" if check.matches_fsx_model
                         else f"; fsx's model at the failure (.fsxgood) is {model[1]} bytes sha256 {model[0][:16]}")
    return check


def _sha(value: tuple[str, int] | str | None) -> str | None:
    return value[0] if isinstance(value, tuple) else None


def _compare(fname: str, against: str, expected: tuple[str, int] | str, got: tuple[str, int] | None,
             missing: str) -> PersistenceCheck:
    if not isinstance(expected, tuple):
        has = (f"{against} has {got[1]} bytes sha256 {got[0][:16]}" if got is not None
               else f"{against}: {missing}")
        return PersistenceCheck(fname, against, False, None, _sha(got),
                                f"no reference, the first mount could not read it ({expected}); {has}")
    if got is None:
        return PersistenceCheck(fname, against, False, expected[0], None, missing)
    if got == expected:
        return PersistenceCheck(fname, against, True, expected[0], got[0], f"{got[1]} bytes, same sha256")
    return PersistenceCheck(fname, against, False, expected[0], got[0],
                            f"differs: the first mount read {expected[1]} bytes sha256 {expected[0][:16]}, "
                            f"{against} has {got[1]} bytes sha256 {got[0][:16]}")


# --------------------------------------------------------------------------- pjdfstest


@dataclass
class TapFile:
    file: str  # relative to the tests folder, e.g. "chmod/00.t"
    passed: bool = False
    planned: int | None = None
    ok: int = 0
    not_ok: int = 0
    todo: int = 0  # "not ok ... # TODO": expected failures, not counted against the file
    missing: int = 0  # planned but never printed
    not_applicable: bool = False  # the script exited at once (require/quick_exit)
    bail_out: str | None = None  # "Bail out!" and the line before it
    error: str | None = None  # the harness could not run it (its folder, the mount gone)
    returncode: int | None = None
    timed_out: bool = False
    duration: float = 0.0
    first_failure: str | None = None
    failures: list[str] = field(default_factory=list)  # the first few "not ok" lines
    output_tail: str = ""


_TAP_RE = re.compile(r"^(not ok|ok)\b\s*(\d+)?(.*)$")


def parse_tap(name: str, text: str) -> TapFile:
    result = TapFile(file=name)
    seen = 0
    for raw in text.splitlines():
        line = raw.strip()
        plan = re.match(r"^1\.\.(\d+)", line)
        if plan and result.planned is None:
            result.planned = int(plan.group(1))
            continue
        m = _TAP_RE.match(line)
        if not m:
            continue
        seen += 1
        todo = re.search(r"#\s*TODO", m.group(3), re.IGNORECASE) is not None
        if m.group(1) == "ok":
            result.ok += 1
        elif todo:
            result.todo += 1
        else:
            result.not_ok += 1
            if len(result.failures) < 20:
                result.failures.append(line)
    result.missing = max(0, (result.planned or 0) - seen)
    lines = text.splitlines()
    for i, raw in enumerate(lines):
        if raw.startswith("Bail out!"):
            why = raw.removeprefix("Bail out!").strip() or (lines[i - 1].strip() if i else "")
            result.bail_out = f"Bail out! {why}".strip()
            break
    result.first_failure = result.failures[0] if result.failures else None
    result.not_applicable = text.split() == ["1..1", "ok", "1"]  # require()/quick_exit: nothing to test here
    return result


def list_pjdfstest_files(tests_dir: Path, selection: Sequence[str] = ()) -> list[str]:
    """The .t files to run, relative to ``tests_dir`` ("chmod/00.t"). ``selection`` entries
    may be a folder ("chmod"), a file ("chmod/00.t") or a path into any copy of the tests."""
    def key(rel: str) -> tuple:
        return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", rel))

    every = sorted((str(p.relative_to(tests_dir)) for p in tests_dir.rglob("*.t")), key=key)
    if not selection:
        return every
    chosen: list[str] = []
    for item in selection:
        parts = Path(item).parts
        if "tests" in parts:  # .../pjdfstest/tests/chmod/00.t
            parts = parts[len(parts) - 1 - parts[::-1].index("tests") + 1:]
        rel = "/".join(parts).strip("/")
        matches = [f for f in every if f == rel or (rel and f.startswith(rel + "/")) or not rel]
        if not matches:
            raise ConformanceError(f"no pjdfstest file matches {item!r} (under {tests_dir})")
        chosen += [f for f in matches if f not in chosen]
    return chosen


_TRIED_RE = re.compile(r"tried '([^']*)', expected (.*?), got (.*)$")
_ERRNO_LIKE = re.compile(r"^(0|E[A-Z0-9]+)(\|(0|E[A-Z0-9]+))*$")


def failure_cause(t: TapFile) -> str:
    """A coarse key for grouping failing files by their first failure: the syscall and
    the errno it returned, or the stat fields that came back different."""
    if t.error:
        return t.error
    if t.timed_out:
        return "timed out"
    if t.first_failure:
        m = _TRIED_RE.search(t.first_failure)
        if not m:
            return "a check without detail (test_check: compares stat fields, sizes or times)"
        words = m.group(1).split()
        who = []
        while len(words) > 1 and words[0] in ("-u", "-g", "-U"):  # pjdfstest's uid/gid/umask options
            who.append(words[0])
            words = words[2:]
        op = words[0] if words else "?"
        as_other = " (as another uid)" if "-u" in who else ""
        expected, got = m.group(2).strip(), m.group(3).strip() or "(nothing)"
        if _ERRNO_LIKE.match(expected) and _ERRNO_LIKE.match(got):
            return f"{op}{as_other}: expected {expected}, got {got}"
        if _ERRNO_LIKE.match(got) and got != "0":
            return f"{op}{as_other}: failed with {got}"
        fields = next((w for w in words[2:] if re.fullmatch(r"[a-z_]+(,[a-z_]+)*", w)), "")
        return f"{op} {fields}{as_other}: a different value".replace("  ", " ")
    if t.bail_out:
        return "bailed out"
    if t.planned is None:
        return "no TAP plan printed"
    if t.missing:
        return f"stopped early (exit status {t.returncode})"
    return f"exit status {t.returncode}"


@dataclass
class PjdSuiteResult:
    files: list[TapFile] = field(default_factory=list)
    setup_error: str | None = None
    daemon_errors: list[str] = field(default_factory=list)
    daemon_exit: int | None = None
    fs_type: str | None = None
    kernel_options: str | None = None  # as /proc/mounts shows them
    mount_args: list[str] = field(default_factory=list)
    duration: float = 0.0
    work_dir: str = ""

    @property
    def passed(self) -> bool:
        return self.setup_error is None and bool(self.files) and all(f.passed for f in self.files)

    def totals(self) -> dict[str, int]:
        return {
            "files": len(self.files),
            "files_passed": sum(f.passed for f in self.files),
            "files_not_applicable": sum(f.not_applicable for f in self.files),
            "planned": sum(f.planned or 0 for f in self.files),
            "ok": sum(f.ok for f in self.files),
            "not_ok": sum(f.not_ok for f in self.files),
            "todo": sum(f.todo for f in self.files),
            "missing": sum(f.missing for f in self.files),
        }

    def by_cause(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for f in self.files:
            if not f.passed:
                groups.setdefault(failure_cause(f), []).append(f.file)
        return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))


def pjdfstest_suite(pjd: Path, endpoint: str, bucket: str, work: Path, *, selection: Sequence[str] = (),
                    mount_args: Sequence[str] = (), default_permissions: bool = False,
                    timeout: float = DEFAULT_PJD_TIMEOUT, io_timeout: float = DEFAULT_IO_TIMEOUT,
                    mount_timeout: float = DEFAULT_MOUNT_TIMEOUT, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
                    log_level: str = "INFO", progress: Progress = _quiet) -> PjdSuiteResult:
    """Each selected .t file, run by sh from its own fresh folder inside a fresh run folder
    on a mount with allow_other; each file's TAP parsed and scored."""
    tests_dir = pjd / "tests"
    files = list_pjdfstest_files(tests_dir, selection)
    args = ["--allow-other", *(["--default-permissions"] if default_permissions else []), *mount_args]
    result = PjdSuiteResult(mount_args=args, work_dir=str(work))
    work.mkdir(parents=True, exist_ok=True)
    out_dir = work / "pjdfstest-out"
    out_dir.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    started = time.monotonic()
    m = GstoreMount(endpoint, bucket, work, "pjdfstest", args=args, log_level=log_level, drain_timeout=drain_timeout)
    try:
        m.start(wait=mount_timeout)
        entry = _mount_entry(m.path)
        if entry:
            result.fs_type, result.kernel_options = entry
        run_dir = m.path / f"pjdfstest-{_dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
        mkdir_via_mount(run_dir, io_timeout)
        for i, rel in enumerate(files, 1):
            if not m.alive():
                result.files.append(TapFile(file=rel, error="not run: the mount is gone"))
                progress(f"[{i}/{len(files)}] {rel}: FAIL (not run: the mount is gone)")
                continue
            where = run_dir / rel.replace("/", "_").removesuffix(".t")
            try:
                mkdir_via_mount(where, io_timeout)
            except OSError as exc:
                result.files.append(TapFile(file=rel, error=f"cannot make its folder on the mount: {exc}"))
                progress(f"[{i}/{len(files)}] {rel}: FAIL (cannot make its folder: {exc})")
                continue
            res = run_child(["/bin/sh", str(tests_dir / rel)], timeout=timeout, cwd=where, env=env)
            t = parse_tap(rel, res.output)
            t.returncode, t.timed_out, t.duration = res.returncode, res.timed_out, res.duration
            t.passed = (not res.timed_out and res.returncode == 0 and t.planned is not None
                        and t.not_ok == 0 and t.missing == 0 and t.ok + t.todo == t.planned)
            t.output_tail = _tail(res.output, 15)
            (out_dir / (rel.replace("/", "_") + ".out")).write_text(res.output)
            result.files.append(t)
            verdict = "ok  " if t.passed else "FAIL"
            detail = "" if t.passed else f"  {failure_cause(t)}: {t.first_failure or t.output_tail[-200:]}"
            progress(f"[{i}/{len(files)}] {rel:<22} {verdict} {t.ok}/{t.planned or '?'} {t.duration:5.1f}s"
                     f"{shorten_names(detail)}")
    except (ConformanceError, OSError) as exc:
        result.setup_error = str(exc)
    finally:
        result.daemon_exit = m.stop()
        result.daemon_errors = m.log_errors()
        result.duration = time.monotonic() - started
    return result


def _mount_entry(path: Path) -> tuple[str, str] | None:
    """(type, options) of the mount at ``path``, from /proc/self/mounts."""
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[1].replace("\\040", " ") == target:
                    return fields[2], fields[3]
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- reporting


def shorten_names(text: str, longest: int = 100) -> str:
    """pjdfstest's long names (255 bytes, paths near PATH_MAX) shortened for a readable table."""
    def cut(m: re.Match[str]) -> str:
        word = m.group(0)
        return f"{word[:20]}...({len(word)} chars)" if len(word) > longest else word
    return re.sub(r"[^\s']+", cut, text)


def format_fsx(res: FsxSuiteResult) -> str:
    out = ["== fsx: the 8-run matrix on one gstore mount (local S3 endpoint) =="]
    if res.setup_error:
        out.append(f"SETUP ERROR: {res.setup_error}")
    out.append(f"{'run':<4} {'flags':<40} {'result':<6} {'time':>7}  first failure")
    for r in res.runs:
        out.append(f"{r.name:<4} {' '.join(r.flags):<40} {'pass' if r.passed else 'FAIL':<6} {r.duration:6.1f}s  "
                   f"{'' if r.passed else r.summary()}")
    passed = sum(r.passed for r in res.runs)
    out.append(f"runs: {passed}/{len(res.runs)} passed")
    out.append("persistence (checksum through the first mount == bucket after unmount == fresh mount, empty cache):")
    by_file: dict[str, dict[str, PersistenceCheck]] = {}
    for c in res.persistence:
        by_file.setdefault(c.file, {})[c.against] = c
    for fname, checks in by_file.items():
        cells = []
        for against in ("bucket", "fresh mount"):
            check = checks.get(against)
            cells.append(f"{against}: {'-' if check is None else ('pass' if check.passed else 'FAIL')}")
        failed = [f"{c.against}: {c.detail}" for c in checks.values() if not c.passed]
        out.append(f"  {fname:<12} {cells[0]:<14} {cells[1]:<18} {'; '.join(failed)}")
    ok = sum(c.passed for c in res.persistence)
    out.append(f"persistence checks: {ok}/{2 * len(res.runs)} passed")
    out.append("switched off by fsx (the file system answered EOPNOTSUPP/ENOSYS): "
               + (", ".join(res.unsupported) or "nothing"))
    if res.other_disabled:
        out.append("also switched off (not the file system's answer): " + "; ".join(res.other_disabled))
    if res.compiled_out:
        out.append("not in this fsx build (never tried): " + ", ".join(res.compiled_out)
                   + "; no AIO or io_uring modes either")
    out.append("daemon exit: " + ", ".join(f"{k} {v}" for k, v in res.daemon_exit.items()))
    if res.daemon_errors:
        out.append(f"daemon log errors: {len(res.daemon_errors)} (first below)")
        out.append(_indent(res.daemon_errors[0]))
    out.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in res.durations.items()))
    return "\n".join(out)


def format_pjdfstest(res: PjdSuiteResult) -> str:
    t = res.totals()
    out = ["== pjdfstest on a gstore mount (local S3 endpoint) =="]
    if res.setup_error:
        out.append(f"SETUP ERROR: {res.setup_error}")
    out.append(f"mount: gstore-mount {' '.join(res.mount_args)}; type {res.fs_type}, options {res.kernel_options}; "
               f"running as uid {os.getuid()}")
    out.append(f"files: {t['files_passed']}/{t['files']} passed ({t['files_not_applicable']} of them exited at once "
               f"as not applicable here)")
    out.append(f"assertions: {t['ok']} ok / {t['planned']} planned; not ok {t['not_ok']}, never run {t['missing']}, "
               f"TODO (expected failures) {t['todo']}")
    failing = [f for f in res.files if not f.passed]
    if failing:
        out.append(f"failing files ({len(failing)}), with their first failing assertion:")
        for f in failing:
            what = f.first_failure or f.bail_out or f.error or (
                f"timed out after {f.duration:.0f}s" if f.timed_out else
                f"{failure_cause(f)}; {f.output_tail.splitlines()[-1] if f.output_tail else ''}")
            if f.timed_out:
                what = f"[timed out after {f.duration:.0f}s] {what}"
            out.append(f"  {f.file:<22} {f.ok}/{f.planned or '?'}  {shorten_names(what)}")
        out.append("failing files grouped by their first failure:")
        for cause, names in res.by_cause().items():
            out.append(f"  {len(names):3d}  {cause}")
            out.append(_indent(" ".join(names), "         "))
    out.append(f"daemon exit: {res.daemon_exit}")
    if res.daemon_errors:
        out.append(f"daemon log errors: {len(res.daemon_errors)} (first below)")
        out.append(_indent(res.daemon_errors[0]))
    out.append(f"time: {res.duration:.1f}s")
    return "\n".join(out)


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/conformance",
        description="Build fsx and pjdfstest from shared/conformance and run them against a real gstore "
                    "mount of the project's local S3 endpoint (127.0.0.1). With neither --fsx nor "
                    "--pjdfstest, runs both. Exit status: 0 all passed, 1 something failed, 2 setup error.",
    )
    p.add_argument("--fsx", action="store_true", help="the 8-run fsx matrix, then the 16 persistence checks")
    p.add_argument("--fsx-runs", metavar="NAMES", help="only these runs of the matrix, e.g. s1,s4")
    p.add_argument("--pjdfstest", nargs="*", metavar="FILE",
                   help="pjdfstest: all 238 .t files, or these (chmod, chmod/00.t, a path to a .t)")
    p.add_argument("--src", help=f"the shared/conformance folder (default: ${ENV_SOURCES}, "
                                 "else REPO/../shared/conformance)")
    p.add_argument("--build-dir", type=Path, default=None,
                   help="where to build the suites (default ~/.cache/gstore-conformance)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="mount points, caches and logs (default: a new temp dir; kept when something failed)")
    p.add_argument("--keep-work", action="store_true", help="keep the work dir even when everything passed")
    p.add_argument("--mount-arg", action="append", default=[], metavar="ARG",
                   help="extra gstore-mount argument, repeatable (e.g. --mount-arg=--write-back-delay=0)")
    p.add_argument("--default-permissions", action="store_true",
                   help="pass --default-permissions to gstore-mount for pjdfstest (the kernel checks modes; "
                        "gstore turns it on with allow_other anyway)")
    p.add_argument("--fsx-timeout", type=float, default=DEFAULT_FSX_TIMEOUT,
                   help="seconds per fsx run (default %(default)s)")
    p.add_argument("--pjdfstest-timeout", type=float, default=DEFAULT_PJD_TIMEOUT,
                   help="seconds per pjdfstest .t file (default %(default)s)")
    p.add_argument("--mount-timeout", type=float, default=DEFAULT_MOUNT_TIMEOUT,
                   help="seconds for a mount to appear (default %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT,
                   help="gstore-mount --drain-timeout at unmount (default %(default)s)")
    p.add_argument("--io-timeout", type=float, default=DEFAULT_IO_TIMEOUT,
                   help="seconds for one checksum or mkdir through the mount (default %(default)s)")
    p.add_argument("--log-level", default="INFO", help="gstore-mount --log-level (default %(default)s)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the results to FILE")
    p.add_argument("--build-only", action="store_true", help="build the suites and stop")
    return p


def _log(msg: str) -> None:
    print(msg, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the mounts are stopped and the children killed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    want_fsx = args.fsx or args.pjdfstest is None
    want_pjd = args.pjdfstest is not None or not args.fsx
    need = [n for n, w in (("fsx", want_fsx), ("pjdfstest", want_pjd)) if w]
    build_dir = (args.build_dir or default_build_dir()).expanduser().resolve()
    report: dict[str, Any] = {"started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                              "uid": os.getuid(), "build_dir": str(build_dir)}
    failed = True  # until the suites ran to the end: an interrupted run keeps its work dir
    setup_failed = False
    work: Path | None = None
    try:
        sources = locate_sources(args.src, need)
        report["sources"] = str(sources)
        t0 = time.monotonic()
        fsx = build_fsx(sources, build_dir, _log) if want_fsx else None
        pjd = build_pjdfstest(sources, build_dir, _log) if want_pjd else None
        report["build_seconds"] = round(time.monotonic() - t0, 1)
        if args.build_only:
            _log(f"built: {fsx or ''} {pjd or ''}".strip())
            return 0
        if pjd is not None:
            list_pjdfstest_files(pjd / "tests", args.pjdfstest or ())  # a wrong name fails before mounting
        if want_pjd and os.getuid() != 0:
            _log("warning: pjdfstest expects root (it switches uids); most files will fail as another user")
        work = (args.work_dir.resolve() if args.work_dir else
                Path(tempfile.mkdtemp(prefix="gstore-conformance-")))
        work.mkdir(parents=True, exist_ok=True)
        report["work_dir"] = str(work)
        _log(f"work dir (mounts, caches, logs): {work}")
        texts = []
        failed = False
        with LocalEndpoint() as s3:
            report["endpoint"] = s3.url
            if fsx is not None:
                runs = FSX_MATRIX
                if args.fsx_runs:
                    wanted = [x.strip() for x in args.fsx_runs.split(",") if x.strip()]
                    unknown = [x for x in wanted if x not in {r[0] for r in FSX_MATRIX}]
                    if unknown:
                        raise ConformanceError(f"unknown fsx runs: {', '.join(unknown)}")
                    runs = tuple(r for r in FSX_MATRIX if r[0] in wanted)
                _log(f"fsx: {len(runs)} runs on a mount of {s3.url}")
                res = fsx_suite(fsx, s3.url, s3.bucket("conformance-fsx"), s3.client, work / "fsx", runs=runs,
                                mount_args=args.mount_arg, timeout=args.fsx_timeout, io_timeout=args.io_timeout,
                                mount_timeout=args.mount_timeout, drain_timeout=args.drain_timeout,
                                log_level=args.log_level, progress=_log)
                report["fsx"] = asdict(res) | {"passed": res.passed}
                failed |= not res.passed or bool(res.daemon_errors)
                setup_failed |= res.setup_error is not None
                texts.append(format_fsx(res))
            if pjd is not None:
                _log(f"pjdfstest: from a fresh folder on a mount of {s3.url}")
                res2 = pjdfstest_suite(pjd, s3.url, s3.bucket("conformance-pjdfstest"), work / "pjdfstest",
                                       selection=args.pjdfstest or (), mount_args=args.mount_arg,
                                       default_permissions=args.default_permissions, timeout=args.pjdfstest_timeout,
                                       io_timeout=args.io_timeout, mount_timeout=args.mount_timeout,
                                       drain_timeout=args.drain_timeout, log_level=args.log_level, progress=_log)
                report["pjdfstest"] = asdict(res2) | {"passed": res2.passed, "totals": res2.totals(),
                                                      "by_cause": res2.by_cause()}
                failed |= not res2.passed or bool(res2.daemon_errors)
                setup_failed |= res2.setup_error is not None
                texts.append(format_pjdfstest(res2))
        _log("\n" + "\n\n".join(texts))
        report["passed"] = not failed
        return 2 if setup_failed else 1 if failed else 0
    except ConformanceError as exc:
        report["setup_error"] = str(exc)
        _log(f"conformance: {exc}")
        failed = True
        return 2
    finally:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        if work is not None:
            if failed or args.keep_work or args.work_dir:
                _log(f"work dir kept: {work}")
            else:
                _remove_work(work)


def _remove_work(work: Path) -> None:
    # Never follow into something still mounted.
    for p in work.glob("mnt-*"):
        if os.path.ismount(p):
            return
    for sub in work.iterdir():
        for p in sub.glob("mnt-*") if sub.is_dir() else ():
            if os.path.ismount(p):
                return
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
