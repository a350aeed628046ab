"""Small command-line behaviours: --help once, --version, a non-empty mount point,
``gstore flush`` of a missing path, and ``AWS_ENDPOINT_URL`` for ``s3://`` SPECs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from gstore import __version__, cli


def run_entry(entry: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``gstore-mount`` (entry "mount_main") or ``gstore`` (entry "main") as a real process."""
    code = f"import sys; from gstore.cli import {entry}; sys.exit({entry}())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          env=env)


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["memory:", "/nonexistent-mnt", "--help"],
                                  ["--cache-size", "1G", "--help", "s3:"]])
def test_mount_help_is_printed_once(args):
    out = run_entry("mount_main", *args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("usage: gstore-mount") == 1, out.stdout
    assert out.stdout.count("--cache-size") == 1
    assert "--version" in out.stdout
    assert out.stderr == ""


def test_mount_help_in_process_is_printed_once(capsys):
    with pytest.raises(SystemExit) as info:
        cli.mount_main(["--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.count("usage: gstore-mount") == 1


def test_versions():
    out = run_entry("mount_main", "--version")
    assert (out.returncode, out.stdout.strip()) == (0, f"gstore-mount {__version__}")
    out = run_entry("mount_main", "s3:", "/mnt/x", "--version")
    assert (out.returncode, out.stdout.strip()) == (0, f"gstore-mount {__version__}")
    out = run_entry("main", "--version")
    assert (out.returncode, out.stdout.strip()) == (0, f"gstore {__version__}")


def test_mount_errors_are_still_reported_once():
    out = run_entry("mount_main", "--no-such-option", "memory:", "/tmp")
    assert out.returncode == 2
    assert out.stderr.count("unrecognized arguments") == 1, out.stderr
    assert out.stdout == ""


@pytest.fixture
def no_daemon(monkeypatch):
    """mount_main up to the point where the daemon would start; the request is recorded."""
    from gstore import daemon

    started = []
    monkeypatch.setattr(daemon, "run", lambda request: started.append(request) or 0)
    monkeypatch.setenv("GSTORE_CONFIG", "")
    monkeypatch.setenv("XDG_CONFIG_HOME", "/nonexistent-config-home")
    return started


def test_mounting_on_a_non_empty_folder_warns(tmp_path, capsys, no_daemon):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    (mountpoint / "kept.txt").write_text("x")
    assert cli.mount_main(["memory:", str(mountpoint), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert len(no_daemon) == 1
    err = capsys.readouterr().err
    assert f"{mountpoint} is not empty" in err and "hidden while the mount is active" in err
    assert "'kept.txt'" in err and err.count("warning") == 1


def test_mounting_on_an_empty_folder_is_quiet(tmp_path, capsys, no_daemon):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    assert cli.mount_main(["memory:", str(mountpoint), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert len(no_daemon) == 1
    assert "warning" not in capsys.readouterr().err


def test_mounting_on_a_mount_point_warns(capsys):
    cli._warn_if_not_empty(Path("/proc"))
    assert "already a mount point" in capsys.readouterr().err


def test_flush_of_a_missing_path_fails_clearly(tmp_path, capsys):
    assert cli.main(["flush", str(tmp_path / "no-such-mount")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'no-such-mount'}: no such file or directory" in err
    # A typo in a PATH inside an (existing) mount: refused before the daemon is asked.
    assert cli.main(["flush", str(tmp_path), str(tmp_path / "typo.txt")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'typo.txt'}: no such file or directory" in err
    # An existing folder that is not a gstore mount: refused as before.
    assert cli.main(["flush", str(tmp_path)]) == 2
    assert "not a running gstore mount" in capsys.readouterr().err


def test_flush_of_a_missing_path_as_a_command():
    out = run_entry("main", "flush", "/nonexistent-gstore-mount")
    assert out.returncode == 2
    assert "/nonexistent-gstore-mount: no such file or directory" in out.stderr


def test_aws_endpoint_url_reaches_an_s3_url_mount(s3, tmp_path, monkeypatch):
    """``gstore-mount s3://bucket/prefix`` has no backend options: botocore takes the endpoint
    from AWS_ENDPOINT_URL (docs/configuration.md says so; this checks it)."""
    from gstore.backends import make_backend
    from gstore.config import build_mount_request

    s3.put("data/hello.txt", b"hello from the endpoint")
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-value")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("GSTORE_CONFIG", "")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "mnt").mkdir()
    request = build_mount_request([f"s3://{s3.bucket}/data", str(tmp_path / "mnt")])
    assert dict(request.backend.options) == {}
    backend = make_backend(request.backend.protocol, request.backend.root, dict(request.backend.options),
                           request_timeout=30)

    async def read() -> bytes:
        try:
            info = await backend.stat("hello.txt")
            return await backend.read_range("hello.txt", 0, info.size, info)
        finally:
            await backend.aclose()

    assert trio.run(read) == b"hello from the endpoint"
