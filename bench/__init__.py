"""Benchmark harness: gstore vs rclone mount vs s3fs-fuse on a local S3 endpoint.

Run it with ``scripts/bench`` (see docs/benchmarks.md).  Modules:

* ``endpoint_server``: the S3 endpoint process (our moto-based test server, seeded in-process)
* ``endpoint``: the driver's handle on it (start/stop, stats reset/snapshot, boto3 polling)
* ``tools``: how each filesystem is mounted, found (PID), measured and unmounted
* ``workloads``: the measurements
* ``references``: what each figure is divided by, measured in the same run (boto3 straight
  to the endpoint; ``barefs``, a bare pyfuse3 + trio file system, the Python FUSE ceiling)
* ``report``: results.md and the PNG charts
* ``run``: command line and orchestration
"""
