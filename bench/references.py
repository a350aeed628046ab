"""References: what each workload's figure is divided by, measured in the same run.

A figure such as "188 MiB/s" says little on a shared 2-core VM where the
endpoint is moto; "0.46x one GET stream of the same object from the same
endpoint a few seconds earlier" survives a change of machine. So every
workload that has one measures its reference right before the tools run it,
on the same endpoint and the same bytes:

* boto3, straight to the endpoint (no FUSE): one GET stream of the big object
  (cold sequential read), ``upload_file`` with 10 threads of a file of the
  written size (sequential write to durable), the small files as PUTs on 8
  threads (small files to durable), one paginated LIST of the listing prefix
  (cold ``ls -l``). What a program that talks S3 itself would get.
* ``bench.barefs``, a bare pyfuse3 + trio file system doing a ``pread`` of a
  local copy of the big object per READ, under the very workload code the
  tools run (warm and after-remount sequential reads, cached random reads).
  The ceiling of a Python FUSE daemon: what is left between gstore and it is
  gstore's own work.
* ``bench.barefs_write``, the same for creating files: the small files'
  create loop (the workload's own code) against a bare pyfuse3 + trio file
  system that writes each file to a local file and fsyncs it at close
  (``--fsync-close``): the floor of a close that is durable on local disk.

``ROWS`` says which reference each gstore figure is divided by; ``ratio`` is
always tool / reference, so "0.8x" of a MiB/s figure is 80% of the reference
speed and "1.2x" of a seconds figure takes 20% longer.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.endpoint import ACCESS_KEY, BUCKET, REGION, SECRET_KEY, Endpoint
from bench.tools import REPO, Tool
from bench.util import BenchError, MiB
from bench.workloads import Assets, Config, Run, _fio, _mibps, create_small_files, seq_read


@dataclass(frozen=True)
class Row:
    """One line of the ratio table: a tool's figure and the reference it is divided by."""

    label: str
    workload: str
    metric: str  # the same metric name in the tool's record and in the reference's
    higher_is_better: bool
    kind: str  # "boto3" or "barefs": which reference record holds it
    source: str  # what the reference is, in words


ROWS: list[Row] = [
    Row("seq read cold MiB/s", "seq_read", "cold MiB/s", True, "boto3", "one boto3 GET stream"),
    Row("seq read warm MiB/s", "seq_read", "warm MiB/s", True, "barefs", "bare pyfuse3, warm"),
    Row("seq read after remount MiB/s", "seq_read", "remount MiB/s", True, "barefs",
        "bare pyfuse3, after remount"),
    Row("rand 4 KiB IOPS", "rand_4k", "IOPS", True, "barefs", "bare pyfuse3, same fio"),
    Row("rand 4 KiB p50 ms", "rand_4k", "p50 ms", False, "barefs", "bare pyfuse3, same fio"),
    Row("rand 4 KiB p99 ms", "rand_4k", "p99 ms", False, "barefs", "bare pyfuse3, same fio"),
    Row("rand 64 KiB IOPS", "rand_64k", "IOPS", True, "barefs", "bare pyfuse3, same fio"),
    Row("rand 64 KiB p50 ms", "rand_64k", "p50 ms", False, "barefs", "bare pyfuse3, same fio"),
    Row("rand 64 KiB p99 ms", "rand_64k", "p99 ms", False, "barefs", "bare pyfuse3, same fio"),
    Row("seq write: durable s", "seq_write", "durable s", False, "boto3",
        "boto3 upload_file, 10 threads"),
    Row("small files: durable s", "small_files", "durable s", False, "boto3",
        "boto3 PUTs on 8 threads"),
    Row("small files: close s", "small_files", "close s", False, "barefs",
        "bare pyfuse3 create, fsync per close"),
    Row("ls -l cold s", "ls", "cold s", False, "boto3", "one paginated LIST"),
]


class NoDaemon(Tool):
    """A stand-in tool for references that mount nothing: Run's phases still count the
    endpoint's requests and CPU for them (the daemon's CPU and RSS are simply None)."""

    name = "boto3"
    process_name = "-"

    def version(self) -> str:
        from importlib import metadata

        return f"boto3 {metadata.version('boto3')}"


class _BarePyfuse3(Tool):
    """A bare pyfuse3 + trio file system of bench/ run as a tool (it imports ``bench``)."""

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def version(self) -> str:
        from importlib import metadata

        return f"pyfuse3 {metadata.version('pyfuse3')} + trio {metadata.version('trio')}"


class BareFuse(_BarePyfuse3):
    """bench.barefs serving the local copy of the big object under the same name."""

    name = "barefs"
    process_name = "bench.barefs"

    def __init__(self, endpoint: Endpoint, work: Path, source: Path, name: str) -> None:
        super().__init__(endpoint, work, "0")
        self.source = source
        self.file_name = name

    def command(self, mnt: Path, cache: Path) -> list[str]:
        return [sys.executable, "-m", "bench.barefs", str(self.source), str(mnt),
                "--name", self.file_name]


class BareWriteFuse(_BarePyfuse3):
    """bench.barefs_write: files created in a local folder, each fsynced at its close."""

    name = "barefs"
    process_name = "bench.barefs_write"

    def command(self, mnt: Path, cache: Path) -> list[str]:
        return [sys.executable, "-m", "bench.barefs_write", str(cache), str(mnt), "--fsync-close"]


@dataclass
class Context:
    """What the references need: the same endpoint, sizes and assets as the workloads."""

    endpoint: Endpoint
    cfg: Config
    assets: Assets
    work: Path
    logs: Path
    results_dir: Path
    local_big: Path  # a local copy of the big object (what barefs serves)
    write_file: Path  # a local file of the written size (what upload_file sends)
    _client: Any = None

    @property
    def client(self) -> Any:
        """A boto3 client with a pool big enough for the threaded references."""
        if self._client is None:
            import boto3
            from botocore.config import Config as BotoConfig

            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint.url, region_name=REGION,
                aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                config=BotoConfig(s3={"addressing_style": "path"}, max_pool_connections=32,
                                  retries={"max_attempts": 3}, connect_timeout=10, read_timeout=120))
        return self._client

    def run(self, workload: str, tool: Tool) -> Run:
        return Run(workload, tool, self.endpoint, self.cfg, self.assets, self.work, self.logs,
                   self.results_dir)

    def direct(self, workload: str) -> Run:
        return self.run(workload, NoDaemon(self.endpoint, self.work, "0"))

    def bare(self, workload: str) -> Run:
        return self.run(workload, BareFuse(self.endpoint, self.work, self.local_big,
                                           self.assets.big_key))


# --------------------------------------------------------------------------- the references


def ref_seq_read(ctx: Context) -> dict[str, Run]:
    direct = ctx.direct("seq_read")
    with direct.phase("GET stream") as p:
        t0 = time.perf_counter()
        body = ctx.client.get_object(Bucket=BUCKET, Key=ctx.assets.big_key)["Body"]
        got = sum(len(chunk) for chunk in body.iter_chunks(MiB))
        p["wall_s"] = time.perf_counter() - t0
    if got != ctx.cfg.big_size:
        raise BenchError(f"GET returned {got} bytes, expected {ctx.cfg.big_size}")
    direct.metric("cold MiB/s", _mibps(got, p["wall_s"]))
    bare = ctx.bare("seq_read")
    try:
        seq_read(bare)  # cold here reads the local disk: reported, but not a reference
    finally:
        bare.stop()
    return {"boto3": direct, "barefs": bare}


def _ref_fio(ctx: Context, workload: str, bs: str) -> dict[str, Run]:
    bare = ctx.bare(workload)
    try:
        _fio(bare, bs)
    finally:
        bare.stop()
    return {"barefs": bare}


def ref_seq_write(ctx: Context) -> dict[str, Run]:
    from boto3.s3.transfer import TransferConfig

    r = ctx.direct("seq_write")
    key = "reference-upload.bin"
    size = ctx.write_file.stat().st_size
    with r.phase("upload_file") as p:
        t0 = time.perf_counter()
        ctx.client.upload_file(str(ctx.write_file), BUCKET, key,
                               Config=TransferConfig(max_concurrency=10, use_threads=True))
        p["wall_s"] = time.perf_counter() - t0
    if ctx.endpoint.head_size(key) != size:
        raise BenchError("upload_file returned but the bucket does not have the object")
    ctx.client.delete_object(Bucket=BUCKET, Key=key)  # the endpoint keeps objects in memory
    r.metric("durable s", round(p["wall_s"], 2))
    r.metric("durable MiB/s", _mibps(size, p["wall_s"]))
    return {"boto3": r}


def ref_small_files(ctx: Context) -> dict[str, Run]:
    r = ctx.direct("small_files")
    prefix = "reference-small"
    bodies = [os.urandom(ctx.cfg.small_size) for _ in range(ctx.cfg.small_count)]
    client = ctx.client

    def put(i: int) -> None:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/f{i:05d}.bin", Body=bodies[i])

    with r.phase("PUTs") as p:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, range(len(bodies))))
        p["wall_s"] = time.perf_counter() - t0
    keys = ctx.endpoint.list_keys(prefix + "/")
    if len(keys) != len(bodies):
        raise BenchError(f"{len(keys)} of {len(bodies)} PUT objects in the bucket")
    names = sorted(keys)
    for i in range(0, len(names), 1000):
        client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in names[i:i + 1000]]})
    r.metric("durable s", round(p["wall_s"], 2))
    r.metric("files/s", round(len(bodies) / p["wall_s"], 1))
    bare = ctx.run("small_files", BareWriteFuse(ctx.endpoint, ctx.work, "0"))
    try:
        bare.cold()
        with bare.phase("create") as p:
            t0 = time.perf_counter()
            create_small_files(bare.mnt / "small-barefs", bodies)
            p["wall_s"] = time.perf_counter() - t0
        bare.metric("close s", round(p["wall_s"], 2))
    finally:
        bare.stop()
    return {"boto3": r, "barefs": bare}


def ref_ls(ctx: Context) -> dict[str, Run]:
    r = ctx.direct("ls")
    prefix = ctx.assets.listing_prefix.rstrip("/") + "/"
    with r.phase("LIST pass") as p:
        t0 = time.perf_counter()
        count = 0
        for page in ctx.client.get_paginator("list_objects_v2").paginate(
                Bucket=BUCKET, Prefix=prefix, Delimiter="/", PaginationConfig={"PageSize": 1000}):
            count += len(page.get("Contents", [])) + len(page.get("CommonPrefixes", []))
        p["wall_s"] = time.perf_counter() - t0
    if count != ctx.cfg.listing_count:
        raise BenchError(f"LIST found {count} objects, expected {ctx.cfg.listing_count}")
    r.metric("cold s", round(p["wall_s"], 3))
    return {"boto3": r}


REFERENCES: dict[str, Callable[[Context], dict[str, Run]]] = {
    "seq_read": ref_seq_read,
    "rand_4k": lambda ctx: _ref_fio(ctx, "rand_4k", "4k"),
    "rand_64k": lambda ctx: _ref_fio(ctx, "rand_64k", "64k"),
    "seq_write": ref_seq_write,
    "small_files": ref_small_files,
    "ls": ref_ls,
}


def measure(workload: str, ctx: Context) -> dict[str, dict[str, Any]]:
    """The reference records of one workload ({kind: record}); {} if it has none."""
    fn = REFERENCES.get(workload)
    if fn is None:
        return {}
    runs = fn(ctx)
    out = {}
    for kind, run in runs.items():
        run.stop()
        out[kind] = {**run.record, "version": run.tool.version()}
    return out


# --------------------------------------------------------------------------- ratios


def ratio(value: float | None, reference: float | None) -> float | None:
    """tool / reference, or None when either is missing or the reference is 0."""
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def slowdown(row: Row, value: float | None, reference: float | None) -> float | None:
    """How many times worse than the reference (>1: worse), whichever way the metric points."""
    q = ratio(value, reference)
    if q is None:
        return None
    if row.higher_is_better:
        return None if q <= 0 else 1 / q
    return q


def reference_value(results: dict[str, Any], row: Row) -> float | None:
    rec = results.get("references", {}).get(row.workload, {}).get(row.kind)
    if not rec or rec.get("status") != "ok":
        return None
    v = rec.get("metrics", {}).get(row.metric)
    return v if isinstance(v, (int, float)) else None
