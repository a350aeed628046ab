"""POSIX metadata in the bucket, through real programs on a real mount.

chmod, chown, touch, cp -p, rsync -a, tar, git, mkfifo/mknod, ln -s, ln, setfattr/getfattr,
long names, close-to-open and the kernel's permission checks for another user. Each
result is read back three ways where it makes sense: on the live mount, in the bucket
after a flush (``head_object`` Metadata: the names s3fs-fuse uses, see
docs/semantics.md "POSIX behaviour") and on a fresh mount with an EMPTY cache
directory, so that nothing can come from what the first daemon remembered locally.

A path looked at on a fresh mount is stat'ed *by name* first unless the test is about
listings: by design (docs/semantics.md) a listing carries no user metadata, so readdir
shows the defaults for objects this mount never looked up, while a lookup by name asks
a HEAD and shows what is stored.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote

import pytest

from conftest import BUCKET, MountFactory
from helpers import flush, fresh_mount, keys, read_all, require_program, run

pytestmark = pytest.mark.fuse

ARGS = ("--write-back-delay", "1")
WHEN = "2001-02-03 04:05:06.789"  # touch -d, local time; the expected ns come from date(1)


# -- helpers ------------------------------------------------------------------------------------


def metadata(s3, key: str) -> dict[str, str]:
    """The object's user metadata (names lower-case, without x-amz-meta-)."""
    return s3.client.head_object(Bucket=BUCKET, Key=key)["Metadata"]


def meta_mode(s3, key: str) -> int:
    meta = metadata(s3, key)
    assert "mode" in meta, f"{key}: no 'mode' in its metadata: {meta}"
    return int(meta["mode"])


def stored_xattrs(s3, key: str) -> dict[str, bytes]:
    meta = metadata(s3, key)
    assert "xattr" in meta, f"{key}: no 'xattr' in its metadata: {meta}"
    return {k: base64.b64decode(v) for k, v in json.loads(unquote(meta["xattr"])).items()}


def perms(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def kind(path: Path) -> str:
    return run(["stat", "-c", "%F", str(path)]).stdout.strip()


def epoch_ns(when: str) -> int:
    """``when`` as touch -d reads it (local time), in ns, from date(1) itself."""
    return int(run(["date", "-d", when, "+%s%N"]).stdout.strip())


def require_root(why: str) -> None:
    """Root is needed (chown to others, switching uids); without it: fail in CI, else skip."""
    if os.getuid() == 0:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why}: run as root (required in CI)")
    pytest.skip(f"{why}: needs root")


def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f}s for {what}")
        time.sleep(0.1)


def ls_modes(folder: Path) -> dict[str, str]:
    """name -> the mode string ``ls -ln`` shows (``-rwxr-x---``)."""
    out = run(["ls", "-ln", "--time-style=+", str(folder)]).stdout
    modes = {}
    for line in out.splitlines()[1:]:
        fields = line.split(None, 5)
        if len(fields) == 6:
            modes[fields[5].split(" -> ")[0]] = fields[0].rstrip(".+")
    return modes


# -- chmod, chown, touch, ctime -----------------------------------------------------------------------


def test_chmod_of_files_and_folders_is_stored_and_survives_a_remount(s3, mount):
    s3.put("remote.txt", b"put by another tool")
    s3.put("prefix-only/inside.txt", b"x")  # a folder with no marker object
    m = mount("test:", *ARGS)
    (m.path / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (m.path / "secret").write_text("key\n")
    (m.path / "folder").mkdir()
    run(["chmod", "755", str(m.path / "script.sh")])
    run(["chmod", "600", str(m.path / "secret")])
    run(["chmod", "700", str(m.path / "folder")])
    run(["chmod", "640", str(m.path / "remote.txt")])
    run(["chmod", "750", str(m.path / "prefix-only")])
    expected = {"script.sh": 0o755, "secret": 0o600, "folder": 0o700, "remote.txt": 0o640, "prefix-only": 0o750}
    assert {n: perms(m.path / n) for n in expected} == expected, "live mount"
    assert run([str(m.path / "script.sh")]).stdout == "hi\n", "the exec bit works on the live mount"
    flush(m.path)
    in_bucket = {n: stat.S_IMODE(meta_mode(s3, n + ("/" if n in ("folder", "prefix-only") else "")))
                 for n in expected}
    assert in_bucket == expected, "bucket metadata 'mode'"
    assert stat.S_ISDIR(meta_mode(s3, "folder/")) and stat.S_ISREG(meta_mode(s3, "secret"))
    assert s3.get("remote.txt") == b"put by another tool", "chmod changed an object's bytes"
    m2 = fresh_mount(mount, m, *ARGS)
    assert {n: perms(m2.path / n) for n in expected} == expected, "fresh mount with an empty cache"
    assert run([str(m2.path / "script.sh")]).stdout == "hi\n"


def test_chown_as_root_is_stored_and_survives_a_remount(s3, mount):
    require_root("chown to another user")
    m = mount("test:", *ARGS)
    (m.path / "f").write_text("x")
    (m.path / "d").mkdir()
    (m.path / "d" / "inner").write_text("y")
    flush(m.path)
    run(["chown", "1234:5678", str(m.path / "f")])
    run(["chown", "-R", "1234:5678", str(m.path / "d")])
    run(["chgrp", "42", str(m.path / "d" / "inner")])
    owners = {n: (os.lstat(m.path / n).st_uid, os.lstat(m.path / n).st_gid) for n in ("f", "d", "d/inner")}
    expected = {"f": (1234, 5678), "d": (1234, 5678), "d/inner": (1234, 42)}
    assert owners == expected, "live mount"
    flush(m.path)
    for name, key in (("f", "f"), ("d", "d/"), ("d/inner", "d/inner")):
        meta = metadata(s3, key)
        assert (int(meta.get("uid", -1)), int(meta.get("gid", -1))) == expected[name], f"{key}: {meta}"
    m2 = fresh_mount(mount, m, *ARGS)
    owners = {n: (os.lstat(m2.path / n).st_uid, os.lstat(m2.path / n).st_gid) for n in expected}
    assert owners == expected, "fresh mount with an empty cache"
    assert run(["stat", "-c", "%u:%g", str(m2.path / "f")]).stdout.strip() == "1234:5678"


def test_touch_d_keeps_a_sub_second_mtime_and_touch_m_a_change_one_time(s3, mount):
    m = mount("test:", *ARGS)
    f, d = m.path / "f", m.path / "d"
    f.write_text("x")
    d.mkdir()
    want = epoch_ns(WHEN)
    run(["touch", "-d", WHEN, str(f)])
    run(["touch", "-d", WHEN, str(d)])
    st = os.stat(f)
    assert abs(st.st_mtime_ns - want) < 1000, f"mtime {st.st_mtime_ns}, expected {want}"
    assert abs(os.stat(d).st_mtime_ns - want) < 1000, "a folder's mtime"
    later = epoch_ns("2002-03-04 05:06:07.5")
    run(["touch", "-a", "-d", "2002-03-04 05:06:07.5", str(f)])
    st = os.stat(f)
    assert abs(st.st_atime_ns - later) < 1000 and abs(st.st_mtime_ns - want) < 1000, (
        f"touch -a: atime {st.st_atime_ns} (want {later}), mtime {st.st_mtime_ns} (want {want})")
    flush(m.path)
    assert abs(float(metadata(s3, "f")["mtime"]) * 1e9 - want) < 1000, metadata(s3, "f")
    assert abs(float(metadata(s3, "f")["atime"]) * 1e9 - later) < 1000, metadata(s3, "f")
    assert abs(float(metadata(s3, "d/")["mtime"]) * 1e9 - want) < 1000, metadata(s3, "d/")
    m2 = fresh_mount(mount, m, *ARGS)
    st = os.stat(m2.path / "f")
    assert abs(st.st_mtime_ns - want) < 1000, f"fresh mount: mtime {st.st_mtime_ns}, expected {want}"
    assert abs(st.st_atime_ns - later) < 1000, f"fresh mount: atime {st.st_atime_ns}, expected {later}"
    assert abs(os.stat(m2.path / "d").st_mtime_ns - want) < 1000, "fresh mount: the folder's mtime"
    shown = run(["stat", "-c", "%y", str(m2.path / "f")]).stdout.strip()
    assert shown.startswith("2001-02-03 04:05:06.789000000"), (
        f"fresh mount: stat shows {shown!r} after touch -d '{WHEN}' (st_mtime_ns {st.st_mtime_ns}, "
        f"expected {want}: the nanoseconds are not kept exactly)")
    # touch -m moves mtime only, to now.
    before = time.time_ns()
    run(["touch", "-m", str(m2.path / "f")])
    st = os.stat(m2.path / "f")
    assert st.st_mtime_ns >= before - 10_000_000 and abs(st.st_atime_ns - later) < 1000, (
        f"touch -m: mtime {st.st_mtime_ns}, atime {st.st_atime_ns}")


def test_ctime_moves_on_chmod_and_is_kept(s3, mount):
    m = mount("test:", *ARGS)
    f = m.path / "f"
    f.write_text("x")
    flush(m.path)
    first = os.stat(f).st_ctime_ns
    time.sleep(0.05)  # so that a new ctime is distinguishable, not a speed requirement
    run(["chmod", "600", str(f)])
    after_chmod = os.stat(f).st_ctime_ns
    assert after_chmod > first, f"ctime did not move on chmod ({first} -> {after_chmod})"
    time.sleep(0.05)
    run(["touch", "-d", WHEN, str(f)])
    after_touch = os.stat(f)
    assert after_touch.st_ctime_ns > after_chmod, "ctime did not move on touch -d"
    assert after_touch.st_ctime_ns > after_touch.st_mtime_ns, "touch -d into the past moved ctime back"
    flush(m.path)
    assert "ctime" in metadata(s3, "f"), metadata(s3, "f")
    m2 = fresh_mount(mount, m, *ARGS)
    kept = os.stat(m2.path / "f").st_ctime_ns
    assert kept >= after_touch.st_ctime_ns - 1000, (
        f"fresh mount: ctime {kept} is before the last change ({after_touch.st_ctime_ns})")


def test_a_folder_mtime_moves_when_an_entry_is_created_removed_or_renamed(s3, mount):
    m = mount("test:", *ARGS)
    d = m.path / "d"
    d.mkdir()
    (d / "keep").write_text("k")
    old = epoch_ns(WHEN)
    steps = [
        ("create", lambda: (d / "new").write_text("n")),
        ("mkdir", lambda: (d / "sub").mkdir()),
        ("unlink", lambda: (d / "new").unlink()),
        ("rmdir", lambda: (d / "sub").rmdir()),
        ("rename inside", lambda: (d / "keep").rename(d / "kept")),
        ("rename out", lambda: (d / "kept").rename(m.path / "out")),
        ("rename in", lambda: (m.path / "out").rename(d / "back")),
    ]
    for what, change in steps:
        run(["touch", "-d", WHEN, str(d)])
        assert abs(os.stat(d).st_mtime_ns - old) < 1000
        change()
        st = os.stat(d)
        assert st.st_mtime_ns > old + 10**9, f"{what}: the folder's mtime did not move"
        assert st.st_ctime_ns >= st.st_mtime_ns - 1000, f"{what}: the folder's ctime is behind its mtime"


# -- cp -p, rsync -a -----------------------------------------------------------------------------------


def _source_tree(root: Path, *, owners: bool) -> dict[str, tuple[int, int]]:
    """Files and folders with distinct modes and sub-second mtimes; name -> (mode bits, mtime ns)."""
    rng = random.Random(3)
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "private").mkdir(mode=0o700)
    made = {}
    for rel, mode in (("run.sh", 0o755), ("secret.key", 0o600), ("notes.txt", 0o644),
                      ("nested/tool", 0o750), ("nested/deeper/data.bin", 0o640), ("private/id", 0o400)):
        path = root / rel
        path.write_bytes(rng.randbytes(rng.randrange(0, 5000)))
        os.chmod(path, mode)
        ns = 1_500_000_000_123_456_789 + rng.randrange(10**15)
        os.utime(path, ns=(ns, ns))
        if owners:
            os.chown(path, 1234, 5678)
        made[rel] = (mode, ns)
    os.chmod(root / "private", 0o700)
    return made


def _check_tree(where: str, target: Path, made: dict[str, tuple[int, int]], *, owners: bool) -> None:
    problems = []
    for rel, (mode, ns) in made.items():
        st = os.lstat(target / rel)
        if stat.S_IMODE(st.st_mode) != mode:
            problems.append(f"{rel}: mode {stat.S_IMODE(st.st_mode):04o}, expected {mode:04o}")
        # cp -p and rsync copy the time with the precision utimensat gets (ns, or µs for some tools)
        if abs(st.st_mtime_ns - ns) >= 1000:
            problems.append(f"{rel}: mtime {st.st_mtime_ns}, expected {ns}")
        if owners and (st.st_uid, st.st_gid) != (1234, 5678):
            problems.append(f"{rel}: owner {st.st_uid}:{st.st_gid}, expected 1234:5678")
    if stat.S_IMODE(os.lstat(target / "private").st_mode) != 0o700:
        problems.append(f"private/: mode {stat.S_IMODE(os.lstat(target / 'private').st_mode):04o}, expected 0700")
    assert not problems, f"{where}:\n  " + "\n  ".join(problems)


def test_cp_p_keeps_modes_owners_and_times(s3, mount, tmp_path):
    owners = os.getuid() == 0
    source = tmp_path / "source"
    made = _source_tree(source, owners=owners)
    m = mount("test:", *ARGS)
    run(["cp", "-rp", f"{source}/.", str(m.path / "copy")])
    _check_tree("live mount", m.path / "copy", made, owners=owners)
    flush(m.path)
    for rel, (mode, ns) in made.items():
        meta = metadata(s3, f"copy/{rel}")
        assert int(meta["mode"]) == stat.S_IFREG | mode, f"{rel}: {meta}"
        assert abs(float(meta["mtime"]) * 1e9 - ns) < 1000, f"{rel}: {meta}"
    m2 = fresh_mount(mount, m, *ARGS)
    _check_tree("fresh mount with an empty cache", m2.path / "copy", made, owners=owners)


def _rsync(source: Path, target: Path) -> tuple[int, list[str]]:
    out = run(["rsync", "-a", "--stats", "--itemize-changes", f"{source}/", f"{target}/"]).stdout
    found = re.search(r"Number of regular files transferred: ([\d,]+)", out)
    assert found, f"no transfer count in rsync's output:\n{out}"
    # --itemize-changes: one line per item rsync changed ("YXcstpoguax name"), nothing for the rest
    changed = [line for line in out.splitlines() if re.match(r"^[<>ch.*][fdLDS][.+?a-zA-Z]{9} ", line)]
    return int(found.group(1).replace(",", "")), changed


def test_rsync_a_twice_transfers_nothing_the_second_time(s3, mount, tmp_path):
    require_program("rsync")
    owners = os.getuid() == 0
    source = tmp_path / "source"
    made = _source_tree(source, owners=owners)
    os.symlink("notes.txt", source / "link-to-notes")
    os.symlink("nested", source / "link-to-folder")
    m = mount("test:", *ARGS)
    count, _ = _rsync(source, m.path / "mirror")
    assert count == len(made), f"the first rsync transferred {count} files"
    _check_tree("live mount", m.path / "mirror", made, owners=owners)
    assert os.readlink(m.path / "mirror" / "link-to-notes") == "notes.txt"
    count, changed = _rsync(source, m.path / "mirror")
    assert count == 0 and not changed, f"the second rsync on the live mount transferred {count} files: {changed}"
    flush(m.path)
    m2 = fresh_mount(mount, m, *ARGS)
    count, changed = _rsync(source, m2.path / "mirror")
    assert count == 0 and not changed, (
        f"rsync after a remount with an empty cache transferred {count} files: {changed}")
    _check_tree("fresh mount with an empty cache", m2.path / "mirror", made, owners=owners)
    assert os.readlink(m2.path / "mirror" / "link-to-folder") == "nested"


# -- tar --------------------------------------------------------------------------------------------------


def _tar_tree(root: Path) -> None:
    rng = random.Random(7)
    for folder, mode in (("bin", 0o755), ("etc", 0o755), ("etc/private", 0o700), ("share/doc/deep", 0o755)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        os.chmod(root / folder, mode)
    for rel, mode in (("bin/tool", 0o755), ("bin/helper.sh", 0o750), ("etc/app.conf", 0o644),
                      ("etc/private/secret.key", 0o600), ("share/doc/deep/README", 0o444)):
        (root / rel).write_bytes(rng.randbytes(rng.randrange(1, 3000)))
        os.chmod(root / rel, mode)
    os.symlink("tool", root / "bin" / "tool-alias")
    os.symlink("../etc/app.conf", root / "bin" / "conf-link")
    os.symlink("share/doc", root / "docs")
    os.symlink("does/not/exist", root / "dangling")
    if os.getuid() == 0:
        os.lchown(root / "etc" / "private" / "secret.key", 1234, 5678)
    for dirpath, dirs, files in os.walk(root, topdown=False):
        for name in files + dirs:
            os.utime(Path(dirpath) / name, (1_300_000_000, 1_300_000_000 + len(name)), follow_symlinks=False)
    os.utime(root, (1_300_000_000, 1_300_000_000))


def _tar_listing(archive: Path) -> list[str]:
    out = run(["tar", "--numeric-owner", "--full-time", "-tvf", str(archive)]).stdout
    lines = []
    for line in out.splitlines():
        fields = line.split(None, 5)  # mode owner size date time name
        if fields[0].startswith("d"):
            fields[2] = "0"  # a folder's size is meaningless here
        lines.append(" ".join(fields))
    return sorted(lines)


def test_tar_x_then_tar_c_gives_the_same_listing(s3, mount, tmp_path):
    require_program("tar")
    tree = tmp_path / "tree"
    tree.mkdir()
    _tar_tree(tree)
    archive = tmp_path / "in.tar"
    run(["tar", "--numeric-owner", "-cf", str(archive), "-C", str(tree), "."])
    want = _tar_listing(archive)
    m = mount("test:", *ARGS)
    (m.path / "unpacked").mkdir()
    run(["tar", "--numeric-owner", "-xpf", str(archive), "-C", str(m.path / "unpacked")])

    def compare(where: str, folder: Path, n: int) -> None:
        out = tmp_path / f"out{n}.tar"
        run(["tar", "--numeric-owner", "-cf", str(out), "-C", str(folder), "."])
        got = _tar_listing(out)
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        assert got == want, (f"{where}: tar tvf of tar c differs from the original archive\n"
                             f"  only in the original:\n    " + "\n    ".join(missing) +
                             "\n  only in the copy:\n    " + "\n    ".join(extra))

    compare("live mount", m.path / "unpacked", 1)
    assert os.readlink(m.path / "unpacked" / "docs") == "share/doc"
    flush(m.path)
    assert s3.get("unpacked/bin/tool-alias") == b"tool"
    assert stat.S_ISLNK(meta_mode(s3, "unpacked/bin/tool-alias"))
    assert stat.S_IMODE(meta_mode(s3, "unpacked/etc/private/secret.key")) == 0o600
    m2 = fresh_mount(mount, m, *ARGS)
    compare("fresh mount with an empty cache", m2.path / "unpacked", 2)


# -- git ----------------------------------------------------------------------------------------------------


def _git_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
    })
    return env


def test_git_clone_keeps_a_symlink_and_an_exec_bit(s3, mount, tmp_path):
    require_program("git")
    home = tmp_path / "home"
    home.mkdir()
    env = _git_env(home)

    def git(*args: str, cwd: Path) -> str:
        return run(["git", *args], cwd=cwd, env=env).stdout

    origin = tmp_path / "origin"
    origin.mkdir()
    git("-c", "init.defaultBranch=main", "init", "-q", ".", cwd=origin)
    (origin / "README.md").write_text("# demo\n")
    (origin / "build.sh").write_text("#!/bin/sh\necho built\n")
    os.chmod(origin / "build.sh", 0o755)
    (origin / "src").mkdir()
    (origin / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    os.symlink("README.md", origin / "README.link")
    os.symlink("src", origin / "code")
    git("add", "-A", cwd=origin)
    git("commit", "-q", "-m", "first", cwd=origin)
    tree = git("ls-tree", "-r", "HEAD", cwd=origin)
    assert "120000" in tree and "100755" in tree, tree

    m = mount("test:", *ARGS)
    repo = m.path / "repo"
    git("clone", "-q", str(origin), str(repo), cwd=tmp_path)

    def verify(where: str, checkout: Path) -> None:
        config = run(["git", "config", "--list", "--local"], cwd=checkout, env=env).stdout.splitlines()
        assert "core.symlinks=false" not in config, f"{where}: git found that symlinks do not work"
        assert "core.filemode=true" in config, f"{where}: git found that exec bits do not stick: {config}"
        status = git("status", "--porcelain", "--untracked-files=all", cwd=checkout)
        assert status == "", f"{where}: git status is not clean:\n{status}"
        assert (checkout / "README.link").is_symlink(), f"{where}: README.link is not a symlink"
        assert os.readlink(checkout / "README.link") == "README.md"
        assert (checkout / "code").is_symlink() and (checkout / "code" / "main.c").is_file()
        assert os.stat(checkout / "build.sh").st_mode & 0o111 == 0o111, f"{where}: build.sh lost its exec bit"
        assert run([str(checkout / "build.sh")]).stdout == "built\n"
        assert git("diff", "--stat", cwd=checkout) == ""

    verify("live mount", repo)
    flush(m.path)
    assert s3.get("repo/README.link") == b"README.md"
    m2 = fresh_mount(mount, m, *ARGS)
    verify("fresh mount with an empty cache", m2.path / "repo")


# -- symlinks, hard links, FIFOs and device nodes ------------------------------------------------------


def test_symlinks_readlink_and_a_symlink_to_a_folder_followed(s3, mount):
    m = mount("test:", *ARGS)
    (m.path / "real").mkdir()
    (m.path / "real" / "inside.txt").write_text("inside\n")
    (m.path / "target.txt").write_text("target\n")
    run(["ln", "-s", "target.txt", str(m.path / "link")])
    run(["ln", "-s", "real", str(m.path / "folder-link")])
    run(["ln", "-s", "no/such/thing", str(m.path / "dangling")])

    def verify(where: str, root: Path) -> None:
        # by name first (no listing): each is a lookup and a readlink
        assert kind(root / "link") == "symbolic link", f"{where}: {kind(root / 'link')}"
        assert run(["readlink", str(root / "link")]).stdout.strip() == "target.txt", where
        assert (root / "link").read_text() == "target\n", f"{where}: following the link"
        assert os.lstat(root / "link").st_size == len("target.txt"), f"{where}: a symlink's size"
        assert run(["cat", str(root / "folder-link" / "inside.txt")]).stdout == "inside\n", where
        assert os.listdir(root / "folder-link") == ["inside.txt"], where
        assert os.path.isdir(root / "folder-link") and os.path.islink(root / "folder-link"), where
        assert os.readlink(root / "dangling") == "no/such/thing" and not (root / "dangling").exists(), where
        assert run(["find", str(root), "-maxdepth", "1", "-type", "l"]).stdout.count("\n") == 3, where

    verify("live mount", m.path)
    run(["ln", "-sfn", "real/inside.txt", str(m.path / "link")])  # replace the link
    assert os.readlink(m.path / "link") == "real/inside.txt"
    flush(m.path)
    assert s3.get("link") == b"real/inside.txt" and s3.get("folder-link") == b"real"
    assert stat.S_ISLNK(meta_mode(s3, "link"))
    run(["ln", "-sfn", "target.txt", str(m.path / "link")])
    m2 = fresh_mount(mount, m, *ARGS)
    verify("fresh mount with an empty cache", m2.path)
    (m2.path / "link").unlink()
    assert (m2.path / "target.txt").read_text() == "target\n", "rm of a symlink removed its target"


def test_hard_links_fail_with_operation_not_supported(s3, mount):
    m = mount("test:", *ARGS)
    (m.path / "a").write_text("a")
    result = run(["ln", str(m.path / "a"), str(m.path / "b")], check=False)
    assert result.returncode != 0 and "Operation not supported" in result.stderr, result.stderr
    with pytest.raises(OSError) as refused:
        os.link(m.path / "a", m.path / "c")
    assert refused.value.errno in (errno.EOPNOTSUPP, errno.ENOTSUP), refused.value
    assert not (m.path / "b").exists() and not (m.path / "c").exists()
    assert os.stat(m.path / "a").st_nlink == 1


def test_mkfifo_and_mknod_are_kept_as_empty_objects(s3, mount):
    m = mount("test:", *ARGS)
    run(["mkfifo", "-m", "640", str(m.path / "pipe")])
    specials = {"pipe": "fifo"}
    if os.getuid() == 0:
        run(["mknod", "-m", "666", str(m.path / "null"), "c", "1", "3"])
        run(["mknod", "-m", "660", str(m.path / "disk"), "b", "8", "1"])
        specials.update({"null": "character special file", "disk": "block special file"})
    os.mknod(m.path / "regular", stat.S_IFREG | 0o600)
    specials["regular"] = "regular empty file"
    import socket as _socket
    with _socket.socket(_socket.AF_UNIX) as sock:
        sock.bind(str(m.path / "sock"))  # a socket node: mknod(S_IFSOCK)
    specials["sock"] = "socket"

    def verify(where: str, root: Path) -> None:
        shown = {name: kind(root / name) for name in specials}
        assert shown == specials, f"{where}: {shown}"
        assert stat.S_IMODE(os.lstat(root / "pipe").st_mode) == 0o640, where
        if "null" in specials:
            assert os.lstat(root / "null").st_rdev == os.makedev(1, 3), f"{where}: rdev of null"
            assert os.lstat(root / "disk").st_rdev == os.makedev(8, 1), f"{where}: rdev of disk"

    verify("live mount", m.path)
    # A FIFO on the mount is a pipe between two local processes.
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append((m.path / "pipe").read_bytes()), daemon=True)
    reader.start()
    writer = subprocess.run(["sh", "-c", f"echo through the fifo > '{m.path / 'pipe'}'"], timeout=30)
    reader.join(timeout=30)
    assert writer.returncode == 0 and got == [b"through the fifo\n"], got
    flush(m.path)
    for name in specials:
        assert s3.get(name) == b"", f"{name} is not an empty object"
    assert stat.S_ISFIFO(meta_mode(s3, "pipe"))
    if "null" in specials:
        assert int(metadata(s3, "null").get("rdev", 0)) == os.makedev(1, 3), metadata(s3, "null")
    m2 = fresh_mount(mount, m, *ARGS)
    verify("fresh mount with an empty cache", m2.path)


# -- extended attributes ------------------------------------------------------------------------------------


def test_user_xattrs_with_setfattr_and_getfattr(s3, mount):
    require_program("setfattr")
    require_program("getfattr")
    m = mount("test:", *ARGS)
    f, d = m.path / "f", m.path / "d"
    f.write_text("content")
    d.mkdir()
    flush(m.path)
    run(["setfattr", "-n", "user.color", "-v", "blue", str(f)])
    run(["setfattr", "-n", "user.note", "-v", "0x00ff10", str(f)])  # binary, given in hex
    run(["setfattr", "-n", "user.scratch", "-v", "x", str(f)])
    run(["setfattr", "-x", "user.scratch", str(f)])
    run(["setfattr", "-n", "user.owner", "-v", "team", str(d)])

    def verify(where: str, root: Path) -> None:
        value = run(["getfattr", "--only-values", "-n", "user.color", str(root / "f")]).stdout
        assert value == "blue", f"{where}: user.color is {value!r}"
        assert os.getxattr(root / "f", "user.note") == b"\x00\xff\x10", where
        names = set(os.listxattr(root / "f"))
        assert {"user.color", "user.note"} <= names and "user.scratch" not in names, f"{where}: {names}"
        assert "user.md5" in names, f"{where}: the computed names are listed too: {names}"
        dump = run(["getfattr", "-d", str(root / "f")]).stdout
        assert 'user.color="blue"' in dump, f"{where}: getfattr -d:\n{dump}"
        assert os.getxattr(root / "d", "user.owner") == b"team", where
        missing = run(["getfattr", "-n", "user.scratch", str(root / "f")], check=False)
        assert missing.returncode != 0 and "No such attribute" in missing.stderr, missing.stderr
        assert os.getxattr(root / "f", "user.md5") == b"9a0364b9e99bb480dd25e1f0284c8555", where

    verify("live mount", m.path)
    too_big = run(["setfattr", "-n", "user.big", "-v", "b" * 3000, str(f)], check=False)
    assert too_big.returncode != 0 and "Argument list too long" in too_big.stderr, too_big.stderr
    with pytest.raises(OSError) as big:
        os.setxattr(f, "user.big", b"b" * 3000)
    assert big.value.errno == errno.E2BIG
    flush(m.path)
    assert stored_xattrs(s3, "f") == {"user.color": b"blue", "user.note": b"\x00\xff\x10"}
    assert stored_xattrs(s3, "d/") == {"user.owner": b"team"}
    assert s3.get("f") == b"content"
    m2 = fresh_mount(mount, m, *ARGS)
    verify("fresh mount with an empty cache", m2.path)


# -- names -------------------------------------------------------------------------------------------------


def test_255_byte_names_work_and_a_key_over_1024_bytes_is_enametoolong(s3, mount):
    m = mount("test:", *ARGS)
    long_name = "n" * 251 + ".txt"
    (m.path / long_name).write_text("long\n")
    run(["touch", str(m.path / ("é" * 127 + "x"))])  # 255 bytes of UTF-8
    deep = m.path
    for letter in "abcd":
        deep = deep / (letter * 250)
        deep.mkdir()
    (deep / ("f" * 19)).write_text("fits")  # a key of 1,023 bytes
    result = run(["touch", str(deep / ("g" * 40))], check=False)
    assert result.returncode != 0 and "File name too long" in result.stderr, result.stderr
    for make in (lambda p: p.mkdir(), lambda p: os.symlink("x", p), lambda p: os.mkfifo(p),
                 lambda p: (m.path / long_name).rename(p)):
        with pytest.raises(OSError) as refused:
            make(deep / ("h" * 40))
        assert refused.value.errno == errno.ENAMETOOLONG, refused.value
    with pytest.raises(OSError) as too_long:
        open(m.path / ("m" * 256), "w")
    assert too_long.value.errno == errno.ENAMETOOLONG
    flush(m.path)
    stored = keys(s3)
    assert long_name in stored and ("é" * 127 + "x") in stored
    assert not any(len(k.encode()) > 1024 for k in stored), "a key over 1,024 bytes reached the bucket"
    m2 = fresh_mount(mount, m, *ARGS)
    assert (m2.path / long_name).read_text() == "long\n"
    deep2 = m2.path / ("a" * 250) / ("b" * 250) / ("c" * 250) / ("d" * 250)
    assert (deep2 / ("f" * 19)).read_text() == "fits"


# -- other tools' metadata, consistency ---------------------------------------------------------------------


def test_objects_written_by_s3fs_fuse_show_their_metadata(s3, mount):
    s3.put("dir/by-s3fs", b"12345", Metadata={"mode": str(0o100750), "uid": "1001", "gid": "1002",
                                             "mtime": "1600000000"})
    s3.put("dir/s3fs-link", b"by-s3fs", Metadata={"mode": str(stat.S_IFLNK | 0o777), "mtime": "1600000000"})
    s3.put("dir/by-rclone", b"r", Metadata={"mtime": "1600000000.5"})
    m = mount("test:", *ARGS)
    st = os.lstat(m.path / "dir" / "by-s3fs")  # by name, before any listing: a HEAD
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (
        0o750, 1001, 1002, 1600000000 * 10**9), (oct(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
    assert stat.S_ISREG(st.st_mode) and st.st_size == 5
    assert os.path.islink(m.path / "dir" / "s3fs-link")
    assert os.readlink(m.path / "dir" / "s3fs-link") == "by-s3fs"
    assert (m.path / "dir" / "s3fs-link").read_bytes() == b"12345", "following an s3fs-fuse symlink"
    rc = os.lstat(m.path / "dir" / "by-rclone")
    assert abs(rc.st_mtime_ns - 1600000000_500000000) < 1000 and stat.S_IMODE(rc.st_mode) == 0o644


def test_listings_show_what_is_stored_after_a_fresh_mount(s3, mount):
    """S3 listings carry no user metadata: a folder of a few files the mount knows nothing
    of gets one HEAD per file when it is listed (once per object version), so ``ls -l``
    shows the stored modes even before any lookup by name (the large-folder limit is
    covered in tests/core)."""
    for name in ("a", "b"):
        s3.put(f"listed/{name}", b"x", Metadata={"mode": str(0o100750), "uid": "1001", "gid": "1002"})
    m = mount("test:", *ARGS)
    modes = ls_modes(m.path / "listed")
    assert modes == {"a": "-rwxr-x---", "b": "-rwxr-x---"}, f"ls -l of a folder never looked up: {modes}"
    m2 = fresh_mount(mount, m, *ARGS)
    assert stat.S_IMODE(os.lstat(m2.path / "listed" / "a").st_mode) == 0o750, "a lookup by name"
    assert ls_modes(m2.path / "listed") == {"a": "-rwxr-x---", "b": "-rwxr-x---"}


def test_a_folder_made_on_the_mount_shows_objects_others_put_in_it_soon(s3, mount):
    m = mount("test:", *ARGS)
    folder = m.path / "shared"
    folder.mkdir()
    assert os.listdir(folder) == []
    assert not (folder / "from-elsewhere").exists()
    s3.put("shared/from-elsewhere", b"hello\n")
    wait_until(lambda: "from-elsewhere" in os.listdir(folder), 10,
               "an object put into a folder made on this mount to show in its listing")
    wait_until(lambda: (folder / "from-elsewhere").exists(), 10, "a lookup of it to succeed")
    assert (folder / "from-elsewhere").read_bytes() == b"hello\n"


def _close_to_open_window() -> float:
    """How long after a HEAD an open trusts it (gstore's documented window), 0 if none."""
    try:
        from gstore.vfs.filesystem import CLOSE_TO_OPEN_WINDOW
    except ImportError:
        return 0.0
    return float(CLOSE_TO_OPEN_WINDOW)


def test_open_revalidates_close_to_open(s3, mount):
    """An open sees the object as it is in the bucket (close-to-open), page cache and size
    included, once the window in which a fresh HEAD is trusted has passed (as designed)."""
    s3.put("doc.txt", b"version one\n")
    m = mount("test:", *ARGS)
    doc = m.path / "doc.txt"
    assert doc.read_bytes() == b"version one\n"
    s3.put("doc.txt", b"version two, which is longer\n")
    time.sleep(_close_to_open_window() + 0.1)  # the design's window, not a speed requirement
    assert doc.read_bytes() == b"version two, which is longer\n", "an open did not revalidate"
    assert read_all(doc) == b"version two, which is longer\n"
    assert os.stat(doc).st_size == len(b"version two, which is longer\n")
    s3.put("doc.txt", b"v3\n")
    time.sleep(_close_to_open_window() + 0.1)
    assert run(["cat", str(doc)]).stdout == "v3\n", "a shorter new version"


def test_after_a_remount_a_listing_does_not_turn_symlinks_into_files(s3, mount, tmp_path):
    """A fresh mount whose first look at a folder is a listing (ls, tar c, find, cp -r): the
    symlinks in it must still behave as symlinks, and archiving the folder must work."""
    m = mount("test:", *ARGS)
    d = m.path / "d"
    d.mkdir()
    (d / "target").write_text("hello\n")
    os.chmod(d / "target", 0o700)
    os.symlink("target", d / "link")
    flush(m.path)
    m2 = fresh_mount(mount, m, *ARGS)
    d2 = m2.path / "d"
    run(["ls", "-l", str(d2)])  # the first look: a listing
    assert (d2 / "link").read_text() == "hello\n", "cat of a symlink after ls gives the link's own bytes"
    assert os.path.islink(d2 / "link") and os.readlink(d2 / "link") == "target", kind(d2 / "link")
    m3 = fresh_mount(mount, m2, *ARGS)
    result = run(["tar", "-cf", str(tmp_path / "x.tar"), "-C", str(m3.path / "d"), "."], check=False)
    assert result.returncode == 0, f"tar c of a folder on a fresh mount:\n{result.stderr}"
    listing = run(["tar", "-tvf", str(tmp_path / "x.tar")]).stdout
    assert re.search(r"^lrwxrwxrwx .* \./link -> target$", listing, re.M), listing
    assert re.search(r"^-rwx------ .* \./target$", listing, re.M), listing


# -- the kernel's permission checks for another user ----------------------------------------------------------


@pytest.fixture
def shared_mount(s3):
    """Mounts under a world-traversable temporary folder (pytest's is private to root), so
    that another uid can reach the mount point; unmounted and removed at the end."""
    base = Path(tempfile.mkdtemp(prefix="gstore-perm-"))
    os.chmod(base, 0o755)
    factory = MountFactory(base, s3)
    try:
        yield factory
    finally:
        factory.cleanup()
        if not any(os.path.ismount(p) for p in base.glob("mnt*")):
            shutil.rmtree(base, ignore_errors=True)


def as_user(uid: int, *cmd: str) -> subprocess.CompletedProcess:
    setpriv = require_program("setpriv")
    return run([setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd], check=False)


def test_permission_checks_apply_to_other_users(s3, shared_mount):
    require_root("switching to another uid")
    args = (*ARGS, "--allow-other", "--default-permissions")
    m = shared_mount("test:", *args)
    with open("/proc/self/mounts") as f:
        options = next(line for line in f if f" {m.path} " in line).split()[3].split(",")
    assert "default_permissions" in options and "allow_other" in options, options
    secret, public, private_dir = m.path / "secret", m.path / "public", m.path / "private"
    secret.write_text("root only\n")
    public.write_text("everyone\n")
    private_dir.mkdir()
    (private_dir / "inside").write_text("hidden\n")
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    os.chmod(private_dir, 0o700)
    mine = m.path / "mine"
    mine.write_text("for 1234\n")
    os.chmod(mine, 0o600)
    os.chown(mine, 1234, 1234)

    def verify(where: str, root: Path) -> None:
        # by name: lookups, which show the stored modes and owners
        denied = as_user(1234, "cat", str(root / "secret"))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, f"{where}: {denied}"
        assert as_user(1234, "cat", str(root / "public")).stdout == "everyone\n", where
        inside = as_user(1234, "cat", str(root / "private" / "inside"))
        assert inside.returncode != 0 and "Permission denied" in inside.stderr, f"{where}: {inside}"
        assert as_user(1234, "cat", str(root / "mine")).stdout == "for 1234\n", where
        write = as_user(1234, "sh", "-c", f"echo x >> '{root / 'public'}'")
        assert write.returncode != 0 and "Permission denied" in write.stderr, f"{where}: {write}"
        create = as_user(1234, "touch", str(root / "new-by-1234"))
        assert create.returncode != 0 and "Permission denied" in create.stderr, f"{where}: {create}"
        chmod = as_user(1234, "chmod", "777", str(root / "secret"))
        assert chmod.returncode != 0 and "Operation not permitted" in chmod.stderr, f"{where}: {chmod}"

    verify("live mount", m.path)
    flush(m.path)
    m.stop()
    m2 = shared_mount("test:", *args, cache_dir=Path(tempfile.mkdtemp(prefix="fresh-cache-", dir=m.cache_dir.parent)))
    verify("fresh mount with an empty cache", m2.path)


def _kernel_options(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return next(line for line in f if f" {path} " in line).split()[3].split(",")


def test_default_permissions_follows_its_option(s3, mount, tmp_path):
    on = mount("test:", *ARGS)
    assert "default_permissions" in _kernel_options(on.path), "default_permissions is on by default"
    off = mount("test:", *ARGS, "--no-default-permissions", cache_dir=tmp_path / "other-cache")
    assert "default_permissions" not in _kernel_options(off.path), "--no-default-permissions"
