"""Logging: one line per event, and no secret ever written.

Secrets are known values (backend options whose names look like credentials,
and the usual credential environment variables). A filter on the handler
replaces each of them in the final formatted line, so neither our own messages
nor exceptions quoted from libraries can leak them.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|private|(^|_)key$|^key$|sas|signature)", re.I)
_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
)
MASK = "***"

# Signing material that libraries print at DEBUG (botocore header dumps), whatever
# the credential source (profile files, instance metadata, SSO): masked by shape.
_SECRET_PATTERNS = (
    re.compile(r"(?i)(x-amz-security-token['\"]?\s*[:=]\s*(?:b?['\"])?)[^'\",\s}&]+"),
    re.compile(r"(?i)(x-amz-credential=|credential=)[^/,\s'\"&]+"),
    re.compile(r"(?i)((?:x-amz-)?signature=)[0-9a-f]{16,}"),
    re.compile(r"(?i)(aws_secret_access_key|aws_session_token|secret_key|session_token)(['\"]?\s*[:=]\s*(?:b?['\"])?)[^'\",\s}]+"),
)


def secret_values(options: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> set[str]:
    """Every credential-looking value in backend options (nested) and the environment."""
    found: set[str] = set()

    def walk(mapping: Mapping[str, Any]) -> None:
        for key, value in mapping.items():
            if isinstance(value, Mapping):
                walk(value)
            elif isinstance(value, str) and _SECRET_KEY.search(str(key)) and len(value) >= 4:
                found.add(value)

    walk(options)
    for name in _SECRET_ENV:
        value = env.get(name)
        if value and len(value) >= 4:
            found.add(value)
    return found


class RedactingFilter(logging.Filter):
    """Masks known secret values in the fully formatted record."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def add(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted(set(self._secrets) | {s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        for pattern in _SECRET_PATTERNS:
            text = pattern.sub(lambda m: m.group(1) + (m.group(2) if m.lastindex and m.lastindex >= 2 else "") + MASK,
                               text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = self.redact(record.getMessage())
        if record.exc_info:
            formatter = logging.Formatter()
            message += "\n" + self.redact(formatter.formatException(record.exc_info))
            record.exc_info = None
            record.exc_text = None
        record.msg, record.args = message, None
        return True


_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

redactor = RedactingFilter()


def setup_logging(
    level: str, log_file: Path | None = None, *, stderr: bool = True, stderr_level: str | None = None
) -> None:
    """Configure the root logger for the daemon (idempotent).

    ``stderr_level`` raises the threshold for the terminal only: a daemonizing
    mount shows its user warnings and errors, while the log file gets everything.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handlers: list[logging.Handler] = []
    if stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        if stderr_level and not isinstance(handler, logging.FileHandler):
            handler.setLevel(stderr_level.upper())
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.addFilter(redactor)
        root.addHandler(handler)
    root.setLevel(level.upper())
    # Library chatter (botocore request dumps can include signed headers) only on DEBUG.
    quiet = logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING
    for name in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "asyncio"):
        logging.getLogger(name).setLevel(max(quiet, logging.INFO) if name == "s3fs" else quiet)
