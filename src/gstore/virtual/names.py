"""Names of the hidden virtual files, parsed into typed references.

Every directory ``D`` of the mount (the root included) has four hidden virtual
directories. They are reachable by path but never listed, and readdir of the
virtual directory itself returns no entries (only ``.`` and ``..``).

``D/.concat/A+B+C``
    Read-only file: the bytes of ``D/A``, ``D/B`` and ``D/C``, in that order.
    The name is split on ``+``; each part is a path relative to ``D`` in which
    ``%2F`` stands for ``/``, ``%2B`` for ``+`` and ``%25`` for ``%`` (hex digits
    in either case). No other escape exists: a ``%`` that does not start one of
    these three is an error (EINVAL), so ``%2E%2E`` is refused rather than
    meaning ``..``, and a file called ``100%.txt`` is written ``100%25.txt``.
    Spaces and every other character need no escaping.

``D/.concat/@M``
    Read-only file: the concatenation of the files listed in ``D/M`` (a
    manifest). ``M`` is %-decoded like a part, so it may live in a subfolder or
    be a version (``@.versions%2Findex.m3u8%2F-2``). A name starting with ``@``
    is always a manifest reference and takes exactly one path (an unescaped
    ``+`` after it is EINVAL); to concatenate a real file whose name starts with
    ``@``, write it as ``.%2F@name`` (:func:`concat_name` does this).
    Manifest rules (:func:`parse_manifest`, :func:`resolve_manifest`):

    * UTF-8 text (a leading BOM is ignored), one path per line; ``\\n`` or
      ``\\r\\n`` line ends; leading and trailing ASCII whitespace of a line is
      stripped (so a listed name cannot start or end with whitespace).
    * Blank lines and lines starting with ``#`` (HLS tags such as ``#EXTINF``,
      comments) are ignored, so an HLS media playlist works as is:
      ``ffmpeg -i MNT/hls/.concat/@index.m3u8``.
    * Every other line is a plain path relative to ``D`` (the directory holding
      the ``.concat`` directory, *not* the manifest's own folder; the two are
      the same in the ``D/.concat/@index.m3u8`` form). Lines are **not**
      %-decoded: ``a%2Fb`` names a file literally called ``a%2Fb``. ``..`` may
      move between folders of the mount, and a line may name a version
      (``.versions/seg1.ts/-2``).
    * A line that is a URL (``scheme://...``) is refused with EINVAL; a line
      that is an absolute path (starts with ``/``) with EACCES. The error
      message names the 1-based line number. Query strings and fragments are
      not special: ``seg.ts?x=1`` names a file called exactly that.
    * HLS fMP4 playlists: ``#EXT-X-MAP:URI="init.mp4"`` (the media
      initialization section) is honoured. Its file comes right before the
      first segment line after the tag, and again before a later segment only
      when a different ``EXT-X-MAP`` applies to it (the same URI repeated is
      not repeated). A map that no segment follows adds nothing. The URI is
      checked like any line (relative path, not %-decoded). ``EXT-X-MAP`` with
      ``BYTERANGE``, a map without ``URI``, and ``#EXT-X-BYTERANGE`` segments
      are refused with EINVAL: a ``.concat`` joins whole files only.
    * At most ``MANIFEST_MAX_ENTRIES`` entries (E2BIG beyond) and
      ``MANIFEST_MAX_BYTES`` bytes of manifest (EFBIG beyond). A manifest with
      no entries gives an empty file.

``D/.diff/A+B``
    Read-only file: the unified diff of ``D/A`` and ``D/B`` (see
    :mod:`gstore.virtual.diff`). Exactly two parts, escaped as for ``.concat``;
    ``@`` has no special meaning here.

``D/.versions/NAME/`` and ``D/.versions/NAME/V``
    A read-only directory with one file per version of ``D/NAME``, and one of
    those files (see :mod:`gstore.virtual.versions` for the names and the
    ``-1``, ``-2``... aliases). ``NAME`` and ``V`` are literal file names (no
    %-decoding: use ``D/sub/.versions/NAME`` for a file of a subfolder).

``D/.zip/F.zip``
    Read-only file: a STORED (uncompressed) zip archive of the regular files
    under the folder ``D/F``, recursively, named relative to ``D/F`` (see
    :mod:`gstore.virtual.zipview`). The name must end with ``.zip``; what is
    before it is %-decoded like a ``.concat`` part (``a%2Fb.zip`` is the
    folder ``D/a/b``), and ``.`` is ``D`` itself (``D/.zip/..zip``). The
    folder may not be (or be inside) a virtual directory (EINVAL).

Parts of ``.concat`` and ``.diff`` names, manifest paths and manifest lines
may be version paths (``.diff/.versions%2Fconfig.json%2F-2+config.json``) but
not other ``.concat``/``.diff``/``.zip`` files (EINVAL: no nesting, hence no cycles).
A part that names a virtual *directory* (``.concat``, ``.versions``,
``.versions/NAME``) or the mount root is EISDIR.

Path resolution and errors
    Paths are resolved lexically (``a/../b`` is ``b`` whether or not ``a``
    exists) and always inside the mount: ``..`` may move between folders but
    never above the root. Whatever the encoding (``..%2F..%2Fetc``, a leading
    ``%2F``, a leading ``/`` in a manifest), a path that would leave the mount
    is refused with **EACCES**; there is no way to name anything outside.
    The errnos are, consistently:

    * ``EACCES``: the path would leave the mount (``..`` above the root, or an
      absolute path).
    * ``EINVAL``: malformed: NUL character, empty component (``a//b``, trailing
      ``/``), empty part (``a++b``, ``+a``), bad ``%`` escape, wrong number of
      parts for ``.diff`` or ``@``, nested ``.concat``/``.diff``, URL in a
      manifest, manifest not UTF-8.
    * ``ENOTDIR``: a path continues below a virtual *file*
      (``.concat/a+b/x``, ``.diff/a+b/x``, ``.versions/f/-1/x``).
    * ``EISDIR``: a part names a directory that is known to be one here.
    * ``ENOENT``: ``.versions/NAME`` where ``NAME`` is itself a virtual name.

    All errors are :class:`VirtualPathError`, an ``OSError`` whose ``errno``
    :func:`gstore.errors.to_errno` passes through.

Configurable names
    :class:`VirtualNames` maps each role (``concat``, ``diff``, ``versions``, ``zip``)
    to its directory name, or ``None`` to disable the role, because real
    objects with those names may exist. An enabled virtual name shadows a real
    object of the same name in every directory.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import ClassVar, Literal

Role = Literal["concat", "diff", "versions", "zip"]
ROLES: tuple[Role, ...] = ("concat", "diff", "versions", "zip")

#: Manifests longer than this many bytes are refused with EFBIG.
MANIFEST_MAX_BYTES = 4 * 1024 * 1024
#: Manifests with more entries than this are refused with E2BIG (each entry
#: costs a stat of the listed file).
MANIFEST_MAX_ENTRIES = 10_000

_ESCAPES = {"2F": "/", "2B": "+", "25": "%"}
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_MANIFEST_STRIP = " \t\r\n\f\v"


class VirtualPathError(OSError):
    """A virtual path is malformed or points outside the mount.

    ``errno`` is one of EACCES, EINVAL, ENOTDIR, EISDIR, ENOENT, EFBIG or E2BIG
    (see the module documentation); ``strerror`` is a readable message.
    """

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


def _fail(err: int, message: str) -> VirtualPathError:
    return VirtualPathError(err, message)


# -- configuration -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VirtualNames:
    """The directory name of each virtual role; ``None`` disables the role."""

    concat: str | None = ".concat"
    diff: str | None = ".diff"
    versions: str | None = ".versions"
    zip: str | None = ".zip"

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for f in fields(self):
            name = getattr(self, f.name)
            if name is None:
                continue
            if not isinstance(name, str):
                raise TypeError(f"virtual name for {f.name} must be a string or None, not {name!r}")
            if name in ("", ".", "..") or "/" in name or "\0" in name:
                raise ValueError(f"invalid virtual name for {f.name}: {name!r}")
            if name in seen:
                raise ValueError(f"virtual name {name!r} used for both {seen[name]} and {f.name}")
            seen[name] = f.name

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str | None]) -> VirtualNames:
        """Build from a role → name mapping (e.g. configuration); roles not in
        the mapping keep their default name. Unknown roles are a ValueError."""
        unknown = set(mapping) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown virtual roles: {sorted(unknown)}; known: {list(ROLES)}")
        return cls(**dict(mapping))

    @classmethod
    def disabled(cls) -> VirtualNames:
        return cls(concat=None, diff=None, versions=None, zip=None)

    def role_of(self, name: str) -> Role | None:
        """The role whose directory is called ``name``, or None."""
        if name == self.concat:
            return "concat"
        if name == self.diff:
            return "diff"
        if name == self.versions:
            return "versions"
        if name == self.zip:
            return "zip"
        return None

    def name_of(self, role: Role) -> str | None:
        value: str | None = getattr(self, role)
        return value

    def enabled(self) -> dict[Role, str]:
        """Role → name of the enabled roles."""
        return {role: name for role in ROLES if (name := self.name_of(role)) is not None}


# -- references --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VirtualDirRef:
    """``D/.concat``, ``D/.diff`` or ``D/.versions`` itself (an empty directory)."""

    role: Role
    base_dir: str  # D, mount-relative, "" for the root
    path: str  # the normalized path that was parsed


@dataclass(frozen=True, slots=True)
class ConcatRef:
    """``D/.concat/A+B+...``: ``parts`` are normalized mount-relative paths."""

    role: ClassVar[Role] = "concat"
    base_dir: str
    parts: tuple[str, ...]  # at least one
    path: str


@dataclass(frozen=True, slots=True)
class ConcatManifestRef:
    """``D/.concat/@M``: read ``manifest``, then :func:`resolve_manifest` with
    ``base_dir`` gives the parts."""

    role: ClassVar[Role] = "concat"
    base_dir: str
    manifest: str  # normalized mount-relative path of M
    path: str


@dataclass(frozen=True, slots=True)
class DiffRef:
    """``D/.diff/A+B``. ``a``/``b`` are normalized mount-relative paths;
    ``a_label``/``b_label`` are the parts as written (decoded, relative to D),
    for the diff header, as ``cd D && diff -u A B`` would print them."""

    role: ClassVar[Role] = "diff"
    base_dir: str
    a: str
    b: str
    a_label: str
    b_label: str
    path: str


@dataclass(frozen=True, slots=True)
class VersionsDirRef:
    """``D/.versions/NAME``: the directory of the versions of ``target``."""

    role: ClassVar[Role] = "versions"
    base_dir: str
    name: str
    target: str  # D/NAME, mount-relative
    path: str


@dataclass(frozen=True, slots=True)
class VersionRef:
    """``D/.versions/NAME/V``: one version of ``target``; ``version`` is the
    entry name or alias, to resolve with :class:`gstore.virtual.versions.VersionTable`."""

    role: ClassVar[Role] = "versions"
    base_dir: str
    name: str
    target: str
    version: str
    path: str


@dataclass(frozen=True, slots=True)
class ZipRef:
    """``D/.zip/F.zip``: a zip archive of the files under ``folder`` (normalized,
    mount-relative; ``""`` is the mount root)."""

    role: ClassVar[Role] = "zip"
    base_dir: str
    folder: str
    path: str


VirtualRef = VirtualDirRef | ConcatRef | ConcatManifestRef | DiffRef | VersionsDirRef | VersionRef | ZipRef


# -- path helpers ------------------------------------------------------------------


def _check_base_dir(base_dir: str) -> list[str]:
    if base_dir == "":
        return []
    if "\0" in base_dir:
        raise _fail(errno.EINVAL, "base directory contains a NUL character")
    comps = base_dir.split("/")
    for comp in comps:
        if comp in ("", ".", ".."):
            raise _fail(
                errno.EINVAL, f"base directory is not a normalized mount path: {base_dir!r}"
            )
    return comps


def _normalize(base: list[str], rel: str) -> list[str]:
    if rel == "":
        raise _fail(errno.EINVAL, "empty path")
    if "\0" in rel:
        raise _fail(errno.EINVAL, f"path contains a NUL character: {rel!r}")
    if rel.startswith("/"):
        raise _fail(
            errno.EACCES,
            f"absolute paths are not allowed (paths are relative to the folder): {rel!r}",
        )
    stack = list(base)
    for comp in rel.split("/"):
        if comp == "":
            raise _fail(errno.EINVAL, f"empty path component in {rel!r}")
        if comp == ".":
            continue
        if comp == "..":
            if not stack:
                raise _fail(errno.EACCES, f"path leaves the mount root: {rel!r}")
            stack.pop()
            continue
        stack.append(comp)
    return stack


def resolve_relative(base_dir: str, rel: str) -> str:
    """Join ``rel`` to the mount-relative directory ``base_dir`` and normalize.

    ``.`` components are dropped and ``..`` removes the previous component,
    lexically. Returns a mount-relative path without leading or trailing ``/``
    (``""`` is the mount root). Raises :class:`VirtualPathError`: EACCES if
    ``rel`` is absolute or ``..`` would go above the root; EINVAL if ``rel`` is
    empty or has an empty component or a NUL (or ``base_dir`` is not
    normalized).
    """
    return "/".join(_normalize(_check_base_dir(base_dir), rel))


def decode_part(text: str) -> str:
    """Undo the ``%2F``/``%2B``/``%25`` escapes of one part; any other ``%``
    is EINVAL."""
    if "%" not in text:
        return text
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c != "%":
            j = text.find("%", i)
            if j < 0:
                j = n
            out.append(text[i:j])
            i = j
            continue
        code = text[i + 1 : i + 3].upper()
        if code not in _ESCAPES:
            raise _fail(
                errno.EINVAL,
                f"invalid escape {text[i : i + 3]!r} in {text!r}: "
                "only %2F (/), %2B (+) and %25 (%) are allowed",
            )
        out.append(_ESCAPES[code])
        i += 3
    return "".join(out)


def encode_part(path: str) -> str:
    """The escaped form of one part: ``decode_part(encode_part(p)) == p``."""
    return path.replace("%", "%25").replace("/", "%2F").replace("+", "%2B")


def concat_name(parts: Sequence[str]) -> str:
    """The ``.concat`` file name for ``parts`` (paths relative to D)."""
    if not parts or any(p == "" for p in parts):
        raise ValueError("concat_name needs at least one non-empty part")
    name = "+".join(encode_part(p) for p in parts)
    return ".%2F" + name if name.startswith("@") else name


def manifest_name(manifest: str) -> str:
    """The ``.concat`` file name for the manifest ``manifest`` (relative to D)."""
    if manifest == "":
        raise ValueError("manifest path must not be empty")
    return "@" + encode_part(manifest)


def diff_name(a: str, b: str) -> str:
    """The ``.diff`` file name comparing ``a`` and ``b`` (relative to D)."""
    if a == "" or b == "":
        raise ValueError("diff_name needs two non-empty paths")
    return encode_part(a) + "+" + encode_part(b)


# -- parsing -----------------------------------------------------------------------


def _first_virtual(comps: list[str], names: VirtualNames) -> tuple[int, Role] | None:
    for index, comp in enumerate(comps):
        role = names.role_of(comp)
        if role is not None:
            return index, role
    return None


def _check_part(resolved: list[str], names: VirtualNames, what: str) -> str:
    """Validate a resolved part; returns it joined. A valid part is an ordinary
    path or a version file."""
    path = "/".join(resolved)
    if not resolved:
        raise _fail(errno.EISDIR, f"{what} is the mount root, a directory")
    found = _first_virtual(resolved, names)
    if found is None:
        return path
    index, role = found
    rest = resolved[index + 1 :]
    if role != "versions":
        if not rest:
            raise _fail(errno.EISDIR, f"{what} {path!r} is a virtual directory")
        raise _fail(errno.EINVAL, f"{what} {path!r}: virtual .concat/.diff/.zip files cannot be nested")
    try:
        ref = _parse_components(resolved, names)
    except VirtualPathError as exc:
        raise _fail(exc.errno or errno.EINVAL, f"{what}: {exc.strerror}") from None
    if isinstance(ref, VersionRef):
        return path
    raise _fail(errno.EISDIR, f"{what} {path!r} is a virtual directory")


def _split_parts(name: str) -> list[str]:
    raw = name.split("+")
    for index, part in enumerate(raw, 1):
        if part == "":
            raise _fail(errno.EINVAL, f"empty part {index} in {name!r}")
    return raw


def _resolve_part(base: list[str], raw: str, names: VirtualNames, what: str) -> tuple[str, str]:
    """(decoded text, resolved path) of one escaped part."""
    try:
        decoded = decode_part(raw)
        resolved = _normalize(base, decoded)
    except VirtualPathError as exc:
        raise _fail(exc.errno or errno.EINVAL, f"{what}: {exc.strerror}") from None
    return decoded, _check_part(resolved, names, what)


def _parse_components(comps: list[str], names: VirtualNames) -> VirtualRef | None:
    found = _first_virtual(comps, names)
    if found is None:
        return None
    index, role = found
    base = comps[:index]
    base_dir = "/".join(base)
    path = "/".join(comps)
    rest = comps[index + 1 :]
    if not rest:
        return VirtualDirRef(role, base_dir, path)
    if role == "versions":
        if len(rest) > 2:
            raise _fail(
                errno.ENOTDIR,
                f"{path!r}: {'/'.join(comps[: index + 3])!r} is a file, not a directory",
            )
        name = rest[0]
        if names.role_of(name) is not None:
            raise _fail(errno.ENOENT, f"{path!r}: {name!r} is a virtual name and has no versions")
        target = "/".join([*base, name])
        if len(rest) == 1:
            return VersionsDirRef(base_dir, name, target, path)
        return VersionRef(base_dir, name, target, rest[1], path)
    if len(rest) > 1:
        raise _fail(
            errno.ENOTDIR, f"{path!r}: {'/'.join(comps[: index + 2])!r} is a file, not a directory"
        )
    name = rest[0]
    if role == "zip":
        return _parse_zip(base, name, path, names)
    if role == "concat":
        if name.startswith("@"):
            raw = name[1:]
            if raw == "":
                raise _fail(errno.EINVAL, f"{path!r}: '@' must be followed by the manifest path")
            if "+" in raw:
                raise _fail(
                    errno.EINVAL,
                    f"{path!r}: a manifest reference takes exactly one path (escape '+' as %2B)",
                )
            _, manifest = _resolve_part(base, raw, names, "manifest")
            return ConcatManifestRef(base_dir, manifest, path)
        parts = tuple(
            _resolve_part(base, raw, names, f"part {i}")[1]
            for i, raw in enumerate(_split_parts(name), 1)
        )
        return ConcatRef(base_dir, parts, path)
    # diff
    raw_parts = _split_parts(name)
    if len(raw_parts) != 2:
        raise _fail(
            errno.EINVAL,
            f"{path!r}: a diff takes exactly two parts A+B, not {len(raw_parts)} "
            "(escape '+' as %2B)",
        )
    a_label, a = _resolve_part(base, raw_parts[0], names, "part 1")
    b_label, b = _resolve_part(base, raw_parts[1], names, "part 2")
    return DiffRef(base_dir, a, b, a_label, b_label, path)


ZIP_SUFFIX = ".zip"


def _parse_zip(base: list[str], name: str, path: str, names: VirtualNames) -> ZipRef:
    if not name.endswith(ZIP_SUFFIX) or name == ZIP_SUFFIX:
        raise _fail(errno.EINVAL, f"{path!r}: a zip view is named FOLDER.zip (FOLDER relative to the folder)")
    try:
        folder = _normalize(base, decode_part(name[: -len(ZIP_SUFFIX)]))
    except VirtualPathError as exc:
        raise _fail(exc.errno or errno.EINVAL, f"{path!r}: {exc.strerror}") from None
    if _first_virtual(folder, names) is not None:
        raise _fail(errno.EINVAL, f"{path!r}: a virtual directory cannot be zipped")
    return ZipRef("/".join(base), "/".join(folder), path)


def zip_name(folder: str) -> str:
    """The ``.zip`` file name of ``folder`` (relative to D; ``.`` is D itself)."""
    if folder == "":
        raise ValueError("zip_name needs a folder ('.' for D itself)")
    return encode_part(folder) + ZIP_SUFFIX


def parse_virtual_path(path: str, names: VirtualNames) -> VirtualRef | None:
    """Classify a mount-relative path (``"a/b/.concat/x+y"``, ``""`` = root).

    Returns None for an ordinary path (no enabled virtual name among its
    components), else a typed reference. The first component that is an
    enabled virtual name decides: the components before it are D. The path
    itself is normalized like a part (``.``/``..`` resolved lexically, never
    above the root) and must not start with ``/``.

    Guarantees: every path in the result (``base_dir``, ``parts``, ``a``,
    ``b``, ``manifest``, ``target``) is a normalized mount-relative path
    inside the mount; each of ``parts``/``a``/``b``/``manifest``, given back to
    this function, returns None or a :class:`VersionRef` without raising.
    Raises only :class:`VirtualPathError`.
    """
    if path == "":
        return None
    comps = _normalize([], path)
    return _parse_components(comps, names)


# -- manifests ---------------------------------------------------------------------


_HLS_MAP = "#EXT-X-MAP:"
_HLS_BYTERANGE = "#EXT-X-BYTERANGE"
_HLS_ATTRIBUTE_RE = re.compile(r'[ \t]*([A-Z0-9-]+)=("[^"\r\n]*"|[^",\s]*)[ \t]*(?:,|$)')


def _hls_attributes(text: str, number: int, tag: str) -> dict[str, str]:
    """The attribute list of an HLS tag (``NAME=VALUE,NAME="quoted"``), quotes removed."""
    attributes: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = _HLS_ATTRIBUTE_RE.match(text, position)
        if match is None:
            raise _fail(errno.EINVAL, f"manifest line {number}: malformed {tag} attribute list: {text!r}")
        value = match.group(2)
        attributes[match.group(1)] = value[1:-1] if value.startswith('"') else value
        position = match.end()
    return attributes


def _check_manifest_path(line: str, number: int) -> None:
    if "\0" in line:
        raise _fail(errno.EINVAL, f"manifest line {number}: contains a NUL character")
    if _URL_RE.match(line):
        raise _fail(
            errno.EINVAL,
            f"manifest line {number}: URLs are not supported, "
            f"only paths relative to the folder: {line!r}",
        )
    if line.startswith("/"):
        raise _fail(
            errno.EACCES,
            f"manifest line {number}: absolute paths are not allowed, "
            f"only paths relative to the folder: {line!r}",
        )


def _hls_map_uri(line: str, number: int) -> str:
    """The file an ``#EXT-X-MAP:`` line names (BYTERANGE refused: whole files only)."""
    attributes = _hls_attributes(line[len(_HLS_MAP):], number, "EXT-X-MAP")
    if "BYTERANGE" in attributes:
        raise _fail(
            errno.EINVAL,
            f"manifest line {number}: EXT-X-MAP with BYTERANGE is not supported "
            "(a .concat joins whole files; keep the init segment in a file of its own)",
        )
    uri = attributes.get("URI", "").strip(_MANIFEST_STRIP)
    if not uri:
        raise _fail(errno.EINVAL, f"manifest line {number}: EXT-X-MAP without a URI")
    _check_manifest_path(uri, number)
    return uri


def _manifest_entries(text: str | bytes, max_entries: int) -> list[tuple[int, str]]:
    """(1-based line number, entry) of each entry of a manifest.

    An ``#EXT-X-MAP`` init segment is an entry too, numbered by its tag's line,
    placed before the first segment it applies to (see the module documentation).
    """
    if isinstance(text, bytes):
        if len(text) > MANIFEST_MAX_BYTES:
            raise _fail(errno.EFBIG, f"manifest is larger than {MANIFEST_MAX_BYTES} bytes")
        try:
            decoded = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            bad_line = text[: exc.start].count(b"\n") + 1
            raise _fail(errno.EINVAL, f"manifest line {bad_line}: not UTF-8 text") from None
    else:
        decoded = text[1:] if text.startswith("\ufeff") else text
    entries: list[tuple[int, str]] = []

    def add(number: int, entry: str) -> None:
        if len(entries) >= max_entries:
            raise _fail(errno.E2BIG, f"manifest has more than {max_entries} entries")
        entries.append((number, entry))

    current_map: tuple[int, str] | None = None  # the EXT-X-MAP in force: (line, URI)
    emitted_map: str | None = None  # the init segment the joined bytes last carried
    for number, raw in enumerate(decoded.split("\n"), 1):
        line = raw.strip(_MANIFEST_STRIP)
        if line.startswith(_HLS_MAP):
            current_map = (number, _hls_map_uri(line, number))
            continue
        if line.startswith(_HLS_BYTERANGE):
            raise _fail(
                errno.EINVAL,
                f"manifest line {number}: EXT-X-BYTERANGE segments are not supported "
                "(a .concat joins whole files)",
            )
        if line == "" or line.startswith("#"):
            continue
        _check_manifest_path(line, number)
        if current_map is not None and current_map[1] != emitted_map:
            add(*current_map)
            emitted_map = current_map[1]
        add(number, line)
    return entries


def parse_manifest(text: str | bytes, *, max_entries: int = MANIFEST_MAX_ENTRIES) -> list[str]:
    """The entries of a manifest, in order, as written (not resolved).

    ``bytes`` are decoded as UTF-8 (BOM ignored; EINVAL if invalid; EFBIG over
    ``MANIFEST_MAX_BYTES``). See the module documentation for the line rules.
    Errors are :class:`VirtualPathError` naming the 1-based line number.
    """
    return [entry for _, entry in _manifest_entries(text, max_entries)]


def resolve_manifest(
    base_dir: str,
    text: str | bytes,
    names: VirtualNames,
    *,
    max_entries: int = MANIFEST_MAX_ENTRIES,
) -> list[str]:
    """The normalized mount-relative paths a manifest lists, relative to
    ``base_dir`` (the D of :class:`ConcatManifestRef`), each checked like a
    ``.concat`` part (inside the mount, no nested ``.concat``/``.diff``, may be
    a version). Errors name the 1-based line number."""
    base = _check_base_dir(base_dir)
    resolved: list[str] = []
    for number, entry in _manifest_entries(text, max_entries):
        try:
            resolved.append(_check_part(_normalize(base, entry), names, "entry"))
        except VirtualPathError as exc:
            raise _fail(exc.errno or errno.EINVAL, f"manifest line {number}: {exc.strerror}") from None
    return resolved
