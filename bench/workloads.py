"""The workloads. Each one runs on one tool at a time and fills a result record.

A workload controls its own mounts through :class:`Run`: ``cold()`` unmounts,
empties the tool's cache directory, drops the kernel caches and mounts again;
``remount()`` does the same but keeps the cache directory (a restart with a
warm persistent cache). Every measured step is a ``phase``: the endpoint's
counters are reset before it and read after it (minus the requests our own
durability polling made), and the CPU time of the daemon and of the endpoint
is taken around it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.endpoint import BUCKET, Endpoint
from bench.tools import Tool
from bench.util import (BenchError, MiB, drop_caches, log, machine_busy_seconds,
                        proc_status_kib, reset_peak_rss)

# errnos that mean "this mount does not offer the feature (yet)", not "the benchmark broke"
NOT_SUPPORTED = {errno.EROFS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODATA}


@dataclass
class Config:
    big_size: int
    write_size: int
    small_count: int
    small_size: int
    listing_count: int
    fio_runtime: int
    video_seconds: int
    transcode: bool
    durable_timeout: float
    profile: list[str] = field(default_factory=list)  # workloads: py-spy profile of gstore during them
    py_spy: str | None = None
    big_file_size: int = 4 * 1024 * MiB  # the --big workload's file


@dataclass
class Assets:
    big_key: str
    video_key: str
    video_md5: str
    video_size: int
    listing_prefix: str


@dataclass
class Unsupported(Exception):
    """The mount refused an operation with an errno from NOT_SUPPORTED: the result is n/a."""

    what: str
    err: int

    def __str__(self) -> str:
        return f"{self.what}: {errno.errorcode.get(self.err, self.err)} ({os.strerror(self.err)})"


def _unsupported_or_raise(exc: OSError, what: str) -> None:
    if exc.errno in NOT_SUPPORTED:
        raise Unsupported(what, exc.errno) from exc
    raise exc


@dataclass
class Run:
    """One (workload, tool) pair: its mounts, phases and result record."""

    workload: str
    tool: Tool
    endpoint: Endpoint
    cfg: Config
    assets: Assets
    work: Path
    logs: Path
    results_dir: Path
    record: dict[str, Any] = field(default_factory=dict)
    _session: int = 0
    _session_peak_kib: int = 0  # VmHWM seen before each per-phase reset of it

    def __post_init__(self) -> None:
        self.mnt = self.work / "mnt" / self.tool.name
        self.cache = self.work / "cache" / self.tool.name
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.record = {"status": "ok", "note": "", "metrics": {}, "na": {}, "phases": {},
                       "sessions": []}

    # -- mounts
    def _start(self) -> None:
        self._session += 1
        self._session_peak_kib = 0
        log_path = self.logs / f"{self.tool.name}-{self.workload}-{self._session}.log"
        mount_s = self.tool.start(self.mnt, self.cache, log_path)
        self.record["sessions"].append({"mount_s": mount_s, "pid": self.tool.pid})
        self.endpoint.check_alive()

    def stop(self) -> None:
        if self.tool.pid is None and self.tool.mnt is None:
            return
        session = self.record["sessions"][-1] if self.record["sessions"] else {}
        peaks = [p for p in (self._session_peak_kib, self.tool.peak_rss_kib()) if p]
        session["peak_rss_kib"] = max(peaks) if peaks else None
        session["daemon_cpu_s"] = self.tool.cpu()
        if not self.tool.stop():
            session["unclean_unmount"] = True

    def cold(self) -> None:
        self.stop()
        shutil.rmtree(self.cache, ignore_errors=True)
        drop_caches()
        self._start()

    def remount(self) -> None:
        self.stop()
        drop_caches()
        self._start()

    # -- measurement
    @contextlib.contextmanager
    def phase(self, name: str, settle: float = 0.3) -> Iterator[dict[str, Any]]:
        rec: dict[str, Any] = {}
        profiler = self._start_profiler(name)
        # peak RSS of this phase alone: remember the session's peak so far, then reset VmHWM
        self._session_peak_kib = max(self._session_peak_kib, self.tool.peak_rss_kib() or 0)
        phase_peak = reset_peak_rss(self.tool.pid)
        self.endpoint.reset_stats()
        d0, e0, m0 = self.tool.cpu(), self.endpoint.cpu(), machine_busy_seconds()
        t0 = time.perf_counter()
        try:
            yield rec
        finally:
            rec.setdefault("wall_s", time.perf_counter() - t0)
            time.sleep(settle)  # let in-flight requests land in this phase's counters
            d1, e1, m1 = self.tool.cpu(), self.endpoint.cpu(), machine_busy_seconds()
            # every busy CPU second on the machine, including the client program (dd, fio, ls),
            # the bench driver and anything else running: a check on outside interference
            rec["machine_busy_cpu_s"] = round(m1 - m0, 2)
            rec["daemon_cpu_s"] = None if d0 is None or d1 is None else round(d1 - d0, 3)
            rec["endpoint_cpu_s"] = None if e0 is None or e1 is None else round(e1 - e0, 3)
            hwm = self.tool.peak_rss_kib()
            if hwm:
                self._session_peak_kib = max(self._session_peak_kib, hwm)
                if phase_peak:
                    rec["peak_rss_kib"] = hwm
            try:
                rec["backend"] = self.endpoint.stats()
            except OSError as exc:
                rec["backend"] = {"error": str(exc)}
            self._stop_profiler(profiler, name)
            self.record["phases"][name] = rec

    def metric(self, name: str, value: float | None, na: str | None = None) -> None:
        self.record["metrics"][name] = value
        if value is None and na:
            self.record["na"][name] = na

    # -- py-spy (only gstore, only the workload named by --profile)
    def _start_profiler(self, phase: str) -> Any:
        if self.workload not in self.cfg.profile or self.tool.name != "gstore" or not self.cfg.py_spy:
            return None
        out = self.results_dir / f"profile-{self.workload}-{phase.replace(' ', '_')}.raw"
        proc = subprocess.Popen(
            [self.cfg.py_spy, "record", "--pid", str(self.tool.pid), "--rate", "200", "--format", "raw",
             "--threads", "--nonblocking", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=open(self.logs / f"py-spy-{phase.replace(' ', '_')}.log", "wb"),
            start_new_session=True)
        time.sleep(1.0)  # attach before the measured step starts
        return proc, out

    def _stop_profiler(self, profiler: Any, phase: str) -> None:
        if profiler is None:
            return
        proc, out = profiler
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
        log(f"py-spy profile of gstore during {self.workload}/{phase}: {out}")
        if out.exists():
            from bench.profile_summary import summarize

            summary = out.with_suffix(".txt")
            summary.write_text(summarize(out, 30))
            self.record.setdefault("profiles", {})[phase] = {"raw": out.name, "summary": summary.name}


# --------------------------------------------------------------------------- helpers


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise BenchError(f"{' '.join(cmd[:3])}... exited {r.returncode}: {r.stderr.strip()[-500:]}")
    return r


def _read_all(path: Path, expected: int) -> float:
    """dd the file to /dev/null with 1 MiB reads; returns seconds."""
    t0 = time.perf_counter()
    r = _run(["dd", f"if={path}", "of=/dev/null", "bs=1M"])
    elapsed = time.perf_counter() - t0
    copied = r.stderr.strip().splitlines()[-1].split()[0]
    if int(copied) != expected:
        raise BenchError(f"dd read {copied} bytes of {path}, expected {expected}")
    return elapsed


def _mibps(nbytes: int, seconds: float) -> float:
    return round(nbytes / MiB / seconds, 1)


def _poll(check: Callable[[], bool], timeout: float, interval: float) -> float | None:
    """Call check() until it is true; the perf_counter time it became true, or None."""
    deadline = time.perf_counter() + timeout
    while True:
        if check():
            return time.perf_counter()
        if time.perf_counter() > deadline:
            return None
        time.sleep(interval)


def _durable(r: Run, check: Callable[[], bool], interval: float, p: dict[str, Any]) -> float | None:
    """The perf_counter time the written data was durable in the bucket, or None (timeout).

    gstore: ``gstore flush MNT`` (returns once every pending upload is confirmed), then one
    check that the bucket has it. Tools without a flush command (rclone uploads after its
    --vfs-write-back delay; s3fs uploads at close): poll the bucket."""
    took = r.tool.flush(r.mnt, r.cfg.durable_timeout)
    if took is not None:
        done = time.perf_counter()
        p["flush_s"] = round(took, 3)
        p["durable_by"] = "flush command"
        if not check():
            raise BenchError("the flush command returned but the bucket does not have the data")
        return done
    p["durable_by"] = "polling the bucket"
    return _poll(check, r.cfg.durable_timeout, interval)


# --------------------------------------------------------------------------- workloads


def seq_read(r: Run) -> None:
    """cat-like read of the big object: cold (empty caches), warm (same mount), after remount."""
    path, size = r.mnt / r.assets.big_key, r.cfg.big_size
    r.cold()
    with r.phase("cold") as p:
        p["wall_s"] = _read_all(path, size)
    r.metric("cold MiB/s", _mibps(size, p["wall_s"]))
    with r.phase("warm") as p:
        p["wall_s"] = _read_all(path, size)
    r.metric("warm MiB/s", _mibps(size, p["wall_s"]))
    r.remount()
    with r.phase("remount") as p:
        p["wall_s"] = _read_all(path, size)
    r.metric("remount MiB/s", _mibps(size, p["wall_s"]))


def _fio(r: Run, bs: str) -> None:
    """Cached random reads: a fresh mount reads the object once (the daemon's cache now holds
    it), then fio reads with O_DIRECT at queue depth 1, so every read is one FUSE request that
    the daemon answers from its cache: its per-request cost, not the backend's."""
    path = r.mnt / r.assets.big_key
    out = r.work / f"fio-{r.tool.name}-{bs}.json"
    r.cold()
    with r.phase("prime") as p:
        p["wall_s"] = _read_all(path, r.cfg.big_size)
    with r.phase(f"randread {bs}"):
        _run(["fio", f"--name=randread-{bs}", f"--filename={path}", "--readonly", "--rw=randread",
              f"--bs={bs}", "--ioengine=psync", "--iodepth=1", "--numjobs=1", "--direct=1",
              "--invalidate=1", "--randrepeat=1", "--time_based=1",
              f"--runtime={r.cfg.fio_runtime}", "--output-format=json", f"--output={out}"],
             timeout=r.cfg.fio_runtime + 120)
    job = json.loads(out.read_text())["jobs"][0]["read"]
    pct = job["clat_ns"].get("percentile", {})
    r.metric("IOPS", round(job["iops"], 1))
    r.metric("MiB/s", round(job["bw_bytes"] / MiB, 2))
    r.metric("p50 ms", round(pct.get("50.000000", 0) / 1e6, 3))
    r.metric("p99 ms", round(pct.get("99.000000", 0) / 1e6, 3))
    r.metric("mean ms", round(job["clat_ns"]["mean"] / 1e6, 3))
    r.record["fio"] = {"io_bytes": job["io_bytes"], "total_ios": job["total_ios"],
                       "runtime_ms": job["runtime"]}


def rand_4k(r: Run) -> None:
    """fio random 4 KiB reads (one thread, psync, O_DIRECT, cached) over the big object."""
    _fio(r, "4k")


def rand_64k(r: Run) -> None:
    """fio random 64 KiB reads (one thread, psync, O_DIRECT, cached) over the big object."""
    _fio(r, "64k")


def seq_write(r: Run) -> None:
    """Write a new object of write_size bytes; time to close, and until the bucket has it."""
    key = f"written-{r.tool.name}-big.bin"
    path = r.mnt / key
    data = os.urandom(r.cfg.write_size)
    chunk = MiB
    r.cold()
    durable = None
    with r.phase("write") as p:
        t0 = time.perf_counter()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            _unsupported_or_raise(exc, "open for writing")
        try:
            view = memoryview(data)
            for off in range(0, len(data), chunk):
                os.write(fd, view[off:off + chunk])
        except OSError as exc:
            os.close(fd)
            _unsupported_or_raise(exc, "write")
        os.close(fd)
        closed = time.perf_counter()
        p["close_s"] = closed - t0
        durable = _durable(r, lambda: r.endpoint.head_size(key) == len(data), 0.05, p)
        p["durable_s"] = None if durable is None else durable - t0
        p["wall_s"] = time.perf_counter() - t0
    r.metric("close s", round(p["close_s"], 2))
    r.metric("close MiB/s", _mibps(len(data), p["close_s"]))
    r.metric("durable s", None if durable is None else round(p["durable_s"], 2),
             na=f"not in the bucket after {r.cfg.durable_timeout:.0f} s")
    r.metric("durable MiB/s", None if durable is None else _mibps(len(data), p["durable_s"]))


def create_small_files(d: Path, payloads: list[bytes]) -> None:
    """``mkdir d``, then each payload as a new file: open, one write, close (what ``tar x``,
    ``cp -r`` of a folder of small files do). The same code for the tools and the bare
    reference (bench.barefs_write)."""
    try:
        os.mkdir(d)
    except OSError as exc:
        _unsupported_or_raise(exc, "mkdir")
    try:
        for i, body in enumerate(payloads):
            with open(d / f"f{i:05d}.bin", "wb") as f:
                f.write(body)
    except OSError as exc:
        _unsupported_or_raise(exc, "create")


def small_files(r: Run) -> None:
    """Create small_count files of small_size bytes in a new directory; close, then bucket."""
    prefix = f"small-{r.tool.name}"
    d = r.mnt / prefix
    payloads = [os.urandom(r.cfg.small_size) for _ in range(r.cfg.small_count)]
    r.cold()

    def all_there() -> bool:
        keys = r.endpoint.list_keys(prefix + "/")
        return sum(1 for k, s in keys.items() if s == r.cfg.small_size and not k.endswith("/")) \
            >= len(payloads)

    with r.phase("create") as p:
        t0 = time.perf_counter()
        create_small_files(d, payloads)
        p["close_s"] = time.perf_counter() - t0
        durable = _durable(r, all_there, 0.25, p)
        p["durable_s"] = None if durable is None else durable - t0
        p["wall_s"] = time.perf_counter() - t0
    r.metric("close s", round(p["close_s"], 2))
    r.metric("files/s to close", round(len(payloads) / p["close_s"], 1))
    r.metric("durable s", None if durable is None else round(p["durable_s"], 2),
             na=f"not all in the bucket after {r.cfg.durable_timeout:.0f} s")


def ls(r: Run) -> None:
    """ls -l of the listing prefix: cold (fresh mount), then warm (same mount, again)."""
    d = r.mnt / r.assets.listing_prefix
    r.cold()
    for phase in ("cold", "warm"):
        with r.phase(phase) as p:
            out = _run(["ls", "-l", str(d)], timeout=900).stdout
        entries = sum(1 for line in out.splitlines() if line and not line.startswith("total"))
        if entries != r.cfg.listing_count:
            raise BenchError(f"ls -l showed {entries} entries, expected {r.cfg.listing_count}")
        r.metric(f"{phase} s", round(p["wall_s"], 3))


def video(r: Run) -> None:
    """ffprobe of the MP4 (cold), then a 5 s transcode reading from the mount (cold again)."""
    path = r.mnt / r.assets.video_key
    r.cold()
    with r.phase("ffprobe") as p:
        _run(["ffprobe", "-v", "error", "-show_format", "-show_streams", str(path)], timeout=300)
    r.metric("ffprobe s", round(p["wall_s"], 3))
    if not r.cfg.transcode:
        return
    out = r.work / f"transcode-{r.tool.name}.mp4"
    r.cold()
    with r.phase("transcode") as p:
        _run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(path), "-t", "5",
              "-vf", "scale=320:180", "-c:v", "mpeg4", "-q:v", "5", "-an", str(out)], timeout=600)
    out.unlink(missing_ok=True)
    r.metric("transcode 5 s", round(p["wall_s"], 3))


def md5(r: Run) -> None:
    """md5sum of the MP4 through the mount (cold) vs getxattr user.md5 (cold; gstore's feature)."""
    path = r.mnt / r.assets.video_key
    r.cold()
    with r.phase("md5sum") as p:
        got = _run(["md5sum", str(path)], timeout=600).stdout.split()[0]
    if got != r.assets.video_md5:
        raise BenchError(f"md5sum through the mount is {got}, expected {r.assets.video_md5}")
    r.metric("md5sum s", round(p["wall_s"], 3))
    r.cold()
    value = None
    why = None
    with r.phase("getxattr user.md5") as p:
        try:
            value = os.getxattr(path, "user.md5").decode(errors="replace").strip().strip('"')
        except OSError as exc:
            why = f"{errno.errorcode.get(exc.errno, exc.errno)} ({exc.strerror})"
    if why is not None:
        r.metric("getxattr s", None, na=f"getxattr user.md5: {why}")
    elif value != r.assets.video_md5:
        r.metric("getxattr s", None, na=f"user.md5 is {value!r}, not the object's MD5")
    else:
        r.metric("getxattr s", round(p["wall_s"], 4))


def idle(r: Run) -> None:
    """A mounted, unused daemon: CPU use over 3 s (after 1 s to settle) and its memory."""
    r.cold()
    time.sleep(1.0)
    with r.phase("idle 3 s", settle=0) as p:
        time.sleep(3.0)
    cpu = p.get("daemon_cpu_s")
    r.metric("idle CPU %", None if cpu is None else round(100 * cpu / p["wall_s"], 1))
    rss = r.tool.peak_rss_kib()
    r.metric("RSS MiB", None if rss is None else round(rss / 1024, 1))


class RssSampler:
    """VmRSS of one process every 0.25 s in a thread, to tell a flat curve from a growing one."""

    def __init__(self, pid: int | None) -> None:
        import threading

        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            kib = proc_status_kib(self.pid, "VmRSS")
            if kib is None:
                return
            self.samples.append((time.perf_counter() - t0, kib))
            self._stop.wait(0.25)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        """Peak RSS (MiB) in each quarter of the phase: flat means the last quarters do not
        climb above the first ones (within 10% + 16 MiB, for allocator noise)."""
        if len(self.samples) < 4:
            return {"quarters_mib": [], "flat": None}
        end = self.samples[-1][0] or 1.0
        quarters = [0, 0, 0, 0]
        for t, kib in self.samples:
            q = min(3, int(4 * t / end))
            quarters[q] = max(quarters[q], kib)
        mib = [round(k / 1024, 1) for k in quarters]
        first_half = max(mib[:2])
        return {"quarters_mib": mib, "flat": max(mib[2:]) <= first_half * 1.1 + 16}


def big_file(r: Run) -> None:
    """RSS while writing and then reading a big_file_size (4 GiB) file (only with --big).

    dd from /dev/zero into the mount, made durable (gstore flush / polling), then a cold
    dd back. Reported: the daemon's peak RSS per phase and whether it stayed flat."""
    key = f"big-{r.tool.name}.bin"
    path, size = r.mnt / key, r.cfg.big_file_size
    count = size // MiB
    r.cold()
    with r.phase("write") as p, RssSampler(r.tool.pid) as rss_w:
        t0 = time.perf_counter()
        _run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={count}"], timeout=3600)
        p["close_s"] = time.perf_counter() - t0
        durable = _durable(r, lambda: r.endpoint.head_size(key) == count * MiB, 0.25, p)
        if durable is None:
            raise BenchError(f"{key} not in the bucket after {r.cfg.durable_timeout:.0f} s")
        p["wall_s"] = durable - t0
    r.record["rss_write"] = rss_w.summary()
    r.cold()
    with r.phase("read cold") as p, RssSampler(r.tool.pid) as rss_r:
        p["wall_s"] = _read_all(path, count * MiB)
    r.record["rss_read"] = rss_r.summary()
    r.metric("write peak RSS MiB", _phase_peak_mib(r, "write"))
    r.metric("read peak RSS MiB", _phase_peak_mib(r, "read cold"))
    r.record["metrics"]["write RSS flat"] = _yes_no(r.record["rss_write"]["flat"])
    r.record["metrics"]["read RSS flat"] = _yes_no(r.record["rss_read"]["flat"])
    r.metric("write MiB/s to durable", _mibps(count * MiB, r.record["phases"]["write"]["wall_s"]))
    r.metric("read MiB/s", _mibps(count * MiB, r.record["phases"]["read cold"]["wall_s"]))
    try:
        r.endpoint.client.delete_object(Bucket=BUCKET, Key=key)  # the endpoint keeps it in RAM
    except Exception as exc:  # noqa: BLE001 - tidying only
        log(f"  could not delete {key}: {exc}")


def _yes_no(flat: bool | None) -> str:
    return "?" if flat is None else ("yes" if flat else "no")


def _phase_peak_mib(r: Run, phase: str) -> float | None:
    kib = r.record["phases"].get(phase, {}).get("peak_rss_kib")
    return None if kib is None else round(kib / 1024, 1)


WORKLOADS: dict[str, Callable[[Run], None]] = {
    "idle": idle,
    "seq_read": seq_read,
    "rand_4k": rand_4k,
    "rand_64k": rand_64k,
    "seq_write": seq_write,
    "small_files": small_files,
    "ls": ls,
    "video": video,
    "md5": md5,
    "big_file": big_file,  # not in DEFAULT_WORKLOADS: only with --big (or --workloads big_file)
}
DEFAULT_WORKLOADS = tuple(w for w in WORKLOADS if w != "big_file")
QUICK_WORKLOADS = ("idle", "seq_read", "rand_4k", "seq_write", "small_files", "ls", "video", "md5")


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()
