"""POSIX metadata in the bucket, at the core level: modes, owners, times, symlinks, special
files, user xattrs, name limits and close-to-open consistency.

Each test drives a core over a fresh bucket of the local S3 endpoint (the attributes
live in S3 user metadata, which a local-directory backend cannot keep) through
:class:`tests.core.posix_kernel.PosixKernel`, and checks up to three views: the live
one (what ``stat`` shows at once), the bucket after a drain (``head_object`` Metadata,
the names s3fs-fuse uses) and a restarted core (its caches empty; the state directory
is kept, as a remount with the same cache would).

Metadata names (docs/semantics.md, "POSIX behaviour"): ``mode`` (decimal st_mode with
the type bits), ``uid``, ``gid``, ``mtime``/``ctime``/``atime`` (seconds, decimal
fraction), ``rdev``, ``xattr`` (URL-encoded JSON, name -> base64 value).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import stat
import time
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
import trio

from gstore.vfs import filesystem
from gstore.vfs.filesystem import CLOSE_TO_OPEN_WINDOW

from .posix_kernel import PosixKernel, get_object, head_metadata, open_s3_core, put_object

UMASK_FILE = 0o644  # what an object without metadata shows (--umask 022)
UMASK_DIR = 0o755
# 2001-02-03 04:05:06.789 UTC: a time with a sub-second part.
WHEN = 981173106.789
NS = 1_000_000_000


def perms(mode: int) -> int:
    return stat.S_IMODE(mode)


def kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "char device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return f"unknown type {stat.S_IFMT(mode):o}"


def describe(attrs) -> str:  # type: ignore[no-untyped-def]
    return (f"{kind(attrs.mode)} {perms(attrs.mode):04o} {attrs.uid}:{attrs.gid} "
            f"mtime {attrs.mtime_ns / NS:.6f} ctime {attrs.ctime_ns / NS:.6f}")


def meta_mode(meta: dict[str, str]) -> int:
    assert "mode" in meta, f"no 'mode' in the object's metadata: {meta}"
    return int(meta["mode"])


def stored_xattrs(meta: dict[str, str]) -> dict[str, bytes]:
    """The ``xattr`` metadata value, decoded the way s3fs-fuse writes it."""
    assert "xattr" in meta, f"no 'xattr' in the object's metadata: {meta}"
    table = json.loads(unquote(meta["xattr"]))
    return {name: base64.b64decode(value) for name, value in table.items()}


async def drained(h) -> None:  # type: ignore[no-untyped-def]
    failures = await h.drain()
    assert failures == [], f"the drain could not upload everything: {failures}"


async def restarted(h) -> PosixKernel:  # type: ignore[no-untyped-def]
    failures = await h.restart()
    assert failures == [], f"the drain before the restart failed: {failures}"
    return PosixKernel.of(h)


async def emptied(h) -> PosixKernel:  # type: ignore[no-untyped-def]
    """A remount with an EMPTY cache: drain, stop, remove the state directory (block cache,
    staging, the attributes remembered per object version), start a new core."""
    await drained(h)
    await h.kernel.released()
    await h.stop()
    shutil.rmtree(h.state_dir)
    await h.start()
    return PosixKernel.of(h)


async def tick() -> None:
    """Let the clock move on, so that a new time is distinguishable from the last one."""
    await trio.sleep(0.02)


# --------------------------------------------------------------------------- create / mkdir modes


async def test_create_and_mkdir_keep_the_mode_given(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        a = await k.create("secret", 0o600, b"key")
        x = await k.create("tool.sh", 0o755, b"#!/bin/sh\n")
        d = await k.mkdir_mode("private", 0o700)
        assert (kind(a.mode), perms(a.mode)) == ("file", 0o600), describe(a)
        assert (kind(x.mode), perms(x.mode)) == ("file", 0o755), describe(x)
        assert (kind(d.mode), perms(d.mode)) == ("dir", 0o700), describe(d)
        await drained(h)
        assert meta_mode(head_metadata(h, "secret")) == stat.S_IFREG | 0o600
        assert meta_mode(head_metadata(h, "tool.sh")) == stat.S_IFREG | 0o755
        assert meta_mode(head_metadata(h, "private/")) == stat.S_IFDIR | 0o700
        for name in ("uid", "gid", "mtime"):
            assert name in head_metadata(h, "secret"), f"'{name}' not written with the upload"
        k = await restarted(h)
        assert perms((await k.lstat("secret")).mode) == 0o600
        assert perms((await k.lstat("tool.sh")).mode) == 0o755
        assert perms((await k.lstat("private")).mode) == 0o700


# --------------------------------------------------------------------------- chmod


async def test_chmod_of_a_remote_file_and_folder_is_stored_and_kept(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path) as h:
        put_object(h, "plain.txt", b"hello")
        put_object(h, "prefix-only/inside.txt", b"x")  # a folder with no marker object
        k = PosixKernel.of(h)
        await k.mkdir_mode("made", 0o755)
        assert perms((await k.lstat("plain.txt")).mode) == UMASK_FILE, "an object without metadata: default"
        await k.chmod("plain.txt", 0o600)
        await k.chmod("made", 0o711)
        await k.chmod("prefix-only", 0o750)
        assert perms((await k.lstat("plain.txt")).mode) == 0o600
        assert perms((await k.lstat("made")).mode) == 0o711
        assert perms((await k.lstat("prefix-only")).mode) == 0o750
        await drained(h)
        assert meta_mode(head_metadata(h, "plain.txt")) == stat.S_IFREG | 0o600
        assert get_object(h, "plain.txt") == b"hello", "a metadata-only update changed the bytes"
        assert meta_mode(head_metadata(h, "made/")) == stat.S_IFDIR | 0o711
        assert meta_mode(head_metadata(h, "prefix-only/")) == stat.S_IFDIR | 0o750
        k = await restarted(h)
        assert perms((await k.lstat("plain.txt")).mode) == 0o600
        assert perms((await k.lstat("made")).mode) == 0o711
        assert perms((await k.lstat("prefix-only")).mode) == 0o750
        assert await k.read_file("plain.txt") == b"hello"


async def test_chmod_of_a_pending_file_goes_up_with_its_upload(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path, write_back_delay=30) as h:
        k = PosixKernel.of(h)
        fd = await k.create_fd("run.sh", 0o644)
        await k.pwrite(fd, b"echo hi\n", 0)
        await k.fchmod(fd, 0o750)
        await k.close(fd)
        await k.chmod("run.sh", 0o755)
        assert perms((await k.lstat("run.sh")).mode) == 0o755
        before = h.bucket.keys()
        assert "run.sh" not in before, "the file went up before its write-back delay"
        await drained(h)
        assert meta_mode(head_metadata(h, "run.sh")) == stat.S_IFREG | 0o755
        assert get_object(h, "run.sh") == b"echo hi\n"


async def test_a_metadata_update_keeps_metadata_gstore_does_not_know(tmp_path: Path) -> None:
    """chmod of an object another tool wrote: its bytes, Content-Type and the user metadata
    gstore has no use for (an application's tag, rclone's md5chksum) stay as they were."""
    async with open_s3_core(tmp_path) as h:
        assert h.bucket is not None
        h.bucket.client.put_object(Bucket=h.bucket.name, Key="tagged", Body=b"payload", ContentType="text/csv",
                                   Metadata={"project": "apollo", "md5chksum": "abc", "mtime": "1600000000"})
        k = PosixKernel.of(h)
        await k.chmod("tagged", 0o600)
        await drained(h)
        head = h.bucket.client.head_object(Bucket=h.bucket.name, Key="tagged")
        meta = head["Metadata"]
        assert meta_mode(meta) == stat.S_IFREG | 0o600
        assert (meta.get("project"), meta.get("md5chksum")) == ("apollo", "abc"), (
            f"a chmod dropped metadata other tools wrote: {meta}")
        assert float(meta["mtime"]) == 1600000000, meta
        assert head["ContentType"] == "text/csv"
        assert get_object(h, "tagged") == b"payload"


async def test_metadata_changes_of_one_remote_file_are_coalesced(tmp_path: Path) -> None:
    """chmod, chown and touch of an uploaded file in a row: the bucket ends with all three,
    through the write-back queue (not one server-side copy each)."""
    async with open_s3_core(tmp_path, write_back_delay=0.5) as h:
        put_object(h, "f", b"data")
        k = PosixKernel.of(h)
        await k.lstat("f")
        server = h.bucket.server
        server.stats.reset()
        await k.chmod("f", 0o640)
        await k.chown("f", 1234, 5678)
        await k.utime("f", atime=WHEN, mtime=WHEN)
        await drained(h)
        meta = head_metadata(h, "f")
        assert meta_mode(meta) == stat.S_IFREG | 0o640 and meta.get("uid") == "1234" and meta.get("gid") == "5678"
        assert abs(float(meta["mtime"]) - WHEN) < 1e-6, meta
        copies = server.stats.snapshot().get("COPY", 0)
        assert copies <= 1, f"{copies} server-side copies for three metadata changes in a row"


# --------------------------------------------------------------------------- chown


async def test_chown_of_files_and_folders(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        await k.create("f", 0o644, b"x")
        await k.mkdir_mode("d", 0o755)
        await drained(h)
        after = await k.chown("f", 1234, 5678)
        assert (after.uid, after.gid) == (1234, 5678), describe(after)
        await k.chown("d", 1234, 5678)
        only_gid = await k.chown("d", None, 42)
        assert (only_gid.uid, only_gid.gid) == (1234, 42), "chown with uid -1 changed the uid"
        await drained(h)
        meta = head_metadata(h, "f")
        assert (meta.get("uid"), meta.get("gid")) == ("1234", "5678"), meta
        meta = head_metadata(h, "d/")
        assert (meta.get("uid"), meta.get("gid")) == ("1234", "42"), meta
        assert get_object(h, "f") == b"x"
        k = await restarted(h)
        f, d = await k.lstat("f"), await k.lstat("d")
        assert (f.uid, f.gid, d.uid, d.gid) == (1234, 5678, 1234, 42), (describe(f), describe(d))


async def test_a_folder_made_again_does_not_inherit_the_removed_one_attributes(tmp_path: Path) -> None:
    """rmdir, then mkdir of the same name (or a folder renamed over it, then removed): the new
    folder belongs to whoever made it, with the mode given, in the bucket and at every lookup.
    (pjdfstest rename/10.t: a stale owner let another user rename over it in a sticky folder.)"""
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        await k.mkdir_mode("d", 0o755)
        await k.chown("d", 1234, 1234)
        await k.chmod("d", 0o700)
        await k.rmdir("d")
        made = await k.mkdir_mode("d", 0o755)
        assert (made.uid, perms(made.mode)) == (k.caller[0], 0o755), describe(made)
        again = await k.lstat("d")  # a new lookup: the driver keeps no dentry
        assert (again.uid, again.gid, perms(again.mode)) == (*k.caller, 0o755), (
            f"the new folder shows the removed one's attributes: {describe(again)}")
        await k.mkdir_mode("x", 0o755)
        await k.mkdir_mode("y", 0o755)
        await k.chown("y", 1234, 1234)
        await k.rename("x", "y")
        await k.rmdir("y")
        await k.mkdir_mode("y", 0o711)
        y = await k.lstat("y")
        assert (y.uid, perms(y.mode)) == (k.caller[0], 0o711), f"y: {describe(y)}"
        await drained(h)
        assert (meta_mode(head_metadata(h, "d/")), head_metadata(h, "d/").get("uid")) == (
            stat.S_IFDIR | 0o755, str(k.caller[0])), head_metadata(h, "d/")


# --------------------------------------------------------------------------- times


async def test_utimens_keeps_sub_second_times(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        await k.create("f", 0o644, b"x")
        await drained(h)
        a = await k.utime("f", atime=WHEN + 100, mtime=WHEN)
        assert abs(a.mtime_ns - int(WHEN * NS)) < 1000, describe(a)
        assert abs(a.atime_ns - int((WHEN + 100) * NS)) < 1000, f"atime {a.atime_ns}"
        only_m = await k.utime("f", mtime=WHEN + 1)  # touch -m: atime left alone
        assert abs(only_m.atime_ns - int((WHEN + 100) * NS)) < 1000, "touch -m changed atime"
        await k.utime("f", mtime=WHEN)
        await drained(h)
        meta = head_metadata(h, "f")
        assert abs(float(meta["mtime"]) - WHEN) < 1e-6, meta
        assert abs(float(meta["atime"]) - (WHEN + 100)) < 1e-6, meta
        k = await restarted(h)
        again = await k.lstat("f")
        assert abs(again.mtime_ns - int(WHEN * NS)) < 1000, describe(again)


async def test_utimens_of_a_folder(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        await k.mkdir_mode("d", 0o755)
        d = await k.utime("d", atime=WHEN, mtime=WHEN)
        assert abs(d.mtime_ns - int(WHEN * NS)) < 1000, describe(d)
        await drained(h)
        assert abs(float(head_metadata(h, "d/")["mtime"]) - WHEN) < 1e-6
        k = await restarted(h)
        assert abs((await k.lstat("d")).mtime_ns - int(WHEN * NS)) < 1000


async def test_ctime_moves_on_every_metadata_or_content_change(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        await k.create("f", 0o644, b"x")
        await drained(h)
        seen = [(await k.lstat("f")).ctime_ns]

        async def changed(what: str, change) -> None:  # type: ignore[no-untyped-def]
            await tick()
            before = time.time_ns()
            await change()
            now = (await k.lstat("f")).ctime_ns
            assert now > seen[-1], f"{what}: ctime did not move ({seen[-1]} -> {now})"
            assert now >= before - 5_000_000, f"{what}: ctime {now} is before the change ({before})"
            seen.append(now)

        await changed("chmod", lambda: k.chmod("f", 0o600))
        await changed("chown", lambda: k.chown("f", 1234, 5678))
        await changed("utimens", lambda: k.utime("f", mtime=WHEN))
        await changed("setxattr", lambda: k.setxattr("f", "user.k", b"v"))
        await changed("write", lambda: k.write_file("f", b"new content"))
        attrs = await k.lstat("f")
        assert attrs.ctime_ns >= attrs.mtime_ns, f"ctime before mtime: {describe(attrs)}"
        # touch -d into the past: mtime goes back, ctime does not.
        past = await k.utime("f", mtime=WHEN)
        assert past.ctime_ns > int(WHEN * NS) and past.ctime_ns >= seen[-1], describe(past)


async def test_a_folder_mtime_and_ctime_move_when_its_entries_change(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        await k.mkdir_mode("d", 0o755)
        await k.create("d/keep", 0o644, b"k")
        old = int(WHEN * NS)

        async def moves(what: str, change) -> None:  # type: ignore[no-untyped-def]
            await k.utime("d", atime=WHEN, mtime=WHEN)
            assert (await k.lstat("d")).mtime_ns == pytest.approx(old, abs=1000)
            await change()
            after = await k.lstat("d")
            assert after.mtime_ns > old + NS, f"{what} in d: its mtime did not move ({describe(after)})"
            assert after.ctime_ns >= after.mtime_ns - 1000, f"{what} in d: ctime behind mtime ({describe(after)})"

        await moves("create", lambda: k.create("d/new", 0o644))
        await moves("mkdir", lambda: k.mkdir_mode("d/sub", 0o755))
        await moves("symlink", lambda: k.symlink("keep", "d/link"))
        await moves("unlink", lambda: k.unlink("d/new"))
        await moves("rmdir", lambda: k.rmdir("d/sub"))
        await moves("rename inside", lambda: k.rename("d/keep", "d/kept"))
        await moves("rename out", lambda: k.rename("d/kept", "moved"))
        await moves("rename in", lambda: k.rename("moved", "d/back"))


# --------------------------------------------------------------------------- symlinks


async def test_symlink_readlink_and_lstat(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        await k.create("target.txt", 0o640, b"the target")
        link = await k.symlink("target.txt", "link")
        assert kind(link.mode) == "symlink", describe(link)
        assert link.size == len("target.txt"), f"a symlink's size is its target's length, got {link.size}"
        assert await k.readlink("link") == "target.txt"
        followed = await k.stat_follow("link")
        assert (kind(followed.mode), perms(followed.mode), followed.size) == ("file", 0o640, 10)
        assert await k.read_file(await k.realpath("link")) == b"the target"
        dangling = await k.symlink("../nowhere/at/all", "dangling")
        assert kind(dangling.mode) == "symlink"
        with pytest.raises(FileNotFoundError):
            await k.stat_follow("dangling")
        await drained(h)
        assert get_object(h, "link") == b"target.txt", "a symlink is an object holding its target"
        assert stat.S_ISLNK(meta_mode(head_metadata(h, "link")))
        k = await restarted(h)
        assert kind((await k.lstat("link")).mode) == "symlink"
        assert await k.readlink("link") == "target.txt"
        assert await k.readlink("dangling") == "../nowhere/at/all"
        listed = await k.listdir_attrs("")
        assert set(listed) >= {"link", "dangling", "target.txt"}


async def test_symlink_to_a_folder_is_followed(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        await k.mkdir_mode("real", 0o755)
        await k.create("real/inside.txt", 0o644, b"inside")
        await k.symlink("real", "alias")
        await k.symlink("/real/inside.txt", "absolute")  # absolute: from the mount root here
        assert kind((await k.lstat("alias")).mode) == "symlink"
        assert kind((await k.stat_follow("alias")).mode) == "dir"
        assert await k.realpath("alias/inside.txt") == "real/inside.txt"
        assert await k.read_file(await k.realpath("alias/inside.txt")) == b"inside"
        await k.symlink("loop2", "loop1")
        await k.symlink("loop1", "loop2")
        with pytest.raises(OSError) as loop:
            await k.realpath("loop1/x")
        assert loop.value.errno == errno.ELOOP
        k = await restarted(h)
        assert await k.read_file(await k.realpath("alias/inside.txt")) == b"inside"


async def test_a_symlink_written_by_s3fs_fuse_reads_as_a_symlink(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path) as h:
        put_object(h, "s3fs-link", b"some/where", mode=str(stat.S_IFLNK | 0o777), uid="0", gid="0",
                   mtime="1600000000")
        k = PosixKernel.of(h)
        attrs = await k.lstat("s3fs-link")
        assert kind(attrs.mode) == "symlink", describe(attrs)
        assert await k.readlink("s3fs-link") == "some/where"


async def test_unlink_and_rename_of_a_symlink(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        await k.create("t", 0o644, b"t")
        await k.symlink("t", "l1")
        await k.rename("l1", "l2")
        assert await k.readlink("l2") == "t"
        assert kind((await k.lstat("l2")).mode) == "symlink"
        await k.unlink("l2")
        assert await k.lstat_or_none("l2") is None
        assert await k.read_file("t") == b"t", "unlinking a symlink removed its target"
        await drained(h)
        assert sorted(h.bucket.keys()) == ["t"]


# --------------------------------------------------------------------------- mknod, hard links


async def test_mknod_of_fifos_sockets_devices_and_regular_files(tmp_path: Path) -> None:
    chr_dev, blk_dev = os.makedev(1, 3), os.makedev(8, 1)
    wanted = {
        "fifo": (stat.S_IFIFO | 0o640, 0, "fifo"),
        "sock": (stat.S_IFSOCK | 0o755, 0, "socket"),
        "null": (stat.S_IFCHR | 0o666, chr_dev, "char device"),
        "disk": (stat.S_IFBLK | 0o660, blk_dev, "block device"),
        "plain": (stat.S_IFREG | 0o600, 0, "file"),
    }
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        for name, (mode, rdev, what) in wanted.items():
            attrs = await k.mknod(name, mode, rdev)
            assert (kind(attrs.mode), perms(attrs.mode)) == (what, perms(mode)), f"{name}: {describe(attrs)}"
            if rdev:
                assert getattr(attrs, "rdev", None) == rdev, f"{name}: rdev {getattr(attrs, 'rdev', None)}"
            assert attrs.size == 0
        await drained(h)
        for name, (mode, rdev, _what) in wanted.items():
            assert get_object(h, name) == b"", f"{name}: not an empty object"
            meta = head_metadata(h, name)
            assert meta_mode(meta) == mode, f"{name}: {meta}"
            if rdev:
                assert int(meta.get("rdev", "0")) == rdev, f"{name}: {meta}"
        k = await restarted(h)
        for name, (mode, rdev, what) in wanted.items():
            attrs = await k.lstat(name)
            assert (kind(attrs.mode), perms(attrs.mode)) == (what, perms(mode)), f"{name}: {describe(attrs)}"
            if rdev:
                assert getattr(attrs, "rdev", None) == rdev


async def test_hard_links_are_not_supported(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        await k.create("a", 0o644, b"a")
        with pytest.raises(OSError) as refused:
            await k.link("a", "b")
        assert refused.value.errno in (errno.EOPNOTSUPP, errno.ENOTSUP), refused.value
        assert await k.lstat_or_none("b") is None
        assert (await k.lstat("a")).nlink == 1


# --------------------------------------------------------------------------- user xattrs


async def test_user_xattrs_are_stored_with_the_object(tmp_path: Path) -> None:
    binary = bytes(range(256))
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        await k.create("f", 0o644, b"content")
        await k.mkdir_mode("d", 0o755)
        await drained(h)
        await k.setxattr("f", "user.color", b"blue")
        await k.setxattr("f", "user.binary", binary)
        await k.setxattr("f", "user.empty", b"")
        await k.setxattr("d", "user.owner", b"team")
        assert await k.getxattr("f", "user.color") == b"blue"
        assert await k.getxattr("f", "user.binary") == binary
        assert await k.getxattr("f", "user.empty") == b""
        names = await k.listxattr("f")
        assert {"user.color", "user.binary", "user.empty"} <= set(names), names
        assert "user.md5" in names, f"the computed names are listed beside the stored ones: {names}"
        await k.setxattr("f", "user.color", b"green")  # replace
        await k.removexattr("f", "user.empty")
        with pytest.raises(OSError) as gone:
            await k.getxattr("f", "user.empty")
        assert gone.value.errno == errno.ENODATA
        with pytest.raises(OSError) as missing:
            await k.removexattr("f", "user.never-set")
        assert missing.value.errno == errno.ENODATA
        await drained(h)
        assert stored_xattrs(head_metadata(h, "f")) == {"user.color": b"green", "user.binary": binary}
        assert stored_xattrs(head_metadata(h, "d/")) == {"user.owner": b"team"}
        assert get_object(h, "f") == b"content"
        k = await restarted(h)
        assert await k.getxattr("f", "user.color") == b"green"
        assert await k.getxattr("f", "user.binary") == binary
        assert await k.getxattr("d", "user.owner") == b"team"
        assert await k.getxattr("f", "user.md5") == b"9a0364b9e99bb480dd25e1f0284c8555"  # md5("content")


async def test_xattrs_of_a_pending_file_go_up_with_it(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path, write_back_delay=30) as h:
        k = PosixKernel.of(h)
        fd = await k.create_fd("p", 0o644)
        await k.pwrite(fd, b"pending", 0)
        await k.close(fd)
        await k.setxattr("p", "user.tag", b"x")
        assert await k.getxattr("p", "user.tag") == b"x"
        await drained(h)
        assert stored_xattrs(head_metadata(h, "p")) == {"user.tag": b"x"}


async def test_xattrs_beyond_the_metadata_limit_are_e2big(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        await k.create("f", 0o644, b"x")
        await k.setxattr("f", "user.small", b"s" * 100)
        with pytest.raises(OSError) as big:
            await k.setxattr("f", "user.big", b"b" * 3000)
        assert big.value.errno == errno.E2BIG, big.value
        # Many attributes that fit one by one but not together.
        with pytest.raises(OSError) as many:
            for i in range(40):
                await k.setxattr("f", f"user.n{i:02d}", b"v" * 60)
        assert many.value.errno == errno.E2BIG, many.value
        assert await k.getxattr("f", "user.small") == b"s" * 100, "a refused set lost an earlier one"
        with pytest.raises(OSError) as absent:
            await k.getxattr("f", "user.big")
        assert absent.value.errno == errno.ENODATA
        await drained(h)
        assert stored_xattrs(head_metadata(h, "f"))["user.small"] == b"s" * 100


async def test_computed_xattrs_stay_read_only(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        await k.create("f", 0o644, b"content")
        await drained(h)
        for name in ("user.md5", "user.etag"):
            with pytest.raises(OSError) as refused:
                await k.setxattr("f", name, b"forged")
            assert refused.value.errno in (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EROFS), (
                name, refused.value)
            with pytest.raises(OSError):
                await k.removexattr("f", name)
        assert await k.getxattr("f", "user.md5") == b"9a0364b9e99bb480dd25e1f0284c8555"
        assert "xattr" not in head_metadata(h, "f") or "user.md5" not in stored_xattrs(head_metadata(h, "f"))
        # user.mimetype stays what it was: the object's Content-Type.
        await k.setxattr("f", "user.mimetype", b"text/markdown")
        assert await k.getxattr("f", "user.mimetype") == b"text/markdown"


async def test_xattrs_written_by_s3fs_fuse_are_read(tmp_path: Path) -> None:
    table = {"user.origin": base64.b64encode(b"s3fs").decode(), "user.bin": base64.b64encode(b"\0\1").decode()}
    async with open_s3_core(tmp_path) as h:
        put_object(h, "from-s3fs", b"x", xattr=quote(json.dumps(table), safe=""))
        k = PosixKernel.of(h)
        assert await k.getxattr("from-s3fs", "user.origin") == b"s3fs"
        assert await k.getxattr("from-s3fs", "user.bin") == b"\0\1"
        assert {"user.origin", "user.bin"} <= set(await k.listxattr("from-s3fs"))


async def test_non_user_namespaces_are_not_stored(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        await k.create("f", 0o644, b"x")
        for name in ("trusted.x", "security.x"):
            with pytest.raises(OSError) as refused:
                await k.setxattr("f", name, b"v")
            assert refused.value.errno in (errno.ENOTSUP, errno.EPERM, errno.EOPNOTSUPP), (name, refused.value)


# --------------------------------------------------------------------------- other tools' metadata


async def test_an_object_with_s3fs_fuse_metadata_shows_it(tmp_path: Path) -> None:
    """Each object is looked up by name on a core that never listed its folder (at most
    three names per folder: a fourth would have the folder listed instead, see the next test)."""
    async with open_s3_core(tmp_path) as h:
        put_object(h, "by-s3fs", b"12345", mode=str(stat.S_IFREG | 0o750), uid="1001", gid="1002",
                   mtime="1600000000")
        put_object(h, "by-rclone", b"r", mtime="1600000000.25")
        put_object(h, "dir-marker/", b"", mode=str(stat.S_IFDIR | 0o711), uid="7", gid="8")
        put_object(h, "other/junk", b"j", mode="not a number", uid="-", mtime="yesterday")
        k = PosixKernel.of(h)
        a = await k.lstat("by-s3fs")
        assert (kind(a.mode), perms(a.mode), a.uid, a.gid) == ("file", 0o750, 1001, 1002), describe(a)
        assert a.mtime_ns == 1600000000 * NS, describe(a)
        assert a.size == 5
        r = await k.lstat("by-rclone")
        assert r.mtime_ns == pytest.approx(1600000000.25 * NS, abs=1000), describe(r)
        assert perms(r.mode) == UMASK_FILE and (r.uid, r.gid) == (h.options.uid, h.options.gid), describe(r)
        d = await k.lstat("dir-marker")
        assert (kind(d.mode), perms(d.mode), d.uid, d.gid) == ("dir", 0o711, 7, 8), describe(d)
        j = await k.lstat("other/junk")
        assert (kind(j.mode), perms(j.mode), j.uid) == ("file", UMASK_FILE, h.options.uid), (
            f"unparsable metadata must show the defaults: {describe(j)}")


async def test_lookups_by_name_of_many_objects_in_one_folder_show_their_metadata(tmp_path: Path) -> None:
    """``stat`` by name of every file of a folder (git status, rsync's receiver, make) on a
    core that never listed it: each shows its stored mode and owner, also past the fourth
    name, where the folder gets listed to save HEADs."""
    names = [f"f{i}" for i in range(8)]
    async with open_s3_core(tmp_path) as h:
        for i, name in enumerate(names):
            put_object(h, f"many/{name}", b"x", mode=str(stat.S_IFREG | (0o700 + i)), uid=str(2000 + i), gid="3000")
        k = PosixKernel.of(h)
        shown = {}
        for name in names:
            a = await k.lstat(f"many/{name}")
            shown[name] = (perms(a.mode), a.uid)
        wanted = {name: (0o700 + i, 2000 + i) for i, name in enumerate(names)}
        wrong = {n: f"{m:04o} uid {u}" for n, (m, u) in shown.items() if (m, u) != wanted[n]}
        assert not wrong, f"lookups by name that showed the defaults instead of the stored metadata: {wrong}"


async def test_objects_without_metadata_show_the_mount_defaults(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path, uid=4321, gid=8765, umask=0o027) as h:
        put_object(h, "plain", b"p")
        put_object(h, "folder/x", b"x")
        k = PosixKernel.of(h)
        f, d = await k.lstat("plain"), await k.lstat("folder")
        assert (perms(f.mode), f.uid, f.gid) == (0o640, 4321, 8765), describe(f)
        assert (perms(d.mode), d.uid, d.gid) == (0o750, 4321, 8765), describe(d)


# --------------------------------------------------------------------------- consistency, as designed


async def test_a_listing_shows_stored_attributes_and_a_large_one_the_defaults(tmp_path: Path) -> None:
    """A listing carries no user metadata. A folder with few files this mount knows nothing
    of gets one HEAD per file at opendir (once per object version), so ``ls -l``, ``tar c``
    and ``cp -a`` see stored modes, owners and symlinks; a folder with more of them than
    LISTING_DETAIL_LIMIT is shown as listed (defaults), so ``ls -l`` of a huge bucket folder
    stays one LIST; a lookup by name still asks a HEAD, which later listings remember."""
    async with open_s3_core(tmp_path) as h:
        for name in ("a", "b"):
            put_object(h, f"dir/{name}", b"x", mode=str(stat.S_IFREG | 0o750), uid="1001", gid="1002")
            put_object(h, f"big/{name}", b"x", mode=str(stat.S_IFREG | 0o750), uid="1001", gid="1002")
        k = PosixKernel.of(h)
        listed = await k.listdir_attrs("dir")
        assert set(listed) == {"a", "b"}
        assert (perms(listed["a"].mode), listed["a"].uid, listed["a"].gid) == (0o750, 1001, 1002), (
            f"a small folder's listing shows what is stored: {describe(listed['a'])}")
        k = await restarted(h)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(filesystem, "LISTING_DETAIL_LIMIT", 1)
            listed = await k.listdir_attrs("big")
            assert perms(listed["a"].mode) == UMASK_FILE and listed["a"].uid == h.options.uid, (
                f"more unknown files than the limit: shown as listed: {describe(listed['a'])}")
            looked_up = await k.lstat("big/a")  # by name: a HEAD
            assert (perms(looked_up.mode), looked_up.uid, looked_up.gid) == (0o750, 1001, 1002), describe(looked_up)
            k = await restarted(h)
            patch.setattr(filesystem, "LISTING_DETAIL_LIMIT", 0)  # b alone is still "too many"
            listed = await k.listdir_attrs("big")
            assert perms(listed["a"].mode) == 0o750, f"what a HEAD taught this mount: {describe(listed['a'])}"
            assert perms(listed["b"].mode) == UMASK_FILE, f"never looked up: {describe(listed['b'])}"


@pytest.mark.parametrize("folder", [
    "small",
    pytest.param("beyond-the-detail-limit", marks=pytest.mark.xfail(strict=True, reason=(
        "documented limit (docs/semantics.md): a folder with more than LISTING_DETAIL_LIMIT files "
        "this mount knows nothing of is shown as listed, so its symlinks and FIFOs look like files "
        "until they are looked up by name after the entry expires"))),
])
async def test_a_listing_and_a_lookup_never_disagree_on_the_file_type(tmp_path: Path, folder: str) -> None:
    """On a core with an empty cache, a folder is listed first (ls, tar c, find): the inode
    numbers readdir hands out must keep their file type when looked up afterwards. The Linux
    kernel cannot take an inode that turns from a regular file into a symlink or a FIFO: it
    marks it bad and every later call on it fails with EIO (tar: "Cannot stat: Input/output
    error"). Also in a folder with more undescribed files than LISTING_DETAIL_LIMIT (made
    small here), which a listing shows without a HEAD per file."""
    with pytest.MonkeyPatch.context() as patch:
        async with open_s3_core(tmp_path) as h:
            if folder != "small":
                if not hasattr(filesystem, "LISTING_DETAIL_LIMIT"):
                    pytest.skip("no LISTING_DETAIL_LIMIT in gstore.vfs.filesystem")
                patch.setattr(filesystem, "LISTING_DETAIL_LIMIT", 1)
            k = PosixKernel.of(h)
            await k.mkdir_mode("d", 0o755)
            await k.create("d/target", 0o700, b"hello")
            await k.symlink("target", "d/link")
            await k.mkfifo("d/pipe", 0o600)
            k = await emptied(h)
            listed = await k.listdir_attrs("d")
            changed = []
            for name, first in listed.items():
                later = await k.lstat(f"d/{name}")
                if later.ino == first.ino and stat.S_IFMT(later.mode) != stat.S_IFMT(first.mode):
                    changed.append(f"{name}: readdir said {kind(first.mode)}, a lookup says {kind(later.mode)}")
            assert not changed, "the same inode changed its file type: " + "; ".join(changed)
            assert kind((await k.lstat("d/link")).mode) == "symlink"
            assert await k.readlink("d/link") == "target"
            # As the kernel does it: readdirplus leaves dentries; the next lstat within the entry
            # timeout asks getattr on the inode the listing gave, not lookup.
            k = await emptied(h)
            kd = PosixKernel(h.fs, k.policy, dcache=True)
            await kd.listdir_attrs("d")
            shown = {name: kind((await kd.lstat(f"d/{name}")).mode) for name in ("link", "pipe", "target")}
            assert shown == {"link": "symlink", "pipe": "fifo", "target": "file"}, (
                f"lstat right after ls, through the dentries the listing left: {shown}")


async def test_what_this_mount_wrote_shows_in_its_listings(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        await k.mkdir_mode("d", 0o755)
        await k.create("d/secret", 0o600, b"s")
        await k.symlink("secret", "d/link")
        await k.mkfifo("d/pipe", 0o644)
        await drained(h)
        await k.chmod("d/secret", 0o400)
        listed = await k.listdir_attrs("d")
        shown = {name: (kind(a.mode), perms(a.mode)) for name, a in listed.items()}
        assert shown == {"secret": ("file", 0o400), "link": ("symlink", 0o777), "pipe": ("fifo", 0o644)}, shown


async def test_a_folder_made_here_shows_objects_others_put_in_it(tmp_path: Path) -> None:
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        await k.mkdir_mode("shared", 0o755)
        assert await k.listdir("shared") == []
        put_object(h, "shared/from-elsewhere", b"hello")
        deadline = trio.current_time() + 10
        while "from-elsewhere" not in await k.listdir("shared"):
            assert trio.current_time() < deadline, (
                "an object put into a folder made on this mount stayed hidden for 10 s")
            await trio.sleep(0.2)
        assert await k.read_file("shared/from-elsewhere") == b"hello"


@pytest.mark.parametrize("dcache", [False, True], ids=["no-dentry-cache", "dentry-cache"])
async def test_open_revalidates_against_the_backend(tmp_path: Path, dcache: bool) -> None:
    """Close-to-open: an open after another writer's upload reads the new version, even
    within the attribute TTL. An open within CLOSE_TO_OPEN_WINDOW of the last HEAD trusts it
    (the issue allows skipping the check when the attributes were fetched in the last second
    or so). With a dentry cache the kernel does not look the name up again: the open alone asks."""
    async with open_s3_core(tmp_path, attr_ttl=60, dir_cache_ttl=60) as h:
        put_object(h, "doc", b"version one")
        k = PosixKernel(h.fs, PosixKernel.of(h).policy, dcache=dcache)
        assert await k.read_file("doc") == b"version one"
        put_object(h, "doc", b"version two, longer")
        await trio.sleep(CLOSE_TO_OPEN_WINDOW + 0.1)  # the design's window, not a speed requirement
        assert await k.read_file("doc") == b"version two, longer"
        assert (await k.stat("doc")).size == len(b"version two, longer")
        put_object(h, "doc", b"3")
        await trio.sleep(CLOSE_TO_OPEN_WINDOW + 0.1)
        assert await k.read_file("doc") == b"3"


# --------------------------------------------------------------------------- name limits


async def test_255_byte_names_work_and_keys_over_1024_bytes_are_enametoolong(tmp_path: Path) -> None:
    long_name = "n" * 251 + ".txt"
    assert len(long_name.encode()) == 255
    utf8_name = "é" * 127 + "x"  # 255 bytes in UTF-8
    assert len(utf8_name.encode()) == 255
    async with open_s3_core(tmp_path) as h:
        k = PosixKernel.of(h)
        await k.create(long_name, 0o644, b"long")
        await k.mkdir_mode(utf8_name, 0o755)
        with pytest.raises(OSError) as too_long:
            await k.create("m" * 256, 0o644)
        assert too_long.value.errno == errno.ENAMETOOLONG
        # Four 250-byte folders: "a…/b…/c…/d…/" is 1,004 bytes of key already.
        deep = ""
        for letter in "abcd":
            deep = f"{deep}/{letter * 250}" if deep else letter * 250
            await k.mkdir_mode(deep, 0o755)
        await k.create(f"{deep}/{'f' * 19}", 0o644, b"fits")  # key of 1,023 bytes
        for name, make in (("g" * 40, lambda p: k.create(p, 0o644, b"no")),
                           ("h" * 40, lambda p: k.mkdir_mode(p, 0o755)),
                           ("i" * 40, lambda p: k.symlink("x", p)),
                           ("j" * 40, lambda p: k.mkfifo(p))):
            with pytest.raises(OSError) as refused:
                await make(f"{deep}/{name}")
            assert refused.value.errno == errno.ENAMETOOLONG, (name[:1], refused.value)
        assert await k.read_file(f"{deep}/{'f' * 19}") == b"fits"
        with pytest.raises(OSError) as rename_refused:
            await k.rename(long_name, f"{deep}/{'r' * 40}")
        assert rename_refused.value.errno == errno.ENAMETOOLONG
        await drained(h)
        keys = set(h.bucket.keys())
        assert long_name in keys and f"{utf8_name}/" in keys
        assert f"{deep}/{'f' * 19}" in keys
        assert not any(len(key.encode()) > 1024 for key in keys), "a key over 1,024 bytes reached the bucket"
        k = await restarted(h)
        assert await k.read_file(long_name) == b"long"
        assert kind((await k.lstat(utf8_name)).mode) == "dir"
