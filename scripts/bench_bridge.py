#!/usr/bin/env python3
"""Measure the cost of one backend call from trio through each bridge design.

Compares, for a trivial coroutine on fsspec's asyncio IO loop:
  * gstore's AsyncioBridge (run_coroutine_threadsafe + TrioToken.run_sync_soon), and
  * trio.to_thread.run_sync(fsspec.asyn.sync(...)), the two-hop alternative,
sequentially (latency per call) and with 500 calls in flight (throughput, and
whether the 40-thread default limiter caps concurrency).
Usage: .venv/bin/python scripts/bench_bridge.py
"""

from __future__ import annotations

import asyncio
import statistics
import time

import fsspec.asyn
import trio

from gstore.backends.bridge import AsyncioBridge

LOOP = fsspec.asyn.get_loop()


async def tiny(delay: float = 0.0) -> int:
    await asyncio.sleep(delay)
    return 1


async def via_bridge(bridge: AsyncioBridge, delay: float) -> int:
    return await bridge.run(tiny(delay))


async def via_thread(delay: float) -> int:
    return await trio.to_thread.run_sync(lambda: fsspec.asyn.sync(LOOP, tiny, delay))


async def measure() -> None:
    bridge = AsyncioBridge(LOOP)
    for name, call in (("bridge", lambda d: via_bridge(bridge, d)), ("to_thread", via_thread)):
        samples = []
        for _ in range(2000):
            start = time.perf_counter()
            await call(0.0)
            samples.append(time.perf_counter() - start)
        samples.sort()
        p50, p99 = samples[len(samples) // 2], samples[int(len(samples) * 0.99)]
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(500):
                nursery.start_soon(call, 0.05)
        wall = time.perf_counter() - start
        print(f"{name:10s} sequential: p50 {p50 * 1e6:7.1f} us  p99 {p99 * 1e6:7.1f} us  "
              f"mean {statistics.mean(samples) * 1e6:7.1f} us | 500 concurrent 50 ms calls: {wall * 1000:7.1f} ms")


if __name__ == "__main__":
    trio.run(measure)
