#!/usr/bin/env python3
"""How fast the multipart upload path can feed parts, with the network taken out.

gstore's :class:`~gstore.write.uploader.Uploader` uploads one staged file of
SIZE MiB to a backend that answers every part after a fixed delay and keeps
nothing (``--part-ms 0``: at once). What is left is gstore's own pipeline:
hashing each part (its Content-MD5) and the whole object (``user.md5``),
slots, and the trio/thread hops. ``--part-ms 0`` gives the pipeline's ceiling
in MiB/s, which a fast network to a real store would hit; a delay per part
shows whether a freed slot waits for hashing before it sends. Compare two
trees by running this script with ``PYTHONPATH=<tree>/src``.

    .venv/bin/python scripts/measure_part_pipeline.py [--size-mib 256] [--part-ms 0]
        [--rounds 5] [--part-concurrency 8]
Prints the median seconds and MiB/s over the rounds. Nothing is mounted; no root needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from gstore.backends.base import Capabilities, ObjectInfo, UploadedPart
from gstore.backends.filebody import FileRegion
from gstore.write.staging import StagingArea
from gstore.write.uploader import ConflictPolicy, Uploader

MiB = 1024 * 1024


class DelayedPartsBackend:
    """Just what a multipart upload of a new file calls; each part takes ``delay`` seconds."""

    display = "measure"
    capabilities = dataclasses.replace(Capabilities(), multipart=True, conditional_writes=True)
    min_copy_part = 5 * MiB

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.sizes: dict[str, int] = {}

    def part_size(self, size: int) -> int:
        return 8 * MiB

    async def start_multipart(self, path: str, **kwargs: Any) -> str:
        self.sizes[path] = 0
        return "upload"

    async def upload_part(self, path: str, upload_id: str, number: int, data: FileRegion) -> UploadedPart:
        if self.delay:
            await trio.sleep(self.delay)
        self.sizes[path] += len(data)
        return UploadedPart(number, data.md5_hex)

    async def complete_multipart(self, path: str, upload_id: str, parts: Any, **kwargs: Any) -> None:
        pass

    async def abort_multipart(self, path: str, upload_id: str) -> None:
        pass

    async def head(self, path: str) -> ObjectInfo:
        return ObjectInfo(name=path, is_dir=False, size=self.sizes[path], etag="x-1")


async def one_round(staging: StagingArea, data: bytes, delay: float, part_concurrency: int) -> float:
    backend = DelayedPartsBackend(delay)

    async def nothing_missing(*args: Any) -> None:
        pass

    uploader = Uploader(backend, staging, ensure_local=nothing_missing,  # type: ignore[arg-type]
                        policy=ConflictPolicy.OVERWRITE, part_concurrency=part_concurrency)
    staged = staging.create("big.bin", base=None, expect=None, size=0, keep_open=True)
    StagingArea.write(staged, 0, data)
    start = time.perf_counter()
    result = await uploader.upload(staged, staged.generation)
    took = time.perf_counter() - start
    if result.md5 is not None and result.md5 != hashlib.md5(data).hexdigest():
        raise SystemExit("the whole-object MD5 is wrong")
    staging.remove(staged)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--part-ms", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--part-concurrency", type=int, default=8)
    args = parser.parse_args()
    data = os.urandom(args.size_mib * MiB)
    with tempfile.TemporaryDirectory() as tmp:
        staging = StagingArea(Path(tmp) / "staging")
        times = [trio.run(one_round, staging, data, args.part_ms / 1000, args.part_concurrency)
                 for _ in range(args.rounds)]
        staging.close()
    median = statistics.median(times)
    print(f"{args.size_mib} MiB, parts answered after {args.part_ms:g} ms, {args.part_concurrency} slots: "
          f"median {median:.3f} s ({args.size_mib / median:.0f} MiB/s) over {args.rounds} rounds "
          f"({', '.join(f'{t:.3f}' for t in times)})")


if __name__ == "__main__":
    main()
