"""The driver's handle on the endpoint process: start, stats, polling for durability, stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.util import BenchError, cpu_seconds, log, stop_pid

ACCESS_KEY = "bench-key"
SECRET_KEY = "bench-secret"
REGION = "us-east-1"
BUCKET = "bench"
OPS = ("GET", "HEAD", "LIST", "PUT", "COPY", "POST", "DELETE", "OTHER")


class Endpoint:
    def __init__(self, work: Path, *, latency_s: float, bandwidth_bps: float | None,
                 seeds: dict[str, Path], listings: list[tuple[str, int, int]], log_path: Path) -> None:
        self.work = work
        self.latency_s = latency_s
        self.bandwidth_bps = bandwidth_bps
        self.seeds = seeds
        self.listings = listings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._client: Any = None
        self.poll_requests: dict[str, int] = {}
        self.poll_bytes = 0

    # -- lifecycle
    def start(self, timeout: float = 300.0) -> None:
        port_file = self.work / "endpoint.url"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "bench.endpoint_server", "--port-file", str(port_file),
               "--bucket", BUCKET, "--latency", str(self.latency_s)]
        if self.bandwidth_bps:
            cmd += ["--bandwidth", str(self.bandwidth_bps)]
        for key, path in self.seeds.items():
            cmd += ["--seed", f"{key}={path}"]
        for prefix, count, size in self.listings:
            cmd += ["--seed-listing", prefix, str(count), str(size)]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise BenchError(f"endpoint exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise BenchError("endpoint did not come up")
            time.sleep(0.1)
        self.url = port_file.read_text().strip()
        log(f"endpoint {self.url} (pid {self.proc.pid})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_pid(self.proc.pid, "bench.endpoint_server")
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.proc = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def cpu(self) -> float | None:
        return cpu_seconds(self.pid)

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError(f"the endpoint process died; see {self.log_path}")

    # -- accounting
    def _control(self, path: str, method: str = "GET") -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def reset_stats(self) -> None:
        self._control("/_gstore/stats/reset", "POST")
        self.poll_requests = dict.fromkeys(OPS, 0)
        self.poll_bytes = 0

    def stats(self) -> dict[str, int]:
        """Counters since the last reset, minus the requests our own durability polling made."""
        raw = self._control("/_gstore/stats")
        out = {op: raw.get(op, 0) - self.poll_requests.get(op, 0) for op in OPS}
        out["bytes_down"] = raw.get("bytes_sent", 0) - self.poll_bytes  # endpoint -> client
        out["bytes_up"] = raw.get("bytes_received", 0)  # client -> endpoint
        out["total"] = sum(out[op] for op in OPS)
        return out

    # -- a boto3 client of our own, to see what is in the bucket
    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.url, region_name=REGION,
                aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                              connect_timeout=10, read_timeout=60))
        return self._client

    def head_size(self, key: str) -> int | None:
        """Size of KEY, or None if absent (one HEAD, subtracted from the workload's counts)."""
        self.poll_requests["HEAD"] = self.poll_requests.get("HEAD", 0) + 1
        try:
            r = self.client.head_object(Bucket=BUCKET, Key=key)
        except Exception as exc:  # botocore ClientError 404 and friends
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(r["ContentLength"])

    def list_keys(self, prefix: str) -> dict[str, int]:
        """{key: size} under PREFIX (LIST pages and their bytes are subtracted from the counts)."""
        out: dict[str, int] = {}
        token = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": BUCKET, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            r = self.client.list_objects_v2(**kwargs)
            self.poll_requests["LIST"] = self.poll_requests.get("LIST", 0) + 1
            length = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("content-length")
            self.poll_bytes += int(length or 0)
            for obj in r.get("Contents", []):
                out[obj["Key"]] = int(obj["Size"])
            if not r.get("IsTruncated"):
                return out
            token = r["NextContinuationToken"]
