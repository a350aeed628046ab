"""Summarize a py-spy ``--format raw --threads`` profile: where the daemon's CPU time goes.

    python -m bench.profile_summary PROFILE.raw [--top 25]

Prints samples per thread, the functions with the most samples anywhere on the
stack (inclusive), the leaf functions (self time), and the same two lists
restricted to gstore's own code. py-spy (without ``--idle``) only records
threads that are running, so the samples are CPU time, not waiting.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path


def parse(path: Path) -> list[tuple[str, list[str], int]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0]
        m = re.match(r"thread \((\w+)\): ?(.*)", thread)
        name = m.group(2) if m else thread
        name = re.sub(r"\d+", "N", name) or "?"
        out.append((name, frames[1:], int(count)))
    return out


def short(frame: str) -> str:
    """'func (path/to/mod.py:123)' -> 'func (mod.py)': lines differ between samples of one function."""
    m = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({m.group(2)})"


def summarize(path: Path, top: int = 25) -> str:
    rows = parse(path)
    total = sum(c for _, _, c in rows) or 1
    threads: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    g_incl: collections.Counter[str] = collections.Counter()
    g_leaf: collections.Counter[str] = collections.Counter()
    for thread, frames, count in rows:
        threads[thread] += count
        names = [short(f) for f in frames]
        for f in set(names):
            incl[f] += count
            if "gstore/" in f:
                g_incl[f] += count
        if names:
            leaf[names[-1]] += count
            own = [f for f in names if "gstore/" in f]
            if own:
                g_leaf[own[-1]] += count  # innermost gstore frame: gstore code and what it calls

    def table(title: str, counter: collections.Counter[str]) -> list[str]:
        lines = [f"\n{title}", f"{'samples':>8} {'share':>6}  function"]
        for f, c in counter.most_common(top):
            lines.append(f"{c:>8} {100 * c / total:5.1f}%  {f}")
        return lines

    out = [f"{path}: {total} samples (CPU only; rate as recorded)"]
    out += table("Samples per thread", threads)
    out += table("Inclusive (anywhere on the stack)", incl)
    out += table("Self (leaf frame)", leaf)
    out += table("gstore functions, inclusive", g_incl)
    out += table("Innermost gstore frame (gstore code plus the libraries it calls)", g_leaf)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_summary")
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    sys.stdout.write(summarize(args.profile, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
