"""``gstore.mount()``: a gstore mount for the length of a ``with`` block, from Python.

::

    import subprocess, gstore

    with gstore.mount("s3://bucket/videos") as root:      # a pathlib.Path
        subprocess.run(["ffmpeg", "-i", root / "in.mp4", root / "out.mp4"], check=True)
    # here out.mp4 is in the bucket, and nothing is mounted any more

Entering mounts the storage on a new private folder (a temporary directory of
mode 0700) with ``gstore-mount`` and returns once the mount answers; a start
that fails raises :class:`MountError` with the daemon's own message. Leaving
uploads everything written (a flush, as ``gstore flush`` does), unmounts, and
waits for the daemon to exit; uploads that did not succeed raise
:class:`UploadError` naming them (their bytes stay in the cache directory and
are uploaded at the next mount of the same storage with the same cache
directory).

Keyword arguments are mount options when they name one (``cache_size="2G"``,
``read_only=True``, ``attr_ttl=5``, ... as in ``gstore-mount --help``, with
``_``), and backend options (passed to ``fsspec.filesystem(protocol, ...)``,
e.g. ``endpoint_url``, ``key``, ``secret``, ``client_kwargs``) otherwise;
``storage_options={...}`` gives backend options explicitly. Backend options
need a URL spec (``s3://bucket/prefix``); they are written to a config file
readable only by you, inside the private folder, and deleted once the daemon
has read it. A named mount (``"s3:"``, ``"s3:sub/path"``) comes from the usual
config file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

#: Entry name of the config file written for backend options.
_ENTRY = "python"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class MountError(RuntimeError):
    """The mount could not be started (the message is the daemon's), or not stopped."""


class UploadError(OSError):
    """Files written under the mount are not durable in the backend: ``failed`` names them."""

    def __init__(self, failed: list[str]) -> None:
        self.failed = list(failed)
        listing = "; ".join(self.failed[:20]) + (f"; and {len(self.failed) - 20} more" if len(self.failed) > 20 else "")
        super().__init__(f"{len(self.failed)} file(s) not uploaded: {listing}")


def _mount_option_names() -> set[str]:
    import dataclasses

    from gstore.config import MountOptions

    return {f.name for f in dataclasses.fields(MountOptions)}


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(os.fspath(value))  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v, where)}" for k, v in value.items()) + " }"
    raise TypeError(f"{where}: {type(value).__name__} values cannot be passed to the daemon")


def _toml_key(key: Any) -> str:
    key = str(key)
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _split_url(spec: str) -> tuple[str, str]:
    protocol, _, root = spec.partition("://")
    if not protocol or not _BARE_KEY.fullmatch(protocol):
        raise ValueError(f"not a URL spec: {spec!r}")
    return protocol.lower(), root


def _cli_flag(name: str, value: Any) -> list[str]:
    """A mount option as ``gstore-mount`` arguments (booleans through -o, which takes true/false)."""
    if isinstance(value, bool):
        return ["-o", f"{name}={'true' if value else 'false'}"]
    if value is None:
        return ["-o", f"{name}=off"]  # the virtual directories' "off"
    return [f"--{name.replace('_', '-')}", os.fspath(value) if isinstance(value, os.PathLike) else str(value)]


class Mount:
    """The context manager :func:`mount` returns; ``root`` is the mount point once entered."""

    def __init__(self, spec: str, *, storage_options: dict[str, Any] | None = None, start_timeout: float = 120.0,
                 stop_timeout: float = 600.0, **options: Any) -> None:
        known = _mount_option_names()
        self.spec = spec
        self.mount_options = {k: v for k, v in options.items() if k in known}
        self.storage_options = {k: v for k, v in options.items() if k not in known}
        self.storage_options.update(storage_options or {})
        if "foreground" in self.mount_options:
            raise ValueError("foreground is managed by gstore.mount")
        if self.storage_options and "://" not in spec:
            raise ValueError(f"backend options ({', '.join(sorted(self.storage_options))}) need a URL spec such "
                             f"as s3://bucket/prefix, not {spec!r}")
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.root: Path | None = None
        self.pid: int | None = None
        self._folder: Path | None = None

    # -- entering ---------------------------------------------------------------------------------

    def __enter__(self) -> Path:
        folder = Path(tempfile.mkdtemp(prefix="gstore-"))  # 0700, ours alone
        self._folder = folder
        mountpoint = folder / "mnt"
        mountpoint.mkdir(mode=0o700)
        config: Path | None = None
        try:
            args: list[str] = []
            spec = self.spec
            if self.storage_options:
                config = self._write_config(folder)
                args += ["--config", str(config)]
                spec = f"{_ENTRY}:"
            for name, value in self.mount_options.items():
                args += _cli_flag(name, value)
            command = [sys.executable, "-c", "import sys; from gstore.cli import mount_main; sys.exit(mount_main())",
                       *args, spec, str(mountpoint)]
            try:
                done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                      timeout=self.start_timeout)
            except subprocess.TimeoutExpired:
                raise MountError(f"gstore-mount did not finish starting within {self.start_timeout:g}s") from None
            if done.returncode != 0:
                message = "\n".join(line.removeprefix("gstore-mount: ") for line in done.stderr.strip().splitlines())
                raise MountError(message or f"gstore-mount exited with status {done.returncode}")
            self.root = mountpoint
            self.pid = self._daemon_pid()
        except BaseException:
            if self.root is not None:
                self._unmount()
            self._remove_folder()
            raise
        finally:
            if config is not None:
                config.unlink(missing_ok=True)  # the daemon has read it (or never will)
        return mountpoint

    def _write_config(self, folder: Path) -> Path:
        protocol, root = _split_url(self.spec)
        lines = [f"[mounts.{_ENTRY}]", f"protocol = {_toml_value(protocol, 'protocol')}",
                 f"root = {_toml_value(root, 'root')}", f"[mounts.{_ENTRY}.options]"]
        for key, value in self.storage_options.items():
            lines.append(f"{_toml_key(key)} = {_toml_value(value, key)}")
        path = folder / "mounts.toml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def _daemon_pid(self) -> int | None:
        assert self.root is not None
        try:
            with open(self.root / ".gstore" / "status.json", encoding="utf-8") as f:
                return int(json.load(f)["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # -- leaving ----------------------------------------------------------------------------------

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        failed: list[str] = []
        problem: str | None = None
        try:
            failed = self.flush()
        except OSError as error:
            problem = f"could not flush {self.root}: {error.strerror or error}"
        try:
            self._unmount()
        finally:
            self._remove_folder()
        if exc is not None:
            if failed or problem:
                exc.add_note(problem or str(UploadError(failed)))
            return False
        if problem:
            raise MountError(problem)
        if failed:
            raise UploadError(failed)
        return False

    def flush(self) -> list[str]:
        """Upload everything pending under the mount and wait; returns what is not durable."""
        if self.root is None:
            return []
        with open(self.root / ".gstore" / "flush", "rb") as f:
            verdict = json.loads(f.read() or b"{}")
        return [] if verdict.get("ok") else [str(x) for x in verdict.get("failed", [])] or ["(unknown)"]

    def _unmount(self) -> None:
        root = self.root
        if root is None:
            return
        deadline = time.monotonic() + 10
        while os.path.ismount(root):
            done = subprocess.run(["fusermount3", "-u", str(root)], capture_output=True, text=True)
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                # Still busy (a program kept a file or its working directory there):
                # detach now; the daemon ends when the last user lets go.
                subprocess.run(["fusermount3", "-u", "-z", str(root)], capture_output=True, text=True)
                break
            time.sleep(0.1)
        self.root = None
        if self.pid is not None:
            self._wait_for_exit(self.pid)
            self.pid = None

    def _wait_for_exit(self, pid: int) -> None:
        deadline = time.monotonic() + self.stop_timeout
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                    state = f.read().rsplit(")", 1)[-1].split()[0]
            except OSError:
                return  # gone
            if state in ("Z", "X"):
                try:
                    os.waitpid(pid, os.WNOHANG)  # ours to reap only if we are its subreaper
                except ChildProcessError:
                    pass
                return
            time.sleep(0.05)
        raise MountError(f"the gstore daemon (pid {pid}) did not exit within {self.stop_timeout:g}s of unmounting")

    def _remove_folder(self) -> None:
        folder = self._folder
        if folder is None:
            return
        mountpoint = folder / "mnt"
        if os.path.ismount(mountpoint):
            return  # never delete through a mount that is still there
        shutil.rmtree(folder, ignore_errors=True)
        self._folder = None


def mount(spec: str, *, storage_options: dict[str, Any] | None = None, **options: Any) -> Mount:
    """Mount ``spec`` (``"s3://bucket/prefix"``, any fsspec URL, or a configured ``"NAME:"``) for a
    ``with`` block, which gets the mount point as a :class:`pathlib.Path`. See the module documentation."""
    return Mount(spec, storage_options=storage_options, **options)


__all__ = ["Mount", "MountError", "UploadError", "mount"]
