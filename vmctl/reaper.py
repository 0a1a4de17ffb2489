"""Machines that never outlive their owner, and `vmctl prune`.

A machine started by the pytest plugin (or `vmctl up --owner-pid PID`) records its owner
process (pid + start time, so a reused pid is not mistaken for it). One watchdog process per
owner and state folder, `python -m vmctl.reaper STATE_DIR PID START`, holds a pidfd of the
owner and sleeps in poll(); when the owner ends, even by SIGKILL, the pidfd becomes readable
and the watchdog removes every machine of that owner through its backend (VMM or QEMU or
container stopped, TAP and NAT rule, overlays, state folder). The watchdog runs in its own
session, so the signal that killed the owner's process group does not reach it.

`prune()` does the same for owners that are already gone (a watchdog that was itself
killed), plus ephemeral machines whose process is dead, NAT rules of vanished TAPs, and
vmctl's persistent TAPs and container cgroups that nothing uses or records any more.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from .paths import state_dir
from .proc import pid_alive
from .state import MachineRecord, StateStore

log = logging.getLogger(__name__)
WATCHDOGS = "reapers"
CGROUP_GRACE = 60.0  # seconds: an empty cgroup younger than this may be a container starting  # in the state folder: one lock file per watched owner


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def owner_of(pid: int) -> dict:
    start = process_start(pid)
    if start is None:
        from .errors import VmctlError

        raise VmctlError(f"--owner-pid {pid}: no such process")
    return {"pid": pid, "start": start}


def owner_alive(owner: dict | None) -> bool:
    if not owner:
        return True  # no owner: lives until removed
    return pid_alive(owner["pid"]) and process_start(owner["pid"]) == owner["start"]


def _lock_path(root: Path, owner: dict) -> Path:
    return root / WATCHDOGS / f"{owner['pid']}-{owner['start']}.lock"


def ensure_watchdog(owner: dict, root: Path | None = None) -> None:
    """Start the owner's watchdog unless one already watches it for this state folder."""
    root = Path(root or state_dir())
    lock = _lock_path(root, owner)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a watchdog holds it
        fcntl.flock(handle, fcntl.LOCK_UN)
    ready_r, ready_w = os.pipe()
    subprocess.Popen([sys.executable, "-m", "vmctl.reaper", str(root), str(owner["pid"]), str(owner["start"]), str(ready_w)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, pass_fds=[ready_w], close_fds=True)
    os.close(ready_w)
    try:
        select.select([ready_r], [], [], 10)  # it holds the lock and the pidfd once this returns
    finally:
        os.close(ready_r)


def reap(store: StateStore, owner: dict) -> list[str]:
    """Remove every machine of `owner`; their names."""

    removed = []
    with store.locked():
        for name in store.names():
            try:
                record = store.load(name)
            except Exception as error:  # its owner cannot be read: say so, `vmctl prune` lists it too
                log.warning("%s: left alone, unreadable record (%s); vmctl rm %s removes it", name, error, name)
                continue
            if record.owner and record.owner.get("pid") == owner["pid"] and record.owner.get("start") == owner["start"]:
                _remove(store, record)
                removed.append(name)
    return removed


def _remove(store: StateStore, record: MachineRecord) -> None:
    from .backends import get_backend

    try:
        get_backend(record.backend).remove(store, record)
    except Exception as error:  # keep going: the others must go too
        log.warning("%s: %s", record.name, error)
        store.delete(record.name)


def watch(root: Path, owner: dict, ready_fd: int | None = None) -> list[str]:
    """Wait for the owner to end, then remove its machines."""
    lock = _lock_path(root, owner)
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return []  # another watchdog was faster
    try:
        try:
            pidfd = os.pidfd_open(owner["pid"])
        except ProcessLookupError:
            pidfd = None
        if ready_fd is not None:
            os.close(ready_fd)
        if pidfd is not None and process_start(owner["pid"]) == owner["start"]:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while not poller.poll():
                pass
        if pidfd is not None:
            os.close(pidfd)
        return reap(StateStore(root), owner)
    finally:
        lock.unlink(missing_ok=True)
        handle.close()


def prune(store: StateStore) -> list[str]:
    """What `vmctl prune` removes: messages, one per thing."""
    from .backends import get_backend

    done: list[str] = []
    with store.locked():
        for name in store.names():
            try:
                record = store.load(name)
            except Exception as error:  # say so: only `vmctl rm NAME` removes it (vmctl.cli.salvage)
                done.append(f"{name}: left alone, unreadable record ({error}); vmctl rm {name} removes it")
                continue
            if record.owner and not owner_alive(record.owner):
                _remove(store, record)
                done.append(f"{name}: removed (its owner, pid {record.owner['pid']}, is gone)")
            elif record.ephemeral and get_backend(record.backend).status(store, record).state in ("dead", "exited", "crashed"):
                _remove(store, record)
                done.append(f"{name}: removed (ephemeral, {record.backend} process gone)")
        done += [f"TAP {tap}: removed (its machine is gone, no process holds it)" for tap in sweep_orphan_taps()]
        done += [f"cgroup {path}: removed (empty, no machine)" for path in sweep_orphan_cgroups(store)]
    from .net.host import sweep_stale_rules

    rules = sweep_stale_rules()
    if rules:
        done.append(f"{rules} NAT rule(s) of vanished TAPs: removed")
    return done




def sweep_orphan_taps(prefix: str | None = None) -> list[str]:
    """vmctl's persistent TAPs (libvirt machines) whose machine folder is gone and that no
    process holds. Each carries its machine's folder in its alias (set when it is made), so
    machines of other state folders are told apart; a TAP without that alias is left alone.
    Native VMs' TAPs are not persistent at all: they vanish with their VMM."""
    from .net.host import TAP_ALIAS, TAP_PREFIX, _ip

    removed = []
    for name in sorted(os.listdir("/sys/class/net")):
        if not name.startswith(prefix or TAP_PREFIX) or not os.path.exists(f"/sys/class/net/{name}/tun_flags"):
            continue
        try:
            alias = Path(f"/sys/class/net/{name}/ifalias").read_text().strip()
        except OSError:
            continue
        if not alias.startswith(TAP_ALIAS) or (Path(alias[len(TAP_ALIAS):]) / "machine.json").exists():
            continue
        try:
            carrier = Path(f"/sys/class/net/{name}/carrier").read_text().strip()
        except OSError:
            carrier = "0"  # reading carrier of a down link fails: nobody attached
        if carrier == "1":
            continue
        try:
            _ip("link", "del", name)
            removed.append(name)
        except Exception as error:
            log.warning("prune: %s", error)
    return removed


def sweep_orphan_cgroups(store: StateStore) -> list[str]:
    """/vmctl/<id> container cgroups with no process in them and no machine recording them."""
    from .backends.container.runtime import CGROUP_PARENT, CGROUP_ROOT, cgroup_mode

    recorded = set()
    for name in store.names():
        try:
            recorded.update(store.load(name).resources.get("cgroup", []))
        except Exception:
            pass
    removed: list[str] = []
    if not CGROUP_ROOT.is_dir():
        return removed
    # v2 only (the nested host): one hierarchy, the root itself; else one per mounted v1 controller
    hierarchies = [CGROUP_ROOT] if cgroup_mode() == "unified" else list(CGROUP_ROOT.iterdir())
    for hierarchy in hierarchies:
        parent = hierarchy / CGROUP_PARENT
        if not parent.is_dir():
            continue
        for group in sorted(p for p in parent.iterdir() if p.is_dir()):
            if f"/{CGROUP_PARENT}/{group.name}" in recorded:
                continue
            try:
                if (group / "cgroup.procs").read_text().strip() or time.time() - group.stat().st_mtime < CGROUP_GRACE:
                    continue  # in use, or just made by a runtime that is about to join it
                for child in sorted(group.glob("**/"), key=lambda p: len(p.parts), reverse=True):
                    child.rmdir()
                removed.append(str(group))
            except OSError:
                continue
    return removed


def main(argv: list[str]) -> int:
    root, pid, start = Path(argv[0]), int(argv[1]), int(argv[2])
    ready = int(argv[3]) if len(argv) > 3 else None
    logging.basicConfig(level=logging.INFO, format="vmctl-reaper: %(message)s")
    removed = watch(root, {"pid": pid, "start": start}, ready)
    for name in removed:
        log.info("%s: removed (owner %d ended)", name, pid)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
