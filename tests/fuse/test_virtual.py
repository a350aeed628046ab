"""End to end: .concat, .diff, .versions and the user.* xattrs, driven by real programs."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def run(*cmd: str | Path, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, **kwargs)  # type: ignore[call-overload]


def getfattr(path: Path, name: str) -> str:
    out = run("getfattr", "--only-values", "-n", name, path, check=True).stdout
    return out.decode()


def get_bytes(s3, key: str) -> tuple[int, int]:
    """(GET requests, bytes sent) for ``key`` since the last reset."""
    records = [r for r in s3.server.stats.records() if r.op == "GET" and r.key == key]
    return len(records), sum(r.bytes_sent for r in records)


# -- .concat ------------------------------------------------------------------------------


def test_concat_reads_like_cat_of_the_parts_at_any_offset(s3, mount, tmp_path):
    parts = {"a.bin": blob(MiB + 17, 1), "b.bin": blob(3, 2), "c.bin": b"", "d e.bin": blob(2 * MiB + 5, 3)}
    for name, data in parts.items():
        s3.put(f"v/{name}", data)
    whole = b"".join(parts.values())
    m = mount("test:", "--block-size", "1M")
    concat = m.path / "v" / ".concat" / "a.bin+b.bin+c.bin+d e.bin"
    assert concat.stat().st_size == len(whole)  # right size before any read
    assert run("cat", concat, check=True).stdout == whole
    for bs, skip, count in [(1000, 1048, 2), (4096, 256, 3), (MiB, 1, 2), (7, 149797, 3)]:
        out = run("dd", f"if={concat}", f"bs={bs}", f"skip={skip}", f"count={count}", "status=none", check=True).stdout
        assert out == whole[bs * skip: bs * (skip + count)], (bs, skip, count)
    assert run("tail", "-c", "1000", concat, check=True).stdout == whole[-1000:]
    with open(concat, "rb") as f:  # pread across every boundary
        for offset in (MiB + 10, MiB + 17, MiB + 19, MiB + 20, len(whole) - 3):
            assert os.pread(f.fileno(), 16, offset) == whole[offset:offset + 16]
    # Hidden: never listed, so find/du/rsync do not walk them.
    assert ".concat" not in os.listdir(m.path / "v")
    assert os.listdir(m.path / "v" / ".concat") == []
    assert run("find", m.path, check=True).stdout.count(b".concat") == 0


def test_concat_escapes_join_files_of_other_folders(s3, mount):
    s3.put("videos/part1.ts", b"one-")
    s3.put("videos/part+2.ts", b"two-")
    s3.put("videos/100%.ts", b"three")
    m = mount("test:")
    name = "videos%2Fpart1.ts+videos%2Fpart%2B2.ts+videos%2F100%25.ts"
    assert (m.path / ".concat" / name).read_bytes() == b"one-two-three"
    # ".." may move between folders of the mount.
    s3.put("other/x.txt", b"X")
    assert (m.path / "videos" / ".concat" / "part1.ts+..%2Fother%2Fx.txt").read_bytes() == b"one-X"


def test_concat_of_a_tail_fetches_only_the_last_block(s3, mount):
    for i in range(4):
        s3.put(f"big/p{i}.bin", blob(8 * MiB, 10 + i))
    m = mount("test:", "--block-size", "1M")
    concat = m.path / "big" / ".concat" / "p0.bin+p1.bin+p2.bin+p3.bin"
    assert concat.stat().st_size == 32 * MiB
    s3.reset_stats()
    assert run("tail", "-c", "1000", concat, check=True).stdout == blob(8 * MiB, 13)[-1000:]
    for i in range(3):
        assert get_bytes(s3, f"big/p{i}.bin") == (0, 0)
    gets, sent = get_bytes(s3, "big/p3.bin")
    assert 1 <= gets <= 2 and sent <= 2 * MiB


def test_concat_manifest_of_hls_segments_plays_in_ffmpeg(s3, mount, tmp_path):
    src = tmp_path / "hls"
    src.mkdir()
    run("ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25", "-t", "6",
        "-c:v", "libx264", "-g", "25", "-f", "hls", "-hls_time", "1", "-hls_list_size", "0",
        src / "index.m3u8", check=True)
    segments = sorted(p.name for p in src.glob("*.ts"))
    assert len(segments) >= 4
    for p in src.iterdir():
        s3.put(f"hls/{p.name}", p.read_bytes())
    m = mount("test:")
    concat = m.path / "hls" / ".concat" / "@index.m3u8"
    joined = b"".join((src / s).read_bytes() for s in segments)
    assert concat.stat().st_size == len(joined)
    assert concat.read_bytes() == joined
    probe = run("ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", concat, check=True)
    assert 5.0 <= float(probe.stdout) <= 7.0
    out = tmp_path / "out.mp4"  # a seek into the middle, then a remux
    run("ffmpeg", "-v", "error", "-ss", "3", "-i", concat, "-c", "copy", "-y", out, check=True)
    duration = run("ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", out, check=True)
    assert 1.5 <= float(duration.stdout) <= 4.5
    assert getfattr(concat, "user.mimetype") == "video/mp2t"


def test_concat_is_lazy_and_follows_changes_after_the_ttl(s3, mount):
    s3.put("a.txt", b"old-a\n")
    s3.put("b.txt", b"b\n")
    m = mount("test:", "--attr-ttl", "1", "--dir-cache-ttl", "1")
    concat = m.path / ".concat" / "a.txt+b.txt"
    assert concat.read_bytes() == b"old-a\nb\n"
    s3.put("a.txt", b"new content of a\n")
    time.sleep(2.2)
    assert concat.stat().st_size == len(b"new content of a\nb\n")
    assert concat.read_bytes() == b"new content of a\nb\n"


def test_concat_sees_pending_writes(s3, mount):
    s3.put("a.txt", b"remote\n")
    m = mount("test:", "--write-back-delay", "60")
    (m.path / "new.txt").write_bytes(b"pending\n")
    assert (m.path / ".concat" / "a.txt+new.txt").read_bytes() == b"remote\npending\n"


# -- confinement and errors --------------------------------------------------------------------


def test_virtual_paths_cannot_leave_a_prefix_mount(s3, mount):
    s3.put("secret.txt", b"outside the mount")
    s3.put("sub/in.txt", b"inside")
    s3.put("sub/list.m3u8", b"in.txt\n../secret.txt\n")
    s3.put("sub/abs.m3u8", b"/secret.txt\n")
    s3.put("sub/url.m3u8", b"s3://test-bucket/secret.txt\n")
    m = mount("test:sub")
    cases = {
        ".concat/..%2Fsecret.txt": errno.EACCES,
        ".concat/in.txt+..%2F..%2Fsecret.txt": errno.EACCES,
        ".concat/%2F..%2Fsecret.txt": errno.EACCES,
        ".concat/%2E%2E%2Fsecret.txt": errno.EINVAL,
        ".concat/@list.m3u8": errno.EACCES,
        ".concat/@abs.m3u8": errno.EACCES,
        ".concat/@url.m3u8": errno.EINVAL,
        ".diff/in.txt+..%2Fsecret.txt": errno.EACCES,
        ".concat/in.txt++in.txt": errno.EINVAL,
        ".concat/missing.txt": errno.ENOENT,
    }
    for name, expected in cases.items():
        with pytest.raises(OSError) as caught:
            (m.path / name).read_bytes()
        assert caught.value.errno == expected, (name, caught.value)
    assert get_bytes(s3, "secret.txt") == (0, 0)
    assert (m.path / ".concat" / "in.txt+in.txt").read_bytes() == b"insideinside"


def test_virtual_files_are_read_only(s3, mount):
    s3.put("a.txt", b"a")
    m = mount("test:")
    target = m.path / ".concat" / "a.txt+a.txt"
    for action in (lambda: open(target, "r+b"), lambda: (m.path / ".concat" / "new").write_bytes(b"x"),
                   lambda: os.unlink(target), lambda: os.mkdir(m.path / ".concat" / "zz"),
                   lambda: os.rename(m.path / "a.txt", m.path / ".concat" / "b"),
                   lambda: os.mkdir(m.path / ".concat")):
        with pytest.raises(OSError) as caught:
            action()
        assert caught.value.errno in (errno.EROFS, errno.EEXIST), (caught.value, caught.value.filename)
    assert oct(target.stat().st_mode & 0o777) == "0o444"
    assert (m.path / "a.txt").read_bytes() == b"a"


def test_virtual_names_can_be_renamed_or_turned_off(s3, mount):
    s3.put("a.txt", b"a")
    s3.put(".concat/real.txt", b"a real object")
    m = mount("test:")
    assert ".concat" not in os.listdir(m.path)  # the virtual directory wins (and is hidden)
    m2 = mount("test:", "-o", "concat_dir=off,diff_dir=.gdiff", cache_dir=m.cache_dir.parent / "cache2")
    assert (m2.path / ".concat" / "real.txt").read_bytes() == b"a real object"
    assert ".concat" in os.listdir(m2.path)
    assert (m2.path / ".gdiff" / "a.txt+a.txt").read_bytes() == b""


# -- .diff -----------------------------------------------------------------------------------------


def test_diff_matches_gnu_diff_u(s3, mount, tmp_path):
    old = "".join(f"line {i}\n" for i in range(40))
    new = old.replace("line 5\n", "line five\n").replace("line 30\n", "") + "tail\n"
    s3.put("cfg/old.conf", old.encode())
    s3.put("cfg/new.conf", new.encode())
    s3.put("cfg/same.conf", old.encode())
    s3.put("cfg/bin.dat", b"\x00\x01binary")
    m = mount("test:")
    virtual = m.path / "cfg" / ".diff" / "old.conf+new.conf"
    expected = subprocess.run(["diff", "-u", "old.conf", "new.conf"], cwd=m.path / "cfg", capture_output=True,
                              env={**os.environ, "TZ": "UTC"}).stdout
    assert expected.startswith(b"--- old.conf\t")
    assert virtual.stat().st_size == len(expected)
    assert virtual.read_bytes() == expected
    assert (m.path / "cfg" / ".diff" / "old.conf+same.conf").read_bytes() == b""
    with pytest.raises(OSError) as caught:
        (m.path / "cfg" / ".diff" / "old.conf+bin.dat").read_bytes()
    assert caught.value.errno == errno.EINVAL
    assert "binary" in m.log()


# -- .versions -------------------------------------------------------------------------------------


def test_versions_list_read_and_diff(s3, mount):
    s3.client.put_bucket_versioning(Bucket=s3.bucket, VersioningConfiguration={"Status": "Enabled"})
    bodies = [b'{"v": 1}\n', b'{"v": 2}\n', b'{"v": 3, "new": true}\n']
    ids = []
    for body in bodies:
        ids.append(s3.put("conf/config.json", body)["VersionId"])
        time.sleep(1.05)  # listed names sort by LastModified (second precision here)
    m = mount("test:")
    versions = m.path / "conf" / ".versions" / "config.json"
    names = os.listdir(versions)
    assert len(names) == 3
    listed = sorted(names)
    assert [(versions / n).read_bytes() for n in listed] == bodies  # ls order is time order
    assert (versions / "-1").read_bytes() == bodies[2]
    assert (versions / "-2").read_bytes() == bodies[1]
    assert (versions / "-3").read_bytes() == bodies[0]
    assert not (versions / "-4").exists()
    assert getfattr(versions / "-2", "user.version_id") == ids[1]
    diff = (m.path / "conf" / ".diff" / ".versions%2Fconfig.json%2F-2+config.json").read_text()
    assert '-{"v": 2}' in diff and '+{"v": 3, "new": true}' in diff
    assert getfattr(m.path / "conf" / "config.json", "user.version_id") == ids[2]
    # Versions are parts like any file.
    assert (m.path / "conf" / ".concat" / ".versions%2Fconfig.json%2F-3+config.json").read_bytes() == bodies[0] + bodies[2]


# -- xattrs ------------------------------------------------------------------------------------------


def test_md5_xattr_single_part_is_free_and_matches_md5sum(s3, mount):
    data = blob(3 * MiB, 5)
    s3.put("one.bin", data)
    m = mount("test:")
    s3.reset_stats()
    assert getfattr(m.path / "one.bin", "user.md5") == hashlib.md5(data).hexdigest()
    assert get_bytes(s3, "one.bin") == (0, 0)
    md5sum = run("md5sum", m.path / "one.bin", check=True).stdout.split()[0].decode()
    assert md5sum == getfattr(m.path / "one.bin", "user.md5")


def test_md5_xattr_of_multipart_object_is_computed_once(s3, mount):
    data = blob(12 * MiB + 3, 6)
    client = s3.client
    upload = client.create_multipart_upload(Bucket=s3.bucket, Key="multi.bin")
    parts = []
    for number, start in enumerate(range(0, len(data), 5 * MiB), 1):
        r = client.upload_part(Bucket=s3.bucket, Key="multi.bin", UploadId=upload["UploadId"], PartNumber=number,
                               Body=data[start:start + 5 * MiB])
        parts.append({"ETag": r["ETag"], "PartNumber": number})
    client.complete_multipart_upload(Bucket=s3.bucket, Key="multi.bin", UploadId=upload["UploadId"],
                                     MultipartUpload={"Parts": parts})
    assert "-" in client.head_object(Bucket=s3.bucket, Key="multi.bin")["ETag"]
    m = mount("test:", "--block-size", "1M")
    s3.reset_stats()
    assert getfattr(m.path / "multi.bin", "user.md5") == hashlib.md5(data).hexdigest()
    first = get_bytes(s3, "multi.bin")
    assert first[1] == len(data)
    s3.reset_stats()
    assert getfattr(m.path / "multi.bin", "user.md5") == hashlib.md5(data).hexdigest()
    assert get_bytes(s3, "multi.bin") == (0, 0)


def test_xattrs_listed_and_mimetype_matches_file(s3, mount, tmp_path):
    png = tmp_path / "img.png"
    run("ffmpeg", "-v", "error", "-f", "lavfi", "-i", "color=red:size=16x16", "-frames:v", "1", png, check=True)
    s3.put("img.png", png.read_bytes())
    s3.put("notes.txt", b"hello\n")
    s3.put("data.json", b'{"a": 1}\n')
    s3.put("typed.bin", b"x", ContentType="application/x-custom")
    m = mount("test:")
    listing = run("getfattr", "-d", m.path / "notes.txt", check=True).stdout.decode()
    for name in ("user.md5", "user.mimetype", "user.etag"):
        assert name in listing
    for name in ("img.png", "notes.txt", "data.json"):
        by_file = run("file", "--brief", "--mime-type", m.path / name, check=True).stdout.decode().strip()
        assert getfattr(m.path / name, "user.mimetype") == by_file, name
    assert getfattr(m.path / "typed.bin", "user.mimetype") == "application/x-custom"
    assert os.getxattr(m.path / "notes.txt", "user.etag").decode() == hashlib.md5(b"hello\n").hexdigest()
    assert "user.md5" in [n for n in os.listxattr(m.path / "notes.txt")]
    with pytest.raises(OSError) as caught:
        os.getxattr(m.path / "notes.txt", "user.other")
    assert caught.value.errno == errno.ENODATA
    assert os.listxattr(m.path) == []


def test_setting_mimetype_rewrites_the_content_type(s3, mount):
    s3.put("doc.bin", b"<html></html>")
    m = mount("test:")
    run("setfattr", "-n", "user.mimetype", "-v", "text/html", m.path / "doc.bin", check=True)
    assert s3.client.head_object(Bucket=s3.bucket, Key="doc.bin")["ContentType"] == "text/html"
    assert s3.get("doc.bin") == b"<html></html>"
    assert getfattr(m.path / "doc.bin", "user.mimetype") == "text/html"
    bad = run("setfattr", "-n", "user.mimetype", "-v", "not a type", m.path / "doc.bin")
    assert bad.returncode != 0
    other = run("setfattr", "-n", "user.md5", "-v", "0" * 32, m.path / "doc.bin")
    assert other.returncode != 0 and b"not supported" in other.stderr


def test_pending_file_reports_md5_of_local_bytes_and_keeps_mimetype(s3, mount):
    m = mount("test:", "--write-back-delay", "60")
    data = blob(MiB, 9)
    (m.path / "pending.dat").write_bytes(data)
    assert getfattr(m.path / "pending.dat", "user.md5") == hashlib.md5(data).hexdigest()
    os.setxattr(m.path / "pending.dat", "user.mimetype", b"application/x-pending")
    subprocess.run([sys.executable, "-c", "import sys; from gstore.cli import main; sys.exit(main())",
                    "flush", str(m.path)], check=True, timeout=120)
    head = s3.client.head_object(Bucket=s3.bucket, Key="pending.dat")
    assert head["ContentType"] == "application/x-pending"
    assert s3.get("pending.dat") == data


# -- hostile names -------------------------------------------------------------------------------------

CLEAN_ERRNOS = {errno.ENOENT, errno.EINVAL, errno.EACCES, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG,
                errno.ENODATA, errno.ENOTSUP, errno.EROFS, errno.ERANGE, errno.E2BIG, errno.EFBIG, errno.EPERM}


def test_fuzzed_virtual_names_and_xattrs_get_clean_errors(s3, mount):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    s3.put("a.txt", b"a\n")
    s3.put("d/b.txt", b"b\n")
    m = mount("test:")
    alphabet = st.sampled_from(list("ab.+%2F5/@-~ \\x") + ["%2F", "%2B", "%25", "..", "..%2F", "a.txt", "d", "b.txt"])

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(role=st.sampled_from([".concat", ".diff", ".versions"]),
           name=st.lists(alphabet, min_size=1, max_size=12).map("".join))
    def virtual_name(role: str, name: str) -> None:
        path = m.path / role / name
        try:
            with open(path, "rb") as f:
                f.read(64)
        except OSError as exc:
            assert exc.errno in CLEAN_ERRNOS, (name, exc)

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(name=st.text(min_size=1, max_size=40).filter(lambda t: "\0" not in t),
           value=st.binary(max_size=300), user=st.booleans())
    def xattr(name: str, value: bytes, user: bool) -> None:
        attr = ("user." + name) if user else name
        for action in (lambda: os.getxattr(m.path / "a.txt", attr),
                       lambda: os.setxattr(m.path / "a.txt", attr, value),
                       lambda: os.removexattr(m.path / "a.txt", attr)):
            try:
                action()
            except OSError as exc:
                assert exc.errno in CLEAN_ERRNOS | {errno.EOPNOTSUPP}, (attr, exc)
            except ValueError:
                pass  # rejected by Python before reaching the kernel

    virtual_name()
    xattr()
    assert m.process.poll() is None
    assert (m.path / "a.txt").read_bytes() == b"a\n"
    assert s3.get("a.txt") == b"a\n"


def test_xattrs_can_be_turned_off_for_the_kernel(s3, mount):
    s3.put("a.txt", b"a")
    m = mount("test:", "--no-xattrs")
    with pytest.raises(OSError) as caught:
        os.getxattr(m.path / "a.txt", "user.md5")
    assert caught.value.errno == errno.EOPNOTSUPP
    assert run("ls", "-l", m.path, check=True).stdout.count(b"a.txt") == 1
    assert (m.path / ".concat" / "a.txt+a.txt").read_bytes() == b"aa"
