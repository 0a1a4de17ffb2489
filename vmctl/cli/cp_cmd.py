"""`vmctl cp`: copy files and trees between the host and a running machine."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import VmctlError


def register(subparsers: argparse._SubParsersAction) -> None:
    cp = subparsers.add_parser(
        "cp", help="copy files into or out of a running machine",
        usage="vmctl cp [--timeout S] SRC... NAME:DEST  |  vmctl cp NAME:SRC DEST",
        description="Copy files and directories (recursively, with modes and symlinks) between the host "
        "and the running machine NAME, as one tar stream: over SSH when the machine has an sshd on "
        "vmctl's network, else through the native VMM's transfer share (virtio-fs), else through the "
        "guest agent. DEST is a directory to copy into when it exists, else the new name.",
        epilog="examples:\n  vmctl cp ./src web:/srv/      # /srv/src in the guest\n"
               "  vmctl cp web:/var/log/app.log ./app.log",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    cp.add_argument("paths", nargs="+", metavar="PATH")
    cp.add_argument("--timeout", type=float, default=300, help="seconds for the whole copy (default 300)")
    cp.set_defaults(func=cmd_cp)


def _machine_path(text: str) -> tuple[str, str] | None:
    name, colon, path = text.partition(":")
    if colon and name and "/" not in name and path:
        return name, path
    return None


def cmd_cp(args: argparse.Namespace) -> int:
    from ..state import StateStore
    from ..transfer import channel_for, copy_in, copy_out

    if len(args.paths) < 2:
        raise VmctlError("cp: give a source and a destination (NAME:PATH on one side)")
    *sources, dest = args.paths
    store = StateStore()
    started = time.monotonic()
    into = _machine_path(dest)
    if into is not None:
        if any(_machine_path(s) for s in sources):
            raise VmctlError("cp: guest to guest is not supported; copy through the host")
        name, guest_path = into
        kind = copy_in(channel_for(store, store.load(name)), [Path(s) for s in sources], guest_path, args.timeout)
    else:
        if len(sources) != 1 or _machine_path(sources[0]) is None:
            raise VmctlError("cp: one of SRC or DEST must be NAME:PATH (a running machine)")
        name, guest_path = _machine_path(sources[0])
        kind = copy_out(channel_for(store, store.load(name)), guest_path, Path(dest), args.timeout)
    print(f"vmctl cp: done over {kind} in {time.monotonic() - started:.2f} s", file=sys.stderr)
    return 0
