"""`vmctl rm` of a machine whose machine.json is corrupt or truncated (a disk filled up, a
hand edit, a crash of something that did not write atomically).

Without the record vmctl does not know the backend or the pids, so it removes what the
folder itself shows: processes started on that folder (the VMM daemon and the container
monitor name it in their argv), the container's runtime state, cgroup and overlay
(container.json, written before the monitor starts), mounts below the folder, NAT rules of
TAPs that are gone; then the folder. Why not refuse: a broken record must never make a
machine impossible to clean up."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from ..errors import VmctlError
from ..proc import send_signal, wait_gone
from ..state import StateStore


def processes_on(folder: Path) -> list[int]:
    """Pids whose command line names the machine folder (never this process)."""
    wanted = str(folder).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.rstrip(b"/") == wanted for arg in argv):
            found.append(int(entry))
    return found


def mounts_below(folder: Path) -> list[str]:
    prefix = str(folder) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].encode().decode("unicode_escape") for line in mounts]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def salvage(store: StateStore, name: str, problem: VmctlError) -> str:
    """Release what a machine with an unreadable record holds and delete its folder; what
    was done, as one line. Raises when something could not be released."""
    folder = store.folder(name)
    if not folder.is_dir():
        raise problem
    pids = processes_on(folder)
    for pid in pids:
        send_signal(pid, signal.SIGKILL)
    for pid in pids:
        wait_gone(pid, 5)
    problems: list[str] = []
    from ..backends.container.monitor import PLAN, Plan, release

    if (folder / PLAN).exists():
        try:
            problems += release(folder, Plan.load(folder))
        except (OSError, ValueError, TypeError) as error:
            problems.append(f"{folder / PLAN}: unreadable: {error}")
    for point in mounts_below(folder):
        done = subprocess.run(["umount", point], capture_output=True, text=True)
        if done.returncode != 0:
            problems.append(f"umount {point}: {done.stderr.strip()}")
    if problems:  # never delete the folder through a mount that is still there
        raise VmctlError(f"{name}: not removed: {'; '.join(problems)}")
    from ..net.host import sweep_stale_rules

    sweep_stale_rules()
    store.delete(name)
    return f"{name}: removed despite an unreadable record ({problem}); killed {len(pids)} process(es)"
