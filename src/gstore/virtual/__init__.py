"""Building blocks of the hidden virtual files (``.concat``, ``.diff``, ``.versions``).

Pure functions and small classes with no FUSE or backend dependency; the
filesystem layer wires them in:

* :mod:`gstore.virtual.names`: configurable names, path parsing into typed
  references, safe path resolution, manifests (the user-facing contract is
  documented there).
* :mod:`gstore.virtual.concat`: byte-range mapping and reads of a concatenation.
* :mod:`gstore.virtual.diff`: ``diff -u`` output, byte for byte.
* :mod:`gstore.virtual.versions`: names and aliases of object versions.
* :mod:`gstore.virtual.content_type`: MIME types and MD5s from S3 metadata.
* :mod:`gstore.virtual.zipview`: byte layout of a stored zip archive (``.zip``).
"""

from gstore.virtual.concat import ConcatError, ConcatLayout, read_concat
from gstore.virtual.content_type import guess_mimetype, md5_from_etag
from gstore.virtual.diff import DIFF_SIZE_LIMIT, DiffError, check_diff_sizes, unified_diff_bytes
from gstore.virtual.names import (
    ConcatManifestRef,
    ConcatRef,
    DiffRef,
    VersionRef,
    VersionsDirRef,
    VirtualDirRef,
    VirtualNames,
    VirtualPathError,
    VirtualRef,
    ZipRef,
    concat_name,
    decode_part,
    diff_name,
    encode_part,
    manifest_name,
    parse_manifest,
    parse_virtual_path,
    resolve_manifest,
    resolve_relative,
    zip_name,
)
from gstore.virtual.versions import ObjectVersion, VersionEntry, VersionNotFoundError, VersionTable
from gstore.virtual.zipview import ZipError, ZipLayout, ZipMember, ZipReader

__all__ = [
    "DIFF_SIZE_LIMIT",
    "ConcatError",
    "ConcatLayout",
    "ConcatManifestRef",
    "ConcatRef",
    "DiffError",
    "DiffRef",
    "ObjectVersion",
    "VersionEntry",
    "VersionNotFoundError",
    "VersionRef",
    "VersionTable",
    "VersionsDirRef",
    "VirtualDirRef",
    "VirtualNames",
    "VirtualPathError",
    "VirtualRef",
    "ZipError",
    "ZipLayout",
    "ZipMember",
    "ZipReader",
    "ZipRef",
    "check_diff_sizes",
    "concat_name",
    "decode_part",
    "diff_name",
    "encode_part",
    "guess_mimetype",
    "manifest_name",
    "md5_from_etag",
    "parse_manifest",
    "parse_virtual_path",
    "read_concat",
    "resolve_manifest",
    "resolve_relative",
    "unified_diff_bytes",
    "zip_name",
]
