"""The `vmctl` command line: one argparse parser, one module per command group.

Each command module exposes `register(subparsers)`, which adds its parser(s) and sets
`func` to a callable taking the parsed namespace and returning the process exit code.
Only the module of the command being run is imported (all of them for `vmctl --help`): a
VMM started as `vmctl boot` should not pay for the spec, qcow2 and image code at start-up.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import TYPE_CHECKING, Sequence

from .. import signals
from ..errors import VmctlError

if TYPE_CHECKING:
    import argparse

# Commands a pre-initialised launcher may run (VMCTL_LAUNCHER, vmctl.launcher) when stdin is
# not a terminal (the launched process is not in the terminal's foreground process group, so
# it could not read it): `boot`, and the short commands whose cost is mostly the CLI's own
# start (exec and cp: one agent round trip is ~70 ms in the nested host, the CLI ~3 s).
# Not `up`/`run`: their VMM is already forked by the launcher (spawn_detached), which a
# launched process, being one itself, could not ask for.
LAUNCHABLE = ("boot", "exec", "cp", "ps", "status", "logs")

# Command modules in help order, and the module that registers each command.
COMMAND_MODULES = ("boot", "hostcheck", "image_cmd", "lifecycle", "snapshot_cmd", "compare", "share", "cp_cmd")
COMMAND_MODULE = {
    "boot": "boot", "host-check": "hostcheck", "image": "image_cmd", "compare": "compare", "share": "share", "cp": "cp_cmd",
    **dict.fromkeys(("up", "prune", "down", "ps", "status", "logs", "rm", "run", "exec", "console", "ssh"), "lifecycle"),
    **dict.fromkeys(("snapshot", "stop", "start"), "snapshot_cmd"),
}


def _modules_for(argv: Sequence[str]) -> tuple[str, ...]:
    """The command modules needed to parse `argv`: the command's own, or all of them."""
    command = next((word for word in argv if not word.startswith("-")), None)
    if command not in COMMAND_MODULE:
        return COMMAND_MODULES  # no or unknown command: argparse lists them all
    return (COMMAND_MODULE[command],)


def build_parser(argv: Sequence[str] | None = None) -> "argparse.ArgumentParser":
    """The parser for `argv` (only its command registered), or for every command. Built
    once per set of command modules: an argparse parser is a web of reference cycles, and
    one new parser per call left ~130 objects per command for the cyclic GC, which frees
    them only in its rare full collections (an in-process caller's RSS crept up by
    ~1.4 MiB per 1,000 up/ps/down/rm cycles: docs/reliability.md)."""
    return _parser_for(COMMAND_MODULES if argv is None else _modules_for(argv))


@functools.cache  # keys: one command module, or all of them
def _parser_for(modules: tuple[str, ...]) -> "argparse.ArgumentParser":
    import argparse
    import importlib

    from .. import __version__

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
    for name in modules:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def _through_launcher(argv: list[str]) -> int | None:
    """The exit status of `argv` run by the launcher, or None: run it here."""
    if os.environ.get("VMCTL_LAUNCHER", "0") in ("", "0"):
        return None
    command = next((word for word in argv if not word.startswith("-")), None)
    if command not in LAUNCHABLE or os.isatty(0):
        return None
    from ..launcher.client import run_command

    return run_command(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; no traceback reaches the user for a signal or a closed stdout."""
    signals.install()  # first: SIGTERM/SIGHUP clean up like Ctrl-C from here on
    try:
        return _main(argv)
    except KeyboardInterrupt as interrupt:  # signals.Interrupted too
        print(f"vmctl: interrupted{_by(interrupt)}", file=sys.stderr)
        return signals.exit_status(interrupt)
    except BrokenPipeError:
        # The reader went away (`vmctl ps | head -1`): say nothing more, like a tool killed
        # by SIGPIPE; stdout is pointed at /dev/null so the interpreter's last flush is quiet.
        _silence_stdout()
        return 128 + 13


def _by(interrupt: KeyboardInterrupt) -> str:
    from ..signals import Interrupted

    return f" ({interrupt.args[0]})" if isinstance(interrupt, Interrupted) and interrupt.signum != 2 else ""


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    launched = _through_launcher(argv)
    if launched is not None:
        return launched
    import logging

    # Everything after the first "--" is a guest command (vmctl run -- CMD), never our options.
    passthrough: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, passthrough = argv[:split], argv[split + 1 :]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    args.passthrough = passthrough
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="vmctl: %(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed stdout is a BrokenPipeError here, not at exit
        return code
    except VmctlError as error:
        print(f"vmctl: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
