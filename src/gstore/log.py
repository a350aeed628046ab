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
import time
from collections.abc import Callable, Iterable, Mapping
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
        # One line per event, whatever the message holds (tracebacks, names with
        # newlines): a log line is a journal entry and a grep hit on its own.
        if "\n" in message or "\r" in message:
            message = message.replace("\r", "\\r").replace("\n", " | ")
        record.msg, record.args = message, None
        return True


_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Under journald the journal adds the time; "<N>" gives each line its syslog priority.
_JOURNAL_FORMAT = "<%(priority)d>%(levelname)s %(name)s: %(message)s"
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.priority = _PRIORITIES.get(record.levelno, 6)
        return super().format(record)


def stderr_is_journal(env: Mapping[str, str] = os.environ) -> bool:
    """True when stderr is a journald stream ($JOURNAL_STREAM names its device and inode)."""
    stream = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)

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
    journal = stderr_is_journal()
    for handler in handlers:
        to_stderr = not isinstance(handler, logging.FileHandler)
        if stderr_level and to_stderr:
            handler.setLevel(stderr_level.upper())
        handler.setFormatter(_JournalFormatter(_JOURNAL_FORMAT) if to_stderr and journal else logging.Formatter(_FORMAT))
        handler.addFilter(redactor)
        root.addHandler(handler)
    root.setLevel(level.upper())
    # Library chatter (botocore request dumps can include signed headers) only on DEBUG.
    quiet = logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING
    for name in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "asyncio"):
        logging.getLogger(name).setLevel(max(quiet, logging.INFO) if name == "s3fs" else quiet)


# --------------------------------------------------------------------------- per-request tracing

requests_log = logging.getLogger("gstore.requests")


def _short(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, str):
        return repr(value if len(value) <= 200 else value[:200] + "...")
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return f"<{type(value).__name__} of {len(value)}>"
    path = getattr(value, "path", None)  # ObjectInfo-like, StagedFile, ...
    if isinstance(path, str):
        return f"<{type(value).__name__} {path!r}>"
    return f"<{type(value).__name__}>"


class RequestTracer:
    """One DEBUG line per kernel request and per backend request, switchable at run time.

    Switching on replaces the watched methods with logging wrappers *on the
    instance* (the class is untouched); switching off removes them again, so
    a mount that is not being traced pays nothing.
    """

    def __init__(self) -> None:
        self.enabled = False
        self._patches: list[tuple[object, str, Callable[[Any], Any]]] = []

    def watch(self, obj: object, names: Iterable[str], make: Callable[[str, Any], Any]) -> None:
        """Trace ``obj.NAME`` for each name; ``make(name, original)`` returns the wrapper."""
        for name in names:
            self._patches.append((obj, name, make))
            if self.enabled:
                setattr(obj, name, make(name, getattr(obj, name)))

    def set(self, enabled: bool) -> None:
        if enabled == self.enabled:
            return
        self.enabled = enabled
        if enabled:
            requests_log.setLevel(logging.DEBUG)
        for obj, name, make in self._patches:
            if enabled:
                setattr(obj, name, make(name, getattr(obj, name)))
            else:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass
        requests_log.warning("per-request debug logging %s", "on" if enabled else "off")
        if not enabled:
            requests_log.setLevel(logging.NOTSET)

    def toggle(self) -> None:
        self.set(not self.enabled)


def traced_backend_call(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrapper for a backend coroutine method: ``backend NAME ARGS -> RESULT in MS``."""

    async def call(*args: Any, **kwargs: Any) -> Any:
        shown = ", ".join([_short(a) for a in args] + [f"{k}={_short(v)}" for k, v in kwargs.items()])
        start = time.monotonic()
        try:
            result = await method(*args, **kwargs)
        except BaseException as exc:
            requests_log.debug("backend %s(%s) -> %s: %s in %.1f ms", name, shown, type(exc).__name__, exc,
                               1000 * (time.monotonic() - start))
            raise
        requests_log.debug("backend %s(%s) -> %s in %.1f ms", name, shown, _short(result),
                           1000 * (time.monotonic() - start))
        return result

    return call
