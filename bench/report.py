"""results.md (one table per workload group, plus backend requests) and PNG charts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.references import ROWS, ratio, reference_value, slowdown

MiB = 1024 * 1024
COLORS = {"gstore": "#1f77b4", "rclone": "#ff7f0e", "s3fs": "#2ca02c"}
OPS = ("GET", "HEAD", "LIST", "PUT", "POST", "COPY", "DELETE")


def _sz(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n / 1024:.0f} KiB"


def describe(results: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Workload name -> (title, how it is measured)."""
    c = results["config"]
    a = results.get("assets", {})
    fio = (f"Cached random reads: a fresh mount with empty caches reads the {_sz(c['big_size'])} "
           "object once (`dd`, phase prime), then fio, 1 job, psync, iodepth 1, --direct=1 "
           f"(O_DIRECT: every read is one FUSE request), time-based {c['fio_runtime']} s, same "
           "random sequence on every tool. Latency is fio's completion latency per read.")
    return {
        "idle": ("Idle daemon",
                 "Mount, wait 1 s, then measure the daemon's CPU use over 3 s with nothing "
                 "touching the mount (a check that a daemon costs nothing when unused)."),
        "seq_read": ("Sequential read",
                     f"`dd bs=1M` of a {_sz(c['big_size'])} object to /dev/null. cold: fresh mount, "
                     "emptied cache dir, kernel caches dropped; warm: again on the same mount; "
                     "remount: unmount, drop kernel caches, mount again on the kept cache dir. "
                     "MiB/s, higher is better."),
        "rand_4k": ("Random 4 KiB reads", fio),
        "rand_64k": ("Random 64 KiB reads", fio),
        "seq_write": ("Sequential write",
                      f"write a new {_sz(c['write_size'])} file in 1 MiB writes, close. close s: from "
                      "open to close returning; durable s: from open until the object is in the "
                      "bucket: for gstore until `gstore flush MNT` returns (it returns once every "
                      "pending upload is confirmed; a HEAD then checks), for rclone and s3fs until "
                      "a HEAD on the endpoint shows the full object (polled every 50 ms; rclone "
                      "uploads after its 5 s --vfs-write-back delay, s3fs at close). Lower is better."),
        "small_files": ("Small files",
                        f"mkdir, then create {c['small_count']} files of {_sz(c['small_size'])} "
                        "(open, write, close each). close s: until the last close returns; "
                        "durable s: for gstore until `gstore flush MNT` returns, for rclone and "
                        "s3fs until a listing shows all of them (polled every 250 ms)."),
        "ls": ("Directory listing",
               f"`ls -l` of a prefix holding {c['listing_count']:,} objects: cold (fresh mount, "
               "kernel caches dropped), then warm (same mount, right after). Seconds."),
        "video": ("Video",
                  f"`ffprobe -show_format -show_streams` of a {_sz(a.get('video_bytes'))} MP4 "
                  "(moov atom at the end), cold; then `ffmpeg -t 5 -vf scale=320:180 -c:v mpeg4` "
                  "of its first 5 s to /tmp, cold again. Seconds."),
        "big_file": ("Big file memory",
                     f"`dd if=/dev/zero bs=1M` of a {_sz(c.get('big_file_size'))} file into the "
                     "mount until durable, then a cold `dd` back. The daemon's peak RSS per phase "
                     "and whether it stayed flat (VmRSS sampled every 0.25 s: the last two "
                     "quarters of the phase within 10% + 16 MiB of the first two)."),
        "md5": ("MD5 of a file",
                f"`md5sum` of the {_sz(a.get('video_bytes'))} MP4 through the mount (cold) vs "
                "getxattr(2) of `user.md5` (what `getfattr -n user.md5` does; cold). Seconds."),
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _load_note(results: dict[str, Any]) -> str:
    loads = [rec.get("loadavg_at_start") for by_tool in results["workloads"].values()
             for rec in by_tool.values() if rec.get("loadavg_at_start") is not None]
    if not loads:
        return "machine load not recorded"
    return (f"1-minute load average at the start of each workload: {min(loads):.2f} to {max(loads):.2f} "
            f"(median {sorted(loads)[len(loads) // 2]:.2f})")


def _mib(n: int | None) -> str:
    if n is None:
        return "?"
    return "0" if n == 0 else (f"{n / MiB:.1f}" if n >= MiB / 10 else f"{n / MiB:.3f}")


# --------------------------------------------------------------------------- references


def _x(q: float | None) -> str:
    if q is None:
        return "–"
    return f"{q:.2f}×" if q < 10 else f"{q:,.0f}×"


def reference_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per ratio-table row present in this run: label, source, reference value, and
    each tool's value, its ratio to the reference and how many times worse it is."""
    out = []
    for row in ROWS:
        if row.workload not in results["workloads"]:
            continue
        ref = reference_value(results, row)
        tools = {}
        for t in results["tools"]:
            v = _get(results, row.workload, t, row.metric)
            tools[t] = {"value": v, "ratio": ratio(v, ref), "worse": slowdown(row, v, ref)}
        out.append({"row": row, "reference": ref, "tools": tools})
    return out


def reference_table(results: dict[str, Any]) -> list[str]:
    tools = list(results["tools"])
    lines = ["| figure | reference | reference value | " + " | ".join(f"{t} | {t} ÷ ref" for t in tools) + " |",
             "|---|---|---:|" + "---:|---:|" * len(tools)]
    for r in reference_rows(results):
        row = r["row"]
        cells = [f"{_fmt(r['tools'][t]['value'])} | {_x(r['tools'][t]['ratio'])}" for t in tools]
        better = "higher is better" if row.higher_is_better else "lower is better"
        lines.append(f"| {row.label} ({better}) | {row.source} | {_fmt(r['reference'])} | "
                     + " | ".join(cells) + " |")
    return lines


def furthest(results: dict[str, Any], tool: str = "gstore", n: int = 2) -> list[tuple[str, str, float]]:
    """The n workloads where the tool is furthest from its reference: (workload, label, times
    worse), one entry per workload (its worst figure)."""
    worst: dict[str, tuple[str, float]] = {}
    for r in reference_rows(results):
        w = r["tools"].get(tool, {}).get("worse")
        wl = r["row"].workload
        if w is not None and (wl not in worst or w > worst[wl][1]):
            worst[wl] = (r["row"].label, w)
    ranked = sorted(worst.items(), key=lambda kv: -kv[1][1])
    return [(wl, label, w) for wl, (label, w) in ranked[:n]]


def _peak_rss_mib(results: dict[str, Any], tool: str) -> float | None:
    peaks: list[int] = [int(r.get("peak_rss_kib") or 0) for by in results["workloads"].values()
                        for t, r in by.items() if t == tool]
    return round(max(peaks) / 1024, 1) if peaks and max(peaks) else None


def goals(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Issue #14's measurable goals for gstore: (goal, figure, "pass"/"FAIL"/"–")."""
    out: list[tuple[str, str, str]] = []
    lat = results["endpoint"].get("latency_ms") or 0
    cond = "" if lat == 20 else f" (stated for --latency 20; this run: {lat:g} ms)"
    by_label = {r["row"].label: r for r in reference_rows(results)}

    def verdict(ok: bool | None) -> str:
        return "–" if ok is None else ("pass" if ok else "FAIL")

    ls = by_label.get("ls -l cold s", {}).get("tools", {}).get("gstore", {}).get("ratio")
    if "ls" in results["workloads"]:
        n = results["config"].get("listing_count")
        out.append((f"cold `ls -l` of {n:,} objects within 1.2× one LIST pass{cond}",
                    _x(ls), verdict(None if ls is None else ls <= 1.2)))
    if "small_files" in results["workloads"]:
        v = _get(results, "small_files", "gstore", "durable s")
        n = results["config"].get("small_count")
        out.append((f"{n:,} small files durable within 5 s{cond}", f"{_fmt(v)} s",
                    verdict(None if v is None else v <= 5)))
    rd = by_label.get("seq read cold MiB/s", {}).get("tools", {}).get("gstore", {}).get("ratio")
    if "seq_read" in results["workloads"]:
        out.append((f"cold sequential read ≥ 0.8× a direct GET{cond}", _x(rd),
                    verdict(None if rd is None else rd >= 0.8)))
    rss = _peak_rss_mib(results, "gstore")
    if "gstore" in results["tools"]:
        out.append(("peak RSS of the daemon under 100 MiB over the whole benchmark",
                    f"{_fmt(rss)} MiB", verdict(None if rss is None else rss < 100)))
    big = results["workloads"].get("big_file", {}).get("gstore")
    if big and big.get("status") == "ok":
        m = big["metrics"]
        flat = m.get("write RSS flat") == "yes" and m.get("read RSS flat") == "yes"
        out.append((f"RSS flat writing and reading a {_sz(results['config'].get('big_file_size'))} file",
                    f"write {m.get('write RSS flat')}, read {m.get('read RSS flat')}", verdict(flat)))
    return out


def references_section(results: dict[str, Any]) -> list[str]:
    if not any(r["reference"] is not None for r in reference_rows(results)):
        return []
    lines = ["## Against the references", "",
             "Every figure divided by its reference, measured in the same run on the same "
             "endpoint right before the tools ran that workload: boto3 straight to the endpoint "
             "(what a program speaking S3 itself gets) and `bench.barefs`, a bare pyfuse3 + trio "
             "file system doing one `pread` of a local copy of the object per request (the "
             "ceiling of a Python FUSE daemon). “÷ ref” is always tool / reference: for MiB/s "
             "and IOPS above 1× beats the reference, for seconds and ms below 1× does.", ""]
    lines += reference_table(results) + [""]
    far = furthest(results)
    if far:
        wls = ",".join(wl for wl, _, _ in far)
        lines += ["Furthest from their reference (gstore): "
                  + "; ".join(f"{label} ({w:.1f}× worse)" for _, label, w in far)
                  + f". Profile them with `scripts/bench --tools gstore --workloads {wls} "
                  f"--profile {wls}`.", ""]
    g = goals(results)
    if g:
        lines += ["Goals of issue #14:", "", "| goal | gstore | |", "|---|---:|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in g] + [""]
    lines += ["Reference details (the endpoint's requests per phase, as for the tools):", "",
              "| workload | reference | version | metrics |", "|---|---|---|---|"]
    for wl, kinds in results.get("references", {}).items():
        for kind, rec in kinds.items():
            ms = ", ".join(f"{k} {_fmt(v)}" for k, v in rec.get("metrics", {}).items())
            lines.append(f"| {wl} | {kind} | {rec.get('version', '')} | {ms} |")
    lines.append("")
    return lines


def terminal_summary(results: dict[str, Any]) -> list[str]:
    """The ratio table as plain text, for the end of a run."""
    rows = reference_rows(results)
    if not rows:
        return []
    tools = list(results["tools"])
    head = f"{'figure':<30} {'reference':<30} {'ref':>9}" + "".join(f" {t:>9} {'÷ref':>7}" for t in tools)
    out = ["", "Each figure as a ratio to its reference (tool / reference):", head, "-" * len(head)]
    for r in rows:
        line = f"{r['row'].label:<30} {r['row'].source:<30} {_fmt(r['reference']):>9}"
        for t in tools:
            line += f" {_fmt(r['tools'][t]['value']):>9} {_x(r['tools'][t]['ratio']):>7}"
        out.append(line)
    rss = "  ".join(f"{t} {_fmt(_peak_rss_mib(results, t))} MiB" for t in tools)
    out.append(f"{'peak RSS over the run':<30} {rss}")
    far = furthest(results)
    if far:
        out.append("furthest from the reference (gstore): "
                   + "; ".join(f"{label} {w:.1f}× worse" for _, label, w in far))
    for goal, fig, verdict in goals(results):
        out.append(f"goal: {goal}: {fig} {verdict}")
    return out


# (label, workload, metric, True if higher is better)
SUMMARY = [
    ("idle daemon CPU %", "idle", "idle CPU %", False),
    ("seq read cold MiB/s", "seq_read", "cold MiB/s", True),
    ("seq read warm MiB/s", "seq_read", "warm MiB/s", True),
    ("seq read after remount MiB/s", "seq_read", "remount MiB/s", True),
    ("rand 4 KiB IOPS", "rand_4k", "IOPS", True),
    ("rand 4 KiB p50 ms", "rand_4k", "p50 ms", False),
    ("rand 4 KiB p99 ms", "rand_4k", "p99 ms", False),
    ("rand 64 KiB IOPS", "rand_64k", "IOPS", True),
    ("rand 64 KiB p50 ms", "rand_64k", "p50 ms", False),
    ("rand 64 KiB p99 ms", "rand_64k", "p99 ms", False),
    ("seq write: close s", "seq_write", "close s", False),
    ("seq write: durable s", "seq_write", "durable s", False),
    ("small files: close s", "small_files", "close s", False),
    ("small files: durable s", "small_files", "durable s", False),
    ("ls -l cold s", "ls", "cold s", False),
    ("ls -l warm s", "ls", "warm s", False),
    ("ffprobe s", "video", "ffprobe s", False),
    ("transcode 5 s of video, s", "video", "transcode 5 s", False),
    ("md5sum s", "md5", "md5sum s", False),
    ("getxattr user.md5 s", "md5", "getxattr s", False),
]


def _ratio(mine: float | None, others: list[float], higher: bool) -> float | None:
    """How many times worse gstore is than the best other tool (>1: behind, <1: ahead)."""
    if mine is None or not others:
        return None
    best = max(others) if higher else min(others)
    if higher:
        return None if mine <= 0 else best / mine
    if best <= 0:
        return float("inf") if mine > 0 else 1.0
    return mine / best


def summary_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, float | None], float | None]]:
    """(label, {tool: value}, gstore's ratio to the best other tool) for the headline table."""
    tools = list(results["tools"])
    rows = []
    for label, wl, metric, higher in SUMMARY:
        if wl not in results["workloads"]:
            continue
        vals = {t: _get(results, wl, t, metric) for t in tools}
        others = [v for t, v in vals.items() if t != "gstore" and v is not None]
        rows.append((label, vals, _ratio(vals.get("gstore"), others, higher)))
    rss = {t: max((r.get("peak_rss_kib") or 0 for by in results["workloads"].values()
                   for tt, r in by.items() if tt == t), default=0) for t in tools}
    vals = {t: (round(v / 1024, 1) if v else None) for t, v in rss.items()}
    others = [v for t, v in vals.items() if t != "gstore" and v is not None]
    rows.append(("peak RSS over the run, MiB", vals, _ratio(vals.get("gstore"), others, False)))
    return rows


def summary_table(results: dict[str, Any]) -> list[str]:
    tools = list(results["tools"])
    with_ratio = "gstore" in tools and len(tools) > 1
    head = "| | " + " | ".join(tools) + (" | gstore vs best other |" if with_ratio else " |")
    lines = [head, "|---|" + "---:|" * (len(tools) + (1 if with_ratio else 0))]
    for label, vals, ratio in summary_rows(results):
        cells = [_fmt(vals[t]) for t in tools]
        row = f"| {label} | " + " | ".join(cells)
        if with_ratio:
            if ratio is None:
                r = "–"
            elif ratio == float("inf"):
                r = "behind (others: 0)"
            elif ratio >= 1.05:
                r = f"{ratio:.1f}× behind" if ratio < 100 else f"{ratio:,.0f}× behind"
            elif ratio <= 1 / 1.05:
                r = f"{1 / ratio:.1f}× ahead" if ratio > 0.01 else f"{1 / ratio:,.0f}× ahead"
            else:
                r = "even"
            row += f" | {r}"
        lines.append(row + " |")
    return lines


def write(out: Path, results: dict[str, Any]) -> None:
    (out / "results.md").write_text(markdown(results, charts=charts(out, results)))


# --------------------------------------------------------------------------- Markdown


def markdown(results: dict[str, Any], charts: list[str] | None = None) -> str:
    m, c, ep = results["machine"], results["config"], results["endpoint"]
    lines = [f"# gstore benchmark, {results['started']}", ""]
    net = "no emulated latency or bandwidth cap"
    if ep.get("latency_ms") or ep.get("bandwidth_mibps"):
        net = f"emulated latency {ep.get('latency_ms') or 0} ms, bandwidth {ep.get('bandwidth_mibps') or '∞'} MiB/s per request"
    lines += [
        f"- Command: `{results['command']}`" + (" (quick mode)" if c.get("quick") else ""),
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB RAM, Linux {m['kernel']}, "
        f"{m['os']}, Python {m['python']}",
        f"- Endpoint: {ep['kind']}; {net}",
        f"- Run time: {results.get('duration_s', '?')} s; " + _load_note(results),
        "",
        "| tool | version | cache |",
        "|---|---|---|",
    ]
    for name, info in results["tools"].items():
        lines.append(f"| {name} | {info['version']} | {c['cache_size'] if name != 's3fs' else 'unbounded'} |")
    lines.append("")
    if results.get("errors"):
        lines += ["**Errors:**", ""] + [f"- {e}" for e in results["errors"]] + [""]

    lines += ["## Summary", "",
              "Higher is better for MiB/s and IOPS, lower for everything else; the last column "
              "compares gstore with the best of the other tools. Details, backend requests and "
              "bytes per phase below.", ""] + summary_table(results) + [""]
    lines += references_section(results)
    desc = describe(results)
    for wl, by_tool in results["workloads"].items():
        title, how = desc.get(wl, (wl, ""))
        lines += [f"## {title} (`{wl}`)", "", how, ""]
        metrics: list[str] = []
        for rec in by_tool.values():
            for k in rec["metrics"]:
                if k not in metrics:
                    metrics.append(k)
        lines.append("| tool | " + " | ".join(metrics) + " | peak RSS MiB | note |")
        lines.append("|---|" + "---:|" * len(metrics) + "---:|---|")
        for tool, rec in by_tool.items():
            cells = []
            for k in metrics:
                cells.append("n/a" if rec["status"] == "n/a" else
                             "error" if rec["status"] == "error" and k not in rec["metrics"] else
                             _fmt(rec["metrics"].get(k)))
            notes = [rec["note"]] if rec.get("note") else []
            notes += [f"{k}: {v}" for k, v in rec.get("na", {}).items() if rec["status"] == "ok"]
            rss = rec.get("peak_rss_kib")
            lines.append(f"| {tool} | " + " | ".join(cells) + f" | {_fmt(round(rss / 1024)) if rss else '?'} | "
                         + "; ".join(notes).replace("|", "/") + " |")
        lines += ["", "Backend requests and bytes per phase (counted by the endpoint; our own "
                  "durability polling subtracted); CPU seconds of the daemon, of the endpoint and of the whole "
                  "machine (which includes the client program, the driver and any outside load; "
                  f"{results['machine']['nproc']} CPUs):", "",
                  "| tool | phase | " + " | ".join(OPS) + " | MiB down | MiB up | daemon CPU s | endpoint CPU s | machine busy CPU s | wall s | peak RSS MiB |",
                  "|---|---|" + "---:|" * (len(OPS) + 7)]
        refs = {f"reference: {kind}": rec for kind, rec in results.get("references", {}).get(wl, {}).items()}
        for tool, rec in {**refs, **by_tool}.items():
            for phase, p in rec["phases"].items():
                b = p.get("backend", {})
                if "error" in b or not b:
                    continue
                lines.append(f"| {tool} | {phase} | " + " | ".join(_fmt(b.get(op, 0)) for op in OPS)
                             + f" | {_mib(b.get('bytes_down'))} | {_mib(b.get('bytes_up'))}"
                             f" | {_fmt(p.get('daemon_cpu_s'))} | {_fmt(p.get('endpoint_cpu_s'))}"
                             f" | {_fmt(p.get('machine_busy_cpu_s'))}"
                             f" | {_fmt(round(p['wall_s'], 3)) if p.get('wall_s') is not None else '?'}"
                             f" | {_fmt(round(p['peak_rss_kib'] / 1024, 1)) if p.get('peak_rss_kib') else '–'} |")
        lines.append("")

    lines += ["## Daemons", "",
              "Peak RSS (VmHWM of the daemon process, MiB) per workload; every workload mounts "
              "afresh, so each number is one daemon's lifetime peak. Mount time: from starting "
              "the daemon until the mount point answers (median over the run).", ""]
    tools = list(results["tools"])
    lines.append("| workload | " + " | ".join(tools) + " |")
    lines.append("|---|" + "---:|" * len(tools))
    peak: dict[str, int] = {}
    mounts: dict[str, list[float]] = {t: [] for t in tools}
    for wl, by_tool in results["workloads"].items():
        row = []
        for t in tools:
            rec = by_tool.get(t, {})
            rss = rec.get("peak_rss_kib")
            row.append(_fmt(round(rss / 1024)) if rss else "?")
            if rss:
                peak[t] = max(peak.get(t, 0), rss)
            mounts[t] += [s["mount_s"] for s in rec.get("sessions", []) if s.get("mount_s")]
        lines.append(f"| {wl} | " + " | ".join(row) + " |")
    lines.append("| **max** | " + " | ".join(_fmt(round(peak[t] / 1024)) if t in peak else "?" for t in tools) + " |")
    med = {t: sorted(v)[len(v) // 2] for t, v in mounts.items() if v}
    lines.append("| mount time s (median) | " + " | ".join(_fmt(round(med[t], 3)) if t in med else "?" for t in tools) + " |")
    lines += ["", "## Exact commands", ""]
    for name, info in results["tools"].items():
        lines += [f"- **{name}**: `{info['command']}`", f"  ({info['notes']})" if info.get("notes") else ""]
    lines += ["", "Other versions: " + ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items()), ""]
    if charts:
        lines += ["## Charts", ""] + [f"![{Path(p).stem}]({p})" for p in charts] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- charts


def _get(results: dict[str, Any], wl: str, tool: str, metric: str) -> float | None:
    rec = results["workloads"].get(wl, {}).get(tool)
    if not rec or rec["status"] != "ok":
        return None
    v = rec["metrics"].get(metric)
    return v if isinstance(v, (int, float)) else None


def _bars(ax: Any, groups: list[str], series: dict[str, list[float | None]], *, log: bool,
          ylabel: str, title: str) -> None:
    tools = list(series)
    width = 0.8 / max(1, len(tools))
    values = [v for vals in series.values() for v in vals if v]
    floor = min(values) / 3 if (log and values) else 0
    for i, tool in enumerate(tools):
        xs = [g + (i - (len(tools) - 1) / 2) * width for g in range(len(groups))]
        vals = series[tool]
        heights = [v if v else 0 for v in vals]
        bars = ax.bar(xs, heights, width, label=tool, color=COLORS.get(tool), edgecolor="white")
        for x, v, bar in zip(xs, vals, bars):
            if v:
                ax.annotate(_fmt(v), (x, v), ha="center", va="bottom", fontsize=7,
                            xytext=(0, 1), textcoords="offset points", rotation=90 if len(tools) > 2 else 0)
            else:  # None: the tool could not do it (or failed); 0: it did it with none
                y = floor * 1.1 if log else 0
                ax.annotate("n/a" if v is None else "0", (x, y), ha="center", va="bottom", fontsize=7,
                            color="grey" if v is None else "black", rotation=90)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    if log and values:
        ax.set_yscale("log")
        ax.set_ylim(floor, max(values) * 8)
    elif values:
        ax.set_ylim(0, max(values) * 1.25)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=8)


def charts(out: Path, results: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tools = list(results["tools"])
    made: list[str] = []
    wls = results["workloads"]

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

    # throughput
    groups: list[tuple[str, str, str]] = []
    if "seq_read" in wls:
        groups += [("read cold", "seq_read", "cold MiB/s"), ("read warm", "seq_read", "warm MiB/s"),
                   ("read after\nremount", "seq_read", "remount MiB/s")]
    if "seq_write" in wls:
        groups += [("write\n(to close)", "seq_write", "close MiB/s"),
                   ("write\n(to durable)", "seq_write", "durable MiB/s")]
    if groups:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        _bars(ax, [g[0] for g in groups], {t: [_get(results, w, t, m) for _, w, m in groups] for t in tools},
              log=True, ylabel="MiB/s (log scale)", title="Sequential throughput (higher is better)")
        save(fig, "throughput.png")

    # random reads
    rand = [w for w in ("rand_4k", "rand_64k") if w in wls]
    if rand:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
        labels = [w.replace("rand_", "") for w in rand]
        _bars(a1, labels, {t: [_get(results, w, t, "IOPS") for w in rand] for t in tools},
              log=True, ylabel="IOPS (log scale)", title="Random reads: IOPS (higher is better)")
        lat_groups = [(f"{w.replace('rand_', '')} {q}", w, f"{q} ms") for w in rand for q in ("p50", "p99")]
        _bars(a2, [g[0] for g in lat_groups],
              {t: [_get(results, w, t, m) for _, w, m in lat_groups] for t in tools},
              log=True, ylabel="ms (log scale)", title="Random reads: latency (lower is better)")
        save(fig, "latency.png")

    # wall-clock times of the other workloads
    tgroups = [("ls -l cold", "ls", "cold s"), ("ls -l warm", "ls", "warm s"),
               ("ffprobe", "video", "ffprobe s"), ("transcode\n5 s", "video", "transcode 5 s"),
               ("md5sum", "md5", "md5sum s"), ("getxattr\nuser.md5", "md5", "getxattr s"),
               ("small files\nclose", "small_files", "close s"),
               ("small files\ndurable", "small_files", "durable s"),
               ("write\nclose", "seq_write", "close s"), ("write\ndurable", "seq_write", "durable s")]
    tgroups = [g for g in tgroups if g[1] in wls and any(g[2] in r["metrics"] or r["status"] != "ok"
                                                         for r in wls[g[1]].values())]
    if tgroups:
        fig, ax = plt.subplots(figsize=(11, 4.5))
        _bars(ax, [g[0] for g in tgroups], {t: [_get(results, w, t, m) for _, w, m in tgroups] for t in tools},
              log=True, ylabel="seconds (log scale)", title="Time to complete (lower is better)")
        save(fig, "times.png")

    # backend requests and bytes per phase
    phases: list[tuple[str, str, str]] = []
    for wl, by_tool in wls.items():
        seen: list[str] = []
        for rec in by_tool.values():
            for ph in rec["phases"]:
                if ph not in seen:
                    seen.append(ph)
        phases += [(f"{wl}\n{ph}", wl, ph) for ph in seen]
    if phases:
        def val(wl: str, tool: str, ph: str, key: str) -> float | None:
            rec = wls[wl].get(tool)
            if not rec or rec["status"] != "ok":
                return None
            b = rec["phases"].get(ph, {}).get("backend", {})
            if not b or "error" in b:
                return None
            if key == "requests":
                return b.get("total", 0)
            return round((b.get("bytes_down", 0) + b.get("bytes_up", 0)) / MiB, 3)

        fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(10, len(phases) * 0.9), 8))
        labels = [p[0] for p in phases]
        _bars(a1, labels, {t: [val(w, t, ph, "requests") for _, w, ph in phases] for t in tools},
              log=True, ylabel="requests (log scale)", title="Backend requests per phase (all types)")
        _bars(a2, labels, {t: [val(w, t, ph, "bytes") for _, w, ph in phases] for t in tools},
              log=True, ylabel="MiB (log scale)", title="Backend bytes per phase (down + up)")
        for a in (a1, a2):
            a.tick_params(axis="x", labelsize=7)
        save(fig, "requests.png")

    # peak RSS
    rss_w = [w for w in wls]
    if rss_w:
        fig, ax = plt.subplots(figsize=(9, 4))

        def rss(w: str, t: str) -> float | None:
            v = wls[w].get(t, {}).get("peak_rss_kib")
            return round(v / 1024, 1) if v else None

        _bars(ax, rss_w, {t: [rss(w, t) for w in rss_w] for t in tools}, log=False,
              ylabel="MiB", title="Peak RSS of the daemon per workload (lower is better)")
        save(fig, "rss.png")
    return made



if __name__ == "__main__":  # re-render a results folder: python -m bench.report DIR
    import json
    import sys

    folder = Path(sys.argv[1])
    write(folder, json.loads((folder / "results.json").read_text()))
    print(folder / "results.md")
