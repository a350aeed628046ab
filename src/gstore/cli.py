"""Command-line entry points: ``gstore-mount`` and ``gstore``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gstore import __version__
from gstore.config import ConfigError, build_mount_request, find_config, load_config


def mount_main(argv: Sequence[str] | None = None) -> int:
    """``gstore-mount [options] SPEC MOUNTPOINT``."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        request = build_mount_request(args)
    except ConfigError as exc:
        print(f"gstore-mount: {exc}", file=sys.stderr)
        return 2
    from gstore import daemon

    return daemon.run(request)


def main(argv: Sequence[str] | None = None) -> int:
    """``gstore SUBCOMMAND``: management commands."""
    parser = argparse.ArgumentParser(prog="gstore", description="Manage gstore mounts.")
    parser.add_argument("--version", action="version", version=f"gstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate the configuration file and list its mounts")
    check.add_argument("--config", help="configuration file (default: the usual lookup order)")
    args = parser.parse_args(argv)

    if args.command == "check-config":
        try:
            path = find_config(args.config)
            if path is None:
                print("no configuration file found; built-in mounts: local:, memory:")
                return 0
            mounts = load_config(path)
        except ConfigError as exc:
            print(f"gstore: {exc}", file=sys.stderr)
            return 2
        print(f"{path}: OK, {len(mounts)} mount(s)")
        for name, entry in sorted(mounts.items()):
            print(f"  {name}: {entry.get('protocol', '?')}://{entry.get('root', '')}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
