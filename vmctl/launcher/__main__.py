"""`python -m vmctl.launcher serve [SOCKET] [--idle SECONDS]` | `stop [SOCKET]` | `status [SOCKET]`."""

from __future__ import annotations

import argparse
import sys

from .client import connect, default_socket


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmctl.launcher", description=__doc__)
    parser.add_argument("action", choices=("serve", "status", "stop"))
    parser.add_argument("socket", nargs="?", default=None, help="socket path (default: the per-user one)")
    parser.add_argument("--idle", type=float, default=None, help="exit after this many seconds with nothing to run")
    args = parser.parse_args(argv)
    path = args.socket or default_socket()
    if args.action == "serve":
        from .server import IDLE_SECONDS, Launcher, LauncherError

        try:
            return Launcher(path, args.idle if args.idle is not None else IDLE_SECONDS).serve()
        except LauncherError as error:
            print(f"vmctl launcher: {error}", file=sys.stderr)
            return 1
    conn = connect(path)
    if conn is None:
        print(f"no launcher at {path}")
        return 1 if args.action == "status" else 0
    conn.close()
    try:
        pid = int(open(path + ".pid").read())
    except (OSError, ValueError):
        print(f"launcher at {path} has no pid file")
        return 1
    if args.action == "status":
        print(f"launcher {pid} at {path}")
        return 0
    import os
    import signal

    os.kill(pid, signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
