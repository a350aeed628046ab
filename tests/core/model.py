"""The model-based test machinery: the same steps on the core and on a local directory.

A *step* is one program-level call (open, pwrite, append, ftruncate, truncate,
fsync, close, rename, unlink, read, ...) or a checkpoint (let time pass for the
background uploads, drain, crash, clean restart). :class:`Runner` applies each
step twice: to the core through :class:`~tests.core.kernel.Kernel`, and to a
plain directory through the real ``os`` calls (the reference). After every
step it compares:

* the step's own result: bytes read, bytes written, and the errno of a failure
  (both sides must fail, and the same way);
* ``stat`` of every path of the model (exists or ENOENT, kind, size) and the
  listing of every folder with the sizes it shows;
* every few steps and at every checkpoint, the whole content of every file.

Checkpoints compare more:

* ``drain``: the backend directory (every file, byte for byte, and the folders)
  equals the reference directory, with descriptors still open;
* ``crash``: every open descriptor is first closed or fsynced (what POSIX and
  docs/writeback.md promise survives a kill -9), then the core dies without a
  drain and a fresh core recovers the journal: it must show exactly the
  reference directory;
* ``restart``: close everything, a clean stop (drain) and a fresh core: the
  backend and the new core both equal the reference.

Steps are generated from a seeded ``random.Random``, one at a time, looking at
the reference to pick interesting arguments (offsets near the end of a file,
paths that are open); the recorded list can be replayed without the
generator, so a failing run is shrunk by dropping steps and printed as a
readable numbered script.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .conftest import CoreHarness, describe_exception, open_core, tree_dirs, tree_files

PATHS = ("a", "b", "sub/c", "sub/d")
DIRS = ("", "sub")
SLOTS = 6  # descriptors open at most at once

OPEN_MODES: dict[str, int] = {
    "r": os.O_RDONLY,
    "r+": os.O_RDWR,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "w+": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "a+": os.O_RDWR | os.O_CREAT | os.O_APPEND,
    "rw+creat": os.O_RDWR | os.O_CREAT,
    "wx": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
}
READABLE = {"r", "r+", "w+", "a+", "rw+creat"}
WRITABLE = {"r+", "w", "w+", "a", "a+", "rw+creat", "wx"}
APPENDING = {"a", "a+"}


def pattern(tag: str, length: int) -> bytes:
    """Recognisable bytes: ``"7.7.7.7."`` for step 7, so a diff names the write it came from."""
    token = f"{tag}."
    return (token * (length // len(token) + 1))[:length].encode()


def seed_files() -> dict[str, bytes]:
    """Files that exist in the backend (and the reference) before the first step."""
    return {"a": pattern("seed-a", 1000), "sub/c": pattern("seed-c", 5000)}


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Step:
    op: str
    slot: int | None = None
    path: str | None = None
    path2: str | None = None
    mode: str | None = None
    offset: int = 0
    length: int = 0
    actions: tuple[tuple[int, str], ...] = ()  # crash: (slot, "close" | "fsync")

    def data(self, index: int) -> bytes:
        return pattern(str(index), self.length)

    def describe(self) -> str:
        fd = f"fd{self.slot}"
        op = self.op
        if op == "open":
            return f"{fd} = open({self.path!r}, {self.mode!r})"
        if op == "close":
            return f"close({fd})"
        if op == "pwrite":
            return f"pwrite({fd}, offset={self.offset}, {self.length} bytes)"
        if op == "append":
            return f"append({fd}, {self.length} bytes)"
        if op == "pread":
            return f"pread({fd}, offset={self.offset}, size={self.length})"
        if op == "ftruncate":
            return f"ftruncate({fd}, {self.offset})"
        if op == "truncate":
            return f"truncate({self.path!r}, {self.offset})"
        if op == "fsync":
            return f"fsync({fd})"
        if op == "rename":
            return f"rename({self.path!r}, {self.path2!r})"
        if op == "unlink":
            return f"unlink({self.path!r})"
        if op == "read_path":
            return f"cat({self.path!r})"
        if op == "sleep":
            return f"sleep({self.offset} ms)  # background uploads run"
        if op == "drain":
            return "drain()  # upload everything; the backend must equal the reference"
        if op == "crash":
            acts = ", ".join(f"{a} fd{s}" for s, a in self.actions) or "no open files"
            return f"crash()  # kill -9 after: {acts}; then a new core recovers the journal"
        if op == "restart":
            return "restart()  # close all, clean stop (drain), new core"
        if op == "drop_caches":
            return "drop_caches()  # the kernel forgets its cached dentries"
        return f"{op}(?)"


class ModelMismatch(AssertionError):
    def __init__(self, category: str, message: str) -> None:
        super().__init__(message)
        self.category = category
        self.message = message


Outcome = tuple[str, Any]  # ("ok", value) | ("err", errno name) | ("exc", text)


def _errname(code: int | None) -> str:
    return errno.errorcode.get(code or 0, str(code))


def _show(outcome: Outcome) -> str:
    kind, value = outcome
    if kind == "ok":
        if isinstance(value, bytes):
            return f"{len(value)} bytes {value[:40]!r}{'...' if len(value) > 40 else ''}"
        return "ok" if value is None else repr(value)
    if kind == "err":
        return f"error {value}"
    return f"exception {value}"


def describe_diff(core: bytes, ref: bytes) -> str:
    if len(core) != len(ref):
        head = f"core has {len(core)} bytes, reference {len(ref)}"
    else:
        head = f"both {len(ref)} bytes"
    first = next((i for i, (x, y) in enumerate(zip(core, ref, strict=False)) if x != y), min(len(core), len(ref)))
    lo = max(0, first - 16)
    return (f"{head}; first difference at offset {first}:\n"
            f"      core      [{lo}:{first + 40}] = {core[lo:first + 40]!r}\n"
            f"      reference [{lo}:{first + 40}] = {ref[lo:first + 40]!r}")


# --------------------------------------------------------------------------- the reference


class Reference:
    """The same calls on a plain local directory (real ``os`` calls)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fds: dict[int, int] = {}  # slot -> os fd

    def p(self, path: str) -> str:
        return str(self.root / path)

    def size_of(self, slot: int) -> int:
        return os.fstat(self.fds[slot]).st_size

    def path_size(self, path: str) -> int | None:
        try:
            return os.stat(self.p(path)).st_size
        except FileNotFoundError:
            return None

    def close_all(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def stat(self, path: str) -> tuple[bool, int]:
        st = os.stat(self.p(path))
        is_dir = os.path.isdir(self.p(path))
        return is_dir, 0 if is_dir else st.st_size

    def listdir(self, path: str) -> dict[str, tuple[bool, int]]:
        out = {}
        for name in os.listdir(self.p(path) if path else self.root):
            out[name] = self.stat(f"{path}/{name}" if path else name)
        return out

    def files(self) -> dict[str, bytes]:
        return tree_files(self.root)


# --------------------------------------------------------------------------- the runner


@dataclass
class Slot:
    mode: str
    path: str
    core_fd: int


@dataclass
class Record:
    index: int
    step: Step
    result: str  # the reference's outcome, or "skipped"


class Runner:
    """Applies steps to a core (via a harness) and to a reference directory; compares after each."""

    def __init__(self, harness: CoreHarness, ref_root: Path, *, content_every: int = 8) -> None:
        self.h = harness
        self.ref = Reference(ref_root)
        self.slots: dict[int, Slot] = {}
        self.records: list[Record] = []
        self.content_every = content_every
        self.counts: dict[str, int] = {}
        #: step index -> the files right after a clean restart there (nothing pending, nothing open):
        #: a replay may start from such a state instead of from the beginning.
        self.snapshots: dict[int, dict[str, bytes]] = {}

    @property
    def kernel(self) -> Any:
        return self.h.kernel

    # -- doing a step on both sides --------------------------------------------------------------

    @staticmethod
    def _ref_call(fn: Callable[[], Any]) -> Outcome:
        try:
            return "ok", fn()
        except OSError as exc:
            return "err", _errname(exc.errno)

    @staticmethod
    async def _core_call(fn: Callable[[], Any]) -> Outcome:
        try:
            return "ok", await fn()
        except OSError as exc:
            return "err", _errname(exc.errno)
        except trio.Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - a crash of the core is a finding, not a test error
            return "exc", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"

    def _compare(self, index: int, step: Step, ref: Outcome, core: Outcome, what: str = "") -> None:
        label = f"{step.describe()}{' ' + what if what else ''}"
        if ref[0] != core[0] or (ref[0] == "err" and ref[1] != core[1]):
            raise ModelMismatch("result", f"step {index}: {label}: reference gave {_show(ref)}, core gave {_show(core)}")
        if ref[0] == "ok" and ref[1] != core[1] and not (step.op == "open" and what == ""):
            if isinstance(ref[1], bytes) and isinstance(core[1], bytes):
                raise ModelMismatch("read", f"step {index}: {label}: the bytes differ: {describe_diff(core[1], ref[1])}")
            raise ModelMismatch("result", f"step {index}: {label}: reference gave {_show(ref)}, core gave {_show(core)}")

    async def apply(self, index: int, step: Step) -> None:
        """Run one step on both sides and compare everything (raises ModelMismatch)."""
        try:
            await self._apply(index, step)
        except ModelMismatch as exc:
            if self.h.worker_errors and exc.category != "worker":
                # Whatever went wrong, the dead workers (no uploads, no readahead) come first.
                raise ModelMismatch(exc.category, f"{exc.message}\n  (the core's background workers had crashed: "
                                                  f"{self.h.worker_errors})") from None
            raise

    async def _apply(self, index: int, step: Step) -> None:
        needs_slot = step.op in ("close", "pwrite", "append", "pread", "ftruncate", "fsync")
        if needs_slot and step.slot not in self.slots:
            self.records.append(Record(index, step, "skipped (no such descriptor)"))
            return
        if step.op == "open" and step.slot in self.slots:
            self.records.append(Record(index, step, "skipped (descriptor in use)"))
            return
        self.counts[step.op] = self.counts.get(step.op, 0) + 1
        record = Record(index, step, "")
        self.records.append(record)
        ref, core = await self._do(index, step)
        record.result = _show(ref)
        self._compare(index, step, ref, core)
        await self.check_state(index, step, contents=(index % self.content_every == 0))

    async def _do(self, index: int, step: Step) -> tuple[Outcome, Outcome]:
        k, ref, op = self.kernel, self.ref, step.op
        slot = self.slots.get(step.slot) if step.slot is not None else None
        ref_fd = ref.fds.get(step.slot) if step.slot is not None else None
        if op == "open":
            flags = OPEN_MODES[step.mode]
            r = self._ref_call(lambda: os.open(ref.p(step.path), flags, 0o644))
            c = await self._core_call(lambda: k.open(step.path, flags))
            if r[0] == "ok":
                ref.fds[step.slot] = r[1]
            if c[0] == "ok":
                if r[0] == "ok":
                    self.slots[step.slot] = Slot(step.mode, step.path, c[1])
                else:
                    await self._core_call(lambda: k.close(c[1]))
            elif r[0] == "ok":
                os.close(ref.fds.pop(step.slot))
            return (r[0], None if r[0] == "ok" else r[1]), (c[0], None if c[0] == "ok" else c[1])
        if op == "close":
            del self.slots[step.slot]
            r = self._ref_call(lambda: os.close(ref.fds.pop(step.slot)))
            return r, await self._core_call(lambda: k.close(slot.core_fd))
        if op == "pwrite":
            data = step.data(index)
            return (self._ref_call(lambda: os.pwrite(ref_fd, data, step.offset)),
                    await self._core_call(lambda: k.pwrite(slot.core_fd, data, step.offset)))
        if op == "append":
            data = step.data(index)
            return (self._ref_call(lambda: os.write(ref_fd, data)),
                    await self._core_call(lambda: k.append(slot.core_fd, data)))
        if op == "pread":
            return (self._ref_call(lambda: os.pread(ref_fd, step.length, step.offset)),
                    await self._core_call(lambda: k.pread(slot.core_fd, step.length, step.offset)))
        if op == "ftruncate":
            return (self._ref_call(lambda: os.ftruncate(ref_fd, step.offset)),
                    await self._core_call(lambda: k.ftruncate(slot.core_fd, step.offset)))
        if op == "fsync":
            return (self._ref_call(lambda: os.fsync(ref_fd)),
                    await self._core_call(lambda: k.fsync(slot.core_fd)))
        if op == "truncate":
            return (self._ref_call(lambda: os.truncate(ref.p(step.path), step.offset)),
                    await self._core_call(lambda: k.truncate(step.path, step.offset)))
        if op == "rename":
            return (self._ref_call(lambda: os.rename(ref.p(step.path), ref.p(step.path2))),
                    await self._core_call(lambda: k.rename(step.path, step.path2)))
        if op == "unlink":
            return (self._ref_call(lambda: os.unlink(ref.p(step.path))),
                    await self._core_call(lambda: k.unlink(step.path)))
        if op == "read_path":
            return (self._ref_call(lambda: Path(ref.p(step.path)).read_bytes()),
                    await self._core_call(lambda: k.read_file(step.path)))
        if op == "sleep":
            await trio.sleep(step.offset / 1000)
            return ("ok", None), ("ok", None)
        if op == "drop_caches":
            k.drop_caches()
            return ("ok", None), ("ok", None)
        if op == "drain":
            return await self._drain(index, step)
        if op == "crash":
            return await self._crash(index, step)
        if op == "restart":
            return await self._restart(index, step)
        raise ValueError(f"unknown step {op}")

    # -- checkpoints ----------------------------------------------------------------------------

    async def _drain(self, index: int, step: Step) -> tuple[Outcome, Outcome]:
        failures = await self.h.drain()
        if failures:
            raise ModelMismatch("drain", f"step {index}: {step.describe()}: the drain reported failures: {failures}")
        self.check_backend(index, step)
        return ("ok", None), ("ok", None)

    async def _crash(self, index: int, step: Step) -> tuple[Outcome, Outcome]:
        for slot_no, action in step.actions:
            slot = self.slots.get(slot_no)
            if slot is None:
                continue
            ref_fd = self.ref.fds[slot_no]
            if action == "fsync":
                r = self._ref_call(lambda: os.fsync(ref_fd))
                c = await self._core_call(lambda: self.kernel.fsync(slot.core_fd))
            else:
                del self.slots[slot_no]
                r = self._ref_call(lambda: os.close(self.ref.fds.pop(slot_no)))
                c = await self._core_call(lambda: self.kernel.close(slot.core_fd))
            self._compare(index, step, r, c, f"[{action} fd{slot_no}]")
        # The process dies: its descriptors with it (the reference's files stay as they are).
        self.ref.close_all()
        self.slots.clear()
        await self.h.crash()
        lost = self.h.journal_without_data()
        if lost:
            raise ModelMismatch("journal", f"step {index}: {step.describe()}: journal records without data: {lost}")
        await self.check_state(index, step, contents=True, why="after the crash and recovery")
        return ("ok", None), ("ok", None)

    async def _restart(self, index: int, step: Step) -> tuple[Outcome, Outcome]:
        for slot_no in sorted(self.slots):
            slot = self.slots.pop(slot_no)
            r = self._ref_call(lambda: os.close(self.ref.fds.pop(slot_no)))
            c = await self._core_call(lambda: self.kernel.close(slot.core_fd))
            self._compare(index, step, r, c, f"[close fd{slot_no}]")
        failures = await self.h.restart()
        if failures:
            raise ModelMismatch("drain", f"step {index}: {step.describe()}: the drain reported failures: {failures}")
        if self.h.recovered:
            raise ModelMismatch("journal", f"step {index}: {step.describe()}: everything was closed and drained, "
                                           f"yet the next start recovered {self.h.recovered} from the journal")
        self.check_backend(index, step)
        await self.check_state(index, step, contents=True, why="after the restart")
        self.snapshots[index] = self.ref.files()
        return ("ok", None), ("ok", None)

    # -- comparing the whole state ------------------------------------------------------------------

    def check_backend(self, index: int, step: Step) -> None:
        backend, ref = self.h.backend_files(), self.ref.files()
        # The conditional-write probe's scratch key (gstore.write.conditional) under the
        # mount's reserved, never-listed .gstore/ folder outlives a kill -9 in the middle of
        # the probe until the next mount's probe removes it; it is no user file.
        backend = {p: d for p, d in backend.items() if not p.startswith(".gstore/write-probe-")}
        if backend != ref:
            lines = []
            for path in sorted(set(backend) | set(ref)):
                if path not in backend:
                    lines.append(f"    {path}: missing in the backend (reference has {len(ref[path])} bytes)")
                elif path not in ref:
                    lines.append(f"    {path}: in the backend ({len(backend[path])} bytes) but not in the reference")
                elif backend[path] != ref[path]:
                    lines.append(f"    {path}: {describe_diff(backend[path], ref[path])}".replace("core ", "backend "))
            raise ModelMismatch("backend", f"step {index}: {step.describe()}: the backend directory differs from the "
                                           "reference:\n" + "\n".join(lines))
        backend_dirs = self.h.backend_dirs() - {".gstore"}
        if backend_dirs != tree_dirs(self.ref.root):
            raise ModelMismatch("backend", f"step {index}: {step.describe()}: backend folders "
                                           f"{sorted(backend_dirs)} != reference {sorted(tree_dirs(self.ref.root))}")

    async def check_state(self, index: int, step: Step, *, contents: bool, why: str = "") -> None:
        k, ref = self.kernel, self.ref
        where = f"step {index}: after {step.describe()}{' (' + why + ')' if why else ''}"
        errors = self.h.release_errors()
        if errors:
            raise ModelMismatch("release", f"{where}: a release sent at close failed: {errors}")
        if self.h.worker_errors:
            raise ModelMismatch("worker", f"{where}: the core's background workers crashed: {self.h.worker_errors}")
        for path in PATHS:
            r = self._ref_call(lambda: ref.stat(path))
            c = await self._core_call(lambda: self._core_stat(path))
            if r != c:
                raise ModelMismatch("stat", f"{where}: stat({path!r}) (is_dir, size): reference {_show(r)}, "
                                            f"core {_show(c)}")
        for folder in DIRS:
            r = self._ref_call(lambda: ref.listdir(folder))
            c = await self._core_call(lambda: k.listdir_stat(folder))
            if r != c:
                raise ModelMismatch("listing", f"{where}: listing of {folder or '/'!r} {{name: (is_dir, size)}}: "
                                               f"reference {_show(r)}, core {_show(c)}")
        if contents:
            for path, data in sorted(ref.files().items()):
                c = await self._core_call(lambda: k.read_file(path))
                if c != ("ok", data):
                    if c[0] == "ok":
                        raise ModelMismatch("content", f"{where}: content of {path!r}: {describe_diff(c[1], data)}")
                    raise ModelMismatch("content", f"{where}: reading {path!r}: core gave {_show(c)}, "
                                                   f"reference has {len(data)} bytes")

    async def _core_stat(self, path: str) -> tuple[bool, int]:
        st = await self.kernel.stat(path)
        return st.is_dir, 0 if st.is_dir else st.size

    def script(self, *, last: int | None = None) -> str:
        """The steps run so far, as a numbered script with the reference's outcome of each."""
        records = self.records if last is None else self.records[-last:]
        lines = []
        if last is not None and len(self.records) > last:
            lines.append(f"  ... ({len(self.records) - last} earlier steps not shown)")
        for rec in records:
            lines.append(f"  {rec.index:4d}  {rec.step.describe():<58}  -> {rec.result}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- the generator


class Generator:
    """Picks the next step from the reference's current state (seeded: the same seed, the same run)."""

    WEIGHTS = {
        "open": 14, "close": 9, "write": 22, "pread": 10, "ftruncate": 3, "truncate": 3, "fsync": 4,
        "rename": 6, "unlink": 4, "read_path": 4, "sleep": 4, "drain": 1.2, "crash": 1.2, "restart": 1.0,
        "drop_caches": 1.5,
    }

    def __init__(self, rng: random.Random, runner: Runner) -> None:
        self.rng = rng
        self.runner = runner

    def _size(self, slot: int) -> int:
        try:
            return self.runner.ref.size_of(slot)
        except (KeyError, OSError):
            return 0

    def _offset(self, size: int) -> int:
        r = self.rng.random()
        if r < 0.2:
            return 0
        if r < 0.4:
            return size
        if r < 0.5:
            return size + self.rng.randint(1, 6000)  # a hole
        return self.rng.randint(0, size + 200)

    def _length(self) -> int:
        return self.rng.choice([self.rng.randint(1, 64), self.rng.randint(1, 3000), self.rng.randint(3000, 9000)])

    def next(self) -> Step:
        rng, slots = self.rng, self.runner.slots
        free = [s for s in range(SLOTS) if s not in slots]
        writable = [s for s, v in slots.items() if v.mode in WRITABLE]
        readable = [s for s, v in slots.items() if v.mode in READABLE]
        choices = {}
        for op, weight in self.WEIGHTS.items():
            if op == "open" and not free:
                continue
            if op in ("close", "fsync") and not slots:
                continue
            if op in ("write", "ftruncate") and not writable:
                continue
            if op == "pread" and not readable:
                continue
            choices[op] = weight
        op = rng.choices(list(choices), weights=list(choices.values()))[0]
        if op == "open":
            open_paths = [v.path for v in slots.values()]
            path = rng.choice(open_paths) if open_paths and rng.random() < 0.4 else rng.choice(PATHS)
            mode = rng.choices(list(OPEN_MODES), weights=[3, 4, 2, 2, 2, 1, 3, 1])[0]
            return Step("open", slot=rng.choice(free), path=path, mode=mode)
        if op == "close":
            return Step("close", slot=rng.choice(sorted(slots)))
        if op == "fsync":
            return Step("fsync", slot=rng.choice(sorted(slots)))
        if op == "write":
            slot = rng.choice(sorted(writable))
            if slots[slot].mode in APPENDING:
                return Step("append", slot=slot, length=self._length())
            return Step("pwrite", slot=slot, offset=self._offset(self._size(slot)), length=self._length())
        if op == "pread":
            slot = rng.choice(sorted(readable))
            size = self._size(slot)
            return Step("pread", slot=slot, offset=self._offset(size), length=rng.choice([1, 100, 4096, 9000]))
        if op == "ftruncate":
            slot = rng.choice(sorted(writable))
            size = self._size(slot)
            return Step("ftruncate", slot=slot, offset=0 if rng.random() < 0.25 else rng.randint(0, size + 3000))
        if op == "truncate":
            path = rng.choice(PATHS)
            size = self.runner.ref.path_size(path) or 0
            return Step("truncate", path=path, offset=0 if rng.random() < 0.25 else rng.randint(0, size + 3000))
        if op == "rename":
            src = rng.choice(PATHS)
            dst = src if rng.random() < 0.05 else rng.choice([p for p in PATHS if p != src])
            return Step("rename", path=src, path2=dst)
        if op in ("unlink", "read_path"):
            return Step(op, path=rng.choice(PATHS))
        if op == "sleep":
            return Step("sleep", offset=rng.choice([10, 60, 120]))  # the write-back delay is 50 ms
        if op == "crash":
            actions = tuple((s, "fsync" if rng.random() < 0.4 else "close") for s in sorted(slots))
            return Step("crash", actions=actions)
        return Step(op)


# --------------------------------------------------------------------------- running and shrinking


@dataclass
class RunResult:
    steps: list[Step]
    records: list[Record]
    failure: ModelMismatch | None
    script: str
    counts: dict[str, int] = field(default_factory=dict)
    snapshots: dict[int, dict[str, bytes]] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """How the core is set up for a model run."""

    name: str
    dcache: bool  # the Kernel keeps a dentry cache (getattr on cached inodes instead of lookups)
    options: tuple[tuple[str, Any], ...] = ()  # MountOptions overrides
    backend: str = "file"  # or "s3" (moto on 127.0.0.1)

    def __str__(self) -> str:
        return self.name


#: The mount's own cache TTLs (attributes and listings 60 s, negatives 5 s) and a kernel dentry cache.
MOUNT_DEFAULTS = Config("mount-defaults", dcache=True)
#: Every cache TTL zero and no dentry cache: every call asks the backend-facing layers afresh.
NO_CACHES = Config("no-caches", dcache=False,
                   options=(("attr_ttl", 0.0), ("dir_cache_ttl", 0.0), ("negative_ttl", 0.0)))
#: The mount's defaults on S3 (moto on 127.0.0.1): ETags, conditional writes, server-side copies.
S3 = Config("s3", dcache=True, backend="s3")


async def run_model(workdir: Path, *, seed: int | None = None, steps: int = 0,
                    replay: list[Step] | None = None, config: Config = MOUNT_DEFAULTS,
                    initial: dict[str, bytes] | None = None) -> RunResult:
    """Generate ``steps`` steps from ``seed`` (or replay a list) on a fresh core and reference.

    Both start with ``initial`` (default :func:`seed_files`) in the backend and the reference."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    ref_root = workdir / "reference"
    ref_root.mkdir()
    seeds = seed_files() if initial is None else initial
    for rel, data in seeds.items():
        (ref_root / rel).parent.mkdir(parents=True, exist_ok=True)
        (ref_root / rel).write_bytes(data)
    (ref_root / "sub").mkdir(exist_ok=True)
    done: list[Step] = []
    try:
        return await _run(workdir, ref_root, seeds, done, seed=seed, steps=steps, replay=replay, config=config)
    except Exception as exc:  # noqa: BLE001 - the core blew up outside a step: still a finding, with its steps
        failure = ModelMismatch("harness", f"after step {len(done) - 1}: {describe_exception(exc)}")
        script = "\n".join(f"  {i:4d}  {s.describe()}" for i, s in enumerate(done))
        return RunResult(done, [], failure, script)


async def _run(workdir: Path, ref_root: Path, seeds: dict[str, bytes], done: list[Step], *, seed: int | None,
               steps: int, replay: list[Step] | None, config: Config) -> RunResult:
    async with open_core(workdir, seed_files=seeds, dcache=config.dcache, backend=config.backend, strict=False,
                         **dict(config.options)) as h:
        h.backend_mkdir("sub")
        runner = Runner(h, ref_root)
        gen = Generator(random.Random(seed), runner) if replay is None else None
        total = len(replay) if replay is not None else steps
        failure = None
        try:
            for index in range(total):
                step = replay[index] if replay is not None else gen.next()
                done.append(step)
                await runner.apply(index, step)
            if replay is None:
                step = Step("restart")  # the end: everything closed, drained and recovered
                done.append(step)
                await runner.apply(total, step)
        except ModelMismatch as exc:
            failure = exc
        finally:
            runner.ref.close_all()
        return RunResult(done, runner.records, failure, runner.script(), dict(runner.counts), runner.snapshots)


def _signature(failure: ModelMismatch, steps: list[Step]) -> tuple[str, str]:
    return failure.category, steps[-1].op if steps else ""


async def shrink(workdir: Path, result: RunResult, *, budget: float, config: Config = MOUNT_DEFAULTS,
                 max_runs: int = 200) -> tuple[list[Step], ModelMismatch, dict[str, bytes] | None, int]:
    """A shorter step list that still fails the same way: ``(steps, failure, initial files, replays)``.

    First the prefix up to the last clean restart before the failure is replaced by the files
    the reference had right then (a restart leaves nothing pending, so that is the whole
    state); then steps are dropped (delta debugging), bounded by ``budget`` seconds.
    """
    assert result.failure is not None
    want = _signature(result.failure, result.steps)
    best, best_failure, initial, runs = list(result.steps), result.failure, None, 0
    deadline = time.monotonic() + budget
    before = [i for i in result.snapshots if i < len(best) - 1]
    if before:
        cut = max(before)
        runs += 1
        again = await run_model(workdir, replay=best[cut + 1:], config=config, initial=result.snapshots[cut])
        if again.failure is not None and _signature(again.failure, again.steps) == want:
            best, best_failure, initial = again.steps, again.failure, result.snapshots[cut]
    chunk = max(1, len(best) // 2)
    while chunk >= 1 and runs < max_runs and time.monotonic() < deadline:
        start, progressed = 0, False
        # The failing (last) step is never dropped.
        while start + chunk <= len(best) - 1 and runs < max_runs and time.monotonic() < deadline:
            candidate = best[:start] + best[start + chunk:]
            runs += 1
            again = None
            with trio.move_on_after(max(0.0, deadline - time.monotonic()) + 30) as guard:  # a hang guard per replay
                try:
                    again = await run_model(workdir, replay=candidate, config=config, initial=initial)
                except BaseExceptionGroup:
                    # The guard's cancellation met another error on its way out (a core torn
                    # down mid-step): this replay tells nothing; stop shrinking here.
                    if not guard.cancel_called:
                        raise
                    again = None
            if again is None:
                break
            if again.failure is not None and _signature(again.failure, again.steps) == want:
                best, best_failure, progressed = again.steps, again.failure, True
            else:
                start += chunk
        if not progressed:
            chunk //= 2
    return best, best_failure, initial, runs


def format_steps(steps: list[Step]) -> str:
    return "\n".join(f"  {i:4d}  {s.describe()}" for i, s in enumerate(steps))
