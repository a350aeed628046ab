"""MIME types and MD5 digests for files of the mount, from S3 metadata.

:func:`guess_mimetype` prefers the object's own ``Content-Type`` when it says
something (not empty, not one of :data:`GENERIC_CONTENT_TYPES` that S3 clients
put on anything), else guesses from the name with the standard library's
built-in table (not the host's ``/etc/mime.types``, so the answer does not
depend on the machine) plus :data:`EXTRA_TYPES`, else
``application/octet-stream``. Compressed names map to the compression's type
(``x.tar.gz`` → ``application/gzip``) because that is what the bytes are.

:func:`md5_from_etag` gives an object's MD5 when its ETag is one. S3's ETag is
the hex MD5 of the content only for objects uploaded in a single part (PUT,
POST, single-part copy) and stored unencrypted or with SSE-S3 (``AES256``).
It is *not* an MD5 for:

* multipart uploads: ``<hex>-<parts>`` (recognizable, returns None);
* SSE-KMS (``x-amz-server-side-encryption: aws:kms`` or ``aws:kms:dsse``)
  and SSE-C (``x-amz-server-side-encryption-customer-algorithm`` present):
  the ETag is 32 hex digits but not the MD5, and only those headers tell.
  Pass them as ``sse`` / ``sse_customer_algorithm`` (from HEAD or GET; a
  listing does not carry them), and the function returns None.

Other S3 implementations may differ (some always use a random or content-hash
ETag); callers that need certainty must verify.
"""

from __future__ import annotations

import mimetypes
import re

#: Content-Types that carry no information (S3 and SDK defaults).
GENERIC_CONTENT_TYPES = frozenset(
    {
        "binary/octet-stream",
        "application/octet-stream",
        "application/unknown",
        "application/x-unknown",
        "unknown/unknown",
    }
)

DEFAULT_MIMETYPE = "application/octet-stream"

#: Extensions the standard table lacks or gets wrong for our purposes.
EXTRA_TYPES: dict[str, str] = {
    ".m3u8": "application/vnd.apple.mpegurl",
    ".m3u": "audio/x-mpegurl",
    ".ts": "video/mp2t",
    ".m4s": "video/iso.segment",
    ".mpd": "application/dash+xml",
    ".mkv": "video/x-matroska",
    ".mka": "audio/x-matroska",
    ".webm": "video/webm",
    ".weba": "audio/webm",
    ".flac": "audio/flac",
    ".opus": "audio/opus",
    ".ogg": "audio/ogg",
    ".m4a": "audio/mp4",
    ".m4v": "video/mp4",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".toml": "application/toml",
    ".yaml": "application/yaml",
    ".yml": "application/yaml",
    ".json": "application/json",
    ".jsonl": "application/jsonl",
    ".ndjson": "application/x-ndjson",
    ".parquet": "application/vnd.apache.parquet",
    ".avro": "application/avro",
    ".orc": "application/x-orc",
    ".arrow": "application/vnd.apache.arrow.file",
    ".feather": "application/vnd.apache.arrow.file",
    ".csv": "text/csv",
    ".tsv": "text/tab-separated-values",
    ".log": "text/plain",
    ".ini": "text/plain",
    ".cfg": "text/plain",
    ".conf": "text/plain",
    ".rst": "text/x-rst",
    ".py": "text/x-python",
    ".sh": "application/x-sh",
    ".rs": "text/x-rust",
    ".go": "text/x-go",
    ".ipynb": "application/x-ipynb+json",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".heic": "image/heic",
    ".wasm": "application/wasm",
    ".woff2": "font/woff2",
    ".7z": "application/x-7z-compressed",
    ".zst": "application/zstd",
    ".gz": "application/gzip",
    ".tgz": "application/gzip",
    ".bz2": "application/x-bzip2",
    ".xz": "application/x-xz",
    ".lz4": "application/x-lz4",
    ".br": "application/x-brotli",
    ".zip": "application/zip",
}

# Built-in table only, independent of the host's mime.types files.
_TABLE = mimetypes.MimeTypes(filenames=())
_ENCODING_TYPES = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "compress": "application/x-compress",
    "br": "application/x-brotli",
}
_MD5_RE = re.compile(r"[0-9a-fA-F]{32}")


def _suffix(name: str) -> str:
    """The last extension of the last component, as written ("" if none)."""
    base = name.rsplit("/", 1)[-1]
    dot = base.rfind(".")
    if dot <= 0:  # no dot, or a dot file such as ".bashrc"
        return ""
    return base[dot:]


def is_generic(content_type: str | None) -> bool:
    """True when ``content_type`` says nothing about the content."""
    if content_type is None:
        return True
    essence = content_type.split(";", 1)[0].strip().lower()
    return essence == "" or essence in GENERIC_CONTENT_TYPES


def guess_mimetype(name: str, content_type: str | None) -> str:
    """The MIME type of the file ``name`` (a file name or path) whose object
    has ``content_type`` (None when unknown)."""
    if not is_generic(content_type):
        assert content_type is not None
        return content_type.strip()
    written = _suffix(name)
    if not written:
        return DEFAULT_MIMETYPE
    suffix = written.lower()
    if suffix in EXTRA_TYPES:
        return EXTRA_TYPES[suffix]
    encoding = _TABLE.encodings_map.get(written) or _TABLE.encodings_map.get(suffix)
    if encoding is not None:
        return _ENCODING_TYPES.get(encoding, DEFAULT_MIMETYPE)
    loose, strict = _TABLE.types_map  # (non-strict, strict)
    return strict.get(suffix) or loose.get(suffix) or DEFAULT_MIMETYPE


def md5_from_etag(
    etag: str | None,
    sse: str | None = None,
    sse_customer_algorithm: str | None = None,
) -> str | None:
    """The lowercase hex MD5 of the object when its ETag is one, else None.

    ``etag`` may be quoted (``"..."``) or weak (``W/"..."``). ``sse`` is the
    ``x-amz-server-side-encryption`` value and ``sse_customer_algorithm`` the
    ``x-amz-server-side-encryption-customer-algorithm`` value, when known:
    with KMS or customer-key encryption the ETag is not an MD5.
    """
    if etag is None:
        return None
    if sse is not None and sse.strip().lower().startswith("aws:kms"):
        return None
    if sse_customer_algorithm:
        return None
    value = etag.strip()
    if value.startswith("W/"):
        value = value[2:]
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if _MD5_RE.fullmatch(value) is None:
        return None
    return value.lower()
