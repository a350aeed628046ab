"""Command line and orchestration: endpoint, assets, workload x tool loop, results."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import references, report
from bench.endpoint import BUCKET, Endpoint
from bench.tools import REPO, TOOLS, Tool, tool_info
from bench.util import BenchError, MiB, drop_caches, first_line, log, unmount, which
from bench.workloads import (DEFAULT_WORKLOADS, QUICK_WORKLOADS, WORKLOADS, Assets, Config, Run,
                             Unsupported, md5_of)

VIDEO_FILTER = "testsrc=size=640x360:rate=25,noise=alls=60:allf=t"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark gstore against rclone mount and s3fs-fuse on a local S3 endpoint "
                    "(127.0.0.1). Writes results.json, results.md and PNG charts.")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes and fewer workloads, for a smoke run (~3 minutes)")
    p.add_argument("--tools", default="gstore,rclone,s3fs",
                   help="comma-separated subset of: %(default)s")
    p.add_argument("--workloads", default=None,
                   help=f"comma-separated subset of: {','.join(WORKLOADS)} (default: all; "
                        f"--quick: {','.join(QUICK_WORKLOADS)})")
    p.add_argument("--out", default=None,
                   help="results folder (default: bench-results/<timestamp>/ in the repository)")
    p.add_argument("--latency", type=float, default=0.0, metavar="MS",
                   help="emulated latency before each response's first byte, in ms (default 0)")
    p.add_argument("--bandwidth", type=float, default=None, metavar="MBPS",
                   help="emulated per-request bandwidth cap on response bodies, in MiB/s (default: none)")
    p.add_argument("--cache-size", default="2G",
                   help="on-disk cache bound for gstore (--cache-size) and rclone "
                        "(--vfs-cache-max-size); s3fs has no bound (default %(default)s)")
    p.add_argument("--fio-runtime", type=int, default=None, metavar="S",
                   help="seconds per fio job (default 10, --quick 4)")
    p.add_argument("--profile", default=None, metavar="WORKLOAD[,WORKLOAD...]",
                   help="record a py-spy profile (raw, per thread, plus a text summary) of the "
                        "gstore daemon during these workloads' measured phases; written next to "
                        "the results")
    p.add_argument("--listing-count", type=int, default=None, metavar="N",
                   help="objects in the ls prefix (default 10,000; 2,000 with --latency, the size "
                        "the latency goal is stated for; --quick 2,000)")
    p.add_argument("--big", action="store_true",
                   help="add the big_file workload: peak RSS while writing and reading a 4 GiB "
                        "file (needs ~2x that in free RAM: the endpoint keeps objects in memory)")
    p.add_argument("--big-size", type=float, default=4.0, metavar="GIB",
                   help="size of the big_file workload's file (default %(default)s GiB)")
    p.add_argument("--no-references", action="store_true",
                   help="skip the references (boto3 straight to the endpoint, bare pyfuse3 file "
                        "system) that every figure is divided by")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch directory (debugging)")
    args = p.parse_args(argv)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    for t in args.tools:
        if t not in TOOLS:
            p.error(f"unknown tool {t!r} (known: {', '.join(TOOLS)})")
    if args.workloads is None:
        args.workloads = list(QUICK_WORKLOADS if args.quick else DEFAULT_WORKLOADS)
        if args.big:
            args.workloads.append("big_file")
    else:
        args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r} (known: {', '.join(WORKLOADS)})")
    args.profile = [w.strip() for w in (args.profile or "").split(",") if w.strip()]
    for w in args.profile:
        if w not in WORKLOADS:
            p.error(f"--profile: unknown workload {w!r}")
    return args


def make_config(args: argparse.Namespace) -> Config:
    if args.quick:
        cfg = Config(big_size=64 * MiB, write_size=64 * MiB, small_count=200, small_size=4096,
                     listing_count=2000, fio_runtime=4, video_seconds=10, transcode=False,
                     durable_timeout=60)
    else:
        cfg = Config(big_size=256 * MiB, write_size=256 * MiB, small_count=1000, small_size=4096,
                     listing_count=10_000, fio_runtime=10, video_seconds=30, transcode=True,
                     durable_timeout=180)
    if args.fio_runtime:
        cfg.fio_runtime = args.fio_runtime
    if args.listing_count:
        cfg.listing_count = args.listing_count
    elif args.latency > 0:
        cfg.listing_count = 2000  # the size issue #14's latency goal is stated for
    cfg.big_file_size = int(args.big_size * 1024) * MiB
    if "big_file" in args.workloads:
        cfg.durable_timeout = max(cfg.durable_timeout, 1800)
    cfg.profile = args.profile
    if args.profile:
        cfg.py_spy = which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(cfg.py_spy).exists():
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    return cfg


def machine_info() -> dict[str, Any]:
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    distro = "unknown"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "memory_gib": round(mem_kib / 1024 / 1024, 1), "cpu": cpu,
            "kernel": platform.release(), "os": distro, "python": platform.python_version(),
            "root": os.geteuid() == 0}


def versions() -> dict[str, str]:
    out = {"fio": first_line(["fio", "--version"]),
           "ffmpeg": first_line(["ffmpeg", "-version"]).split(" Copyright")[0],
           "fuse3": first_line(["fusermount3", "--version"])}
    for pkg in ("moto", "s3fs", "fsspec", "boto3", "pyfuse3", "trio", "matplotlib"):
        try:
            out[f"python {pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def make_video(seconds: int, dest: Path) -> Path:
    """The ~100 MiB (30 s) test MP4, generated once and kept in bench-results/.assets/."""
    if dest.exists() and dest.stat().st_size > 0:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"generating a {seconds} s test video with ffmpeg ({dest})")
    tmp = dest.with_suffix(".tmp.mp4")
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", VIDEO_FILTER,
                    "-t", str(seconds), "-c:v", "mpeg4", "-q:v", "2", "-y", str(tmp)], check=True)
    os.replace(tmp, dest)
    return dest


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    if os.geteuid() != 0:
        log("warning: not root: kernel caches cannot be dropped between cold runs")

    started = dt.datetime.now()
    out = Path(args.out) if args.out else REPO / "bench-results" / started.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gstore-bench."))
    log(f"results: {out}  scratch: {work}")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # explicit: a shell starting us in the background may have left SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)

    results: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": "scripts/bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {**{k: v for k, v in vars(cfg).items() if k != "py_spy"},
                   "cache_size": args.cache_size, "tools": args.tools, "workloads": args.workloads,
                   "quick": args.quick},
        "machine": machine_info(),
        "versions": versions(),
        "endpoint": {"kind": "gstore.testing.s3server.S3TestServer (moto server + ranged-GET fast "
                             "path, TCP_NODELAY, keep-alive: served by cheroot) in its own process on 127.0.0.1",
                     "latency_ms": args.latency, "bandwidth_mibps": args.bandwidth},
        "tools": {}, "references": {}, "workloads": {}, "errors": [],
    }
    endpoint: Endpoint | None = None
    tools: dict[str, Tool] = {}
    interrupted = False
    try:
        # -- assets and endpoint
        big = work / "big.bin"
        write_random(big, cfg.big_size)
        video_path = make_video(cfg.video_seconds,
                                REPO / "bench-results" / ".assets" / f"video-{cfg.video_seconds}s.mp4")
        assets = Assets(big_key="big.bin", video_key="video.mp4", video_md5=md5_of(video_path),
                        video_size=video_path.stat().st_size, listing_prefix="listing")
        results["assets"] = {"big_bytes": cfg.big_size, "video_bytes": assets.video_size,
                             "video_seconds": cfg.video_seconds, "video_md5": assets.video_md5,
                             "listing_objects": cfg.listing_count, "listing_object_bytes": 1024}
        log(f"starting the endpoint and seeding bucket {BUCKET!r}")
        t0 = time.perf_counter()
        endpoint = Endpoint(work, latency_s=args.latency / 1000.0,
                            bandwidth_bps=args.bandwidth * MiB if args.bandwidth else None,
                            seeds={assets.big_key: big, assets.video_key: video_path},
                            listings=[(assets.listing_prefix, cfg.listing_count, 1024)],
                            log_path=logs / "endpoint.log")
        endpoint.start()
        results["endpoint"]["seed_s"] = round(time.perf_counter() - t0, 2)
        # big.bin stays: the bare FUSE reference serves it, upload_file sends it
        write_file = big
        if cfg.write_size != cfg.big_size:
            write_file = work / "write.bin"
            write_random(write_file, cfg.write_size)
        ref_ctx = references.Context(endpoint, cfg, assets, work, logs, out, local_big=big,
                                     write_file=write_file)

        for name in args.tools:
            tools[name] = TOOLS[name](endpoint, work, args.cache_size)
            results["tools"][name] = tool_info(tools[name])

        # -- workload-major: machine noise over time hits every tool alike
        for wl in args.workloads:
            results["workloads"][wl] = {}
            if not args.no_references and wl in references.REFERENCES:
                log(f"{wl} / references")
                try:
                    results["references"][wl] = references.measure(wl, ref_ctx)
                    for kind, rec in results["references"][wl].items():
                        summary = ", ".join(f"{k}={v}" for k, v in rec["metrics"].items())
                        log(f"  {kind}: {summary}")
                except Exception as exc:  # botocore's errors too: the tools still run
                    results["errors"].append(f"{wl}/references: {type(exc).__name__}: {exc}")
                    log(f"  ERROR: {type(exc).__name__}: {exc}")
                    (logs / f"traceback-{wl}-references.txt").write_text(traceback.format_exc())
            for name, tool in tools.items():
                log(f"{wl} / {name}")
                run = Run(wl, tool, endpoint, cfg, assets, work, logs, out)
                run.record["loadavg_at_start"] = round(os.getloadavg()[0], 2)
                try:
                    WORKLOADS[wl](run)
                except Unsupported as exc:
                    run.record["status"] = "n/a"
                    run.record["note"] = str(exc)
                    log(f"  n/a: {exc}")
                except (BenchError, OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
                    run.record["status"] = "error"
                    run.record["note"] = f"{type(exc).__name__}: {exc}"
                    results["errors"].append(f"{wl}/{name}: {exc}")
                    log(f"  ERROR: {exc}")
                    (logs / f"traceback-{wl}-{name}.txt").write_text(traceback.format_exc())
                finally:
                    run.stop()
                rss = [s.get("peak_rss_kib") for s in run.record["sessions"] if s.get("peak_rss_kib")]
                run.record["peak_rss_kib"] = max(rss) if rss else None
                results["workloads"][wl][name] = run.record
                summary = ", ".join(f"{k}={v}" for k, v in run.record["metrics"].items())
                if summary:
                    log(f"  {summary}")
                _save(out, results)
    except KeyboardInterrupt:
        interrupted = True
        results["errors"].append("interrupted")
        log("interrupted: cleaning up")
    finally:
        for tool in tools.values():
            try:
                tool.stop()
            except Exception as exc:  # keep cleaning up
                log(f"cleanup of {tool.name}: {exc}")
        for d in (work / "mnt").glob("*") if (work / "mnt").exists() else []:
            unmount(d)
        if endpoint is not None:
            endpoint.stop()
        if args.keep_work:
            log(f"scratch kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        drop_caches()

    finished = dt.datetime.now()
    results["finished"] = finished.isoformat(timespec="seconds")
    results["duration_s"] = round((finished - started).total_seconds(), 1)
    _save(out, results)
    try:
        report.write(out, results)
    except Exception:
        log("report failed:\n" + traceback.format_exc())
        return 1
    for line in report.terminal_summary(results):
        print(line, flush=True)
    log(f"done in {results['duration_s']:.0f} s: {out / 'results.md'}")
    if interrupted:
        return 130
    return 1 if results["errors"] else 0


def _save(out: Path, results: dict[str, Any]) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp, out / "results.json")
