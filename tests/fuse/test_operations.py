"""gstore as a system service: units, readiness, mount(8), status/flush, stop and crash, logs.

These run the real programs: ``gstore-mount`` with a real unix datagram socket
as $NOTIFY_SOCKET, ``mount -t fuse.gstore-mount`` through the fuse3 helper,
``gstore status``/``gstore flush`` against mounts with pending uploads, and
``systemd-analyze verify`` on the shipped units. With ``CI=true`` a missing
tool fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, daemon_env, daemon_pid, gstore_mount_cmd, require_fuse, write_config

pytestmark = pytest.mark.fuse

BIN = Path(sys.executable).parent
GSTORE_MOUNT = BIN / "gstore-mount"
GSTORE = BIN / "gstore"
INSTALLED_PATH = "/usr/local/bin/gstore-mount"  # what the shipped units run


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if in_ci():
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    require(path is not None, f"{name} is not installed (apt-get install {package})")
    return path  # type: ignore[return-value]


def require_entry_points() -> None:
    require(GSTORE_MOUNT.exists() and GSTORE.exists(), f"the gstore entry points are not installed in {BIN}")


def gstore(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(GSTORE), *args], capture_output=True, text=True, timeout=timeout, env=daemon_env())


def object_or_none(s3, key: str) -> bytes | None:
    try:
        return s3.get(key)
    except Exception:  # noqa: BLE001 - botocore's NoSuchKey
        return None


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Daemon:
    """A ``gstore-mount`` process this test started; stopped by PID and unmounted at the end."""

    def __init__(self, args: list[str], mountpoint: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.mountpoint = mountpoint
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(gstore_mount_cmd() + args, stdout=log, stderr=subprocess.STDOUT,
                                            env=env or daemon_env())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_mounted(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mountpoint):
            if self.process.poll() is not None:
                pytest.fail(f"gstore-mount exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no mount within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if os.path.ismount(self.mountpoint) or _is_dead_mount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False, capture_output=True)


def _is_dead_mount(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == 107  # ENOTCONN
    return False


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.cleanup()


# --------------------------------------------------------------------------- units


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    require_entry_points()
    units = sorted(p for p in (REPO / "systemd").rglob("*") if p.suffix in (".service", ".mount", ".automount"))
    names = {p.relative_to(REPO / "systemd").as_posix() for p in units}
    assert {"gstore-mount@.service", "user/gstore-mount@.service"} <= names, names
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    for unit in units:
        text = unit.read_text()
        if unit.suffix == ".service":
            # The units run the installed program; verify checks that ExecStart exists, so point it at ours.
            assert f"ExecStart={INSTALLED_PATH} " in text, unit
            assert "Type=notify" in text and "Restart=on-failure" in text and "TimeoutStopSec=" in text, unit
            text = text.replace(INSTALLED_PATH, str(GSTORE_MOUNT))
        user = unit.parent.name == "user"
        target_dir = tmp_path / ("user" if user else "system")
        target_dir.mkdir(exist_ok=True)
        target = target_dir / unit.name.replace("@.", "@verify.")
        target.write_text(text)
        cmd = [analyze, *(["--user"] if user else []), "verify", str(target)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
        output = result.stdout + result.stderr
        ours = [line for line in output.splitlines() if target.name in line or str(target_dir) in line]
        assert result.returncode == 0 and not ours, f"{unit}:\n{output}"


def test_system_unit_stop_timeout_covers_the_drain_timeout() -> None:
    from gstore.config import MountOptions, parse_duration

    for unit in ("gstore-mount@.service", "user/gstore-mount@.service"):
        text = (REPO / "systemd" / unit).read_text()
        value = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("TimeoutStopSec="))
        assert parse_duration(value) > MountOptions().drain_timeout, unit


def unit_settings(path: Path) -> dict[str, str]:
    settings = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def test_the_system_unit_sandbox_still_lets_fuse_mount(s3, tmp_path: Path) -> None:
    """The unit's capability bounding set and NoNewPrivileges, applied with setpriv: mount, use, unmount."""
    require_fuse()
    require_entry_points()
    require(os.geteuid() == 0, "the system unit runs as root")
    setpriv = require_tool("setpriv", "util-linux")
    unit = unit_settings(REPO / "systemd" / "gstore-mount@.service")
    assert unit["NoNewPrivileges"] == "yes"
    caps = [c.lower().removeprefix("cap_") for c in unit["CapabilityBoundingSet"].split()]
    assert caps == ["sys_admin"]
    s3.put("hello.txt", b"sandboxed")
    config = write_config(tmp_path / "m.toml", s3.endpoint)
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    cmd = [setpriv, "--bounding-set=-all," + ",".join("+" + c for c in caps), "--inh-caps=-all", "--no-new-privs",
           str(GSTORE_MOUNT), "--config", str(config), "--cache-dir", str(cache), "test:", str(mnt)]
    pid = None
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=daemon_env())
        assert result.returncode == 0, result.stderr
        pid = daemon_pid(cache)
        assert pid is not None
        assert "NoNewPrivs:\t1" in Path(f"/proc/{pid}/status").read_text()
        assert (mnt / "hello.txt").read_bytes() == b"sandboxed"
        (mnt / "out.txt").write_bytes(b"written in the sandbox")
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)
        wait_for(lambda: not pid_alive(pid), 60, "the sandboxed daemon to exit after umount")
        assert s3.get("out.txt") == b"written in the sandbox"
    finally:
        if os.path.ismount(mnt) or _is_dead_mount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- readiness and stop


def test_notify_socket_ready_only_when_live_then_stopping_and_drain(s3, tmp_path: Path, daemons) -> None:
    require_fuse()
    s3.put("hello.txt", b"hello")
    sock_dir = Path(tempfile.mkdtemp(prefix="gstore-notify-", dir="/tmp"))  # sun_path is short: keep it under /tmp
    sock_path = sock_dir / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        listener.bind(str(sock_path))
        listener.settimeout(0.2)
        config = write_config(tmp_path / "m.toml", s3.endpoint)
        mnt, cache = tmp_path / "mnt", tmp_path / "cache"
        mnt.mkdir()
        env = {**daemon_env(), "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"}
        env.pop("WATCHDOG_PID", None)
        daemon = Daemon(["-f", "--config", str(config), "--cache-dir", str(cache), "--write-back-delay", "600",
                         "test:", str(mnt)], mnt, tmp_path / "daemon.log", env)
        daemons.append(daemon)

        messages: list[tuple[float, str, bool]] = []

        def receive_until(predicate, timeout: float) -> str:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    data = listener.recv(65536).decode()
                except TimeoutError:
                    if daemon.process.poll() is not None and predicate is not None:
                        break
                    continue
                # What the mount looked like at the moment the message arrived.
                messages.append((time.monotonic(), data, os.path.ismount(mnt)))
                if predicate(data):
                    return data
            pytest.fail(f"no such notification within {timeout}s; got {[m[1] for m in messages]}\n{daemon.log()}")

        ready = receive_until(lambda m: "READY=1" in m.splitlines(), 60)
        assert messages[-1][2], "READY=1 arrived before the mount point was mounted"
        # Usable at once: the daemon answered a stat before saying READY.
        assert (mnt / "hello.txt").read_bytes() == b"hello"
        assert f"MAINPID={daemon.process.pid}" in ready
        assert any(line.startswith("STATUS=mounted s3://test-bucket") for line in ready.splitlines()), ready
        assert not any("READY=1" in m[1] for m in messages[:-1])

        # Watchdog pings at half of WATCHDOG_USEC.
        first = len(messages)
        receive_until(lambda m: m == "WATCHDOG=1", 5)
        receive_until(lambda m: m == "WATCHDOG=1", 5)
        assert all(m[1] == "WATCHDOG=1" or m[1].startswith("STATUS=") for m in messages[first:])

        # A write that is still pending (write-back delay of 10 min) when the stop comes.
        (mnt / "pending.txt").write_bytes(b"must survive the stop")
        (mnt / "dir").mkdir()
        (mnt / "dir" / "two.txt").write_bytes(b"second")
        status = json.loads((mnt / ".gstore" / "status.json").read_text())
        assert status["uploads"]["pending"] == 2
        assert object_or_none(s3, "pending.txt") is None

        stop_sent = len(messages)
        daemon.process.send_signal(signal.SIGTERM)
        receive_until(lambda m: "STOPPING=1" in m.splitlines(), 30)
        draining = receive_until(lambda m: "STATUS=Draining" in m, 30)
        assert "EXTEND_TIMEOUT_USEC=" in draining
        assert daemon.process.wait(timeout=60) == 0, daemon.log()
        after = [m[1] for m in messages[stop_sent:]]
        assert after.index(next(m for m in after if "STOPPING=1" in m)) < after.index(draining)
        assert s3.get("pending.txt") == b"must survive the stop"
        assert s3.get("dir/two.txt") == b"second"
        assert not os.path.ismount(mnt)
        log = daemon.log()
        assert "SIGTERM received: stopping" in log and "all pending uploads are durable" in log
    finally:
        listener.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_restart_after_a_crash_clears_the_dead_mount_and_uploads_the_journal(s3, tmp_path: Path, daemons) -> None:
    """kill -9 leaves a dead mount (ENOTCONN); the next start (Restart=on-failure) must recover by itself."""
    require_fuse()
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    # The template unit's way: no MOUNTPOINT on the command line, it comes from the config entry (created if missing).
    config = write_config(tmp_path / "m.toml", s3.endpoint, extra=f'mountpoint = "{mnt}"')
    args = ["-f", "--config", str(config), "--cache-dir", str(cache), "--write-back-delay", "600", "test:"]
    first = Daemon(args, mnt, tmp_path / "first.log")
    daemons.append(first)
    first.wait_mounted()
    (mnt / "journaled.txt").write_bytes(b"written before the crash")
    first.process.kill()
    first.process.wait(timeout=10)
    assert _is_dead_mount(mnt)

    second = Daemon(args, mnt, tmp_path / "second.log")
    daemons.append(second)
    second.wait_mounted()
    assert "dead gstore mount" in second.log()
    wait_for(lambda: object_or_none(s3, "journaled.txt") == b"written before the crash", 30,
             "the journaled upload after the restart")
    assert (mnt / "journaled.txt").read_bytes() == b"written before the crash"


def test_default_mountpoint_rules(tmp_path: Path) -> None:
    from gstore.config import ConfigError, default_mountpoint

    config = write_config(tmp_path / "m.toml", "http://127.0.0.1:1", extra='mountpoint = "/srv/here"')
    env = {"HOME": str(tmp_path / "home")}
    assert default_mountpoint("test:", config, env) == Path("/srv/here")
    assert default_mountpoint("local:", config, env, euid=0) == Path("/mnt/gstore/local")
    assert default_mountpoint("local:", config, env, euid=1000) == tmp_path / "home" / "gstore" / "local"
    for spec in ("test:sub/dir", "s3://bucket/x"):
        with pytest.raises(ConfigError, match="MOUNTPOINT"):
            default_mountpoint(spec, config, env)


# --------------------------------------------------------------------------- mount(8) and fstab


def test_mount_t_fuse_gstore_mount_then_umount(s3, tmp_path: Path) -> None:
    """``mount -t fuse.gstore-mount`` through /sbin/mount.fuse3, as an fstab line does, then ``umount``.

    mount(8) runs helpers with a fixed PATH (/usr/local/sbin:/usr/local/bin:...),
    where an installation puts a gstore-mount symlink (docs/operations.md). The
    test does the same, in a private mount namespace so the host is untouched:
    a bind mount over /usr/local/sbin that only this namespace sees.
    """
    require_fuse()
    require_entry_points()
    require(os.geteuid() == 0, "mount(8) of a fuse.gstore-mount line needs root")
    unshare = require_tool("unshare", "util-linux")
    require_tool("mount.fuse3", "fuse3")
    s3.put("hello.txt", b"hello from fstab")
    config = write_config(tmp_path / "m.toml", s3.endpoint)
    mnt, cache, helper_dir = tmp_path / "mnt", tmp_path / "cache", tmp_path / "sbin"
    mnt.mkdir()
    helper_dir.mkdir()
    (helper_dir / "gstore-mount").symlink_to(GSTORE_MOUNT)
    options = (f"config={config},cache_dir={cache},allow_other,write_back_delay=600,"
               "_netdev,nofail,x-systemd.automount,x-systemd.idle-timeout=60,noatime,nodev,nosuid")
    script = """
set -euo pipefail
trap 'umount -l "$MNT" 2>/dev/null || true' EXIT
mount --bind "$HELPERS" /usr/local/sbin
mount -t fuse.gstore-mount test: "$MNT" -o "$OPTIONS"
# mount(8) returned: the mount must answer on the very next line.
cat "$MNT/hello.txt" > "$OUT/read.txt"
grep " $MNT " /proc/mounts > "$OUT/proc_mounts.txt"
printf 'written through fstab' > "$MNT/from-fstab.txt"
"$GSTORE" status --json "$MNT" > "$OUT/status.json"
"$GSTORE" status > "$OUT/status-all.txt" || true  # other (dead) mounts of the machine may be listed too
umount "$MNT"
trap - EXIT
"""
    env = {**daemon_env(), "MNT": str(mnt), "HELPERS": str(helper_dir), "OPTIONS": options, "OUT": str(tmp_path),
           "GSTORE": str(GSTORE)}
    result = subprocess.run([unshare, "--mount", "--propagation", "private", "bash", "-c", script],
                            capture_output=True, text=True, timeout=120, env=env)
    pid = daemon_pid(cache)
    try:
        logs = "\n".join(p.read_text(errors="replace") for p in cache.glob("*/gstore-mount.log"))
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{logs}"
        assert (tmp_path / "read.txt").read_bytes() == b"hello from fstab"
        line = (tmp_path / "proc_mounts.txt").read_text()
        assert line.startswith("gstore:test ") and " fuse.gstore " in line and "allow_other" in line, line
        status = json.loads((tmp_path / "status.json").read_text())
        assert status["backend"] == "s3://test-bucket" and status["uploads"]["pending"] == 1
        assert status["options"]["allow_other"] is True and status["options"]["write_back_delay"] == 600
        assert str(mnt) in (tmp_path / "status-all.txt").read_text()
        # umount returned; the daemon drains the pending upload, then exits by itself.
        assert pid is not None
        wait_for(lambda: not pid_alive(pid), 60, "the daemon to exit after umount")
        assert s3.get("from-fstab.txt") == b"written through fstab"
        assert "all pending uploads are durable" in logs or "all pending uploads are durable" in "\n".join(
            p.read_text(errors="replace") for p in cache.glob("*/gstore-mount.log"))
    finally:
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)  # the daemon we started; its namespace (and mount) go with it


# --------------------------------------------------------------------------- status and flush


def test_status_and_flush_with_pending_and_failing_uploads(s3, mount, tmp_path: Path) -> None:
    require_entry_points()
    s3.put("contested.txt", b"v1")
    m = mount("test:", "--write-back-delay", "600", "--conflict", "fail")
    (m.path / "a.txt").write_bytes(b"alpha")
    (m.path / "sub").mkdir()
    (m.path / "sub" / "b.txt").write_bytes(b"beta" * 1000)

    result = gstore("status", str(m.path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{m.path}: s3://test-bucket (mount test" in out
    assert "2 pending, 0 failing" in out and "pending a.txt (5 bytes)" in out and "pending sub/b.txt" in out
    assert "hit ratio" in out and "MiB fetched" in out and f"config    {m.config_path}" in out

    st = json.loads(gstore("status", "--json", str(m.path)).stdout)
    assert st["backend"] == "s3://test-bucket" and st["mount"] == "test" and st["pid"] == m.process.pid
    assert {e["path"] for e in st["uploads"]["pending_paths"]} == {"a.txt", "sub/b.txt"}
    assert st["cache"]["capacity"] > 0 and "hit_ratio" in st["cache"] and "bytes_fetched" in st["reads"]
    assert st["options"]["conflict"] == "fail" and st["config"] == str(m.config_path)
    raw = json.dumps(st)
    assert "testing-secret-value" not in raw and "testing-key-id" not in raw
    # The same snapshot is a file inside the mount.
    assert json.loads((m.path / ".gstore" / "status.json").read_text())["uploads"]["pending"] == 2

    # Every gstore mount of the machine when no MOUNTPOINT is given (other mounts may be listed too).
    assert f"{m.path}: s3://test-bucket" in gstore("status").stdout

    # flush of some paths: only those become durable.
    result = gstore("flush", str(m.path), str(m.path / "a.txt"))
    assert result.returncode == 0, result.stderr
    assert s3.get("a.txt") == b"alpha" and object_or_none(s3, "sub/b.txt") is None

    # A conflicting remote change with --conflict fail: the upload fails and is shown by path.
    assert (m.path / "contested.txt").read_bytes() == b"v1"
    with open(m.path / "contested.txt", "r+b") as f:
        f.write(b"v2 local")
    s3.put("contested.txt", b"v2 remote")
    result = gstore("flush", str(m.path))
    assert result.returncode == 4 and "contested.txt" in result.stderr, result  # 4: failed uploads, listed
    assert s3.get("sub/b.txt") == b"beta" * 1000  # the rest was uploaded all the same
    st = json.loads(gstore("status", "--json", str(m.path)).stdout)
    assert [e["path"] for e in st["uploads"]["failed_paths"]] == ["contested.txt"]
    assert st["uploads"]["failed_paths"][0]["error"]
    assert st["uploads"]["uploaded"] >= 2 and st["uploads"]["bytes_uploaded"] >= 4005
    # A conflict under --conflict fail is parked (retrying cannot fix it); names are quoted.
    assert 'PARKED  "contested.txt"' in gstore("status", str(m.path)).stdout


def test_status_and_flush_of_something_that_is_not_a_mount(tmp_path: Path) -> None:
    require_entry_points()
    result = gstore("status", str(tmp_path))
    assert result.returncode == 1 and "not a running gstore mount" in result.stderr
    result = gstore("flush", str(tmp_path))
    assert result.returncode == 2 and "not a running gstore mount" in result.stderr


# --------------------------------------------------------------------------- logging


def test_debug_requests_logs_one_line_per_request_and_sigusr1_toggles_it(s3, mount) -> None:
    s3.put("traced.txt", b"x" * 10000)
    s3.put("quiet.txt", b"y")
    m = mount("test:", "--debug-requests")
    assert (m.path / "traced.txt").read_bytes() == b"x" * 10000
    wait_for(lambda: "backend read_range('traced.txt'" in m.log(), 10, "the backend request line")
    lines = [line for line in m.log().splitlines() if "gstore.requests" in line]
    assert any("fuse lookup ino=1 '' name='traced.txt' -> ino=" in line for line in lines), lines
    assert any("fuse read fh=" in line and "'traced.txt'" in line and "-> 10000 bytes in" in line for line in lines)
    assert any(line.startswith(tuple("0123456789")) and " DEBUG gstore.requests: backend " in line and " ms" in line
               for line in lines)

    m.process.send_signal(signal.SIGUSR1)
    wait_for(lambda: "per-request debug logging off" in m.log(), 10, "SIGUSR1 to switch tracing off")
    assert (m.path / "quiet.txt").read_bytes() == b"y"
    time.sleep(0.3)
    assert "quiet.txt" not in "\n".join(line for line in m.log().splitlines() if "gstore.requests: fuse" in line)
    m.process.send_signal(signal.SIGUSR1)
    wait_for(lambda: m.log().count("per-request debug logging on") == 2, 10, "SIGUSR1 to switch tracing on")
    os.listdir(m.path)
    wait_for(lambda: "fuse opendir ino=1" in m.log(), 10, "requests traced again")
    st = json.loads((m.path / ".gstore" / "status.json").read_text())
    assert st["debug_requests"] is True
    m.stop()
    assert "testing-secret-value" not in m.log() and "testing-key-id" not in m.log()


def test_journald_lines_carry_priority_and_events_stay_on_one_line(tmp_path: Path) -> None:
    out = tmp_path / "stderr.txt"
    code = """
import logging, os
from gstore.log import setup_logging
setup_logging("INFO")
log = logging.getLogger("gstore.test")
log.warning("upload of %s failed: %s", "dir/a.txt", "503 Slow Down")
try:
    raise ValueError("first\\nsecond")
except ValueError:
    log.exception("unexpected")
"""
    with open(out, "wb") as stderr:
        st = os.fstat(stderr.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        subprocess.run([sys.executable, "-c", code], stderr=stderr, env=env, check=True, timeout=60)
    lines = out.read_text().splitlines()
    assert lines[0] == "<4>WARNING gstore.test: upload of dir/a.txt failed: 503 Slow Down"
    assert len(lines) == 2 and lines[1].startswith("<3>ERROR gstore.test: unexpected | Traceback")
    assert "ValueError: first | second" in lines[1]
