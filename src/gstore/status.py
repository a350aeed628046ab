"""The status snapshot of a running mount (``.gstore/status.json``, ``gstore status``)."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any

from gstore import __version__


def build_status(*, request: Any, state_dir: Any, fs: Any, store: Any, reader: Any, metadata: Any,
                 writeback: Any, started: float, recent_errors: Any) -> dict[str, Any]:
    """Everything an operator asks first, and no secret (backend options are never included)."""
    store_stats = store.stats()
    lookups = store_stats.hits + store_stats.misses
    read_stats = asdict(reader.stats)
    served = read_stats["hit_bytes"] + read_stats["miss_bytes"]
    pending, failed = [], []
    parked = 0
    uploads: dict[str, Any] = {"enabled": writeback is not None}
    if writeback is not None:
        attempts = writeback.scheduler.attempts
        for staged in writeback.pending():
            entry = {"path": staged.path, "size": staged.size, "attempts": staged.attempts,
                     "open_for_writing": staged.writers > 0,
                     "age_s": round(time.time() - staged.created, 1)}
            if staged.last_error:
                entry["error"] = staged.last_error
                record = attempts.get(staged.id)
                # Parked: the backend refused it for good (denied, invalid, too large...):
                # kept locally, not retried until `gstore flush --retry` or a remount.
                entry["parked"] = bool(record is not None and record.permanent)
                parked += entry["parked"]
                failed.append(entry)
            else:
                pending.append(entry)
        stats = writeback.stats
        uploads.update({
            "pending": len(pending) + len(failed), "failing": len(failed), "parked": parked,
            "pending_paths": pending[:1000], "failed_paths": failed[:1000],
            "uploaded": stats.uploaded, "bytes_uploaded": stats.bytes_uploaded,
            "bytes_copied_server_side": stats.bytes_copied, "failures": stats.failures,
            "conflicts": stats.conflicts, "conflict_policy": writeback.policy.value,
            "write_back_delay_s": writeback.delay,
        })
    return {
        "version": __version__,
        "pid": os.getpid(),
        "mountpoint": str(request.mountpoint),
        "mount": request.backend.name,
        "backend": request.backend.display(),
        "backend_health": _backend_health(fs),
        "connectivity": _connectivity(fs, metadata),
        "read_only": request.options.read_only,
        "config": str(request.config_path) if request.config_path is not None else None,
        "options": _public_options(request.options),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "uptime_s": round(time.time() - started, 1),
        "cache": {
            "dir": str(state_dir), "capacity": store_stats.capacity, "used": store_stats.used_bytes,
            "blocks": store_stats.blocks, "block_size": request.options.block_size,
            "hits": store_stats.hits, "misses": store_stats.misses,
            "hit_ratio": round(store_stats.hits / lookups, 4) if lookups else None,
            "evictions": store_stats.evictions, "corrupt_blocks_dropped": store_stats.corrupt,
        },
        "reads": {**read_stats, "byte_hit_ratio": round(read_stats["hit_bytes"] / served, 4) if served else None},
        "metadata": {"entries": metadata.entry_count(), **metadata.stats},
        "inodes": len(fs.inodes),
        "open_files": fs.open_handle_count(),
        "uploads": uploads,
        "namespace_queue": _namespace_queue(writeback),
        "recent_errors": list(recent_errors)[-20:],
    }


def _namespace_queue(writeback: Any) -> dict[str, Any]:
    """mkdir/rmdir/unlink/rename made while the backend could not be reached, not replayed yet."""
    queue = getattr(writeback, "namespace", None) if writeback is not None else None
    if queue is None:
        return {"queued": 0, "changes": [], "applied": 0, "last_error": None, "not_applied": []}
    return queue.snapshot()


def _backend_health(fs: Any) -> dict[str, Any] | None:
    """Circuit breaker state and retry counters (None for a backend without them)."""
    return fs.backend.health()


def _connectivity(fs: Any, metadata: Any) -> dict[str, Any]:
    """Online or offline, since when, and what is served meanwhile (docs/reliability.md)."""
    health = fs.backend.health() or {}
    online = health.get("online", True)
    result: dict[str, Any] = {
        "state": "online" if online else "offline",
        "since": health.get("since"),
        "stale_metadata_answers": metadata.stats.get("stale_answers", 0),
        "last_known_entries": metadata.last_known_count(),
    }
    if not online:
        result["serving"] = ("last known listings and attributes, however old; cached blocks; "
                             "uncached reads fail with EIO; changes are journaled and queued (uploads and namespace changes), "
                             "replayed in order when the backend answers")
    return result


def _public_options(options: Any) -> dict[str, Any]:
    """The mount options as JSON values (none of them is a secret: backend options are elsewhere)."""
    result: dict[str, Any] = {}
    for name, value in vars(options).items():
        if value is None or isinstance(value, (bool, int, float, str)):
            result[name] = value
        else:
            result[name] = str(value)
    if isinstance(result.get("umask"), int):
        result["umask"] = f"{result['umask']:03o}"
    return result
