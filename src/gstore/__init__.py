"""gstore: mount cloud object storage as a local directory.

``gstore.mount("s3://bucket/prefix")`` is a context manager that mounts for a
``with`` block (:mod:`gstore.api`); it is imported on first use, so importing
``gstore`` stays cheap for the daemon and the commands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from gstore.api import Mount, MountError, UploadError, mount

_API = ("Mount", "MountError", "UploadError", "mount")


def __getattr__(name: str) -> Any:
    if name in _API:
        from gstore import api

        return getattr(api, name)
    raise AttributeError(f"module 'gstore' has no attribute {name!r}")


__all__ = ["Mount", "MountError", "UploadError", "__version__", "mount"]
