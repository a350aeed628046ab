"""The benchmark's S3 endpoint, run as its own process.

It is gstore's test endpoint (``gstore.testing.s3server.S3TestServer``: moto
with the ranged-GET fast path, TCP_NODELAY and request accounting), served by
cheroot with connections kept open between requests as S3 keeps them
(``keep_alive=True``; ``--close-connections`` gives the tests' werkzeug server,
a handshake per request, which cost every client and the endpoint CPU no real
endpoint charges), plus one thing the CLI cannot do: seed the bucket
in-process before serving. Putting 10,000 small objects over HTTP costs ~45 s
on a 2-core machine (~230 PUT/s with 16 client threads: moto and werkzeug's
one-connection-per-request server are the limit); seeding them straight into
moto's backend takes about a second. Seeding is not counted in the stats.

    python -m bench.endpoint_server --port-file F --bucket bench \
        [--seed KEY=PATH ...] [--seed-listing PREFIX COUNT SIZE] \
        [--latency SECONDS] [--bandwidth BYTES_PER_S]

The endpoint URL is written to the port file once the bucket is seeded; the
process serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from gstore.testing.s3server import S3TestServer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.endpoint_server")
    p.add_argument("--port-file", required=True)
    p.add_argument("--bucket", default="bench")
    p.add_argument("--seed", action="append", default=[], metavar="KEY=PATH",
                   help="store the file PATH as object KEY")
    p.add_argument("--seed-listing", nargs=3, action="append", default=[],
                   metavar=("PREFIX", "COUNT", "SIZE"),
                   help="store COUNT objects of SIZE bytes under PREFIX/")
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--bandwidth", type=float, default=None)
    p.add_argument("--close-connections", action="store_true",
                   help="werkzeug's server, a new connection per request (the tests' endpoint), "
                        "instead of cheroot keeping them open as S3 does")
    args = p.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    server = S3TestServer("127.0.0.1", 0, latency=args.latency, bandwidth=args.bandwidth or None,
                          keep_alive=not args.close_connections)
    server.start()
    try:
        server.client().create_bucket(Bucket=args.bucket)
        for spec in args.seed:
            key, _, path = spec.partition("=")
            server.seed(args.bucket, {key: Path(path).read_bytes()})
        for prefix, count, size in args.seed_listing:
            body = b"x" * int(size)
            batch: dict[str, bytes] = {}
            for i in range(int(count)):
                batch[f"{prefix.rstrip('/')}/obj-{i:06d}.dat"] = body
                if len(batch) >= 1000:
                    server.seed(args.bucket, batch)
                    batch = {}
            if batch:
                server.seed(args.bucket, batch)
        server.stats.reset()
        tmp = f"{args.port_file}.tmp"
        with open(tmp, "w") as f:
            f.write(server.endpoint_url + "\n")
        os.replace(tmp, args.port_file)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
