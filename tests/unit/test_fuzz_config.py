"""Hostile input: config files, command lines, sizes, durations and names, fuzzed with hypothesis.

The only acceptable outcomes are a value or a clean :class:`ConfigError` (or, for
path checks, ``PermissionError``) — never another exception, never a crash.
"""

from __future__ import annotations

import logging
import os
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gstore.backends.base import check_relative_path, join_key, posix_name_problem
from gstore.config import ConfigError, build_mount_request, load_config, parse_duration, parse_size

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

toml_scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True), st.booleans(),
    st.text(max_size=40), st.sampled_from(["4M", "10G", "-1", "1e999", "0x10", "5m", "nan", "inf", "off", "∞"]),
)
KEYS = ["protocol", "root", "cache_size", "block_size", "readahead", "request_timeout", "retries",
        "breaker_threshold", "breaker_cooldown", "umask", "uid", "conflict", "log_level", "fsname",
        "cache_dir", "read_only", "allow_other", "fetch_concurrency", "mountpoint", "options", "bogus"]


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    escaped = str(value).encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return f'"{escaped}"'


@FUZZ
@given(st.text(max_size=400))
def test_any_text_as_a_config_file_is_a_clean_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "mounts.toml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        load_config(path)
    except ConfigError:
        pass


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_as_a_config_file_is_a_clean_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "mounts.toml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError:
        pass


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), toml_scalars, max_size=8),
       st.text(alphabet=string.ascii_letters + "-_.é ", min_size=1, max_size=12))
def test_structured_config_values_are_checked(tmp_path: Path, entry: dict, name: str) -> None:
    lines = [f'[mounts."{name}"]'] + [f"{k} = {toml_value(v)}" for k, v in entry.items() if k != "options"]
    path = tmp_path / "mounts.toml"
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    try:
        load_config(path)
    except ConfigError:
        pass


@FUZZ
@given(st.lists(st.one_of(st.sampled_from(["-o", "--cache-size", "--request-timeout", "--retries", "-f",
                                           "--breaker-cooldown", "--umask", "s3://", "memory:", "x:y",
                                           "--config", "-s", "--no-read-only", "--"]),
                          st.text(max_size=20)), max_size=6))
def test_any_command_line_is_a_clean_error(tmp_path: Path, argv: list[str]) -> None:
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    try:
        build_mount_request([*argv, "memory:", str(tmp_path)], env)
    except ConfigError:
        pass
    except SystemExit as exc:  # argparse --help/usage: a clean exit with a code
        assert exc.code in (0, 2)


@FUZZ
@given(st.one_of(st.text(max_size=30), st.integers(), st.floats()))
def test_sizes_and_durations(value: object) -> None:
    for parse in (parse_size, parse_duration):
        try:
            result = parse(value)  # type: ignore[arg-type]
        except ConfigError:
            continue
        assert result >= 0


@FUZZ
@given(st.lists(st.sampled_from(["a", "b", "/", ".", "..", "\0", "é", " ", "/../", "//"]), max_size=12).map("".join))
def test_paths_never_leave_the_prefix(path: str) -> None:
    try:
        checked = check_relative_path(path)
    except PermissionError:
        return
    key = join_key("bucket-prefix", checked)
    assert key == "bucket-prefix" or key.startswith("bucket-prefix/")
    parts = key.split("/")
    assert ".." not in parts and "." not in parts and "" not in parts


@FUZZ
@given(st.text(max_size=300))
def test_any_key_component_is_shown_or_refused_cleanly(name: str) -> None:
    problem = posix_name_problem(name)
    if problem is None:
        assert name not in ("", ".", "..") and "\0" not in name
        assert len(name.encode("utf-8", "surrogateescape")) <= 255


def test_readable_config_with_secrets_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mounts.toml"
    path.write_text('[mounts.s3]\nprotocol = "s3"\nroot = "b"\n[mounts.s3.options]\nsecret = "hunter2-secret"\n')
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="gstore.config"):
        load_config(path)
    assert "chmod 600" in caplog.text and "hunter2-secret" not in caplog.text
    caplog.clear()
    os.chmod(path, 0o600)
    with caplog.at_level(logging.WARNING, logger="gstore.config"):
        load_config(path)
    assert "chmod 600" not in caplog.text
