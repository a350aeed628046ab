"""The three filesystems under test: how each is mounted, found, measured and unmounted.

Every tool mounts the same bucket (``bench``) of the same endpoint on 127.0.0.1,
with an on-disk cache in a directory of its own. A *session* is one daemon
lifetime: ``start`` mounts and returns when the mount answers, ``stop`` unmounts
(``fusermount3 -u``, lazily as a last resort) and waits for the daemon to exit.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from bench.endpoint import ACCESS_KEY, BUCKET, REGION, SECRET_KEY, Endpoint
from bench.util import (BenchError, cpu_seconds, first_line, is_mounted, pid_alive,
                        proc_cmdline, proc_status_kib, stop_pid, unmount, wait_pid_exit)

REPO = Path(__file__).resolve().parent.parent


def _wait_mounted(mnt: Path, proc: subprocess.Popen[bytes] | None, log_path: Path,
                  timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(mnt):
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{mnt}: the daemon exited with {proc.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            raise BenchError(f"{mnt}: not mounted after {timeout:.0f} s; see {log_path}")
        time.sleep(0.02)
    os.stat(mnt)  # answered by the daemon: the mount is live


class Tool:
    name = ""
    process_name = ""  # expected in the daemon's cmdline (guards against PID reuse)

    def __init__(self, endpoint: Endpoint, work: Path, cache_size: str) -> None:
        self.endpoint = endpoint
        self.work = work
        self.cache_size = cache_size  # e.g. "2G"
        self.pid: int | None = None
        self.mnt: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- subclasses
    def command(self, mnt: Path, cache: Path) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def version(self) -> str:
        raise NotImplementedError

    def notes(self) -> str:
        return ""

    def flush(self, mnt: Path, timeout: float) -> float | None:
        """Make everything written durable in the backend, if the tool has a command for it.

        Returns the seconds it took, or None when the tool has no such command (the caller
        then polls the bucket until the objects appear)."""
        return None

    def _spawn(self, mnt: Path, cache: Path, log_path: Path) -> None:
        """Default: a foreground daemon we start ourselves (its PID is the Popen's)."""
        self._log = open(log_path, "ab")
        self._proc = subprocess.Popen(self.command(mnt, cache), stdin=subprocess.DEVNULL,
                                      stdout=self._log, stderr=subprocess.STDOUT, env=self.env(),
                                      start_new_session=True)  # Ctrl-C reaches us, not the daemon
        self.pid = self._proc.pid
        _wait_mounted(mnt, self._proc, log_path)

    # -- common
    def start(self, mnt: Path, cache: Path, log_path: Path) -> float:
        """Mount; returns the seconds until the mount answered."""
        if is_mounted(mnt):
            raise BenchError(f"{mnt} is already mounted")
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.mnt = mnt
        self._spawn(mnt, cache, log_path)
        return time.perf_counter() - t0

    def cpu(self) -> float | None:
        return cpu_seconds(self.pid)

    def peak_rss_kib(self) -> int | None:
        return proc_status_kib(self.pid, "VmHWM")

    def stop(self) -> bool:
        """Unmount and wait for the daemon to exit. True if both went cleanly."""
        clean = True
        if self.mnt is not None:
            clean = unmount(self.mnt)
        if self.pid is not None:
            if not wait_pid_exit(self.pid, 60):
                clean = False
                stop_pid(self.pid, self.process_name)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self._log is not None:
            self._log.close()
        self.pid, self.mnt, self._proc, self._log = None, None, None, None
        return clean


class Gstore(Tool):
    name = "gstore"
    process_name = "gstore-mount"

    def config_path(self) -> Path:
        path = self.work / "gstore-mounts.toml"
        if not path.exists():
            text = ("[mounts.bench]\n"
                    'protocol = "s3"\n'
                    f'root = "{BUCKET}"\n'
                    "[mounts.bench.options]\n"
                    f'endpoint_url = "{self.endpoint.url}"\n'
                    f'key = "{ACCESS_KEY}"\n'
                    f'secret = "{SECRET_KEY}"\n'
                    f'client_kwargs = {{ region_name = "{REGION}" }}\n')
            # 0600: it holds credentials, and gstore refuses a config file others can read
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        return path

    def command(self, mnt: Path, cache: Path) -> list[str]:
        exe = Path(sys.executable).with_name("gstore-mount")
        return [str(exe), "--config", str(self.config_path()), "--cache-dir", str(cache),
                "--cache-size", self.cache_size, "bench:", str(mnt)]

    def _spawn(self, mnt: Path, cache: Path, log_path: Path) -> None:
        # gstore-mount daemonizes and returns once the mount answers; its PID is in the lock file.
        cmd = self.command(mnt, cache) + ["--log-file", str(log_path)]
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise BenchError(f"gstore-mount failed ({r.returncode}): {r.stderr.strip()}")
        locks = sorted(cache.glob("*/lock"))
        pid = None
        for lock in locks:
            try:
                candidate = int(lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if pid_alive(candidate) and self.process_name in " ".join(proc_cmdline(candidate)):
                pid = candidate
        if pid is None:
            raise BenchError(f"gstore is mounted on {mnt} but no live PID in {cache}/*/lock")
        self.pid = pid
        _wait_mounted(mnt, None, log_path)

    def version(self) -> str:
        try:
            v = metadata.version("gstore")
        except metadata.PackageNotFoundError:
            v = "?"
        spec = importlib.util.find_spec("gstore")
        origin = Path(spec.origin).resolve().parent.parent if spec and spec.origin else None
        if origin is not None and origin != REPO / "src":
            return f"gstore {v} (imported from {origin})"  # e.g. PYTHONPATH=<other tree>/src
        commit = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "src"],
                               capture_output=True, text=True).stdout.strip()
        return f"gstore {v} (git {commit}{', src/ modified' if dirty else ''})"

    def flush(self, mnt: Path, timeout: float) -> float | None:
        exe = Path(sys.executable).with_name("gstore")
        t0 = time.perf_counter()
        r = subprocess.run([str(exe), "flush", str(mnt)], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise BenchError(f"gstore flush exited {r.returncode}: {r.stderr.strip()[-300:]}")
        return time.perf_counter() - t0

    def notes(self) -> str:
        return ("defaults: --block-size 4M, --readahead 64M, --fetch-concurrency 16, --upload-concurrency 16, "
                "--part-concurrency 8, attr/dir TTL 60 s, --write-back-delay 5 s")


class Rclone(Tool):
    name = "rclone"
    process_name = "rclone"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("AWS_CA_BUNDLE", None)  # rclone 1.60 refuses to start when it is set
        env.update({
            "RCLONE_CONFIG_BENCH_TYPE": "s3",
            "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
            "RCLONE_CONFIG_BENCH_ENDPOINT": self.endpoint.url,
            "RCLONE_CONFIG_BENCH_REGION": REGION,
            "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
            "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": ACCESS_KEY,
            "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": SECRET_KEY,
        })
        return env

    def command(self, mnt: Path, cache: Path) -> list[str]:
        conf = self.work / "rclone.conf"  # empty: the remote comes from RCLONE_CONFIG_BENCH_*
        conf.touch()
        return ["rclone", "mount", f"bench:{BUCKET}", str(mnt), "--config", str(conf),
                "--cache-dir", str(cache), "--vfs-cache-mode", "full",
                "--vfs-cache-max-size", self.cache_size,
                # moto answers CompleteMultipartUpload with "x-amz-version-id: null" on an
                # unversioned bucket and rejects "versionId=null" afterwards: without this the
                # HEAD rclone sends after every multipart upload fails (400) and the upload retries.
                "--s3-no-head"]

    def version(self) -> str:
        return first_line(["rclone", "version"])

    def notes(self) -> str:
        return ("remote from env: type=s3 provider=Other endpoint=URL force_path_style=true region=us-east-1; "
                "defaults otherwise: --vfs-write-back 5s, --vfs-read-chunk-size 128M, --buffer-size 16M, "
                "--dir-cache-time 5m, --attr-timeout 1s, --transfers 4")


class S3fs(Tool):
    name = "s3fs"
    process_name = "s3fs"

    def passwd_file(self) -> Path:
        path = self.work / "s3fs.passwd"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        return path

    def command(self, mnt: Path, cache: Path) -> list[str]:
        opts = ",".join([f"url={self.endpoint.url}", "use_path_request_style",
                         f"passwd_file={self.passwd_file()}", f"use_cache={cache}"])
        return ["s3fs", BUCKET, str(mnt), "-f", "-o", opts]

    def version(self) -> str:
        return first_line(["s3fs", "--version"])

    def notes(self) -> str:
        return ("defaults otherwise: parallel_count 5, multipart_size 10 MB, multireq_max 20, stat cache 900 s; "
                "no bound on the cache size (s3fs has none; ensure_diskfree only keeps disk space free)")


TOOLS: dict[str, type[Tool]] = {"gstore": Gstore, "rclone": Rclone, "s3fs": S3fs}


def tool_info(tool: Tool) -> dict[str, Any]:
    mnt, cache = Path("MNT"), Path("CACHE")
    command = " ".join(tool.command(mnt, cache))
    # readable and run-independent: the scratch folder, endpoint URL and checkout as placeholders
    for real, placeholder in ((str(tool.work), "WORK"), (tool.endpoint.url, "URL"), (str(REPO), ".")):
        if real:
            command = command.replace(real, placeholder)
    return {"version": tool.version(), "command": command, "notes": tool.notes()}
