"""The `vmctl` command line: one argparse parser, one module per command group.

Each command module exposes `register(subparsers)`, which adds its parser(s) and sets
`func` to a callable taking the parsed namespace and returning the process exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from .. import __version__
from ..errors import VmctlError
from . import boot, hostcheck, image, lifecycle

COMMAND_MODULES = (boot, hostcheck, image, lifecycle)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmctl",
        description="Declarative virtual machines over Linux KVM: boot throwaway guests, "
        "manage qcow2 overlays, compare VMs with containers.",
        epilog="Run `vmctl COMMAND --help` for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"vmctl {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is a guest command (vmctl run -- CMD), never our options.
    passthrough: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, passthrough = argv[:split], argv[split + 1 :]
    args = parser.parse_args(argv)
    args.passthrough = passthrough
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="vmctl: %(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except VmctlError as error:
        print(f"vmctl: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vmctl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
