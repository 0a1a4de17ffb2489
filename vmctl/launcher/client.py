"""The client side of the launcher: hand a command to it, or say that it cannot.

Kept to the standard library's light modules (no argparse, no vmctl.vmm): this runs
before anything else in `vmctl`, and its whole point is a fast start.

`VMCTL_LAUNCHER`: unset or "0" never uses a launcher; "1" uses the default one (per user,
in $XDG_RUNTIME_DIR or /tmp) and starts it when it is not running, so the *next* command
is fast; any other value is the socket path of a launcher started by hand
(`python -m vmctl.launcher serve PATH`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
import time

ENV = "VMCTL_LAUNCHED"  # set in every process the launcher forked (no launcher inside a launched one)
SETTING = "VMCTL_LAUNCHER"
MAX_MESSAGE = 1 << 20
KILL_GRACE = 10.0  # seconds a VMM gets to end after SIGINT when its launcher vanished


def default_socket() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base, f"vmctl-launcher-{os.getuid()}", "launcher.sock")


def configured_socket() -> str | None:
    """The launcher socket $VMCTL_LAUNCHER asks for, or None (no launcher)."""
    setting = os.environ.get(SETTING, "")
    if setting in ("", "0") or os.environ.get(ENV):
        return None
    return default_socket() if setting == "1" else setting


def trusted_directory(path: str) -> bool:
    """The socket's folder is ours and closed to others (nobody else can plant a launcher)."""
    try:
        info = os.stat(os.path.dirname(path) or ".")
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077


def connect(path: str) -> socket.socket | None:
    """A connection to the launcher at `path`, or None when there is none (or a dead one)."""
    if not trusted_directory(path):
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        conn.connect(path)
    except OSError:  # no socket, or a socket nobody listens on: the launcher died
        conn.close()
        return None
    return conn


def submit(conn: socket.socket, argv: list[str], module: str = "vmctl.cli", fds: tuple[int, int, int] = (0, 1, 2),
           detach: bool = False) -> int | None:
    """Ask for `module.main()` with sys.argv = ["vmctl", *argv] in a fork; returns its pid,
    or None if the launcher refused or went away."""
    request = {"argv": argv, "module": module, "cwd": os.getcwd(), "env": dict(os.environ), "detach": detach}
    try:
        socket.send_fds(conn, [json.dumps(request).encode()], list(fds))
        reply = conn.recv(256).decode()
    except OSError:
        return None
    if not reply.startswith("pid "):
        return None
    return int(reply.split()[1])


def wait(conn: socket.socket, pid: int) -> int:
    """Relay interrupts to the launched process and return its exit status. If the launcher
    goes away first, the launched VMM is stopped too: nothing runs on without its client."""
    def relay(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)  # vmctl ends in order on each of them (vmctl.signals)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, relay) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                reply = conn.recv(256).decode()
            except InterruptedError:
                continue
            except OSError:
                reply = ""
            if reply.startswith("exit "):
                return int(reply.split()[1])
            if not reply:
                print("vmctl: error: the launcher went away; stopping the command it ran", file=sys.stderr)
                stop_orphan(pid)
                return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_orphan(pid: int) -> None:
    """Interrupt `pid` (not our child), then kill it if it has not ended after KILL_GRACE."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return  # already gone
    try:
        for sig, grace in ((signal.SIGINT, KILL_GRACE), (signal.SIGKILL, 5.0)):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return
            import select

            if select.select([pidfd], [], [], grace)[0]:
                return
    finally:
        os.close(pidfd)


def start_server(path: str) -> None:
    """Start a launcher at `path` in the background (its own session, no inherited fds)."""
    import subprocess

    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    subprocess.Popen([sys.executable, "-m", "vmctl.launcher", "serve", path], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def run_command(argv: list[str]) -> int | None:
    """`vmctl ARGV` through the configured launcher: its exit status, or None when the caller
    should run it itself (no launcher configured, none running: then one is started for
    the next command when $VMCTL_LAUNCHER is 1)."""
    path = configured_socket()
    if path is None:
        return None
    conn = connect(path)
    if conn is None:
        if os.environ.get(SETTING) == "1":
            start_server(path)
        return None
    with conn:
        pid = submit(conn, argv)
        return None if pid is None else wait(conn, pid)


def spawn_detached(module: str, argv: list[str], fds: tuple[int, int, int]) -> int | None:
    """A detached process (a VMM daemon) forked by the launcher: its pid, or None (no
    launcher: the caller spawns it itself). The launcher reaps it when it ends."""
    path = configured_socket()
    conn = connect(path) if path else None
    if conn is None:
        if path and os.environ.get(SETTING) == "1":
            start_server(path)
        return None
    with conn:
        return submit(conn, argv, module=module, fds=fds, detach=True)


def wait_for_server(path: str, timeout: float = 60.0) -> bool:
    """Until a launcher answers at `path` (tests, benchmarks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = connect(path)
        if conn is not None:
            conn.close()
            return True
        time.sleep(0.05)
    return False
