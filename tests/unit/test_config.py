"""Unit tests of gstore.config: SPEC, config file, options, precedence, messages."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gstore import config
from gstore.config import (
    BUILTIN_MOUNTS,
    BackendSpec,
    ConfigError,
    MountOptions,
    MountRequest,
    build_arg_parser,
    build_mount_request,
    find_config,
    load_config,
    parse_duration,
    parse_size,
    resolve_backend,
)

K, M, G = 1024, 1024**2, 1024**3
SECRET = "S3CR3T-do-not-leak-9f8e7d"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def no_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never read the real /etc/gstore/mounts.toml."""
    path = tmp_path / "etc" / "gstore" / "mounts.toml"
    monkeypatch.setattr(config, "SYSTEM_CONFIG", path)
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    return {"HOME": str(home)}


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


S3_CONFIG = f"""
[mounts.s3]
protocol = "s3"
root = "my-bucket/prefix"
cache_size = "20G"
[mounts.s3.options]
endpoint_url = "http://127.0.0.1:9000"
secret = "{SECRET}"
client_kwargs = {{ region_name = "us-east-1" }}

[mounts.data]
protocol = "file"
root = "/srv/data"
"""


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return write(tmp_path / "conf" / "mounts.toml", S3_CONFIG)


def errmsg(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    return str(excinfo.value)


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    message = errmsg(excinfo)
    assert str(path) in message
    return message


# --------------------------------------------------------------------------- sizes and durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("10G", 10 * G),
        ("512M", 512 * M),
        ("4MiB", 4 * M),
        ("4mib", 4 * M),
        ("1.5G", 3 * G // 2),
        ("10GB", 10 * G),
        ("64k", 64 * K),
        ("64KB", 64 * K),
        ("1 M", M),
        (" 2M ", 2 * M),
        ("100B", 100),
        ("1T", 1024 * G),
        ("0.5K", 512),
        (".5K", 512),
        ("1.3K", 1331),  # rounded down to whole bytes
        (4096, 4096),
    ],
)
def test_parse_size_good(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "12.5x", "G", "1.2.3", "1e3", "--1", "1 0K", "0x10", "１０G"])
def test_parse_size_bad_names_the_text(text: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_size(text)
    assert f'"{text}"' in errmsg(excinfo)


@pytest.mark.parametrize("value", [True, None, 1.5, [1], -1, "-1", "-4K", 2**64, "99999999999P"])
def test_parse_size_rejects_non_sizes(value: object) -> None:
    with pytest.raises(ConfigError):
        parse_size(value)  # type: ignore[arg-type]


def test_parse_size_too_many_digits_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="too large"):
        parse_size("9" * 10_000 + "K")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("60", 60.0),
        ("1.5", 1.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("500ms", 0.5),
        ("2min", 120.0),
        ("0", 0.0),
        (" 10 s ", 10.0),
        (5, 5.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration_good(text: str | float, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "soon", "5x", "-1", "1..2", "1e3", "m5", "inf", "nan"])
def test_parse_duration_bad_names_the_text(text: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_duration(text)
    assert f'"{text}"' in errmsg(excinfo)


@pytest.mark.parametrize("value", [True, None, -1, -0.5, float("nan"), float("inf"), 10**400, "9" * 5000])
def test_parse_duration_rejects_non_durations(value: object) -> None:
    with pytest.raises(ConfigError):
        parse_duration(value)  # type: ignore[arg-type]


@given(n=st.integers(min_value=0, max_value=2**32), unit=st.sampled_from(["", "B", "K", "KB", "KiB", "M", "MiB", "G", "GB"]))
def test_parse_size_round_trips(n: int, unit: str) -> None:
    multiplier = {"": 1, "B": 1, "K": K, "KB": K, "KiB": K, "M": M, "MiB": M, "G": G, "GB": G}[unit]
    assert parse_size(f"{n}{unit}") == n * multiplier
    assert parse_size(f"{n}{unit.lower()}") == n * multiplier


@given(n=st.integers(min_value=0, max_value=10**5), unit=st.sampled_from(["", "s", "m", "h"]))
def test_parse_duration_round_trips(n: int, unit: str) -> None:
    assert parse_duration(f"{n}{unit}") == n * {"": 1, "s": 1, "m": 60, "h": 3600}[unit]


@settings(max_examples=300)
@given(st.text())
def test_parse_size_arbitrary_text_only_raises_config_error(text: str) -> None:
    try:
        result = parse_size(text)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert isinstance(result, int) and result >= 0


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from("0123456789.KMGTPkmgtpiIbB -_xse\t")))
def test_parse_size_size_like_text_only_raises_config_error(text: str) -> None:
    try:
        assert parse_size(text) >= 0
    except ConfigError:
        pass


@settings(max_examples=300)
@given(st.one_of(st.text(), st.text(alphabet=st.sampled_from("0123456789.smhdSMH -")), st.floats(), st.integers()))
def test_parse_duration_arbitrary_input_only_raises_config_error(value: object) -> None:
    try:
        result = parse_duration(value)  # type: ignore[arg-type]
    except ConfigError as exc:
        assert str(exc)
    else:
        assert 0 <= result < float("inf")


# --------------------------------------------------------------------------- config lookup


def test_find_config_none_when_nothing_exists(env: dict[str, str]) -> None:
    assert find_config(None, env) is None


def test_find_config_explicit_wins(tmp_path: Path, env: dict[str, str], home: Path) -> None:
    explicit = write(tmp_path / "explicit.toml", "")
    write(tmp_path / "envconf.toml", "")
    write(home / ".config/gstore/mounts.toml", "")
    env["GSTORE_CONFIG"] = str(tmp_path / "envconf.toml")
    assert find_config(str(explicit), env) == explicit


def test_find_config_explicit_must_exist(tmp_path: Path, env: dict[str, str], home: Path) -> None:
    write(home / ".config/gstore/mounts.toml", "")
    with pytest.raises(ConfigError) as excinfo:
        find_config(str(tmp_path / "missing.toml"), env)
    assert "missing.toml" in errmsg(excinfo)
    assert "--config" in errmsg(excinfo)


def test_find_config_explicit_must_be_a_file(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        find_config(str(tmp_path), env)


def test_find_config_explicit_relative_and_tilde(
    tmp_path: Path, env: dict[str, str], home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_home = write(home / "my.toml", "")
    assert find_config("~/my.toml", env) == in_home
    monkeypatch.chdir(tmp_path)
    rel = write(tmp_path / "rel.toml", "")
    assert find_config("rel.toml", env) == rel
    assert find_config("rel.toml", env).is_absolute()


def test_find_config_env_var_before_user_file(tmp_path: Path, env: dict[str, str], home: Path) -> None:
    envconf = write(tmp_path / "envconf.toml", "")
    write(home / ".config/gstore/mounts.toml", "")
    env["GSTORE_CONFIG"] = str(envconf)
    assert find_config(None, env) == envconf


def test_find_config_env_var_must_exist(tmp_path: Path, env: dict[str, str], home: Path) -> None:
    write(home / ".config/gstore/mounts.toml", "")
    env["GSTORE_CONFIG"] = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as excinfo:
        find_config(None, env)
    assert "GSTORE_CONFIG" in errmsg(excinfo) and "nope.toml" in errmsg(excinfo)


def test_find_config_empty_env_var_is_unset(env: dict[str, str], home: Path) -> None:
    user = write(home / ".config/gstore/mounts.toml", "")
    env["GSTORE_CONFIG"] = ""
    assert find_config(None, env) == user


def test_find_config_user_file_then_system(env: dict[str, str], home: Path, no_system_config: Path) -> None:
    write(no_system_config, "")
    assert find_config(None, env) == no_system_config
    user = write(home / ".config/gstore/mounts.toml", "")
    assert find_config(None, env) == user


def test_find_config_respects_xdg_config_home(tmp_path: Path, env: dict[str, str], home: Path) -> None:
    write(home / ".config/gstore/mounts.toml", "")
    xdg = tmp_path / "xdg"
    wanted = write(xdg / "gstore/mounts.toml", "")
    env["XDG_CONFIG_HOME"] = str(xdg)
    assert find_config(None, env) == wanted


def test_find_config_ignores_relative_xdg_config_home(env: dict[str, str], home: Path) -> None:
    user = write(home / ".config/gstore/mounts.toml", "")
    env["XDG_CONFIG_HOME"] = "relative/dir"
    assert find_config(None, env) == user


# --------------------------------------------------------------------------- load_config


def test_load_config_parses_and_normalizes(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c" / "mounts.toml",
        """
[mounts.s3]
protocol = "S3"
root = "/bucket//a/./b/"
mountpoint = "/mnt/s3"
cache_size = "20G"
block_size = 1048576
attr_ttl = "2m"
negative_ttl = 1
read_only = true
umask = "027"
uid = 1000
log_level = "debug"
cache_dir = "cache"
[mounts.s3.options]
endpoint_url = "http://127.0.0.1:9000"

[mounts.plain]
protocol = "memory"
""",
    )
    mounts = load_config(path)
    assert set(mounts) == {"s3", "plain"}
    s3 = mounts["s3"]
    assert s3["protocol"] == "s3"
    assert s3["root"] == "bucket/a/b"
    assert s3["mountpoint"] == Path("/mnt/s3")
    assert s3["cache_size"] == 20 * G
    assert s3["block_size"] == M
    assert s3["attr_ttl"] == 120.0
    assert s3["negative_ttl"] == 1.0
    assert s3["read_only"] is True
    assert s3["umask"] == 0o027
    assert s3["uid"] == 1000
    assert s3["log_level"] == "DEBUG"
    assert s3["cache_dir"] == tmp_path / "c" / "cache"  # relative to the config file
    assert s3["options"] == {"endpoint_url": "http://127.0.0.1:9000"}
    assert mounts["plain"] == {"protocol": "memory", "root": "", "options": {}}


def test_load_config_empty_file(tmp_path: Path) -> None:
    assert load_config(write(tmp_path / "empty.toml", "")) == {}


def test_load_config_toml_int_umask(tmp_path: Path) -> None:
    path = write(tmp_path / "m.toml", '[mounts.a]\nprotocol = "memory"\numask = 0o077\n')
    assert load_config(path)["a"]["umask"] == 0o077


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        ("/srv/data", "/srv/data"),
        ("/srv/data/", "/srv/data"),
        ("/srv//data/./x", "/srv/data/x"),
        ("/", "/"),
        ("", "/"),
        ("rel/dir", "{base}/rel/dir"),
        ("~/stuff", "{home}/stuff"),
    ],
)
def test_load_config_file_roots(tmp_path: Path, root: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    path = write(tmp_path / "c" / "m.toml", f'[mounts.d]\nprotocol = "file"\nroot = "{root}"\n')
    want = expected.format(base=tmp_path / "c", home=tmp_path / "h")
    assert load_config(path)["d"]["root"] == want


def test_toml_syntax_error_has_file_line_and_column(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[mounts.a]\nprotocol = "memory"\nroot = \n')
    assert "line 3" in message
    assert "column" in message


def test_invalid_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bin.toml"
    path.write_bytes(b'[mounts.a]\nprotocol = "\xff"\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert str(path) in errmsg(excinfo) and "UTF-8" in errmsg(excinfo) and "line 2" in errmsg(excinfo)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(tmp_path / "missing.toml")
    assert "missing.toml" in errmsg(excinfo)


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[mounts.s3]\nprotcol = "s3"\n')
    assert 'mount "s3"' in message
    assert 'unknown key "protcol"' in message
    assert '(did you mean "protocol"?)' in message


def test_unknown_key_with_dashes_suggests_underscores(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[mounts.s3]\nprotocol = "s3"\ncache-size = "1G"\n')
    assert 'did you mean "cache_size"' in message


def test_unknown_key_without_match_points_to_options_table(tmp_path: Path) -> None:
    message = load_error(tmp_path, f'[mounts.s3]\nprotocol = "s3"\naws_secret_access_key = "{SECRET}"\n')
    assert 'unknown key "aws_secret_access_key"' in message
    assert "[mounts.s3.options]" in message
    assert SECRET not in message


def test_unknown_protocol(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[mounts.s3]\nprotocol = "s4"\n')
    assert 'mount "s3"' in message
    assert 'protocol "s4" is not a known fsspec protocol' in message


def test_missing_protocol(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[mounts.s3]\nroot = "bucket"\n')
    assert 'mount "s3"' in message and '"protocol"' in message and "missing" in message


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ('protocol = 3', "protocol", "must be a string"),
        ('protocol = "s3"\nroot = 5', "root", "must be a string"),
        ('protocol = "s3"\nroot = "a/../b"', "root", '".."'),
        ('protocol = "s3"\noptions = "x"', "options", "must be a table"),
        ('protocol = "s3"\ncache_size = "12.5x"', "cache_size", 'expected a size like "10G"'),
        ('protocol = "s3"\ncache_size = 1.5', "cache_size", "expected a size"),
        ('protocol = "s3"\ncache_size = true', "cache_size", "expected a size"),
        ('protocol = "s3"\nblock_size = "1K"', "block_size", "at least 4K"),
        ('protocol = "s3"\nblock_size = "2G"', "block_size", "at most 1G"),
        ('protocol = "s3"\nreadahead = -1', "readahead", "negative"),
        ('protocol = "s3"\nread_only = "yes"', "read_only", "expected true or false"),
        ('protocol = "s3"\nallow_other = 1', "allow_other", "expected true or false"),
        ('protocol = "s3"\nuid = "1000"', "uid", "expected a whole number"),
        ('protocol = "s3"\nuid = -1', "uid", "at least 0"),
        ('protocol = "s3"\ngid = 1.0', "gid", "expected a whole number"),
        ('protocol = "s3"\numask = "999"', "umask", "octal"),
        ('protocol = "s3"\numask = 4096', "umask", "between 000 and 777"),
        ('protocol = "s3"\nattr_ttl = "soon"', "attr_ttl", "expected a duration"),
        ('protocol = "s3"\nnegative_ttl = -5', "negative_ttl", "negative"),
        ('protocol = "s3"\nrequest_timeout = 0', "request_timeout", "at least"),
        ('protocol = "s3"\nfetch_concurrency = 0', "fetch_concurrency", "at least 1"),
        ('protocol = "s3"\nmetadata_entries = "many"', "metadata_entries", "whole number"),
        ('protocol = "s3"\nlog_level = "LOUD"', "log_level", "DEBUG, INFO, WARNING, ERROR"),
        ('protocol = "s3"\nlog_file = 3', "log_file", "path"),
        ('protocol = "s3"\ncache_dir = ""', "cache_dir", "empty"),
        ('protocol = "s3"\nfsname = "a,b"', "fsname", "commas"),
        ('protocol = "s3"\nmountpoint = false', "mountpoint", "path"),
    ],
)
def test_type_errors_name_file_mount_and_key(tmp_path: Path, body: str, key: str, fragment: str) -> None:
    message = load_error(tmp_path, f"[mounts.s3]\n{body}\n")
    assert 'mount "s3"' in message
    assert f'key "{key}"' in message
    assert fragment in message


def test_brief_example_message(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[mounts.s3]\nprotocol = "s3"\ncache_size = "12.5x"\n')
    assert re.search(r'bad\.toml: mount "s3": key "cache_size": expected a size like "10G".*got "12\.5x"', message)


def test_mount_must_be_a_table(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[mounts]\ns3 = "s3://bucket"\n')
    assert 'mount "s3"' in message and "must be a table" in message


def test_mounts_must_be_a_table(tmp_path: Path) -> None:
    message = load_error(tmp_path, 'mounts = "x"\n')
    assert '"mounts" must be a table' in message


def test_bad_mount_name(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[mounts."a:b"]\nprotocol = "memory"\n')
    assert 'mount "a:b"' in message and "may only contain" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[mount.s3]\nprotocol = "s3"\n')
    assert 'unknown top-level key "mount"' in message and 'did you mean "mounts"' in message


def test_defaults_table_validated(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[defaults]\ncache_size = "lots"\n')
    assert "[defaults]" in message and 'key "cache_size"' in message
    message = load_error(tmp_path, '[defaults]\nattr_tll = 5\n')
    assert "[defaults]" in message and 'unknown key "attr_tll"' in message and 'did you mean "attr_ttl"' in message
    message = load_error(tmp_path, '[defaults]\nprotocol = "s3"\n')
    assert 'unknown key "protocol"' in message and "[mounts.NAME]" in message
    message = load_error(tmp_path, 'defaults = 3\n')
    assert '"defaults" must be a table' in message


# --------------------------------------------------------------------------- secrets


SECRET_CASES = [
    # a TOML syntax error on the secret's own line
    f'[mounts.s3]\nprotocol = "s3"\n[mounts.s3.options]\nsecret = {SECRET}\n',
    f'[mounts.s3]\nprotocol = "s3"\n[mounts.s3.options]\nsecret = "{SECRET}\n',
    # options that are not a table
    f'[mounts.s3]\nprotocol = "s3"\noptions = "{SECRET}"\n',
    f'[mounts.s3]\nprotocol = "s3"\noptions = ["{SECRET}"]\n',
    # a credential put at the mount level by mistake
    f'[mounts.s3]\nprotocol = "s3"\nsecret = "{SECRET}"\n',
    f'[mounts.s3]\nprotocol = "s3"\nkey = "{SECRET}"\n',
    f'[defaults]\nsecret = "{SECRET}"\n',
    # a valid options table but another mistake elsewhere
    f'[mounts.s3]\nprotocol = "s4"\n[mounts.s3.options]\nsecret = "{SECRET}"\n',
    f'[mounts.s3]\nprotocol = "s3"\nroot = 1\n[mounts.s3.options]\nsecret = "{SECRET}"\n',
    f'[mounts.s3]\nprotocol = "s3"\ncache_size = "big"\n[mounts.s3.options]\nsecret = "{SECRET}"\n',
    f'{SECRET} = 1\n',
]


@pytest.mark.parametrize("text", SECRET_CASES)
def test_secret_option_values_never_appear_in_messages(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "secret.toml", text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    if text.startswith(SECRET):  # the key itself is the "secret": naming keys is allowed
        return
    assert SECRET not in errmsg(excinfo)


def test_secret_not_in_spec_errors_or_repr(cfg: Path, env: dict[str, str], mnt: Path) -> None:
    for spec in ("s3:../x", "s3:/abs", "nope:", "s3"):
        with pytest.raises(ConfigError) as excinfo:
            resolve_backend(spec, cfg, env=env)
        assert SECRET not in errmsg(excinfo)
    for argv in (
        ["--config", str(cfg), "s3:", str(mnt / "missing")],
        ["--config", str(cfg), "s3:", str(mnt), "-o", "bogus"],
        ["--config", str(cfg), "s3:", str(mnt), "--cache-size", "1K"],
        ["--config", str(cfg), "s3:", str(mnt), "--block-size", "x"],
    ):
        with pytest.raises(ConfigError) as excinfo:
            build_mount_request(argv, env)
        assert SECRET not in errmsg(excinfo)
    request = build_mount_request(["--config", str(cfg), "s3:", str(mnt)], env)
    assert request.backend.options["secret"] == SECRET
    for text in (repr(request), str(request), repr(request.backend), request.backend.display()):
        assert SECRET not in text
    assert "secret" in repr(request.backend)  # keys are fine


# --------------------------------------------------------------------------- SPEC forms


def test_named_mount(cfg: Path, env: dict[str, str]) -> None:
    backend, overrides = resolve_backend("s3:", cfg, env=env)
    assert backend == BackendSpec(
        name="s3",
        protocol="s3",
        root="my-bucket/prefix",
        options=backend.options,
        source=str(cfg),
    )
    assert dict(backend.options)["endpoint_url"] == "http://127.0.0.1:9000"
    assert backend.options["client_kwargs"] == {"region_name": "us-east-1"}
    assert backend.display() == "s3://my-bucket/prefix"
    assert overrides == {"cache_size": 20 * G}


@pytest.mark.parametrize(
    ("spec", "root"),
    [
        ("s3:sub", "my-bucket/prefix/sub"),
        ("s3:sub/path", "my-bucket/prefix/sub/path"),
        ("s3:sub//path/./x/", "my-bucket/prefix/sub/path/x"),
        ("s3:.", "my-bucket/prefix"),
        ("data:", "/srv/data"),
        ("data:videos/2024", "/srv/data/videos/2024"),
        ("memory:x/y", "x/y"),
    ],
)
def test_named_mount_sub_paths(cfg: Path, env: dict[str, str], spec: str, root: str) -> None:
    backend, _ = resolve_backend(spec, cfg, env=env)
    assert backend.root == root


@pytest.mark.parametrize("spec", ["s3:..", "s3:../other", "s3:a/../../b", "s3:a/..", "data:../etc"])
def test_dotdot_sub_paths_rejected(cfg: Path, env: dict[str, str], spec: str) -> None:
    with pytest.raises(ConfigError, match=r'"\.\."'):
        resolve_backend(spec, cfg, env=env)


@pytest.mark.parametrize("spec", ["s3:/abs", "data:/etc", "memory:/"])
def test_absolute_sub_paths_rejected(cfg: Path, env: dict[str, str], spec: str) -> None:
    with pytest.raises(ConfigError, match="relative"):
        resolve_backend(spec, cfg, env=env)


@pytest.mark.parametrize(
    ("spec", "protocol", "root", "display"),
    [
        ("s3://bucket/prefix", "s3", "bucket/prefix", "s3://bucket/prefix"),
        ("s3://bucket/prefix/", "s3", "bucket/prefix", "s3://bucket/prefix"),
        ("s3://bucket", "s3", "bucket", "s3://bucket"),
        ("S3://bucket", "s3", "bucket", "s3://bucket"),
        ("s3://", "s3", "", "s3://"),
        ("gcs://b/p", "gcs", "b/p", "gcs://b/p"),
        ("memory://", "memory", "", "memory://"),
        ("memory://x/y", "memory", "x/y", "memory://x/y"),
        ("file:///srv/data", "file", "/srv/data", "file:///srv/data"),
        ("file:///srv/data/", "file", "/srv/data", "file:///srv/data"),
        ("file:///", "file", "/", "file:///"),
        ("file://", "file", "/", "file:///"),
    ],
)
def test_url_specs(env: dict[str, str], spec: str, protocol: str, root: str, display: str) -> None:
    backend, overrides = resolve_backend(spec, None, env=env)
    assert (backend.name, backend.protocol, backend.root, backend.source) == ("url", protocol, root, "<url>")
    assert dict(backend.options) == {}
    assert backend.display() == display
    assert overrides == {}


def test_file_url_relative_and_tilde(tmp_path: Path, env: dict[str, str], home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_backend("file://data", None, env=env)[0].root == str(tmp_path / "data")
    assert resolve_backend("file://~/x", None, env=env)[0].root == str(home / "x")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("s4://bucket", 'protocol "s4" is not a known fsspec protocol'),
        ("s3://bucket/../other", '".."'),
        ("file:///srv/../etc", '".."'),
        ("simplecache::s3://bucket", "chained"),
        ("1x://bucket", "not a valid URL"),
        ("bucket", 'did you mean "bucket:"'),
        ("", "SPEC is empty"),
        ("  ", "SPEC is empty"),
    ],
)
def test_bad_specs(env: dict[str, str], spec: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        resolve_backend(spec, None, env=env)
    assert fragment in errmsg(excinfo)


def test_unknown_name_lists_known_names_and_file(cfg: Path, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        resolve_backend("foo:", cfg, env=env)
    assert errmsg(excinfo) == f'no mount named "foo" in {cfg} (known: data, local, memory, s3)'


def test_unknown_name_without_config_lists_searched_files(env: dict[str, str], home: Path, no_system_config: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        resolve_backend("foo:", None, env=env)
    message = errmsg(excinfo)
    assert 'no mount named "foo"' in message
    assert str(home / ".config/gstore/mounts.toml") in message
    assert str(no_system_config) in message
    assert "local, memory" in message


def test_name_that_is_a_protocol_hints_at_url_form(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"gcs://bucket"):
        resolve_backend("gcs:bucket", None, env=env)


def test_builtins_without_config(env: dict[str, str], home: Path) -> None:
    local, overrides = resolve_backend("local:", None, env=env)
    assert (local.name, local.protocol, local.source) == ("local", "file", "<built-in>")
    assert local.root == str(home / ".local/share/gstore/local")
    assert overrides == {}
    sub, _ = resolve_backend("local:a/b", None, env=env)
    assert sub.root == str(home / ".local/share/gstore/local/a/b")
    memory, _ = resolve_backend("memory:", None, env=env)
    assert (memory.name, memory.protocol, memory.root, memory.source) == ("memory", "memory", "", "<built-in>")
    assert memory.display() == "memory://"


def test_builtin_local_respects_xdg_data_home(tmp_path: Path, env: dict[str, str]) -> None:
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    local, _ = resolve_backend("local:", None, env=env)
    assert local.root == str(tmp_path / "data/gstore/local")


def test_builtins_available_alongside_config(cfg: Path, env: dict[str, str]) -> None:
    backend, _ = resolve_backend("memory:", cfg, env=env)
    assert backend.source == "<built-in>"


def test_config_entry_overrides_builtin(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path / "m.toml", '[mounts.local]\nprotocol = "file"\nroot = "/srv/local"\nread_only = true\n')
    backend, overrides = resolve_backend("local:", path, env=env)
    assert (backend.root, backend.source) == ("/srv/local", str(path))
    assert overrides == {"read_only": True}


def test_builtin_mounts_mapping() -> None:
    assert set(BUILTIN_MOUNTS) == {"local", "memory"}
    assert BUILTIN_MOUNTS["local"]["protocol"] == "file"
    assert BUILTIN_MOUNTS["memory"] == {"protocol": "memory", "root": "", "options": {}}


def test_backend_spec_is_immutable(cfg: Path, env: dict[str, str]) -> None:
    backend, _ = resolve_backend("s3:", cfg, env=env)
    with pytest.raises(dataclasses.FrozenInstanceError):
        backend.root = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        backend.options["endpoint_url"] = "x"  # type: ignore[index]
    again, _ = resolve_backend("s3:", cfg, env=env)
    assert again == backend
    hash(backend)


# --------------------------------------------------------------------------- build_mount_request


def test_minimal_request_defaults(env: dict[str, str], home: Path, mnt: Path) -> None:
    request = build_mount_request(["memory:", str(mnt)], env)
    assert isinstance(request, MountRequest)
    assert request.config_path is None
    assert request.mountpoint == mnt
    assert request.backend.protocol == "memory"
    options = request.options
    assert options == MountOptions(cache_dir=home / ".cache/gstore")
    assert (options.cache_size, options.block_size, options.readahead) == (10 * G, 4 * M, 64 * M)
    assert (options.uid, options.gid, options.umask) == (os.getuid(), os.getgid(), 0o022)
    assert (options.dir_cache_ttl, options.attr_ttl, options.negative_ttl) == (60.0, 60.0, 5.0)
    assert (options.metadata_entries, options.fetch_concurrency, options.request_timeout) == (200_000, 16, 60.0)
    assert (options.write_back_delay, options.drain_timeout, options.log_level) == (5.0, 300.0, "INFO")
    assert (options.foreground, options.read_only, options.allow_other, options.default_permissions) == (
        False, False, False, True,
    )  # fmt: skip
    assert (options.log_file, options.fsname) == (None, None)


def test_mount_options_dataclass_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xc"))
    assert MountOptions().cache_dir == tmp_path / "xc/gstore"
    with pytest.raises(dataclasses.FrozenInstanceError):
        MountOptions().cache_size = 1  # type: ignore[misc]


def test_cache_dir_respects_xdg_cache_home(tmp_path: Path, env: dict[str, str], mnt: Path) -> None:
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdgcache")
    request = build_mount_request(["memory:", str(mnt)], env)
    assert request.options.cache_dir == tmp_path / "xdgcache/gstore"


def test_config_found_through_lookup(env: dict[str, str], home: Path, mnt: Path) -> None:
    path = write(home / ".config/gstore/mounts.toml", S3_CONFIG)
    request = build_mount_request(["s3:sub", str(mnt)], env)
    assert request.config_path == path
    assert request.backend.root == "my-bucket/prefix/sub"
    assert request.options.cache_size == 20 * G


def test_o_config_and_cli_config(tmp_path: Path, cfg: Path, env: dict[str, str], mnt: Path) -> None:
    request = build_mount_request(["s3:", str(mnt), "-o", f"config={cfg}"], env)
    assert request.config_path == cfg
    other = write(tmp_path / "other.toml", '[mounts.s3]\nprotocol = "memory"\n')
    request = build_mount_request(["--config", str(other), "s3:", str(mnt), "-o", f"config={cfg}"], env)
    assert request.config_path == other
    assert request.backend.protocol == "memory"


def test_precedence_chain(tmp_path: Path, env: dict[str, str], mnt: Path) -> None:
    path = write(
        tmp_path / "m.toml",
        """
[defaults]
cache_size = "1G"
block_size = "1M"
readahead = "1M"
attr_ttl = 1
negative_ttl = 1

[mounts.a]
protocol = "memory"
block_size = "2M"
readahead = "2M"
attr_ttl = 2
""",
    )
    base = ["--config", str(path), "a:", str(mnt)]
    options = build_mount_request(base, env).options
    assert options.fetch_concurrency == 16  # built-in default
    assert options.cache_size == G  # [defaults]
    assert options.negative_ttl == 1.0  # [defaults]
    assert options.block_size == 2 * M  # entry beats [defaults]
    assert options.attr_ttl == 2.0
    options = build_mount_request([*base, "-o", "readahead=3M,attr_ttl=3,fetch_concurrency=4"], env).options
    assert (options.readahead, options.attr_ttl, options.fetch_concurrency) == (3 * M, 3.0, 4)  # -o beats entry
    assert options.block_size == 2 * M
    options = build_mount_request([*base, "-o", "readahead=3M,attr_ttl=3", "--attr-ttl", "4"], env).options
    assert (options.readahead, options.attr_ttl) == (3 * M, 4.0)  # long option beats -o
    # the order on the command line does not matter: long options always win
    options = build_mount_request(["--attr-ttl", "4", *base, "-o", "attr_ttl=3"], env).options
    assert options.attr_ttl == 4.0


def test_defaults_apply_to_builtins_and_urls(tmp_path: Path, env: dict[str, str], mnt: Path) -> None:
    path = write(tmp_path / "m.toml", '[defaults]\nread_only = true\nfetch_concurrency = 3\n')
    for spec in ("memory:", "s3://bucket", "local:"):
        options = build_mount_request(["--config", str(path), spec, str(mnt)], env).options
        assert options.read_only is True and options.fetch_concurrency == 3


def test_read_only_flags(tmp_path: Path, env: dict[str, str], mnt: Path) -> None:
    path = write(tmp_path / "m.toml", '[mounts.ro]\nprotocol = "memory"\nread_only = true\n')
    base = ["--config", str(path)]
    assert build_mount_request([*base, "memory:", str(mnt), "-r"], env).options.read_only is True
    assert build_mount_request([*base, "memory:", str(mnt), "--read-only"], env).options.read_only is True
    assert build_mount_request([*base, "ro:", str(mnt)], env).options.read_only is True
    # mount(8) adds "rw" to every fstab line without "ro": it must not undo the config.
    assert build_mount_request([*base, "ro:", str(mnt), "-o", "rw"], env).options.read_only is True
    assert build_mount_request([*base, "ro:", str(mnt), "--no-read-only"], env).options.read_only is False
    assert build_mount_request([*base, "ro:", str(mnt), "-o", "rw", "-r"], env).options.read_only is True
    assert build_mount_request([*base, "memory:", str(mnt), "-o", "ro,rw"], env).options.read_only is True
    assert build_mount_request([*base, "memory:", str(mnt), "-o", "rw"], env).options.read_only is False
    assert build_mount_request([*base, "memory:", str(mnt), "-o", "read_only=false"], env).options.read_only is False


def test_all_long_options(tmp_path: Path, env: dict[str, str], mnt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [
        "-f", "--cache-dir", "cachedir", "--cache-size", "2G", "--block-size", "1M", "--readahead", "0",
        "--read-only", "--allow-other", "--default-permissions", "--uid", "1234", "--gid", "5678",
        "--umask", "0o027", "--dir-cache-ttl", "1m", "--attr-ttl", "10s", "--negative-ttl", "0",
        "--metadata-entries", "1000", "--fetch-concurrency", "8", "--request-timeout", "2.5",
        "--write-back-delay", "1", "--drain-timeout", "1h", "--log-level", "debug", "--log-file", "~/g.log",
        "--fsname", "gstore:test", "memory:", str(mnt),
    ]  # fmt: skip
    options = build_mount_request(argv, env).options
    assert options == MountOptions(
        foreground=True,
        cache_dir=tmp_path / "cachedir",
        cache_size=2 * G,
        block_size=M,
        readahead=0,
        read_only=True,
        allow_other=True,
        default_permissions=True,
        uid=1234,
        gid=5678,
        umask=0o027,
        dir_cache_ttl=60.0,
        attr_ttl=10.0,
        negative_ttl=0.0,
        metadata_entries=1000,
        fetch_concurrency=8,
        request_timeout=2.5,
        write_back_delay=1.0,
        drain_timeout=3600.0,
        log_level="DEBUG",
        log_file=Path(env["HOME"]) / "g.log",
        fsname="gstore:test",
    )


def test_all_o_options(tmp_path: Path, env: dict[str, str], mnt: Path) -> None:
    o = (
        "foreground,cache_dir=/x/cache,cache-size=2G,block_size=1M,readahead=8M,ro,allow_other,"
        "default-permissions,uid=1000,gid=1001,umask=077,dir_cache_ttl=5m,attr-ttl=10,negative_ttl=1s,"
        "metadata_entries=10,fetch_concurrency=2,request_timeout=5,write_back_delay=0,drain_timeout=60,"
        "log_level=warning,log_file=/x/log,fsname=mine"
    )
    options = build_mount_request(["memory:", str(mnt), "-o", o], env).options
    assert options == MountOptions(
        foreground=True, cache_dir=Path("/x/cache"), cache_size=2 * G, block_size=M, readahead=8 * M,
        read_only=True, allow_other=True, default_permissions=True, uid=1000, gid=1001, umask=0o077,
        dir_cache_ttl=300.0, attr_ttl=10.0, negative_ttl=1.0, metadata_entries=10, fetch_concurrency=2,
        request_timeout=5.0, write_back_delay=0.0, drain_timeout=60.0, log_level="WARNING",
        log_file=Path("/x/log"), fsname="mine",
    )  # fmt: skip


def test_o_ignores_mount8_options(env: dict[str, str], mnt: Path) -> None:
    ignored = (
        "dev,nodev,suid,nosuid,exec,noexec,atime,noatime,defaults,auto,noauto,user,users,nouser,"
        "_netdev,nofail,x-systemd.automount,x-systemd.idle-timeout=60,x-systemd.requires=network-online.target,"
        "comment=systemd.automount,user=alice,x-gvfs-show,relatime"
    )
    request = build_mount_request(["memory:", str(mnt), "-o", ignored], env)
    assert request.options == build_mount_request(["memory:", str(mnt)], env).options


def test_o_repeatable_and_later_wins(env: dict[str, str], mnt: Path) -> None:
    options = build_mount_request(["-o", "uid=1", "memory:", str(mnt), "-o", "gid=2", "-o", "uid=3"], env).options
    assert (options.uid, options.gid) == (3, 2)


def test_o_bool_values(env: dict[str, str], mnt: Path) -> None:
    for text, expected in (("allow_other", True), ("allow_other=yes", True), ("allow_other=0", False),
                           ("allow-other=false", False), ("allow_other=on", True)):  # fmt: skip
        assert build_mount_request(["memory:", str(mnt), "-o", text], env).options.allow_other is expected


@pytest.mark.parametrize(
    ("o", "fragment"),
    [
        ("bogus", 'unknown -o option "bogus"'),
        ("nodev,cache_sise=1G", 'unknown -o option "cache_sise" (did you mean "cache_size"?)'),
        ("cache_size", "-o cache_size needs a value"),
        ("cache_size=huge", '-o cache_size: expected a size like "10G"'),
        ("umask=8", '-o umask: expected an octal mode'),
        ("uid=abc", '-o uid: expected a whole number, got "abc"'),
        ("uid=-1", "-o uid: must be at least 0"),
        ("allow_other=maybe", '-o allow_other: expected true or false, got "maybe"'),
        ("ro=1", "-o ro takes no value"),
        ("config=", "-o config needs a value"),
        ("log_level=chatty", "-o log_level"),
    ],
)
def test_o_errors(env: dict[str, str], mnt: Path, o: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        build_mount_request(["memory:", str(mnt), "-o", o], env)
    assert fragment in errmsg(excinfo)


def test_sloppy_ignores_unknown_o(env: dict[str, str], mnt: Path) -> None:
    request = build_mount_request(["-s", "memory:", str(mnt), "-o", "bogus,uid=7"], env)
    assert request.options.uid == 7


def test_mount8_helper_argument_order(cfg: Path, env: dict[str, str], mnt: Path) -> None:
    # mount(8) runs: helper SOURCE MOUNTPOINT [-sfnv] -o OPTS
    request = build_mount_request(["s3:sub", str(mnt), "-n", "-o", f"rw,nodev,_netdev,config={cfg},allow_other"], env)
    assert request.backend.root == "my-bucket/prefix/sub"
    assert request.options.allow_other is True
    # options between the positionals work too
    request = build_mount_request(["s3:", "-o", f"config={cfg}", str(mnt), "--uid", "5"], env)
    assert request.options.uid == 5 and request.mountpoint == mnt


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--cache-size", "12.5x"], '--cache-size: expected a size like "10G"'),
        (["--block-size", "1K"], "--block-size: must be at least 4K"),
        (["--readahead", "-1"], "--readahead"),
        (["--uid", "root"], '--uid: expected a whole number, got "root"'),
        (["--umask", "0o1000"], "--umask"),
        (["--attr-ttl", "forever"], '--attr-ttl: expected a duration'),
        (["--request-timeout", "0"], "--request-timeout: must be at least"),
        (["--fetch-concurrency", "0"], "--fetch-concurrency: must be at least 1"),
        (["--log-level", "TRACE"], "--log-level"),
        (["--fsname", "a b"], "--fsname"),
        (["--cache-size", "1M"], "cache_size (1048576 bytes) must be at least block_size"),
    ],
)
def test_cli_value_errors(env: dict[str, str], mnt: Path, argv: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        build_mount_request([*argv, "memory:", str(mnt)], env)
    assert fragment in errmsg(excinfo)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["memory:", "/tmp", "extra"],
        ["--no-such-option", "memory:", "/tmp"],
        ["--cache", "1G", "memory:", "/tmp"],  # no abbreviations
        ["--uid"],
    ],
)
def test_usage_errors_are_config_errors(env: dict[str, str], argv: list[str]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        build_mount_request(argv, env)
    assert "gstore-mount --help" in errmsg(excinfo)


def test_mountpoint_must_exist_and_be_a_directory(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        build_mount_request(["memory:", str(tmp_path / "missing")], env)
    assert str(tmp_path / "missing") in errmsg(excinfo) and "does not exist" in errmsg(excinfo)
    afile = write(tmp_path / "afile", "x")
    with pytest.raises(ConfigError) as excinfo:
        build_mount_request(["memory:", str(afile)], env)
    assert "not a directory" in errmsg(excinfo)


def test_mountpoint_is_made_absolute(tmp_path: Path, env: dict[str, str], mnt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    request = build_mount_request(["memory:", "mnt/"], env)
    assert request.mountpoint == mnt and request.mountpoint.is_absolute()
    home_mnt = Path(env["HOME"]) / "m"
    home_mnt.mkdir()
    assert build_mount_request(["memory:", "~/m"], env).mountpoint == home_mnt


def test_config_errors_surface_through_build_mount_request(tmp_path: Path, env: dict[str, str], mnt: Path) -> None:
    path = write(tmp_path / "m.toml", '[mounts.a]\nprotocol = "memory"\nreadahead = "lots"\n')
    with pytest.raises(ConfigError) as excinfo:
        build_mount_request(["--config", str(path), "memory:", str(mnt)], env)
    assert str(path) in errmsg(excinfo) and 'mount "a"' in errmsg(excinfo) and 'key "readahead"' in errmsg(excinfo)


def test_missing_explicit_config(tmp_path: Path, env: dict[str, str], mnt: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml"):
        build_mount_request(["--config", str(tmp_path / "nope.toml"), "memory:", str(mnt)], env)


# --------------------------------------------------------------------------- --help


def test_help_mentions_every_option_with_default() -> None:
    parser = build_arg_parser()
    text = parser.format_help()
    flat = " ".join(text.split())
    for field in dataclasses.fields(MountOptions):
        flag = "--" + field.name.replace("_", "-")
        assert flag in text, flag
    for flag in ("-f", "-r", "-o", "--config", "--no-read-only", "SPEC", "MOUNTPOINT"):
        assert flag in text
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "_n", "_v", "_t"):
            assert action.help and "default" in action.help, action.option_strings
    for fragment in ("x-systemd.", "comment=", "local:", "memory:", "$GSTORE_CONFIG", "/etc/gstore/mounts.toml"):
        assert fragment in flat


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        build_mount_request(["--help"])
    assert excinfo.value.code == 0
    assert "--cache-size" in capsys.readouterr().out


def test_cli_entry_point_reports_config_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gstore.cli import mount_main

    monkeypatch.setenv("HOME", str(home))
    for var in ("GSTORE_CONFIG", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)

    assert mount_main(["nope:", str(tmp_path)]) == 2
    assert 'no mount named "nope"' in capsys.readouterr().err
