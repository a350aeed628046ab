"""What is mounted and how: the config file, SPEC, and the mount options.

Everything here is parsing and validation with no side effects: nothing is
mounted, no network is touched, no fsspec filesystem is created. A user
mistake anywhere becomes a :class:`ConfigError` whose text is the complete
message shown to the user; it names the file, the mount and the key, and never
contains a value from a ``[mounts.NAME.options]`` table (those may be secrets).

Precedence of mount options, lowest first::

    built-in defaults < [defaults] table < [mounts.NAME] keys < -o options < long options
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import math
import os
import posixpath
import re
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = [
    "BUILTIN_MOUNTS",
    "BackendSpec",
    "ConfigError",
    "MountOptions",
    "MountRequest",
    "SYSTEM_CONFIG",
    "build_arg_parser",
    "build_mount_request",
    "find_config",
    "load_config",
    "parse_duration",
    "parse_size",
    "resolve_backend",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: The system-wide config file, last in the lookup order (a module attribute so tests can move it).
SYSTEM_CONFIG = Path("/etc/gstore/mounts.toml")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Protocols whose root is a local absolute path ("/srv/data"), not "bucket/prefix".
_FILE_PROTOCOLS = frozenset({"file", "local"})

_MOUNT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)


class ConfigError(Exception):
    """A user mistake in the config file, SPEC or options.

    str(e) is the complete, user-facing message.
    """


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class BackendSpec:
    """Which storage is mounted: an fsspec protocol, a root inside it, and its options."""

    name: str
    protocol: str
    root: str
    options: Mapping[str, Any] = field(hash=False)
    source: str

    def display(self) -> str:
        """``protocol://root``, e.g. ``s3://bucket/prefix``; never contains option values."""
        return f"{self.protocol}://{self.root}"

    def __repr__(self) -> str:  # option values may be secrets: show the keys only
        keys = ", ".join(sorted(self.options))
        return (
            f"BackendSpec(name={self.name!r}, protocol={self.protocol!r}, root={self.root!r}, "
            f"options=<keys: {keys}>, source={self.source!r})"
        )


def _xdg_dir(env: Mapping[str, str], var: str, fallback: str) -> Path:
    """An XDG base directory: ``$var`` if set to an absolute path, else ``~/fallback``."""
    value = env.get(var, "")
    if value and os.path.isabs(value):
        return Path(value)
    return _home(env) / fallback


def _home(env: Mapping[str, str]) -> Path:
    home = env.get("HOME")
    return Path(home) if home else Path.home()


def _default_cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    return _xdg_dir(env, "XDG_CACHE_HOME", ".cache") / "gstore"


@dataclass(frozen=True)
class MountOptions:
    """How a backend is mounted. See docs/configuration.md for each field."""

    foreground: bool = False
    cache_dir: Path = field(default_factory=_default_cache_dir)
    cache_size: int = 10 * GiB
    block_size: int = 4 * MiB
    readahead: int = 64 * MiB
    read_only: bool = False
    allow_other: bool = False
    default_permissions: bool = True
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    umask: int = 0o022
    dir_cache_ttl: float = 60.0
    attr_ttl: float = 60.0
    negative_ttl: float = 5.0
    metadata_entries: int = 200_000
    fetch_concurrency: int = 16
    request_timeout: float = 60.0
    connect_timeout: float = 5.0
    retries: int = 4
    breaker_threshold: int = 10
    breaker_cooldown: float | None = None
    write_back_delay: float = 5.0
    upload_concurrency: int = 16
    part_concurrency: int = 8
    drain_timeout: float = 300.0
    conflict: str = "keep-both"
    concat_dir: str | None = ".concat"
    diff_dir: str | None = ".diff"
    versions_dir: str | None = ".versions"
    zip_dir: str | None = ".zip"
    log_level: str = "INFO"
    log_file: Path | None = None
    debug_requests: bool = False
    xattrs: bool = True
    fsname: str | None = None

    @property
    def backend_connections(self) -> int:
        """How many connections the backend's client may hold open at once.

        Enough for every request the mount's limiters let through at the same
        time (reads, whole-file uploads, multipart parts) plus room for the
        lookups, listings, deletes and copies that no limiter counts: with a
        smaller pool (botocore's default is 10) the limiters' figures are never
        reached, and a listing waits behind readahead for a free connection.
        """
        return self.fetch_concurrency + self.upload_concurrency + self.part_concurrency + METADATA_CONNECTIONS


#: Connections kept beyond the limiters' sum for requests no limiter counts.
METADATA_CONNECTIONS = 8


@dataclass(frozen=True)
class MountRequest:
    """Everything ``gstore-mount`` was asked to do."""

    backend: BackendSpec
    mountpoint: Path
    options: MountOptions
    config_path: Path | None


# --------------------------------------------------------------------------- sizes and durations

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kb": KiB, "kib": KiB,
    "m": MiB, "mb": MiB, "mib": MiB,
    "g": GiB, "gb": GiB, "gib": GiB,
    "t": 1024 * GiB, "tb": 1024 * GiB, "tib": 1024 * GiB,
    "p": 1024**2 * GiB, "pb": 1024**2 * GiB, "pib": 1024**2 * GiB,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
_MAX_SIZE = 2**63 - 1

_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
_MAX_DURATION = 1e9  # seconds (about 31 years): anything longer is a typo
_MAX_NUMBER_CHARS = 40  # guards int()/Fraction() against pathological inputs


def _size_error(text: object) -> ConfigError:
    return ConfigError(f'expected a size like "10G", "512M" or "4096", got "{text}"')


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: ``"10G"``, ``"512M"``, ``"4MiB"``, ``"1.5G"``, ``"4096"``, ``"10GB"``.

    Multiples are binary (K = 1024, M = 1024², ...); the ``B``/``iB`` suffix is
    optional and case is ignored. Fractions are rounded down to whole bytes.
    A non-negative int is returned as is.
    """
    if isinstance(text, bool):
        raise _size_error(text)
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"a size cannot be negative, got {text}")
        if text > _MAX_SIZE:
            raise ConfigError(f"size {text} is too large")
        return text
    if not isinstance(text, str):
        raise _size_error(text)
    match = _SIZE.match(text)
    if match is None:
        if text.strip().startswith("-"):
            raise ConfigError(f'a size cannot be negative, got "{text}"')
        raise _size_error(text)
    number, unit = match.groups()
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        raise ConfigError(
            f'expected a size like "10G", "512M" or "4096", got "{text}" '
            f'(unknown unit "{unit}": use K, M, G, T or P, optionally followed by B or iB)'
        )
    if len(number) > _MAX_NUMBER_CHARS:
        raise ConfigError(f'size "{text}" is too large')
    value = math.floor(Fraction(number) * multiplier)
    if value > _MAX_SIZE:
        raise ConfigError(f'size "{text}" is too large')
    return value


def _duration_error(text: object) -> ConfigError:
    return ConfigError(f'expected a duration like "60", "1.5", "30s", "5m" or "1h", got "{text}"')


def parse_duration(text: str | float) -> float:
    """Seconds in ``text``: ``"60"``, ``"1.5"``, ``"30s"``, ``"500ms"``, ``"5m"``, ``"1h"``, ``"1d"``.

    An int or float is taken as seconds. Negative, infinite and absurdly
    long durations are rejected.
    """
    if isinstance(text, bool):
        raise _duration_error(text)
    if isinstance(text, (int, float)):
        try:
            value = float(text)
        except OverflowError:
            raise ConfigError(f"duration {text} is too large") from None
        if math.isnan(value):
            raise _duration_error(text)
        if value < 0:
            raise ConfigError(f"a duration cannot be negative, got {text}")
        if value > _MAX_DURATION:
            raise ConfigError(f"duration {text} is too large (at most {_MAX_DURATION:.0f} seconds)")
        return value
    if not isinstance(text, str):
        raise _duration_error(text)
    match = _DURATION.match(text)
    if match is None:
        if text.strip().startswith("-"):
            raise ConfigError(f'a duration cannot be negative, got "{text}"')
        raise _duration_error(text)
    number, unit = match.groups()
    multiplier = _DURATION_UNITS.get(unit.lower())
    if multiplier is None:
        raise ConfigError(
            f'expected a duration like "60", "1.5", "30s", "5m" or "1h", got "{text}" '
            f'(unknown unit "{unit}": use ms, s, m, h or d)'
        )
    if len(number) > _MAX_NUMBER_CHARS:
        raise ConfigError(f'duration "{text}" is too large')
    value = float(number) * multiplier
    if value > _MAX_DURATION:
        raise ConfigError(f'duration "{text}" is too large (at most {_MAX_DURATION:.0f} seconds)')
    return value


# --------------------------------------------------------------------------- option fields
#
# One table drives the config file keys, the -o options, the long options and
# --help, so the three spellings cannot drift apart.

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class _Context:
    """Where a value came from, for messages, and how to make relative paths absolute."""

    base_dir: Path  # relative paths are taken relative to this
    env: Mapping[str, str]
    from_text: bool  # True for command-line strings, False for typed TOML values


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return "a date/time" if hasattr(value, "isoformat") else type(value).__name__


def _conv_bool(value: Any, ctx: _Context) -> bool:
    if isinstance(value, bool):
        return value
    if ctx.from_text and isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ConfigError(f'expected true or false, got "{value}"')
    raise ConfigError(f"expected true or false, got {_type_name(value)}")


def _conv_size(value: Any, ctx: _Context) -> int:
    if isinstance(value, float) and not ctx.from_text:
        raise ConfigError(f'expected a size like "10G" or a whole number of bytes, got {value}')
    return parse_size(value)


def _conv_duration(value: Any, ctx: _Context) -> float:
    return parse_duration(value)


def _conv_int(value: Any, ctx: _Context) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"expected a whole number, got {_type_name(value)}")
    if isinstance(value, int):
        return value
    if ctx.from_text and isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?[0-9]{1,19}", text):
            return int(text)
        raise ConfigError(f'expected a whole number, got "{value}"')
    raise ConfigError(f"expected a whole number, got {_type_name(value)}")


def _conv_octal(value: Any, ctx: _Context) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"expected an octal mode like \"022\", got {_type_name(value)}")
    if isinstance(value, int):
        result = value
    elif isinstance(value, str):
        text = value.strip()
        digits = text[2:] if text[:2].lower() == "0o" else text
        if not re.fullmatch(r"[0-7]{1,4}", digits):
            raise ConfigError(f'expected an octal mode like "022" or "0o022", got "{value}"')
        result = int(digits, 8)
    else:
        raise ConfigError(f"expected an octal mode like \"022\", got {_type_name(value)}")
    if not 0 <= result <= 0o777:
        shown = oct(result) if result >= 0 else str(result)
        raise ConfigError(f"expected an octal mode between 000 and 777, got {shown}")
    return result


def _expand_path(text: str, ctx: _Context) -> Path:
    if text == "~" or text.startswith("~/"):
        text = str(_home(ctx.env)) + text[1:]
    elif text.startswith("~"):
        text = os.path.expanduser(text)
    path = Path(text)
    if not path.is_absolute():
        path = ctx.base_dir / path
    return Path(os.path.normpath(path))


def _conv_path(value: Any, ctx: _Context) -> Path:
    if not isinstance(value, str):
        raise ConfigError(f"expected a path (a string), got {_type_name(value)}")
    if not value.strip():
        raise ConfigError("expected a path, got an empty string")
    if "\0" in value:
        raise ConfigError("a path cannot contain a NUL character")
    return _expand_path(value, ctx)


def _conv_level(value: Any, ctx: _Context) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"expected one of {', '.join(LOG_LEVELS)}, got {_type_name(value)}")
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f'expected one of {", ".join(LOG_LEVELS)}, got "{value}"')
    return level


def _conv_fsname(value: Any, ctx: _Context) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {_type_name(value)}")
    if not value:
        raise ConfigError("expected a non-empty name")
    if "," in value or any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ConfigError(f'must not contain commas, spaces or control characters, got "{value}"')
    return value


CONFLICT_POLICIES = ("keep-both", "overwrite", "fail")


def _conv_virtual_dir(value: Any, ctx: _Context) -> str | None:
    if not isinstance(value, str):
        raise ConfigError(f"expected a directory name or off, got {_type_name(value)}")
    if value.strip().lower() in ("off", "none", "false", "no"):
        return None
    if value in ("", ".", "..") or "/" in value or "," in value or any(not ch.isprintable() for ch in value):
        raise ConfigError(f'expected a plain directory name (no "/" or ",") or off, got "{value}"')
    return value


def _conv_conflict(value: Any, ctx: _Context) -> str:
    if not isinstance(value, str) or value.strip().lower() not in CONFLICT_POLICIES:
        raise ConfigError(f"expected one of {', '.join(CONFLICT_POLICIES)}, got {value!r}")
    return value.strip().lower()


@dataclass(frozen=True)
class _Field:
    name: str
    convert: Callable[[Any, _Context], Any]
    metavar: str | None  # None: a boolean flag
    help: str
    default_text: str
    short: str | None = None
    minimum: float | None = None
    maximum: float | None = None

    @property
    def is_bool(self) -> bool:
        return self.metavar is None

    def check(self, value: Any, ctx: _Context) -> Any:
        result = self.convert(value, ctx)
        shown = f'"{value}"' if isinstance(value, str) else str(value)
        if self.minimum is not None and result < self.minimum:
            raise ConfigError(f"must be at least {_fmt_limit(self, self.minimum)}, got {shown}")
        if self.maximum is not None and result > self.maximum:
            raise ConfigError(f"must be at most {_fmt_limit(self, self.maximum)}, got {shown}")
        return result


def _fmt_limit(f: _Field, limit: float) -> str:
    if f.convert is _conv_size:
        for unit, size in (("G", GiB), ("M", MiB), ("K", KiB)):
            if limit >= size and limit % size == 0:
                return f"{int(limit // size)}{unit}"
    if isinstance(limit, float) and limit.is_integer():
        return str(int(limit))
    return str(limit)


_FIELDS: dict[str, _Field] = {
    f.name: f
    for f in (
        _Field("foreground", _conv_bool, None,
               "stay in the foreground and log to stderr instead of daemonizing", "off", short="-f"),
        _Field("cache_dir", _conv_path, "DIR",
               "directory for the on-disk block cache (one private subdirectory per mount)",
               "$XDG_CACHE_HOME/gstore, else ~/.cache/gstore"),
        _Field("cache_size", _conv_size, "SIZE",
               "upper bound on the block cache's disk use; least recently used blocks are evicted",
               "10G", minimum=1),
        _Field("block_size", _conv_size, "SIZE",
               "size of the blocks fetched from the backend and kept in the cache",
               "4M", minimum=4 * KiB, maximum=1 * GiB),
        _Field("readahead", _conv_size, "SIZE",
               "largest readahead window per open file for sequential reads (0 disables readahead)",
               "64M"),
        _Field("read_only", _conv_bool, None,
               "mount read-only (-o ro); --no-read-only or -o rw undoes a read_only from the config file",
               "off", short="-r"),
        _Field("allow_other", _conv_bool, None,
               "let other users access the mount (needs user_allow_other in /etc/fuse.conf unless root)",
               "off"),
        _Field("default_permissions", _conv_bool, None,
               "let the kernel check permissions against the mode, uid and gid of each file, as on a "
               "local disk (--no-default-permissions: every user who can reach the mount may do anything)",
               "on"),
        _Field("uid", _conv_int, "N", "numeric user id shown as the owner of files and folders that carry no owner",
               "the uid running gstore-mount", minimum=0, maximum=2**32 - 2),
        _Field("gid", _conv_int, "N", "numeric group id shown as the group of files and folders that carry no group",
               "the gid running gstore-mount", minimum=0, maximum=2**32 - 2),
        _Field("umask", _conv_octal, "OCTAL",
               "permission bits removed from the modes shown (files 0666, directories 0777)", "022"),
        _Field("dir_cache_ttl", _conv_duration, "DUR",
               "seconds a directory listing (and the names in it) is trusted before listing again", "60"),
        _Field("attr_ttl", _conv_duration, "DUR",
               "seconds file attributes are trusted (also the kernel's attribute timeout)", "60"),
        _Field("negative_ttl", _conv_duration, "DUR",
               "seconds a \"does not exist\" answer is trusted", "5"),
        _Field("metadata_entries", _conv_int, "N",
               "most attribute/listing entries kept in the metadata cache", "200000", minimum=1),
        _Field("fetch_concurrency", _conv_int, "N",
               "most backend requests in flight at once for reads", "16", minimum=1, maximum=1024),
        _Field("request_timeout", _conv_duration, "DUR",
               "seconds before a backend request is abandoned and the read fails with EIO",
               "60", minimum=0.001),
        _Field("connect_timeout", _conv_duration, "DUR",
               "seconds to open a connection to the storage (at most --request-timeout); an endpoint "
               "that does not accept connections is then known to be down quickly", "5", minimum=0.001),
        _Field("retries", _conv_int, "N",
               "extra attempts of a failed read-side backend request (backoff with jitter), all within "
               "--request-timeout", "4", minimum=0, maximum=20),
        _Field("breaker_threshold", _conv_int, "N",
               "consecutive backend failures after which calls fail fast (EIO) until a probe succeeds",
               "10", minimum=1, maximum=10_000),
        _Field("breaker_cooldown", _conv_duration, "DUR",
               "seconds between probes of a backend that is down",
               "half the request timeout, 1 to 5", minimum=0.01),
        _Field("write_back_delay", _conv_duration, "DUR",
               "seconds a written file stays unchanged before it is uploaded", "5"),
        _Field("upload_concurrency", _conv_int, "N",
               "most files uploading at once", "16", minimum=1, maximum=1024),
        _Field("part_concurrency", _conv_int, "N",
               "most multipart parts in flight at once, mount-wide (each streamed from the staging file)",
               "8", minimum=1, maximum=256),
        _Field("drain_timeout", _conv_duration, "DUR",
               "seconds to wait for pending uploads when unmounting", "300"),
        _Field("conflict", _conv_conflict, "POLICY",
               "when the backend copy changed since this mount read it: keep-both (ours goes to "
               "NAME.conflict-TIMESTAMP), overwrite (ours wins) or fail (ours stays pending)", "keep-both"),
        _Field("concat_dir", _conv_virtual_dir, "NAME",
               "hidden directory of virtual concatenations in every folder (off: none)", ".concat"),
        _Field("diff_dir", _conv_virtual_dir, "NAME",
               "hidden directory of virtual unified diffs in every folder (off: none)", ".diff"),
        _Field("versions_dir", _conv_virtual_dir, "NAME",
               "hidden directory of object versions in every folder (off: none)", ".versions"),
        _Field("zip_dir", _conv_virtual_dir, "NAME",
               "hidden directory of virtual zip archives of folders in every folder (off: none)", ".zip"),
        _Field("log_level", _conv_level, "LEVEL", f"log verbosity: {', '.join(LOG_LEVELS)}", "INFO"),
        _Field("log_file", _conv_path, "FILE",
               "write the log to FILE",
               "stderr in the foreground; gstore-mount.log in the mount's cache subdirectory when daemonized"),
        _Field("debug_requests", _conv_bool, None,
               "log one line per kernel request and per backend request (operation, path, result, "
               "duration) at DEBUG level, for troubleshooting; SIGUSR1 toggles it while running", "off"),
        _Field("xattrs", _conv_bool, None,
               "answer extended attributes (user.md5, user.mimetype, ...); --no-xattrs tells the "
               "kernel there are none, which saves two requests per file in ls -l", "on"),
        _Field("fsname", _conv_fsname, "NAME",
               "source name shown in /proc/mounts and df", "gstore:<mount name>"),
    )
}  # fmt: skip

assert set(_FIELDS) == {f.name for f in dataclasses.fields(MountOptions)}, "option table out of sync"

# Keys of a [mounts.NAME] table besides the MountOptions fields.
_ENTRY_KEYS = ("protocol", "root", "mountpoint", "options")

# mount(8) passes these to helpers; they mean nothing to a FUSE mount.
_IGNORED_O = frozenset(
    {
        "dev", "nodev", "suid", "nosuid", "exec", "noexec",
        "atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime",
        "diratime", "nodiratime", "lazytime", "nolazytime",
        "defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group",
        "_netdev", "nofail", "async",
    }
)  # fmt: skip


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(word.replace("-", "_"), list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


# --------------------------------------------------------------------------- protocols and paths


def _known_protocols() -> set[str]:
    import fsspec
    from fsspec.registry import registry

    return set(fsspec.available_protocols()) | set(registry)


def _check_protocol(protocol: str) -> str | None:
    """None if ``protocol`` is a known fsspec protocol, else the reason it is not."""
    known = _known_protocols()
    if protocol in known:
        return None
    return f'protocol "{protocol}" is not a known fsspec protocol{_suggest(protocol, sorted(known))}'


def _clean_key_path(path: str, what: str) -> str:
    """``a//b/./c/`` → ``a/b/c``; rejects ``..`` components. No leading or trailing "/"."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ConfigError(f'{what} "{path}" must not contain ".." components')
    if any("\0" in p for p in parts):
        raise ConfigError(f"{what} must not contain a NUL character")
    return "/".join(parts)


def _clean_file_root(path: str, what: str, ctx: _Context) -> str:
    """An absolute local path ("~" expanded, relative ones made absolute), normalized; "/" stays "/"."""
    if ".." in path.split("/"):
        raise ConfigError(f'{what} "{path}" must not contain ".." components')
    if "\0" in path:
        raise ConfigError(f"{what} must not contain a NUL character")
    if not path.strip():
        return "/"
    return posixpath.normpath(str(_expand_path(path, ctx)))


def _join_root(protocol: str, root: str, sub: str) -> str:
    if not sub:
        return root
    if protocol in _FILE_PROTOCOLS:
        return posixpath.join(root or "/", sub)
    return f"{root}/{sub}" if root else sub


# --------------------------------------------------------------------------- config file


def _search_paths(env: Mapping[str, str]) -> list[Path]:
    return [_xdg_dir(env, "XDG_CONFIG_HOME", ".config") / "gstore" / "mounts.toml", SYSTEM_CONFIG]


def find_config(explicit: str | None, env: Mapping[str, str] = os.environ) -> Path | None:
    """The config file to use, or None if there is none.

    Order: ``explicit`` (``--config``; must exist), ``$GSTORE_CONFIG`` (must
    exist), ``$XDG_CONFIG_HOME/gstore/mounts.toml`` (default
    ``~/.config/gstore/mounts.toml``), ``/etc/gstore/mounts.toml``.
    """
    ctx = _Context(Path.cwd(), env, from_text=True)
    for value, origin in ((explicit, "--config"), (env.get("GSTORE_CONFIG"), "$GSTORE_CONFIG")):
        if value is None or (origin == "$GSTORE_CONFIG" and not value):
            continue
        if not value.strip():
            raise ConfigError(f"{origin}: expected a file name, got an empty string")
        path = _expand_path(value, ctx)
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"{origin}: config file {path}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{origin}: config file {path} is not a regular file")
        return path
    for path in _search_paths(env):
        if path.is_file():
            return path
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: not valid UTF-8 (at line {line})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's messages end with "(at line L, column C)" and never quote the text.
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _warn_if_secrets_readable(path: Path, doc: Mapping[str, Any]) -> None:
    """Warn (never fail) when a config file holding credentials can be read by other users."""
    import logging

    from gstore.log import secret_values

    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    mounts = doc.get("mounts")
    if not mode & 0o044 or not isinstance(mounts, dict):
        return
    for name, raw in mounts.items():
        options = raw.get("options") if isinstance(raw, dict) else None
        if isinstance(options, dict) and secret_values(options, env={}):
            logging.getLogger("gstore.config").warning(
                "%s holds credentials (mount %r) and other users can read it (mode %04o); "
                "run: chmod 600 %s", path, str(name), mode, path)
            return


def _check_option_table(table: Mapping[str, Any], ctx: _Context, where: str) -> dict[str, Any]:
    """Converts the MountOptions keys of ``table``; ``where`` prefixes messages."""
    result: dict[str, Any] = {}
    for key, value in table.items():
        f = _FIELDS[key]
        try:
            result[key] = f.check(value, ctx)
        except ConfigError as exc:
            raise ConfigError(f'{where}: key "{key}": {exc}') from None
    return result


def _load(
    path: Path, env: Mapping[str, str] = os.environ
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``([defaults] overrides, {mount name: entry})`` of one config file."""
    doc = _read_toml(path)
    _warn_if_secrets_readable(path, doc)
    base_dir = path.parent if path.is_absolute() else (Path.cwd() / path).parent
    ctx = _Context(base_dir, env, from_text=False)

    for key in doc:
        if key not in ("mounts", "defaults"):
            hint = _suggest(key, ["mounts", "defaults"])
            raise ConfigError(f'{path}: unknown top-level key "{key}"{hint}')

    defaults_table = doc.get("defaults", {})
    if not isinstance(defaults_table, dict):
        raise ConfigError(
            f'{path}: "defaults" must be a table ([defaults]), got {_type_name(defaults_table)}'
        )
    for key in defaults_table:
        if key not in _FIELDS:
            hint = _suggest(key, list(_FIELDS))
            if not hint and key in _ENTRY_KEYS:
                hint = f' ("{key}" belongs in a [mounts.NAME] table)'
            raise ConfigError(f'{path}: [defaults]: unknown key "{key}"{hint}')
    defaults = _check_option_table(defaults_table, ctx, f"{path}: [defaults]")

    mounts_table = doc.get("mounts", {})
    if not isinstance(mounts_table, dict):
        raise ConfigError(
            f'{path}: "mounts" must be a table of [mounts.NAME] tables, got {_type_name(mounts_table)}'
        )

    mounts: dict[str, dict[str, Any]] = {}
    for name, raw in mounts_table.items():
        where = f'{path}: mount "{name}"'
        if not _MOUNT_NAME.match(name):
            raise ConfigError(
                f'{where}: a mount name may only contain letters, digits, "_", "-" and "." '
                '(and may not start with "-" or ".")'
            )
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: must be a table ([mounts.{name}]), got {_type_name(raw)}")
        mounts[name] = _load_entry(name, raw, ctx, where)
    return defaults, mounts


def _load_entry(name: str, raw: dict[str, Any], ctx: _Context, where: str) -> dict[str, Any]:
    allowed = [*_ENTRY_KEYS, *_FIELDS]
    for key in raw:
        if key not in allowed:
            hint = _suggest(key, allowed)
            if not hint:
                hint = f" (backend options go in [mounts.{name}.options])"
            raise ConfigError(f'{where}: unknown key "{key}"{hint}')

    if "protocol" not in raw:
        raise ConfigError(
            f'{where}: missing required key "protocol" (an fsspec protocol such as "s3" or "file")'
        )
    protocol = raw["protocol"]
    if not isinstance(protocol, str):
        raise ConfigError(f'{where}: key "protocol" must be a string, got {_type_name(protocol)}')
    protocol = protocol.strip().lower()
    problem = _check_protocol(protocol)
    if problem:
        raise ConfigError(f"{where}: {problem}")

    root = raw.get("root", "")
    if not isinstance(root, str):
        raise ConfigError(f'{where}: key "root" must be a string, got {_type_name(root)}')
    try:
        if protocol in _FILE_PROTOCOLS:
            root = _clean_file_root(root, "root", ctx)
        else:
            root = _clean_key_path(root, "root")
    except ConfigError as exc:
        raise ConfigError(f'{where}: key "root": {exc}') from None

    options = raw.get("options", {})
    if not isinstance(options, dict):
        # Never echo the value: it may be a credential written in the wrong place.
        raise ConfigError(
            f'{where}: key "options" must be a table ([mounts.{name}.options]), got {_type_name(options)}'
        )

    entry: dict[str, Any] = {"protocol": protocol, "root": root, "options": _deep_copy(options)}
    if "mountpoint" in raw:
        try:
            entry["mountpoint"] = _conv_path(raw["mountpoint"], ctx)
        except ConfigError as exc:
            raise ConfigError(f'{where}: key "mountpoint": {exc}') from None
    entry.update(_check_option_table({k: v for k, v in raw.items() if k in _FIELDS}, ctx, where))
    return entry


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def load_config(path: Path) -> dict[str, dict]:
    """The validated ``[mounts.NAME]`` tables of ``path``.

    Each entry has ``protocol`` (lower case, a known fsspec protocol), ``root``
    (normalized), ``options`` (the backend kwargs), ``mountpoint`` (a Path, if
    given) and any MountOptions fields set in the table, converted to their
    types (sizes in bytes, durations in seconds, paths absolute). The whole
    file is validated, including ``[defaults]``.
    """
    return _load(Path(path))[1]


# --------------------------------------------------------------------------- built-in mounts


def _builtin_entries(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    local = _xdg_dir(env, "XDG_DATA_HOME", ".local/share") / "gstore" / "local"
    return {
        "local": {"protocol": "file", "root": str(local), "options": {}},
        "memory": {"protocol": "memory", "root": "", "options": {}},
    }


class _BuiltinMounts(Mapping[str, dict]):
    """The mounts that work without a config file (computed from the environment when read)."""

    def __getitem__(self, name: str) -> dict:
        return _builtin_entries(os.environ)[name]

    def __iter__(self) -> Iterator[str]:
        return iter(_builtin_entries(os.environ))

    def __len__(self) -> int:
        return len(_builtin_entries(os.environ))

    def __repr__(self) -> str:
        return f"BUILTIN_MOUNTS({_builtin_entries(os.environ)!r})"


BUILTIN_MOUNTS: Mapping[str, dict] = _BuiltinMounts()


# --------------------------------------------------------------------------- SPEC


def _parse_url(spec: str, scheme: str, rest: str, env: Mapping[str, str]) -> BackendSpec:
    protocol = scheme.lower()
    problem = _check_protocol(protocol)
    if problem:
        raise ConfigError(f'SPEC "{spec}": {problem}')
    if protocol in _FILE_PROTOCOLS:
        ctx = _Context(Path.cwd(), env, from_text=True)
        root = _clean_file_root(rest, f'SPEC "{spec}": path', ctx)
    else:
        root = _clean_key_path(rest, f'SPEC "{spec}": path')
    return BackendSpec(
        name="url", protocol=protocol, root=root, options=MappingProxyType({}), source="<url>"
    )


def resolve_backend(
    spec: str, config_path: Path | None, *, env: Mapping[str, str] = os.environ
) -> tuple[BackendSpec, dict[str, Any]]:
    """The backend SPEC names, and the MountOptions overrides from the config file.

    SPEC is ``NAME:`` / ``NAME:sub/path`` (a ``[mounts.NAME]`` entry, or the
    built-in ``local`` / ``memory``) or an fsspec URL (``s3://bucket/prefix``,
    ``file:///srv/data``, ``memory://``). The overrides are the ``[defaults]``
    table merged with the mount entry's own keys (entry wins), already
    converted; they are empty without a config file.
    """
    config_path = Path(config_path) if config_path is not None else None
    defaults: dict[str, Any] = {}
    mounts: dict[str, dict[str, Any]] = {}
    if config_path is not None:
        defaults, mounts = _load(config_path, env)

    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(
            "SPEC is empty: expected NAME: or NAME:sub/path (a configured mount) "
            "or a URL like s3://bucket/prefix"
        )

    if "::" in spec:
        raise ConfigError(f'SPEC "{spec}": chained fsspec URLs ("a::b://...") are not supported')
    url = _URL.match(spec)
    if url:
        return _parse_url(spec, url.group(1), url.group(2), env), dict(defaults)
    if "://" in spec:
        raise ConfigError(
            f'SPEC "{spec}": not a valid URL (expected PROTOCOL://path, e.g. s3://bucket/prefix)'
        )

    if ":" not in spec:
        hint = f' (did you mean "{spec}:"?)' if _MOUNT_NAME.match(spec) else ""
        raise ConfigError(
            f'SPEC "{spec}" is neither NAME: / NAME:sub/path nor a URL like s3://bucket/prefix{hint}'
        )
    name, _, sub = spec.partition(":")

    builtins = _builtin_entries(env)
    if name in mounts:
        entry, source = mounts[name], str(config_path)
    elif name in builtins:
        entry, source = builtins[name], "<built-in>"
    else:
        known = ", ".join(sorted(set(mounts) | set(builtins)))
        hint = ""
        if name.lower() in _known_protocols():
            hint = f'; for a URL write {name}://{sub.lstrip("/")}'
        if config_path is not None:
            raise ConfigError(f'no mount named "{name}" in {config_path} (known: {known}){hint}')
        searched = ", ".join(str(p) for p in _search_paths(env))
        raise ConfigError(
            f'no mount named "{name}": no config file found (looked for {searched}; '
            f"built-in mounts: {known}){hint}"
        )

    if sub.startswith("/"):
        raise ConfigError(
            f'SPEC "{spec}": the sub path after "{name}:" must be relative, got "{sub}"'
        )
    sub_clean = _clean_key_path(sub, f'SPEC "{spec}": sub path')
    root = _join_root(entry["protocol"], entry["root"], sub_clean)
    backend = BackendSpec(
        name=name,
        protocol=entry["protocol"],
        root=root,
        options=MappingProxyType(_deep_copy(entry.get("options", {}))),
        source=source,
    )
    overrides = dict(defaults)
    overrides.update({k: v for k, v in entry.items() if k in _FIELDS})
    return backend, overrides


# --------------------------------------------------------------------------- command line


class _ArgumentParser(argparse.ArgumentParser):
    """Raises ConfigError instead of printing usage and exiting (--help still exits)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise ConfigError(f"{message} (see gstore-mount --help)")


_EPILOG = """\
SPEC:
  NAME:              a [mounts.NAME] entry of the config file, or a built-in mount
  NAME:sub/path      the same, starting at sub/path inside its root
  PROTO://path       an fsspec URL: s3://bucket/prefix, gcs://bucket, file:///srv/data, memory://

built-in mounts (no config file needed; a config entry of the same name wins):
  local:             the folder $XDG_DATA_HOME/gstore/local (default ~/.local/share/gstore/local)
  memory:            an empty in-memory filesystem

config file lookup: --config FILE, $GSTORE_CONFIG, $XDG_CONFIG_HOME/gstore/mounts.toml
(default ~/.config/gstore/mounts.toml), /etc/gstore/mounts.toml.

precedence: built-in defaults < [defaults] < [mounts.NAME] keys < -o options < long options.
SIZE: 4096, 512K, 4M, 1.5G, 10GiB (binary multiples). DUR: seconds, or 500ms, 30s, 5m, 1h.
See docs/configuration.md for the file format.

as a mount(8) helper (fstab type fuse.gstore-mount, see docs/operations.md):
  mount -t fuse.gstore-mount NAME: /mnt/x -o config=FILE,cache_dir=DIR,allow_other
SIGTERM/SIGINT or umount: pending uploads drain (--drain-timeout), then exit; SIGUSR1: toggle --debug-requests.
"""


def build_arg_parser() -> argparse.ArgumentParser:
    """The ``gstore-mount`` parser (used for --help and by :func:`build_mount_request`)."""
    parser = _ArgumentParser(
        prog="gstore-mount",
        usage="gstore-mount [options] SPEC MOUNTPOINT",
        description="Mount S3 or any fsspec filesystem at MOUNTPOINT (FUSE), with an on-disk block cache.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "spec", metavar="SPEC", help="what to mount: NAME:, NAME:sub/path or PROTO://path (see below)"
    )
    parser.add_argument(
        "mountpoint", metavar="MOUNTPOINT", nargs="?", default=None,
        help="an existing directory to mount on (default for NAME: only: the entry's mountpoint key, "
        "else /mnt/gstore/NAME as root or ~/gstore/NAME, created if missing)",
    )
    parser.add_argument(
        "--config", metavar="FILE", default=None,
        help="config file with the [mounts.NAME] tables (default: the lookup order below)",
    )  # fmt: skip
    parser.add_argument(
        "-o", dest="o", metavar="OPT[=VAL],...", action="append", default=[],
        help="mount options, fstab-style: any long option with _ or - (cache_size=20G,allow_other), "
        "plus ro, rw, config=FILE; mount(8) options such as nodev, noatime, _netdev, nofail, "
        "x-systemd.* and comment=* are ignored; repeatable (default: none)",
    )  # fmt: skip
    for f in _FIELDS.values():
        flags = [f"--{f.name.replace('_', '-')}"]
        if f.short:
            flags.insert(0, f.short)
        text = f"{f.help} (default: {f.default_text})"
        if f.is_bool:
            parser.add_argument(
                *flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            parser.add_argument(*flags, dest=f.name, metavar=f.metavar, default=None, help=text)
    compat = parser.add_argument_group("accepted for mount(8) helper compatibility")
    compat.add_argument(
        "-n", dest="_n", action="store_true", help="ignored (mount(8): do not write /etc/mtab)"
    )
    compat.add_argument("-s", dest="sloppy", action="store_true",
                        help="sloppy: ignore unknown -o options instead of failing (default: off)")  # fmt: skip
    compat.add_argument("-v", dest="_v", action="store_true", help="ignored (mount(8): verbose)")
    compat.add_argument("-t", dest="_t", metavar="TYPE", help="ignored (mount(8): filesystem type)")
    return parser


def _parse_o(
    values: Sequence[str], ctx: _Context, *, sloppy: bool
) -> tuple[dict[str, Any], str | None]:
    """``-o`` option lists → (MountOptions overrides, config=FILE or None). Later options win."""
    result: dict[str, Any] = {}
    config: str | None = None
    for group in values:
        for item in group.split(","):
            item = item.strip()
            if not item:
                continue
            raw_key, has_value, value = item.partition("=")
            key = raw_key.strip()
            norm = key.replace("-", "_")
            if key.startswith("x-") or key == "comment" or norm in _IGNORED_O:
                continue
            if norm == "config":
                if not has_value or not value:
                    raise ConfigError("-o config needs a value (config=FILE)")
                config = value
                continue
            if norm in ("ro", "rw"):
                if has_value:
                    raise ConfigError(f'-o {key} takes no value (use "{key}" alone)')
                if norm == "ro":
                    result["read_only"] = True
                # "rw" is a no-op: mount(8) adds it to every fstab line that does not
                # say "ro", so it must not override read_only = true in the config.
                continue
            f = _FIELDS.get(norm)
            if f is None:
                if sloppy:
                    continue
                choices = [*_FIELDS, "ro", "rw", "config"]
                raise ConfigError(f'unknown -o option "{key}"{_suggest(norm, choices)}')
            if f.is_bool and not has_value:
                result[norm] = True
                continue
            if not has_value:
                raise ConfigError(f"-o {key} needs a value ({norm}={f.metavar})")
            try:
                result[norm] = f.check(value, ctx)
            except ConfigError as exc:
                raise ConfigError(f"-o {key}: {exc}") from None
    return result, config


#: Where root's mounts go when MOUNTPOINT is omitted (systemd template unit: gstore-mount@NAME).
DEFAULT_MOUNT_ROOT = Path("/mnt/gstore")


def default_mountpoint(
    spec: str, config_path: Path | None, env: Mapping[str, str] = os.environ, *, euid: int | None = None
) -> Path:
    """The mount point of ``gstore-mount NAME:`` with no MOUNTPOINT.

    The entry's ``mountpoint`` key, else ``/mnt/gstore/NAME`` for root and
    ``~/gstore/NAME`` for other users. Only for ``NAME:`` (no sub path, no URL).
    """
    name, sep, sub = spec.partition(":")
    if not sep or sub or "://" in spec or not _MOUNT_NAME.match(name):
        raise ConfigError(
            f'MOUNTPOINT is missing: it may be omitted only for a configured mount written "NAME:", '
            f'got "{spec}" (see gstore-mount --help)'
        )
    if config_path is not None:
        entry = _load(Path(config_path), env)[1].get(name)
        if entry is not None and entry.get("mountpoint") is not None:
            return Path(entry["mountpoint"])
    if (os.geteuid() if euid is None else euid) == 0:
        return DEFAULT_MOUNT_ROOT / name
    return _home(env) / "gstore" / name


def planned_mountpoint(argv: Sequence[str], env: Mapping[str, str] = os.environ) -> tuple[Path, bool] | None:
    """``(mount point, derived)`` that ``gstore-mount ARGV`` would use, or None if ARGV is invalid.

    No side effects; lets the caller prepare the directory before :func:`build_mount_request`.
    """
    try:
        args = build_arg_parser().parse_intermixed_args(list(argv))
        ctx = _Context(Path.cwd(), env, from_text=True)
        if args.mountpoint is not None:
            return _expand_path(args.mountpoint, ctx), False
        _, o_config = _parse_o(args.o, ctx, sloppy=True)
        config_path = find_config(args.config if args.config is not None else o_config, env)
        return default_mountpoint(args.spec, config_path, env), True
    except (ConfigError, SystemExit):
        return None


def _check_mountpoint(text: str, env: Mapping[str, str]) -> Path:
    if not text.strip():
        raise ConfigError("MOUNTPOINT is empty")
    path = _expand_path(text, _Context(Path.cwd(), env, from_text=True))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConfigError(f"mountpoint {path} does not exist (create it with: mkdir -p {path})") from None
    except OSError as exc:
        stale = exc.errno in (errno.ENOTCONN, errno.EIO)
        hint = f" (a stale mount? try: fusermount3 -u {path})" if stale else ""
        raise ConfigError(f"mountpoint {path}: {exc.strerror or exc}{hint}") from None
    if not stat.S_ISDIR(mode):
        raise ConfigError(f"mountpoint {path} is not a directory")
    return path


def build_mount_request(argv: Sequence[str], env: Mapping[str, str] = os.environ) -> MountRequest:
    """Everything ``gstore-mount ARGV`` asks for, validated. Raises ConfigError on any mistake."""
    parser = build_arg_parser()
    args = parser.parse_intermixed_args(list(argv))
    cli_ctx = _Context(Path.cwd(), env, from_text=True)

    o_values, o_config = _parse_o(args.o, cli_ctx, sloppy=args.sloppy)
    config_path = find_config(args.config if args.config is not None else o_config, env)
    backend, overrides = resolve_backend(args.spec, config_path, env=env)

    values: dict[str, Any] = {"cache_dir": _default_cache_dir(env)}
    values.update(overrides)
    values.update(o_values)
    for name, f in _FIELDS.items():
        given = getattr(args, name)
        if given is None:
            continue
        flag = f"--{name.replace('_', '-')}"
        try:
            values[name] = f.check(given, cli_ctx)
        except ConfigError as exc:
            raise ConfigError(f"{flag}: {exc}") from None

    options = MountOptions(**values)
    if options.cache_size < options.block_size:
        raise ConfigError(
            f"cache_size ({options.cache_size} bytes) must be at least "
            f"block_size ({options.block_size} bytes)"
        )
    virtual_dirs = [d for d in (options.concat_dir, options.diff_dir, options.versions_dir, options.zip_dir) if d]
    if len(set(virtual_dirs)) != len(virtual_dirs):
        raise ConfigError(
            f"concat_dir, diff_dir, versions_dir and zip_dir must be different names, got "
            f"{options.concat_dir!r}, {options.diff_dir!r}, {options.versions_dir!r}, {options.zip_dir!r}"
        )
    if args.mountpoint is None:
        derived = default_mountpoint(args.spec, config_path, env)
        try:
            mountpoint = _check_mountpoint(str(derived), env)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc}; it is the mount point of {args.spec} when MOUNTPOINT is omitted (see gstore-mount --help)"
            ) from None
    else:
        mountpoint = _check_mountpoint(args.mountpoint, env)
    return MountRequest(
        backend=backend, mountpoint=mountpoint, options=options, config_path=config_path
    )
