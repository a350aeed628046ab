"""Small process and filesystem helpers shared by the harness."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024


class BenchError(RuntimeError):
    """A setup step failed (a mount did not come up, the endpoint died, ...)."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (all its threads), in seconds; None if it is gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (everything but idle and iowait), /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])  # guest time is already counted in user
    return (total - idle) / CLK_TCK


def proc_status_kib(pid: int | None, key: str) -> int | None:
    """A "kB" value of /proc/PID/status (VmHWM = peak RSS, VmRSS = current RSS)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss(pid: int | None) -> bool:
    """Reset a process's VmHWM to its current RSS (``echo 5 > /proc/PID/clear_refs``).

    Lets one daemon lifetime report a peak per phase; needs root (or the same user) and
    Linux >= 4.0. False if it could not be done (the peak then spans the whole session)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5\n")
        return True
    except OSError:
        return False


def proc_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def wait_pid_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def stop_pid(pid: int, expect_in_cmdline: str, timeout: float = 10.0) -> None:
    """SIGTERM (then SIGKILL) one process we started; checks its cmdline against PID reuse."""
    if not pid_alive(pid):
        return
    if expect_in_cmdline not in " ".join(proc_cmdline(pid)):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_pid_exit(pid, timeout):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        wait_pid_exit(pid, 5)


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 4 and parts[4].replace("\\040", " ") == target:
                    return True
    except OSError:
        pass
    return False


def unmount(path: Path, attempts: int = 20) -> bool:
    """fusermount3 -u, retried while busy; lazy unmount as the last resort. True if clean."""
    for _ in range(attempts):
        if not is_mounted(path):
            return True
        r = subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, text=True)
        if r.returncode == 0:
            return True
        time.sleep(0.25)
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
    return False


def drop_caches() -> bool:
    """sync + drop the kernel page/dentry/inode caches (needs root). False if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def first_line(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    out = (r.stdout or r.stderr).strip().splitlines()
    return out[0].strip() if out else "unknown"


def which(name: str) -> str | None:
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None
