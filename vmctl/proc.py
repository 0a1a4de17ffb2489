"""Processes and files every part of vmctl shares: liveness, signals, waits, atomic writes,
allocated bytes.

One implementation each, because the subtle parts are easy to get wrong twice: a zombie
still answers kill(pid, 0); a process name may contain ")" (so /proc/PID/stat is split at
the *last* parenthesis); a reader must never see half a JSON file.
"""

from __future__ import annotations

import json
import os
import select
import time
from pathlib import Path
from typing import Any

POLL = 0.05


def pid_alive(pid: int | None) -> bool:
    """The process exists and is not a zombie (exited, waiting to be reaped)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    return process_state(pid) not in ("Z", "X", None)


def process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, D, Z...), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "PID (COMM) STATE ...": COMM may itself contain ") ", so split at the last one.
    rest = stat.rpartition(")")[2].split()
    return rest[0] if rest else None


def send_signal(pid: int | None, sig: int) -> bool:
    """Signal `pid` if it exists; False when it is already gone."""
    if not pid:
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def reap(pid: int | None, block: bool = False) -> None:
    """Collect the exit status if `pid` is our own child, so it does not linger as a zombie.
    `block`: it is known to be exiting; wait for the end of its exit."""
    if pid:
        try:
            os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            pass


def wait_gone(pid: int | None, timeout: float, poll: float = POLL) -> bool:
    """Wait up to `timeout` seconds for `pid` to end (reaping it if it is our child).

    Through a pidfd, which becomes readable the moment the process exits: a poll loop woke
    up to `poll` seconds late, which was most of `vmctl rm`'s time (benchmarks-run.md)."""
    if not pid_alive(pid):
        reap(pid, block=True)
        return True
    assert pid is not None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:  # gone between the two checks
        reap(pid, block=True)
        return True
    except OSError:  # no pidfds (kernel < 5.3, seccomp): poll
        return _poll_gone(pid, timeout, poll)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.poll(max(timeout, 0.0) * 1000)  # readable once it exited (a zombie child included)
    finally:
        os.close(pidfd)
    if not pid_alive(pid):
        reap(pid, block=True)
        return True
    return False


def _poll_gone(pid: int, timeout: float, poll: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            reap(pid, block=True)
            return True
        reap(pid)
        time.sleep(poll)
    return not pid_alive(pid)


def allocated_bytes(path: Path) -> int:
    """Bytes allocated at and under `path` (st_blocks: sparse files count what they hold),
    hard links counted once, like `du -s`; 0 when it does not exist."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, dirs, files in os.walk(path):
        for name in [".", *dirs, *files] if root == str(path) else [*dirs, *files]:
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    if not seen and path.is_file():  # os.walk yields nothing for a file
        total = path.lstat().st_blocks * 512
    return total


def write_json_atomic(path: Path, data: Any, indent: int | None = None) -> None:
    """Write `data` as JSON so that readers see the old file or the new one, never a part."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(data, indent=indent))
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
